"""Stand-ins for the demo and the tests: a WAHA simulator and an embedded MongoDB server."""
