"""The API reference (docs/api.rst) documents every public name, so a new export cannot be
forgotten there; the README links to every page, and no page is a fragment of the README.

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


def _toctree_pages() -> list[str]:
    """The pages of docs/index.md's toctrees (``quickstart``, ``api``, ...)."""
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    pages = []
    for tree in re.findall(r"^```\{toctree\}\n(.*?)^```$", index, re.M | re.S):
        pages += [line for line in tree.splitlines() if line and not line.startswith(":")]
    return pages


def test_readme_links_to_every_page_of_the_docs() -> None:
    # The README is a summary: every detail is one click away.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(docs/([\w.]+?)\.(?:md|rst)(?:#[^)]*)?\)", readme))
    if "](CHANGELOG.md)" in readme:
        linked.add("changelog")  # the page is CHANGELOG.md itself
    pages = _toctree_pages()
    assert "quickstart" in pages
    assert set(pages) - linked == set()


def test_docs_pages_own_their_text() -> None:
    # No page is a fragment of the README: each says its own thing, once.
    including = [
        page.name
        for page in (ROOT / "docs").glob("*.md")
        if "README.md" in "".join(re.findall(r"^```\{include\}.*$", page.read_text(), re.M))
    ]
    assert including == []


def test_no_tracker_numbers() -> None:
    # The repository has no issue tracker: a reader could not follow "issue N" or "#N".
    tracker = re.compile(r"\b(?:[Ii]ssues?|PR|[Pp]ull request) ?#?\d+")
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    for folder in ("aiodelay", "tests", "docs", "examples", "benchmarks"):
        files += [
            path
            for path in (ROOT / folder).rglob("*")
            if path.suffix in {".py", ".md", ".rst", ".rpy", ".txt"} and "_build" not in path.parts
        ]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if tracker.search(line)
    ]
    assert found == []
