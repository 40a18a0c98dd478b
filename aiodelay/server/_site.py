"""Serving a directory: static files, directory listings or ``index.html``, and ``.rpy`` scripts.

:func:`create_app` builds the app ``python -m aiodelay --path DIR`` runs.  A request path is
mapped to a file under DIR only if every segment is a plain name: a request that tries to leave
DIR (``..``, ``%2e%2e``, ``%2f``, backslashes, NUL, an absolute path, a symlink resolving
outside DIR) gets 404 before anything is read or executed; so does any name starting with ``.``.

Each script is its own route (``request.match_info.handler`` is the script's handler), so the
aiodelay middleware applies the script's own marks (``@aiodelay.shielded`` / ``@cancellable``,
``@aiodelay.deadline``, ``@aiodelay.grace``) as on any route.

Not promised: a symlink swapped between the check and the open is followed (serve directories
whose symlinks you trust); a listing shows names, never sizes or dates.
"""

from __future__ import annotations

import html
import logging
import stat
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from aiohttp import web
from yarl import URL

from .._core.installation import ROUTES_PER_REQUEST
from .._core.middleware import setup
from .._core.policy import Policy
from ._history import keep_history
from ._script import RouteHandler, ScriptError, Scripts

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import _InfoDict

_Resolve = tuple["web.UrlMappingMatchInfo | None", set[str]]

__all__ = ("DirectoryResource", "create_app")

logger = logging.getLogger("aiodelay.site")

SCRIPT_SUFFIX = ".rpy"
_READ_METHODS = ("GET", "HEAD")


def create_app(
    root: Path | str, *, scripts: bool = True, policy: Policy | str = Policy.CANCEL
) -> web.Application:
    """An app with aiodelay set up (``policy``) that serves the directory ``root``, and keeps
    a history of its interrupted requests (``aiodelay.server.history_of(app)``: what the demo's
    status page shows).

    ``scripts=False`` is static-only mode: ``.rpy`` files are neither run nor served; a request
    for one gets a 404 page saying that scripts are off.
    Raises ``OSError`` if ``root`` is not a readable directory.
    """
    app = web.Application()
    setup(app, policy=policy)
    keep_history(app)
    app.router.register_resource(DirectoryResource(root, scripts=scripts))
    return app


def request_segments(raw_path: str) -> list[str] | None:
    """The decoded names in a raw (still %-encoded) request path, or None if it is not safe.

    ``"/a/b%20c/"`` gives ``["a", "b c", ""]``: the last segment is empty for a trailing slash.
    """
    if not raw_path.startswith("/"):
        return None
    segments: list[str] = []
    raw_segments = raw_path[1:].split("/")
    for index, raw in enumerate(raw_segments):
        try:
            name = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
        if not name:
            if index == len(raw_segments) - 1:  # a trailing slash (or the root itself)
                segments.append(name)
                continue
            return None  # "//": an absolute path in disguise
        if name.startswith(".") or any(c in name for c in "/\\\0"):
            return None  # "..", ".hidden", "%2f", backslashes, NUL
        if PurePath(name).is_absolute() or len(PurePath(name).parts) != 1:
            return None  # "C:" and the like, where the OS reads them so
        segments.append(name)
    return segments


