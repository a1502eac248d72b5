"""blase_specutils: interpretable line-by-line clones of stellar spectra (the blasé method)
for specutils and muler users.

The numerical core (:mod:`blase_specutils.core`) needs only torch, numpy and scipy; the
specutils-facing names below are imported on first use, so ``import blase_specutils.core``
works on a machine without astropy. ``import blase_specutils`` and ``from blase_specutils import
*`` work with the core dependencies alone: the names that need an optional extra (GPyTorch for
:mod:`~blase_specutils.gp`, Pyro for :mod:`~blase_specutils.bayes`) are exported by ``*`` only
where the extra is installed, and using one without it raises an ImportError that names the
``pip install "blase_specutils[...]"`` to run.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

_LAZY = {
    "SpectralClone": "cloning",
    "clone_spectrum": "cloning",
    "load_blase03": "cloning",
    "CloneSettings": "clone_settings",
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
    "FitSettings": "fit_settings",
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
    "GPSettings": "gp",
    "sample_posterior": "bayes",
    "PosteriorFit": "bayes",
    "PosteriorSettings": "bayes",
}

#: The top-level packages of the optional extra that each lazily imported module needs.
_EXTRAS = {"gp": ("gpytorch", "linear_operator"), "bayes": ("pyro",)}


def _extra_installed(module: str) -> bool:
    """Whether the packages of the optional extra behind ``module`` are installed (found, not imported)."""
    for package in _EXTRAS.get(module, ()):
        try:
            if importlib.util.find_spec(package) is None:
                return False
        except (ImportError, ValueError):  # blocked, or a module entry of None (as if not installed)
            return False
    return True


__all__ = ["__version__", *(name for name, module in _LAZY.items() if _extra_installed(module))]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
