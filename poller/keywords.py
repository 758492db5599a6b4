"""Opt-out and opt-in keywords as a person types them on a phone.

A message is a keyword when, once folded, it is the keyword and nothing else: Unicode
compatibility folding (full-width letters, ligatures), zero-width and other invisible format
characters removed, punctuation, symbols and emoji stripped from both ends, runs of spaces made
one, case ignored. So `Stop.`, `STOP!`, `ＳＴＯＰ`, `stop 🛑` and `"Stop"` are STOP; `stop it` and
`S.T.O.P` are not. Keywords from the settings are folded the same way.
"""

from __future__ import annotations

import unicodedata

# Unicode categories stripped from a message's two ends: punctuation, symbols (emoji among
# them), marks (an emoji's variation selector, a keycap) and spaces.
AROUND = ("P", "S", "M", "Z")


def fold(text: str) -> str:
    """`text` as it is compared with a keyword."""
    folded = unicodedata.normalize("NFKC", text)
    visible = "".join(c for c in folded if unicodedata.category(c) != "Cf")
    start, end = 0, len(visible)
    while start < end and _around(visible[start]):
        start += 1
    while end > start and _around(visible[end - 1]):
        end -= 1
    return " ".join(visible[start:end].split()).casefold().upper()


def _around(char: str) -> bool:
    return char.isspace() or unicodedata.category(char)[0] in AROUND
