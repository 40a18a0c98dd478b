"""The README's quick start and example, held to what the README says they do.

The quick start is exactly two commands (one serves the demo, one runs the tests), and CI runs
the second one verbatim, so the two cannot drift apart; the docs' quick start page shows the
same commands and example. The example is run as written, in a real subprocess, and must log
the line the README shows when its client leaves. The example of the docs' *Testing your
handlers* page passes under pytest as written.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytest_plugins = ("pytester",)

README = (ROOT / "README.md").read_text(encoding="utf-8")
QUICK_START_PAGE = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
TESTING_PAGE = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")


def _section(title: str, text: str = README) -> str:
    """The text under ``## title`` (of the README), up to the next ``## `` heading."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found is not None, f"no '## {title}' section"
    return found.group(1)


def _fenced(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of ``text``, as (language, code)."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)


def _quick_start() -> list[str]:
    """The commands of the quick start: its lines that are not blank and not comments."""
    blocks = _fenced(_section("Quick start"))
    assert [language for language, _ in blocks] == ["sh"]
    lines = blocks[0][1].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_quick_start_is_two_commands_one_serves_one_tests() -> None:
    commands = _quick_start()
    assert len(commands) == 2, commands
    assert not [command for command in commands if command.endswith("\\")]  # no continuations
    serve, test = commands
    assert serve.endswith("&& python -m aiodelay")
    assert test.endswith("&& pytest")
    # Each line brings its own virtualenv: Debian's system pip refuses to install packages.
    for command in commands:
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    _, test = _quick_start()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    runs = [
        line
        for line in map(str.strip, ci.splitlines())
        if line == test or line.startswith(test + " ")
    ]
    assert len(runs) == 1, f".ci/run should run {test!r} once, as a line of its own"


def test_readme_links_only_to_files_that_exist() -> None:
    # Relative links (not URLs), without their anchor.
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    assert {"CHANGELOG.md", "LICENSE", "docs/quickstart.md"} <= set(links)
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_quick_start_page_shows_the_readmes_commands_and_example() -> None:
    # The page explains more around them; the commands and the example are the same text.
    readme_commands = _fenced(_section("Quick start"))
    assert _fenced(_section("The two set-up commands", QUICK_START_PAGE)) == readme_commands
    code, shown = _example()
    page_example = [code for _, code in _fenced(_section("Example", QUICK_START_PAGE))]
    assert page_example[:2] == [code, shown + "\n"]


# Runs the README's example text unchanged, with two hooks that only the test adds:
# web.run_app() listens on 127.0.0.1 and a free port instead of the example's default
# (0.0.0.0:8080), and an aiodelay observer prints "started <path>" when a handler starts, so
# that the test leaves while the handler runs (waiting for that line, not sleeping).
BOOTSTRAP = """
import sys

from aiohttp import web

from aiodelay import add_observer


class Started:
    def request_started(self, request):
        print("started", request.path, flush=True)

    def request_lost(self, request, lost):
        pass

    def request_ended(self, request, outcome):
        pass


run_app = web.run_app


def run_on_the_test_port(app, **kwargs):
    add_observer(app, Started())
    run_app(app, host="127.0.0.1", port=int(sys.argv[1]), **kwargs)


web.run_app = run_on_the_test_port
exec(compile(sys.argv[2], "README.md", "exec"), {"__name__": "__main__"})
"""


def _example() -> tuple[str, str]:
    """The README's example program and the log line it says the program writes."""
    blocks = _fenced(_section("Example"))
    assert [language for language, _ in blocks[:2]] == ["python", ""]
    return blocks[0][1], blocks[1][1].strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _read_until(
    stream: asyncio.StreamReader, marker: str, seen: list[str], timeout: float = 10
) -> str:
    """The next line of ``stream`` that contains ``marker``; the lines read go to ``seen``."""

    async def read() -> str:
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"output ended before {marker!r}:\n{''.join(seen)}")
            seen.append(line)
            if marker in line:
                return line

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {marker!r} after {timeout}s in:\n{''.join(seen)}") from None


async def test_example_logs_the_line_the_readme_shows_when_the_client_leaves() -> None:
    code, shown = _example()
    # Only the seconds differ from run to run: the README shows "after 3.512s".
    parts = re.fullmatch(r"(.* after )\d+\.\d{3}(s: .*)", shown)
    assert parts is not None, shown
    expected = re.compile(re.escape(parts[1]) + r"\d+\.\d{3}" + re.escape(parts[2]))

    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        "-c",
        BOOTSTRAP,
        str(port),
        code,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out: list[str] = []
    err: list[str] = []
    try:
        await _read_until(proc.stdout, "Running on", out, timeout=20)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /report HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await _read_until(proc.stdout, "started /report", out)
        writer.close()  # leave while the handler sleeps: a FIN
        await writer.wait_closed()

        logged = await _read_until(proc.stderr, "interrupted by", err)
        assert expected.fullmatch(logged.rstrip("\n")), f"{logged!r} is not like {shown!r}"
        # "aiohttp's access log shows such a request with status 499"
        access = await _read_until(proc.stderr, "aiohttp.access", err)
        assert '"GET /report HTTP/1.1" 499 ' in access

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        err.append((await proc.stderr.read()).decode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in "".join(err)


def _testing_example() -> dict[str, str]:
    """The files of the *Testing your handlers* page's example, by the name in their first
    line (``# app.py: ...``)."""
    files = {}
    for language, code in _fenced(TESTING_PAGE):
        first = code.partition("\n")[0]
        named = re.fullmatch(r"# (\S+\.(?:py|ini))\b.*", first)
        if language in {"python", "ini"} and named:
            files[named[1]] = code
    assert set(files) == {"app.py", "test_app.py", "pytest.ini"}, files
    return files


def test_testing_your_handlers_example_passes_as_written(pytester: pytest.Pytester) -> None:
    for name, code in _testing_example().items():
        (pytester.path / name).write_text(code, encoding="utf-8")
    # A fresh interpreter: the example imports its app.py, as a user's project does.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_testing_your_handlers_factory_is_async_as_gunicorn_needs() -> None:
    # gunicorn's aiohttp worker takes an Application or an async factory: the deployment guide
    # points at this create_app as one.
    app = _testing_example()["app.py"]
    assert "\nasync def create_app() -> web.Application:\n" in app
    guide = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert "the `create_app` of [Testing your handlers](testing.md) is one" in guide
