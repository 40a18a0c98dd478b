"""What the distribution ships besides the code: the license it declares, and the aiohttp
releases it asks for, which CI tests."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import aiohttp

ROOT = Path(__file__).parent.parent


def _setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    return config


def _metadata() -> configparser.SectionProxy:
    return _setup_cfg()["metadata"]


def test_declared_license_has_its_text_in_the_distribution() -> None:
    metadata = _metadata()
    assert metadata["license"] == "Apache-2.0"
    # license_files puts the text in the wheel's .dist-info and in the sdist.
    assert metadata["license_files"].split() == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in text


def test_every_aiohttp_minor_that_setup_cfg_allows_is_tested_by_tox() -> None:
    (requirement,) = [
        line.strip()
        for line in _setup_cfg()["options"]["install_requires"].splitlines()
        if line.strip().startswith("aiohttp")
    ]
    match = re.fullmatch(r"aiohttp >= 3\.(\d+)\.\d+, < 4", requirement)
    assert match, requirement
    oldest = int(match[1])
    tox = (ROOT / "tox.ini").read_text(encoding="utf-8")
    (factors,) = re.findall(r"^\[testenv:aiohttp\{([\d,]+)\}\]$", tox, re.MULTILINE)
    tested = sorted(int(factor[1:]) for factor in factors.split(","))
    assert tested == list(range(oldest, tested[-1] + 1))
    # CI runs this suite on the newest release: a new minor fails here until tox tests it.
    installed = int(aiohttp.__version__.split(".")[1])
    assert installed <= tested[-1], f"aiohttp {aiohttp.__version__}: add its env to tox.ini"
    for minor in tested:
        assert f"aiohttp3{minor}: aiohttp ~= 3.{minor}.0" in tox
