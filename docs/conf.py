"""Sphinx configuration of aiodelay's documentation site.

Build it with ``tox -e docs`` (or ``sphinx-build -W --keep-going -b html docs docs/_build/html``
after ``pip install -e '.[docs]'``). Warnings are errors there, so a docstring whose
cross-reference does not resolve, or a link to a section that is gone, fails the build.
"""

from __future__ import annotations

import aiodelay

project = "aiodelay"
author = "the aiodelay authors"
copyright = "the aiodelay authors"
release = aiodelay.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
]

# Markdown (MyST) for the guides; rST for the API reference, where autodoc's directives live.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Headings get anchors, so a page can link to a section of another (deployment.md#nginx).
myst_heading_anchors = 3

# A cross-reference that does not resolve is a warning (and so an error under -W): a docstring
# that names a function that was renamed fails the build. The build runs offline (no
# intersphinx), so names outside aiodelay are not checked.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(aiohttp|asyncio|collections|concurrent|contextvars|enum|multidict|pytest|"
        r"pathlib|prometheus_client|socket|ssl|types|typing|typing_extensions|web|yarl|_asyncio)(\..*)?",
    ),
    # Private names in signatures (type variables, internal types) are not documented.
    (r"py:.*", r"aiodelay(\.\w+)*\._\w+(\.\w+)*"),
    (
        r"py:.*",
        r"(Any|Awaitable|Callable|Coroutine|Enum|Literal|Mapping|NoReturn|Protocol|"
        r"Sequence|TypeVar|P|T|R|_\w+)",
    ),
    (
        r"py:.*",
        r"(None|bool|bytes|dict|float|int|list|object|str|tuple|type|BaseException|"
        r"Exception|ConnectionError|TimeoutError|RuntimeError|ValueError|TypeError)",
    ),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

html_theme = "furo"
html_title = f"aiodelay {release}"
