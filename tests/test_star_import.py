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

#: The scenarios, run one after another in one fresh interpreter (the imports that every scenario
#: shares, torch and astropy, are paid once): before each, the package and the hidden extras are
#: dropped from ``sys.modules`` with their submodules, and each hidden one is set to None, so that
#: importing it raises ImportError as if it were not installed.
SCRIPT = """
import json, sys
import numpy, torch, astropy.units, specutils  # shared by every scenario, imported once
results = {}
for label, hidden in json.loads(sys.argv[1]).items():
    for key in list(sys.modules):
        if key.split(".")[0] in {"blase_specutils", *hidden}:
            del sys.modules[key]
    for name in hidden:
        sys.modules[name] = None  # as if the package were not installed: importing it raises ImportError
    namespace = {}
    exec("from blase_specutils import *", namespace)
    import blase_specutils
    errors = {}
    for name in ("GPContinuumLikelihood", "GPSettings", "sample_posterior", "PosteriorFit", "PosteriorSettings"):
        try:
            getattr(blase_specutils, name)
        except ImportError as err:
            errors[name] = str(err)
    results[label] = dict(names=sorted(k for k in namespace if not k.startswith("__")), errors=errors,
                          all=list(blase_specutils.__all__))
    for name in hidden:
        del sys.modules[name]
    del blase_specutils
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def star_imports() -> dict:
    """Label → what ``from blase_specutils import *`` gave with those extras hidden ("none": all present)."""
    scenarios = {**MISSING, "none": []}
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(scenarios)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra", sorted(MISSING))
def test_star_import_without_an_extra(extra, star_imports):
    """With an extra hidden, ``*`` imports every name that does not need it; a name that does is
    left out of ``__all__`` and raises an ImportError naming the extra to install when used."""
    res = star_imports[extra]
    for name in ("clone_spectrum", "fit_spectrum", "SpectralClone", "TransferResult", "fit_many", "load_template"):
        assert name in res["names"], name
    if extra in ("gp", "all"):
        for name in ("GPContinuumLikelihood", "GPSettings"):
            assert name not in res["all"] and name not in res["names"]
            assert 'pip install "blase_specutils[gp]"' in res["errors"][name]
    if extra in ("pyro", "all"):
        for name in ("sample_posterior", "PosteriorFit", "PosteriorSettings"):
            assert name not in res["all"] and name not in res["names"]
            assert 'pip install "blase_specutils[pyro]"' in res["errors"][name]
    assert set(res["names"]) == set(res["all"]) - {"__version__"}


@pytest.mark.skipif(importlib.util.find_spec("gpytorch") is None or importlib.util.find_spec("pyro") is None,
                    reason="checks the export of the extras' names where both are installed")
def test_star_import_with_the_extras_exports_their_names(star_imports):
    res = star_imports["none"]
    assert {"GPContinuumLikelihood", "sample_posterior", "PosteriorFit"} <= set(res["names"])
    assert res["errors"] == {}


FIT_WITH_GP = """
import sys
for name in ("gpytorch", "linear_operator"):
    sys.modules[name] = None
import astropy.units as u
import numpy as np
from astropy.nddata import StdDevUncertainty
from specutils import Spectrum
from blase_specutils import SpectralClone, fit_spectrum
from blase_specutils.core import LineCloneModel

wl = np.arange(8700.0, 8710.0, 0.05)
flux = 1.0 - 0.3 * np.exp(-0.5 * ((wl - 8705.0) / 0.1) ** 2)
spec = Spectrum(spectral_axis=wl * u.AA, flux=flux * u.dimensionless_unscaled,
                uncertainty=StdDevUncertainty(np.full(wl.size, 0.01)))
clone = SpectralClone(LineCloneModel([8703.0, 8705.0], np.log([0.02, 0.05]), np.log([0.08, 0.1]),
                                     np.log([0.02, 0.02])))
try:
    fit_spectrum(spec, clone, likelihood="gp", progress=False)
except ImportError as err:
    print("MESSAGE:", err)
else:
    print("fitted")
"""


def test_a_feature_of_a_missing_extra_names_the_install():
    """Asking fit_spectrum for the GP likelihood without GPyTorch raises an ImportError naming the
    extra to install, before any fitting."""
    out = subprocess.run([sys.executable, "-c", FIT_WITH_GP], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'pip install "blase_specutils[gp]"' in out.stdout
