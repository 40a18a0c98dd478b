"""``.rpy`` scripts: Python files that define a module-level ``resource`` to serve a request.

``resource`` is an :class:`aiodelay.Resource` instance, an aiohttp handler (``async def
resource(request)``, a plain function, or a ``web.View`` class).  ``@aiodelay.shielded``,
``@aiodelay.cancellable``, ``@aiodelay.deadline`` and ``@aiodelay.grace`` on it (or on the
``Resource`` subclass) are honoured, as on any route.

A script is executed on its first request and again only when its file changes (modification
time, size or inode): Twisted re-executes on every request, we reload on change.  A script that
fails to load, or defines no usable ``resource``, gives a :class:`ScriptError` with a one-line
reason; the traceback goes to the ``aiodelay.site`` logger, once per version of the file.

Not promised: the module-level code runs on the event loop's thread (a slow script blocks the
server while it loads); a script is not a real module (it is not in ``sys.modules``).
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .._core.policy import copy_marks
from .._resource import Resource

__all__ = ("ScriptError", "Scripts")

logger = logging.getLogger("aiodelay.site")

RouteHandler = Handler | type[web.View]


class ScriptError(Exception):
    """A script cannot serve requests; ``str()`` is a one-line reason meant for the client."""


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int, int]
    handler: RouteHandler | None
    error: str | None


class Scripts:
    """The scripts of one served directory, each loaded once per version of its file."""

    def __init__(self) -> None:
        self._loaded: dict[Path, _Loaded] = {}

    def handler(self, path: Path) -> RouteHandler:
        """The route handler of the script at ``path``; ``ScriptError`` if it cannot serve."""
        try:
            st = path.stat()
        except OSError as exc:
            raise ScriptError(f"{path.name}: cannot read the script: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        loaded = self._loaded.get(path)
        if loaded is None or loaded.stamp != stamp:
            loaded = _load(path, stamp)
            self._loaded[path] = loaded
        if loaded.handler is None:
            raise ScriptError(loaded.error)
        return loaded.handler


def _load(path: Path, stamp: tuple[int, int, int]) -> _Loaded:
    try:
        source = path.read_bytes()
        code = compile(source, str(path), "exec", dont_inherit=True)
        module = types.ModuleType(f"aiodelay.script:{path.name}")
        module.__file__ = str(path)
        exec(code, module.__dict__)  # the point of a script
        resource = module.__dict__.get("resource", _MISSING)
        handler = _as_handler(path.name, resource)
    except ScriptError as exc:
        logger.error("script %s: %s", path, exc)
        return _Loaded(stamp, None, str(exc))
    except (Exception, SystemExit) as exc:  # a script's sys.exit() must not stop the server
        logger.exception("script %s failed to load", path)
        return _Loaded(stamp, None, f"{path.name}: {_one_line(exc, path)}")
    logger.info("loaded script %s", path)
    return _Loaded(stamp, handler, None)


_MISSING: Any = object()


def _as_handler(name: str, resource: object) -> RouteHandler:
    if resource is _MISSING:
        raise ScriptError(f"{name} defines no module-level `resource`")
    if isinstance(resource, type) and issubclass(resource, Resource):
        cls = resource.__name__
        raise ScriptError(f"{name}: `resource` is the class {cls}; use `resource = {cls}()`")
    if isinstance(resource, type) and issubclass(resource, web.View):
        return resource
    if isinstance(resource, Resource):
        return _keep_marks(resource, resource.render)
    if callable(resource):
        if inspect.iscoroutinefunction(resource):
            return resource
        return _keep_marks(resource, _awaiting(resource))
    raise ScriptError(
        f"{name}: `resource` must be an aiodelay.Resource or an aiohttp handler, "
        f"not {type(resource).__name__}"
    )


def _awaiting(func: Any) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        result = func(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, web.StreamResponse):
            raise TypeError(f"{func!r} returned {type(result).__name__}, not a StreamResponse")
        return result

    return handler


def _keep_marks(marked: object, handler: Handler) -> Handler:
    """``handler``, carrying the marks ``marked`` carries (policy, deadline, grace)."""
    return copy_marks(marked, handler) or handler


def _one_line(exc: BaseException, path: Path) -> str:
    """``NameError: name 'x' is not defined (line 3)``: the script's own line, if known."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):  # the name it was compiled with
            line = tb.tb_lineno
        tb = tb.tb_next
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return f"{text} (line {line})" if line is not None else text
