"""Sphinx configuration of the blase_specutils documentation.

Build with ``python -m sphinx -b html docs docs/_build/html``. The tutorial notebooks live in
``../notebooks`` and are copied into ``tutorials/`` at build time. They are rendered as stored
(without outputs) unless ``BLASE_DOCS_EXECUTE=1`` is set, which executes them during the build.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import blase_specutils  # noqa: E402

# ---------------------------------------------------------------- project
project = "blase_specutils"
author = "blase_specutils developers"
copyright = "blase_specutils developers"
release = blase_specutils.__version__
version = release

# ---------------------------------------------------------------- notebooks
TUTORIALS = DOCS / "tutorials"
TUTORIALS.mkdir(exist_ok=True)
for _nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(_nb, TUTORIALS / _nb.name)

# ---------------------------------------------------------------- extensions
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx.ext.mathjax",
    "myst_nb",
]

autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

_execute = os.environ.get("BLASE_DOCS_EXECUTE", "0").strip().lower() in {"1", "true", "yes"}
nb_execution_mode = "force" if _execute else "off"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_kernel_rgx_aliases = {".*": "python3"}

exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# ---------------------------------------------------------------- output
if importlib.util.find_spec("sphinx_book_theme") is not None:
    html_theme = "sphinx_book_theme"
    html_theme_options = {
        "show_toc_level": 2,
    }
else:
    html_theme = "alabaster"
html_title = f"blase_specutils {release}"
