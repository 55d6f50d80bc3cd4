"""The nodes of a flow's graph, one per module, each with torchdata's ``reset(initial_state)`` /
``get_state()`` / ``next()`` contract and plain-dict state; :mod:`.graph` walks a built graph."""
