"""An upload endpoint that streams the request body to disk, and when the client aborts
mid-upload, stops writing and removes the partial file.

``PUT /files/{name}`` writes the body, chunk by chunk as it arrives, to a hidden partial file
next to the target, and renames it to ``name`` only once the whole body is there: a reader of
the directory never sees half a file under the real name. When the client leaves mid-upload,
aiodelay cancels the handler where it waits for the next chunk; the ``except BaseException``
cleanup closes and deletes the partial file. (Cleanup under ``except Exception`` would leave it
behind: ``asyncio.CancelledError`` is not an ``Exception``.) Without aiodelay, aiohttp would
raise a ``ConnectionResetError`` from the body read instead, at the same place: the cleanup
covers both.

Not promised: a client that stalls without closing its connection is not seen (that needs a
read timeout); the chunk being written when the client leaves is written, then deleted.

Each upload is recorded in ``app[UPLOADS]`` (bytes written, how it stopped), which the app
logs and the test reads. Run it: ``python examples/upload/app.py DIRECTORY [--port PORT]``, then
``curl -T big.iso http://127.0.0.1:8080/files/big.iso`` and Ctrl-C curl halfway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiohttp import web

import aiodelay

__all__ = ("UPLOADS", "Upload", "create_app", "main")

CHUNK = 64 * 1024
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")  # no path, not hidden


@dataclass
class Upload:
    """One upload: ``written`` bytes so far, and how it stopped (``running`` while it runs)."""

    name: str
    written: int = 0
    stopped: Literal["running", "completed", "cancelled", "failed", "too large"] = "running"


UPLOADS = web.AppKey("uploads", list[Upload])
DIRECTORY = web.AppKey("directory", Path)
MAX_BYTES = web.AppKey("max_bytes", int)

log = logging.getLogger("upload")


async def put_file(request: web.Request) -> web.Response:
    """Store the body as ``name`` in the app's directory: 201 with the size once complete."""
    app = request.app
    name = request.match_info["name"]
    if not NAME.fullmatch(name):
        raise web.HTTPBadRequest(text=f"bad file name {name!r}\n")
    upload = Upload(name)
    app[UPLOADS].append(upload)
    directory = app[DIRECTORY]
    # A unique hidden partial file: two uploads of one name do not write into each other.
    partial = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by the finally below)
        dir=directory, prefix=f".{name}.", suffix=".part", delete=False
    )
    try:
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                if upload.written + len(chunk) > app[MAX_BYTES]:
                    upload.stopped = "too large"
                    raise web.HTTPRequestEntityTooLarge(
                        max_size=app[MAX_BYTES], actual_size=upload.written + len(chunk)
                    )
                # To the page cache: a chunk's write does not hold the loop for long.
                partial.write(chunk)
                upload.written += len(chunk)
        finally:
            partial.close()
        os.replace(partial.name, directory / name)  # metadata only: quick
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial.name)
        if isinstance(error, asyncio.CancelledError):
            upload.stopped = "cancelled"
            log.info("%s: client left after %d bytes, partial file removed", name, upload.written)
        elif upload.stopped == "running":
            upload.stopped = "failed"
        raise
    upload.stopped = "completed"
    return web.json_response({"name": name, "bytes": upload.written}, status=201)


async def create_app(directory: Path, *, max_bytes: int = 1 << 30) -> web.Application:
    """Uploads into ``directory`` (which must exist), at most ``max_bytes`` each."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, got {max_bytes!r}")
    app = web.Application()
    aiodelay.setup(app)
    app[DIRECTORY] = directory
    app[MAX_BYTES] = max_bytes
    app[UPLOADS] = []
    app.router.add_put("/files/{name}", put_file)
    return app


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="examples/upload/app.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("directory", type=Path, help="where the uploaded files go")
    parser.add_argument(
        "--port", type=_port, default=8080, help="port of 127.0.0.1 (default: 8080)"
    )
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")
    logging.basicConfig(level=logging.INFO)
    try:
        web.run_app(create_app(args.directory), host="127.0.0.1", port=args.port)
    except OSError as exc:  # the port is taken, or not ours to listen on
        print(
            f"examples/upload: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _port(text: str) -> int:
    """A TCP port, 1 to 65535, for argparse (which makes a bad one a one-line error)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1 to 65535): {text!r}")
    return int(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
