"""blase_specutils: interpretable line-by-line clones of stellar spectra (the blasé method)
for specutils and muler users.

The numerical core (:mod:`blase_specutils.core`) needs only torch, numpy and scipy; the
specutils-facing names below are imported on first use, so ``import blase_specutils.core``
works on a machine without astropy.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SpectralClone": "cloning",
    "clone_spectrum": "cloning",
    "load_blase03": "cloning",
    "trim": "preprocessing",
    "divide_blackbody": "preprocessing",
    "flatten_continuum": "preprocessing",
    "preprocess": "preprocessing",
    "spectrum_to_arrays": "spectra",
    "arrays_to_spectrum": "spectra",
    "load_template": "templates",
    "load_example": "examples",
    "EXAMPLES": "examples",
    "read_spectrum": "io",
    "fit_spectrum": "fitting",
    "TransferResult": "fitting",
    "FitFlagWarning": "fitting",
    "FitFlag": "fitting",
    "FitBounds": "fitting",
    "TEMPLATES": "templates",
    "read_orders": "io",
    "fit_many": "batch",
    "clone_many": "batch",
    "clone_grid": "batch",
    "GPContinuumLikelihood": "gp",
    "sample_posterior": "bayes",
    "PosteriorFit": "bayes",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
