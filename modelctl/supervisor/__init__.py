"""The supervisor: its loop, reconcile, per-instance runtime, held sockets, on-demand servers,
replacements, the health watch, the budget, stops, chores, the daemon and the client commands use."""
