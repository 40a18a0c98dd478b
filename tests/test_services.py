"""The rule for tests that need a service: skip on a developer's machine, fail in CI."""

from __future__ import annotations

import shutil

import pytest

from tests import _services


@pytest.fixture
def no_nginx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)


@pytest.mark.usefixtures("no_nginx")
def test_a_missing_tool_skips_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install -y nginx-light"):
        _services.require("nginx")


@pytest.mark.usefixtures("no_nginx")
def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"nginx not found"):
        _services.require("nginx")


def test_an_unknown_tool_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown tool 'apache'"):
        _services.require("apache")
