"""The settings of a cloning run as one validated, immutable value: :class:`CloneSettings`.

:func:`~blase_specutils.clone_spectrum` builds one from its keywords (the keyword API is a thin
front for notebooks) or takes one as ``settings=``. Every quantity is checked here, once, with
its units: wavelengths become Quantities in Å, the temperature a Quantity in K, counts integers,
names one of their choices; an error names the setting and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import astropy.units as u
import numpy as np
import torch

from .core.clone import TUNABLE
from .core.profiles import PROFILES
from .core.training import check_integer, check_plan, check_real
from .preprocessing import DEFAULT_BUFFER, _as_band, _buffer_angstrom, _teff_kelvin

__all__ = ["CloneSettings"]

#: The Adam-trained parameters a clone tunes unless told otherwise (``"wing"`` joins for broad lines).
DEFAULT_TUNE = ("amplitude", "sigma", "gamma", "center")


def _check_flag(value, name: str) -> bool:
    """``value`` as a bool: True or False (numpy's too), nothing else."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_prominence(value) -> float:
    """Prom as a float in (0, 1); a string or bool is refused with a ValueError naming the range."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 < float(value) < 1.0):
        raise ValueError(f"prominence must be a number in (0, 1), got {value!r}: lines shallower than it (in units "
                         "of the continuum) are not cloned; 0.01 is the paper's value")
    return float(value)


def _check_tolerance(value, name: str) -> float:
    """A window truncation tolerance: a float in (0, 1)."""
    value = check_real(value, name, positive=True)
    if not value < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (a fraction of the line's peak, e.g. 1e-7), got {value!r}")
    return value


def _check_tune(tune) -> tuple[str, ...]:
    """The names of the tuned parameters as a tuple (one name may be given as a string)."""
    tune = (tune,) if isinstance(tune, str) else tuple(tune)
    unknown = [t for t in tune if t not in TUNABLE]
    if unknown:
        raise ValueError(f"unknown tunable parameter(s) {unknown}; choose from {TUNABLE}")
    return tune


def _check_n_broad(n_broad) -> int | str:
    """``"auto"`` or a number of broad lines >= 0."""
    if isinstance(n_broad, str) and n_broad == "auto":
        return n_broad
    try:
        return check_integer(n_broad, "n_broad", minimum=0)
    except TypeError:
        raise TypeError(f"n_broad must be 'auto' or an integer >= 0, got {n_broad!r}") from None


def _check_powers(powers, mode: str, likelihood) -> tuple[float, ...] | None:
    """The Beer's-law powers X > 0 of the loss, for a log-mode clone without a likelihood."""
    if powers is None:
        return None
    values = (powers,) if isinstance(powers, numbers.Real) else powers
    powers = tuple(check_real(x, "powers", positive=True) for x in values)
    if not powers:
        raise ValueError("powers must hold at least one power X > 0 (or be None)")
    if mode != "log":
        raise ValueError("powers= trains S^X, which is Beer's law only for a log-mode clone: pass mode='log'")
    if likelihood is not None:
        raise ValueError("powers= and likelihood= cannot be combined: the likelihood replaces the loss")
    return powers


def _check_likelihood(likelihood):
    """None, ``"gp"``, a dict of GP options (its ``"noise"`` checked here, the rest by the GP) or a
    likelihood object; a dict is copied, so that changing the caller's dict changes no settings."""
    if likelihood is None:
        return None
    if isinstance(likelihood, str):
        if likelihood.lower() != "gp":
            raise ValueError(f"unknown likelihood {likelihood!r}: use None (sum of squares), 'gp', or a dict of GP "
                             "options such as {'noise': 0.005}")
        return likelihood
    if isinstance(likelihood, dict):
        if "noise" in likelihood:
            noise = float(likelihood["noise"])
            if not (math.isfinite(noise) and noise > 0):
                raise ValueError(f"the GP 'noise' must be finite and > 0, got {noise}")
        return dict(likelihood)
    return likelihood


@dataclass(frozen=True)
class CloneSettings:
    """What a cloning run does: every setting of :func:`~blase_specutils.clone_spectrum` except
    where it runs (``device``) and how it reports (``progress``).

    Built from keywords and checked once; immutable, so one value can be reused, compared, sent to
    Dask workers or changed with :meth:`replace`. Each field means what the keyword of the same
    name of :func:`~blase_specutils.clone_spectrum` means. After validation wavelengths are
    Quantities in Å (``band`` a pair of them, ``buffer``), ``teff`` a Quantity in K (or None),
    ``tune`` and ``powers`` tuples, numbers Python floats and ints.

    Raises
    ------
    TypeError, ValueError, astropy.units.UnitsError
        A setting of the wrong type, out of range or with the wrong kind of unit; the message names
        the setting and what to pass instead.

    Examples
    --------
    >>> import astropy.units as u
    >>> s = CloneSettings(band=(10500, 10650) * u.AA, epochs=150)
    >>> s.replace(epochs=300).epochs
    300
    """

    prominence: float = 0.01
    band: Any = None
    buffer: Any = field(default_factory=lambda: DEFAULT_BUFFER)
    teff: Any = None
    flatten: bool = True
    continuum_bins: int = 40
    continuum_order: int = 3
    mode: str = "linear"
    profile: str = "pseudo-voigt"
    emission: bool = False
    tune: Any = DEFAULT_TUNE
    n_broad: int | str = "auto"
    epochs: int = 800
    lr: float = 0.05
    patience: int | None = 50
    wing_tolerance: float = 1e-7
    train_tolerance: float = 1e-6
    far_field: bool = True
    dtype: torch.dtype = torch.float64
    seed: int | None = 0
    likelihood: Any = None
    plan: bool | str = "auto"
    residual_passes: int = 3
    air: bool | None = None
    powers: Any = None

    def __post_init__(self) -> None:
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)

    def _checked(self) -> dict:
        """Every field, checked and in its canonical form (the order of the checks is the order of the
        errors a caller sees)."""
        out = {"prominence": _check_prominence(self.prominence),
               "epochs": check_integer(self.epochs, "epochs", minimum=0),
               "residual_passes": check_integer(self.residual_passes, "residual_passes", minimum=0),
               "lr": check_real(self.lr, "lr", positive=True),
               "wing_tolerance": _check_tolerance(self.wing_tolerance, "wing_tolerance"),
               "train_tolerance": _check_tolerance(self.train_tolerance, "train_tolerance"),
               "continuum_bins": check_integer(self.continuum_bins, "continuum_bins", minimum=1),
               "continuum_order": check_integer(self.continuum_order, "continuum_order", minimum=0),
               "n_broad": _check_n_broad(self.n_broad), "tune": _check_tune(self.tune),
               "teff": None if self.teff is None else _teff_kelvin(self.teff) * u.K}
        if self.mode not in ("linear", "log"):
            raise ValueError(f"mode must be 'linear' (Eq. 2) or 'log' (Eq. A2, for saturated telluric bands), "
                             f"got {self.mode!r}")
        out["likelihood"] = _check_likelihood(self.likelihood)
        out["powers"] = _check_powers(self.powers, self.mode, out["likelihood"])
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError("dtype must be torch.float32 or torch.float64")
        out |= self._checked_switches()
        band = _as_band(self.band) if self.band is not None else None
        out["band"] = None if band is None else (band[0] * u.AA, band[1] * u.AA)
        out["buffer"] = _buffer_angstrom(self.buffer) * u.AA
        return out

    def _checked_switches(self) -> dict:
        """The on/off settings, the seed, the patience and the plan choice."""
        check_plan(self.plan)
        if self.air is not None and not isinstance(self.air, bool):
            raise TypeError(f"air must be True (air wavelengths), False (vacuum) or None (as the spectrum says), "
                            f"got {self.air!r}")
        return {"flatten": _check_flag(self.flatten, "flatten"), "emission": _check_flag(self.emission, "emission"),
                "far_field": _check_flag(self.far_field, "far_field"),
                "seed": None if self.seed is None else check_integer(self.seed, "seed"),
                "patience": None if self.patience is None else check_integer(self.patience, "patience", minimum=1)}

    def replace(self, **changes) -> "CloneSettings":
        """A copy with ``changes`` (checked again), e.g. ``settings.replace(epochs=300)``."""
        return dataclasses.replace(self, **changes)

    @property
    def band_angstrom(self) -> tuple[float, float] | None:
        """The band of interest as two floats in Å (None: the whole spectrum)."""
        return None if self.band is None else _as_band(self.band)

    @property
    def buffer_angstrom(self) -> float:
        """Δλ_buffer in Å."""
        return _buffer_angstrom(self.buffer)

    @property
    def teff_kelvin(self) -> float | None:
        """T_eff of the blackbody divided out, in K (None: no division)."""
        return None if self.teff is None else _teff_kelvin(self.teff)

    def changed(self) -> list[str]:
        """The names of the fields that differ from their defaults."""
        default = CloneSettings()
        return [f.name for f in dataclasses.fields(self) if not _same(getattr(self, f.name), getattr(default, f.name))]


def _same(a, b) -> bool:
    """Whether two setting values are equal (Quantities compared as values with units)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, u.Quantity) or isinstance(b, u.Quantity):
        try:
            return bool(u.Quantity(a) == u.Quantity(b))
        except (TypeError, u.UnitsError):
            return False
    return type(a) is type(b) and a == b
