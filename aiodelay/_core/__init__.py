"""aiodelay's core: what happens to a request when its client leaves or its deadline passes.

Read it top-down, the way a request goes (each module imports only modules below it):

- ``degraded``: on an aiohttp that lacks an internal aiodelay relies on (none that CI tests
  does), the middleware that ``setup()`` installs instead, after one WARNING: it touches no
  aiohttp internal and falls back on aiohttp's own ``handler_cancellation``.
- ``middleware``: ``setup(app)``, ``middleware()``, ``stats(app)``. Gives each request its
  state, runs the handler with its deadline armed, and hands the end to ``outcome``.
- ``requests``, ``shield``: the public functions that ask about a request or protect a part
  of its handler; they find the request's state and ask it.
- ``outcome``: the only code that decides how a request ended, counts it, writes its INFO
  line, makes aiohttp's access log say what went on the wire, and tells the observers; also
  what a connection's events (the client left, the connection closed) do to its request.
- ``state``: one request's state (``RequestState``), its phases in one table.
- ``installation``: what one ``setup()`` keeps, and each route's plan (policy, deadline,
  grace, the installations on its way).
- ``aiohttp_internals``: the only module that knows how aiohttp's server is built, and the
  one list of the internals it relies on, looked for on import (``MISSING``); its ``Watch``
  stands between a connection's transport and aiohttp and hears the peer leave.
  Below it, ``hangups`` (the kernel's word on a peer behind unread data) and ``teardown``
  (a connection's teardown deferred until its handler saw its cancellation).
- Leaves that every layer may use: ``errors``, ``policy``, ``stats``, ``observe``, ``owned``
  (a request's timers, tasks, threads), ``client`` (the client address the app trusts).
"""
