"""Rolling campaigns up at the end of each tick: the counts of what this tick ended, one `$inc`
per campaign; completion, detected without reading the whole campaign; and a full recount only
where the counts cannot tell (a campaign seen for the first time, messages the web app marked
done or removed, a crash between an outcome and its count)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from poller.context import Context
from poller.contract import done
from poller.counts import TickCounts
from poller.stats import complete
from poller.store.campaigns import RECOUNTS_PER_TICK, Flags, due_recount

# At most this many messages the web app marked done are taken out of one campaign's queue
# while looking for one that is still open.
RETIRES_PER_CHECK = 20


def rollup(
    t: Context, flags: Flags | None, counts: TickCounts, now: datetime, regular: bool
) -> None:
    """Count what this tick changed in each campaign, and complete those that are done. At a
    `regular` tick (one a POLL_INTERVAL_SECONDS), every open campaign is checked too: the web
    app may have deleted its last open message."""
    tally, checked = counts.stats, set()
    for campaign, change in tally.campaigns().items():
        stats = t.store.campaigns.add(campaign, change) if change else None
        first_seen = stats is None and bool(change)
        if stats is None or str(campaign) in tally.recounts or complete(stats):
            _check(t, campaign, now, counts, recount=first_seen or str(campaign) in tally.recounts)
            checked.add(str(campaign))
    if flags is None:
        return
    working = {str(c["_id"]) for c in flags.working}
    for key in sorted(tally.seen - working - checked):  # seen for the first time: counted
        _check(t, tally.ids[key], now, counts, recount=True)
        checked.add(key)
    if not regular:
        return
    budget = RECOUNTS_PER_TICK
    for campaign in flags.working:
        if str(campaign["_id"]) in checked:
            continue
        recount = budget > 0 and due_recount(campaign, now)
        budget -= recount
        _check(t, campaign["_id"], now, counts, recount)
    t.memory.checked_at = now


def _check(t: Context, campaign: Any, now: datetime, counts: TickCounts, recount: bool) -> None:
    """Complete the campaign when none of its messages can still be sent (one indexed read
    finds one that can); recount it in full when asked to, or when that completes it."""
    messages, plans = t.store.messages, t.store.plans
    found = plans.campaign_open(campaign)
    for _ in range(RETIRES_PER_CHECK):
        if found is None or found.get("isPicked") is True or not done(found):
            break
        messages.retire([found], counts.stats)
        recount = True
        found = plans.campaign_open(campaign)
    if found is None or recount:
        t.store.campaigns.recount(campaign, now)
