"""``python -m aiodelay`` as a library: a directory served as ``twistd -n web --path .``
serves it, with ``.rpy`` resource scripts and Twisted-style resources
(:class:`aiodelay.Resource`, :class:`aiodelay.ResourceRequest`, :data:`aiodelay.NOT_DONE_YET`).

- :func:`create_app`: the site as an ``aiohttp.web.Application``, to run it your own way.
- :func:`main`: the command line (``python -m aiodelay --help``).
- :func:`keep_history`, :func:`history_of`, :class:`History`, :class:`Interruption`: an app's
  last interrupted requests, as the demo's status page shows them.
"""

from ._cli import main
from ._history import History, Interruption, history_of, keep_history
from ._site import create_app

__all__ = ("History", "Interruption", "create_app", "history_of", "keep_history", "main")