class DirectoryResource(web.AbstractResource):
    """An aiohttp router resource for every path under ``/``: a file, listing or script of DIR."""

    def __init__(self, root: Path | str, *, scripts: bool = True) -> None:
        super().__init__()
        self._root = Path(root).resolve(strict=True)
        if not self._root.is_dir():
            raise NotADirectoryError(f"not a directory: {root}")
        next(self._root.iterdir(), None)  # PermissionError now rather than per request
        self._scripts = Scripts() if scripts else None
        # A script's route is made when its request comes: aiodelay looks for the deadline
        # of each (a script's @aiodelay.deadline), not only of the routes it saw at the start.
        setattr(self, ROUTES_PER_REQUEST, scripts)
        self._route = web.ResourceRoute("*", self._serve, self)
        self._scripts_off_route = web.ResourceRoute("*", _scripts_off, self)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        return URL.build(path="/" + kwargs.get("path", ""))

    def add_prefix(self, prefix: str) -> None:
        raise NotImplementedError("a served directory cannot be mounted under a prefix")

    def get_info(self) -> _InfoDict:
        return {"directory": self._root}

    def raw_match(self, path: str) -> bool:
        return False

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[web.AbstractRoute]:
        return iter([self._route])

    def __repr__(self) -> str:
        return f"<DirectoryResource {self._root}>"

    async def resolve(self, request: web.Request) -> _Resolve:
        raw_path = request.rel_url.raw_path
        target = self.locate(raw_path)
        if self._scripts is None and _names_a_script(raw_path, target):
            # Whether or not the script exists: the answer says only that scripts are off.
            return web.UrlMappingMatchInfo({}, self._scripts_off_route), set()
        if target is None:
            return None, set()
        if target.suffix.lower() == SCRIPT_SUFFIX and target.is_file():
            if self._scripts is None:
                return None, set()  # a link to a script, under another name
            handler: RouteHandler
            try:
                handler = self._scripts.handler(target)
            except ScriptError as exc:
                handler = _failed_script(str(exc))
            route = web.ResourceRoute("*", handler, self)
        else:
            route = self._route
        return web.UrlMappingMatchInfo({"path": str(target)}, route), set()

    def locate(self, raw_path: str) -> Path | None:
        """The file or directory under the root that ``raw_path`` names, or None (a 404)."""
        segments = request_segments(raw_path)
        if segments is None:
            return None
        try:
            target = self._root.joinpath(*segments).resolve(strict=True)
            st = target.stat()
        except (OSError, RuntimeError):  # missing, a symlink loop, a name too long, ...
            return None
        if target != self._root and self._root not in target.parents:
            return None  # a symlink out of the root
        if any(part.startswith(".") for part in target.relative_to(self._root).parts):
            return None  # a symlink to a dotfile
        if stat.S_ISDIR(st.st_mode):
            return target
        if not stat.S_ISREG(st.st_mode) or segments[-1] == "":
            return None  # a FIFO or device; or "file.txt/"
        return target

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if request.method not in _READ_METHODS:
            raise web.HTTPMethodNotAllowed(request.method, _READ_METHODS)
        return self._static_response(request, Path(request.match_info["path"]))

    def _static_response(self, request: web.Request, target: Path) -> web.StreamResponse:
        if not target.is_dir():
            return web.FileResponse(target)  # range and conditional requests included
        url = request.rel_url
        if not url.raw_path.endswith("/"):  # relative links in the page need the slash
            query = "?" + url.raw_query_string if url.raw_query_string else ""
            raise web.HTTPMovedPermanently(url.raw_path + "/" + query)
        index = target / "index.html"
        if index.is_file():
            return web.FileResponse(index)
        return web.Response(text=self._listing(target, request.path), content_type="text/html")

    def _listing(self, directory: Path, path: str) -> str:
        items = []
        for entry in sorted(directory.iterdir(), key=lambda p: p.name):
            name = entry.name
            if self.locate_child(directory, name) is None:
                continue
            if self._scripts is None and name.lower().endswith(SCRIPT_SUFFIX):
                continue
            if entry.is_dir():
                name += "/"
            items.append(f'<li><a href="{quote(name)}">{html.escape(name)}</a></li>')
        title = html.escape(f"Index of {path}")
        parent = '<li><a href="../">../</a></li>' if directory != self._root else ""
        return (
            f"<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>{title}</title></head>"
            f"<body><h1>{title}</h1><ul>{parent}{''.join(items)}</ul></body></html>\n"
        )

    def locate_child(self, directory: Path, name: str) -> Path | None:
        """What a link to ``name`` in the listing of ``directory`` would serve (None: hidden)."""
        relative = directory.relative_to(self._root).parts
        return self.locate("/" + "/".join(quote(part) for part in (*relative, name)))


def _names_a_script(raw_path: str, target: Path | None) -> bool:
    """The safe request path ends in a ``.rpy`` name that is not a directory's."""
    segments = request_segments(raw_path)
    if not segments or not segments[-1].lower().endswith(SCRIPT_SUFFIX):
        return False
    return target is None or not target.is_dir()


_SCRIPTS_OFF_PAGE = """<!DOCTYPE html>
<html><head><meta charset=utf-8><title>404: scripts are off</title></head><body>
<h1>404 Not Found: scripts are off</h1>
<p>This server serves static files only (<code>python -m aiodelay --no-scripts</code>):
<code>.rpy</code> scripts are neither run nor shown. Start it without <code>--no-scripts</code>
to run them.</p>
<p><a href="./">Back</a></p>
</body></html>
"""


async def _scripts_off(request: web.Request) -> web.StreamResponse:
    return web.Response(status=404, text=_SCRIPTS_OFF_PAGE, content_type="text/html")


def _failed_script(reason: str) -> RouteHandler:
    async def failed(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text=f"500 Internal Server Error: {reason}\n")

    return failed
