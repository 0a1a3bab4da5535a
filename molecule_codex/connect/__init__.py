"""External Connect: the codex agent on an operator's own machine, talking to the Molecule platform.

The platform's External Connect contract (register, heartbeat, activity feed, notify, peer A2A,
inbound secret) is implemented here; turns run through the same adapter, executor and A2A request
handler as ``molecule-codex serve``. Modules, one job each:

* :mod:`.platform` - the HTTP client for the platform (auth headers, errors, backoff), token lookup;
* :mod:`.state` - the inbox state file (cursor, handled rows, undelivered replies), 0600, atomic;
* :mod:`.inbox` - poll mode: feed → conversation → turn → reply, exactly once across restarts;
* :mod:`.heartbeat` - heartbeat payloads and loop, active-turn tracking;
* :mod:`.push` - push mode: the A2A app behind the platform's inbound-secret bearer;
* :mod:`.runner` - wiring for ``molecule-codex connect``.
"""
