"""What the distribution ships besides the code: the license it declares."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _metadata() -> configparser.SectionProxy:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    return config["metadata"]


def test_declared_license_has_its_text_in_the_distribution() -> None:
    metadata = _metadata()
    assert metadata["license"] == "Apache-2.0"
    # license_files puts the text in the wheel's .dist-info and in the sdist.
    assert metadata["license_files"].split() == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in text
