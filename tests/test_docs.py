"""The API reference (docs/api.rst) documents every public name, so a new export cannot be
forgotten there.

The page names each of ``aiodelay.__all__`` and of the pytest plugin's ``__all__`` in its own
autodoc directive; ``aiodelay.prometheus`` is documented whole (``automodule`` with
``:members:`` and ``:undoc-members:``, which follows the module's ``__all__``). Whether the
docstrings themselves render without a warning is checked by the docs build
(``sphinx-build -W``, in ``tox -e docs`` and ``.ci/run``).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

import aiodelay
import aiodelay.pytest_plugin
import aiodelay.server

ROOT = Path(__file__).parent.parent
API = (ROOT / "docs" / "api.rst").read_text(encoding="utf-8")

# One object per directive: `.. autofunction:: aiodelay.setup`, `.. autoclass:: ...`.
_OBJECT = re.compile(
    r"^\.\. auto(?:function|class|exception|data|decorator|attribute)::\s+(\S+)\s*$", re.M
)


def _documented(module: str) -> set[str]:
    """The names directly in ``module`` that api.rst documents with their own directive."""
    prefix = module + "."
    return {
        target.removeprefix(prefix)
        for target in _OBJECT.findall(API)
        if target.startswith(prefix) and "." not in target.removeprefix(prefix)
    }


@pytest.mark.parametrize(
    "module",
    [
        aiodelay,  # import aiodelay
        aiodelay.server,  # python -m aiodelay, as a library
        aiodelay.pytest_plugin,  # the types to annotate tests with
    ],
    ids=lambda module: module.__name__,
)
def test_api_page_documents_exactly_the_public_names(module: ModuleType) -> None:
    public = set(module.__all__)
    documented = _documented(module.__name__)
    assert public - documented == set(), f"add these to docs/api.rst: {public - documented}"
    assert documented - public == set(), f"not in {module.__name__}.__all__: {documented - public}"


def test_api_page_documents_all_of_prometheus() -> None:
    found = re.search(r"^\.\. automodule:: aiodelay\.prometheus\n((?:   :.*\n)*)", API, re.M)
    assert found is not None, "docs/api.rst has no automodule of aiodelay.prometheus"
    options = set(found.group(1).split())
    # :members: follows the module's __all__; :undoc-members: keeps a name without a
    # docstring from being left out silently.
    assert {":members:", ":undoc-members:"} <= options
    import aiodelay.prometheus

    assert aiodelay.prometheus.__all__  # what the automodule documents
