"""``import blase_specutils`` and ``from blase_specutils import *`` work without the optional extras."""

import importlib.util
import json
import subprocess
import sys

import pytest

#: Each optional extra (or package we only import lazily), as the top-level packages to hide.
MISSING = {
    "gp": ["gpytorch", "linear_operator"],
    "pyro": ["pyro"],
    "dask": ["dask", "distributed"],
    "all": ["gpytorch", "linear_operator", "pyro", "dask", "distributed"],
}

SCRIPT = """
import json, sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # as if the package were not installed: importing it raises ImportError
namespace = {}
exec("from blase_specutils import *", namespace)
import blase_specutils
errors = {}
for name in ("GPContinuumLikelihood", "sample_posterior"):
    try:
        getattr(blase_specutils, name)
    except ImportError as err:
        errors[name] = str(err)
print(json.dumps(dict(names=sorted(k for k in namespace if not k.startswith("__")), errors=errors,
                      all=list(blase_specutils.__all__))))
"""


def _star_import(hidden: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *hidden], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra", sorted(MISSING))
def test_star_import_without_an_extra(extra):
    """With an extra hidden, ``*`` imports every name that does not need it; a name that does is
    left out of ``__all__`` and raises an ImportError naming the extra to install when used."""
    res = _star_import(MISSING[extra])
    for name in ("clone_spectrum", "fit_spectrum", "SpectralClone", "TransferResult", "fit_many", "load_template"):
        assert name in res["names"], name
    if extra in ("gp", "all"):
        assert "GPContinuumLikelihood" not in res["all"] and "GPContinuumLikelihood" not in res["names"]
        assert 'pip install "blase_specutils[gp]"' in res["errors"]["GPContinuumLikelihood"]
    if extra in ("pyro", "all"):
        assert "sample_posterior" not in res["all"] and "PosteriorFit" not in res["names"]
        assert 'pip install "blase_specutils[pyro]"' in res["errors"]["sample_posterior"]
    assert set(res["names"]) == set(res["all"]) - {"__version__"}


@pytest.mark.skipif(importlib.util.find_spec("gpytorch") is None or importlib.util.find_spec("pyro") is None,
                    reason="checks the export of the extras' names where both are installed")
def test_star_import_with_the_extras_exports_their_names():
    res = _star_import([])
    assert {"GPContinuumLikelihood", "sample_posterior", "PosteriorFit"} <= set(res["names"])
    assert res["errors"] == {}
