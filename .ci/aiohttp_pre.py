"""The ``aiohttp-pre`` tox env: the tests given as arguments, against the newest aiohttp
pre-release, if PyPI has one newer than the newest release.

aiohttp publishes betas and release candidates of most minor releases: testing them tells which
internal of the next release aiodelay must learn before that release reaches a deployment.
When there is none newer than the newest release (most of the time), it says so and passes:
the newest release is tested already. pip answers what it would install (``--dry-run
--report``), so the index, its mirrors and the constraints are the ones every install uses.
"""

from __future__ import annotations

import json
import subprocess
import sys

from packaging.version import Version


def newest(pre: bool) -> Version:
    """The aiohttp that ``pip install [--pre] aiohttp`` would install now."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps"]
    command += ["--ignore-installed", "--report", "-", "aiohttp"]
    if pre:
        command.append("--pre")
    answer = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return Version(json.loads(answer)["install"][0]["metadata"]["version"])


def main(tests: list[str]) -> int:
    release, pre = newest(pre=False), newest(pre=True)
    if not pre.is_prerelease or pre <= release:
        print(
            f"aiohttp-pre: skipped, PyPI has no aiohttp pre-release newer than the newest "
            f"release ({release}), which the other envs test"
        )
        return 0
    print(f"aiohttp-pre: testing aiohttp {pre} (newest release: {release})")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", f"aiohttp=={pre}"]
    subprocess.run(pip, check=True)
    check = "import aiohttp, sys; sys.exit(aiohttp.__version__ != sys.argv[1])"
    subprocess.run([sys.executable, "-c", check, str(pre)], check=True)
    return subprocess.run([sys.executable, "-m", "pytest", *tests], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
