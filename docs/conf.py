"""Sphinx configuration of the blase_specutils documentation.

Build with ``python -m sphinx -b html docs docs/_build/html``. The tutorial notebooks live in
``../notebooks``; ``tutorials/`` holds links to them (committed), so the build reads them where
they are and writes nothing into the source tree. They are executed during the build by default,
so that their figures are in the pages (myst-nb's cache, in ``docs/_build/.jupyter_cache``, skips
notebooks that have not changed); ``BLASE_DOCS_EXECUTE=0`` renders them as stored, without
outputs. Executing them needs the project's ``../shared/data`` next to the checkout.
"""

from __future__ import annotations

import importlib.util
import os
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
# docs/tutorials/*.ipynb are symbolic links to ../notebooks/*.ipynb (nothing is copied at build time)
_missing = [nb.name for nb in sorted((ROOT / "notebooks").glob("*.ipynb")) if not (DOCS / "tutorials" / nb.name).exists()]
if _missing:
    raise RuntimeError(f"docs/tutorials has no link to the notebooks {_missing}; add one with "
                       "ln -s ../../notebooks/NAME.ipynb docs/tutorials/NAME.ipynb")

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

_execute = os.environ.get("BLASE_DOCS_EXECUTE", "1").strip().lower() not in {"0", "false", "no"}
nb_execution_mode = "cache" if _execute else "off"
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
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
