"""examples/upload: a client that aborts mid-upload leaves no partial file behind.

The plugin's ``drop(after_request_bytes=N)`` is the raw client: it sends the headers with the
whole body's Content-Length (8 MiB) and only N bytes of it, then resets or closes the
connection. aiodelay cancels the handler, whose cleanup removes the partial file: the upload
directory is empty afterwards. A complete upload is kept under its name, and only it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from aiodelay.pytest_plugin import AiodelayServer
from examples.upload import app as upload
from tests._services import free_port, run_example
from tests.conftest import Drop

BODY = bytes(range(256)) * (32 * 1024)  # 8 MiB
SENT = 3 * upload.CHUNK + 100  # what the client sends of it before it leaves


@pytest.mark.parametrize("how", ["RST", "FIN"])
async def test_an_aborted_upload_is_cancelled_and_its_partial_file_removed(
    aiodelay_server: AiodelayServer, tmp_path: Path, how: Drop
) -> None:
    app = await upload.create_app(tmp_path)
    server = await aiodelay_server(app)

    outcome = await server.drop(
        "PUT", "/files/big.bin", data=BODY, how=how, after_request_bytes=SENT
    )

    [record] = app[upload.UPLOADS]
    print(f"\nupload dropped by {how} after {SENT} of {len(BODY)} bytes sent: {record}")
    assert outcome.cancelled, outcome
    assert record.stopped == "cancelled", record
    assert record.written <= SENT, record
    assert os.listdir(tmp_path) == []  # neither the partial file nor a target


async def test_a_complete_upload_is_kept_under_its_name(
    aiodelay_server: AiodelayServer, tmp_path: Path
) -> None:
    app = await upload.create_app(tmp_path)
    server = await aiodelay_server(app)
    async with (
        aiohttp.ClientSession() as session,
        session.put(server.make_url("/files/big.bin"), data=io.BytesIO(BODY)) as response,
    ):
        assert response.status == 201
        assert await response.json() == {"name": "big.bin", "bytes": len(BODY)}
    assert os.listdir(tmp_path) == ["big.bin"]  # and no partial file
    assert (tmp_path / "big.bin").read_bytes() == BODY
    [record] = app[upload.UPLOADS]
    assert (record.written, record.stopped) == (len(BODY), "completed")


async def test_an_upload_over_the_limit_is_refused_and_removed(
    aiodelay_server: AiodelayServer, tmp_path: Path
) -> None:
    app = await upload.create_app(tmp_path, max_bytes=len(BODY) // 2)
    server = await aiodelay_server(app)
    async with (
        aiohttp.ClientSession() as session,
        session.put(server.make_url("/files/big.bin"), data=io.BytesIO(BODY)) as response,
    ):
        assert response.status == 413
    assert os.listdir(tmp_path) == []
    assert app[upload.UPLOADS][0].stopped == "too large"


# As sent on the wire: "%2E%2E" is "..", "a%2Fb" is "a/b", once decoded.
@pytest.mark.parametrize("name", ["%2E%2E", ".hidden", "a%2Fb", "x" * 300])
async def test_a_bad_file_name_is_refused(
    aiodelay_server: AiodelayServer, tmp_path: Path, name: str
) -> None:
    server = await aiodelay_server(await upload.create_app(tmp_path))
    async with (
        aiohttp.ClientSession() as session,
        session.put(URL(f"{server.url}/files/{name}", encoded=True), data=b"x") as response,
    ):
        assert response.status == 400
    assert os.listdir(tmp_path) == []


async def test_create_app_rejects_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        await upload.create_app(tmp_path / "missing")


async def test_run_as_the_readme_says_on_the_port_given(tmp_path: Path) -> None:
    port = free_port()
    async with (
        run_example("upload/app.py", str(tmp_path), port=port),
        aiohttp.ClientSession() as session,
        session.put(f"http://127.0.0.1:{port}/files/notes.txt", data=b"kept") as resp,
    ):
        assert resp.status == 201, await resp.text()
    assert (tmp_path / "notes.txt").read_bytes() == b"kept"
