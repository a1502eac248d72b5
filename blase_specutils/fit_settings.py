"""The settings of a transfer-learning fit as one validated value: :class:`FitSettings`.

:func:`~blase_specutils.fitting.fit_spectrum` builds one from its keyword arguments (or takes one
as ``settings=``); :func:`~blase_specutils.batch.fit_many` builds one to check its keywords
before any job starts. Each quantity is checked here once, in the user's units (a velocity as a
Quantity or a number in km/s, the buffer as a wavelength); the physical bounds themselves are the
core's (:mod:`blase_specutils.core.limits`), so a value is refused with the same message whether it
enters here or at :class:`~blase_specutils.core.transfer.TransferModel`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import astropy.units as u

from .constants import AUTO_CALIBRATION_DEGREE, TELLURIC_ONLY_TUNED
from .core.clone import TUNABLE
from .core.diagnostics import FitBounds
from .core.limits import check_resolving_power, check_rv, check_rv_range, check_vsini
from .core.training import check_integer, check_plan, check_real
from .frames import check_frame_settings
from .preprocessing import _buffer_angstrom, _velocity_kms

__all__ = ["FitSettings"]


def _tunables(value, name: str) -> tuple[str, ...]:
    """Line parameters to tune: one name (``"amplitude"``) or an iterable of names from ``TUNABLE``."""
    names = (value,) if isinstance(value, str) else value
    try:
        names = tuple(names)
    except TypeError as err:
        raise TypeError(f"{name} must be a parameter name or a sequence of them, e.g. ('amplitude', 'sigma'), "
                        f"got {value!r}") from err
    bad = [t for t in names if not isinstance(t, str) or t not in TUNABLE]
    if bad:
        raise ValueError(f"{name}: unknown tunable parameter(s) {bad}; choose from {TUNABLE}")
    return names


def _check_flag(value, name: str) -> bool:
    """A switch: True or False (numpy booleans included)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class FitSettings:
    """The settings of :func:`~blase_specutils.fitting.fit_spectrum`, checked once (frozen).

    The fields are the keyword arguments of ``fit_spectrum`` of the same names (see there for
    their meaning), less the data, the clones and how to run (``device``, ``progress``,
    ``likelihood``, ``engine``). Construction checks every field and stores it normalised:
    velocities as floats in km/s, ``buffer`` as a Quantity in Å, the tuned parameters as tuples,
    ``bounds`` as a :class:`~blase_specutils.core.diagnostics.FitBounds`. :meth:`replace` gives a
    checked copy with some fields changed.

    Raises
    ------
    TypeError, ValueError, astropy.units.UnitsError
        A field of the wrong type, out of range or in the wrong units; the message names the field
        and what it accepts (e.g. ``rv_range must be > 0 km/s and at most 1000 km/s ...``).

    Examples
    --------
    >>> s = FitSettings(resolving_power=45000.0, rv_range=60 * u.km / u.s, line_epochs=0)
    >>> s.rv_range, s.buffer
    (60.0, <Quantity 30. Angstrom>)
    """

    resolving_power: float = 55000.0
    rv: Any = None
    rv_range: Any = 150.0
    vsini: Any = None
    limb_darkening: float = 0.6
    continuum_degree: int = 2
    tune_lines: Any = ("amplitude", "sigma", "gamma", "center")
    tune_resolving_power: bool = False
    regularization: float | None = 5.0
    width_regularization: float | None = None
    template_epochs: int = 300
    line_epochs: int = 4000
    lr: float = 0.03
    buffer: Any = field(default_factory=lambda: 30 * u.AA)
    tune_telluric: Any = None
    tune_telluric_power: bool = True
    telluric_regularization: float | None = 5.0
    plan: bool | str = "auto"
    bounds: FitBounds | None = None
    calibration_degree: int | str | None = "auto"
    air: bool | None = None
    frame: str | None = None
    barycentric_correction: Any = None

    def __post_init__(self) -> None:
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)

    def _checked(self) -> dict:
        """Every field checked and normalised, in the order the errors are reported."""
        if self.bounds is not None and not isinstance(self.bounds, FitBounds):
            raise TypeError(f"bounds must be a FitBounds or None, got {type(self.bounds).__name__}")
        b = FitBounds() if self.bounds is None else self.bounds
        check_frame_settings(air=self.air, frame=self.frame, barycentric_correction=self.barycentric_correction)
        rv_range = check_rv_range(_velocity_kms(self.rv_range, "rv_range"))
        rv = None if self.rv is None else check_rv(_velocity_kms(self.rv, "rv"), rv_range, bound_name="rv_range",
                                                   fix="; widen rv_range")
        vsini = None if self.vsini is None else check_vsini(_velocity_kms(self.vsini, "vsini", nonnegative=True),
                                                            b.max_vsini)
        return dict(
            bounds=b, rv_range=rv_range, rv=rv, vsini=vsini,
            resolving_power=check_resolving_power(self.resolving_power),
            continuum_degree=check_integer(self.continuum_degree, "continuum_degree", minimum=0),
            tune_lines=_tunables(self.tune_lines, "tune_lines"),
            regularization=check_real(self.regularization, "regularization", optional=True),
            width_regularization=check_real(self.width_regularization, "width_regularization", optional=True),
            template_epochs=check_integer(self.template_epochs, "template_epochs", minimum=0),
            line_epochs=check_integer(self.line_epochs, "line_epochs", minimum=0),
            lr=check_real(self.lr, "lr", positive=True),
            buffer=_buffer_angstrom(self.buffer) * u.AA,
            tune_telluric=None if self.tune_telluric is None else _tunables(self.tune_telluric, "tune_telluric"),
            telluric_regularization=check_real(self.telluric_regularization, "telluric_regularization",
                                               optional=True),
            calibration_degree=self._checked_calibration_degree(),
            tune_resolving_power=_check_flag(self.tune_resolving_power, "tune_resolving_power"),
            tune_telluric_power=_check_flag(self.tune_telluric_power, "tune_telluric_power"),
            plan=check_plan(self.plan),
        )

    def _checked_calibration_degree(self) -> int | str | None:
        """``calibration_degree``: None, ``"auto"`` or an integer >= 0."""
        if self.calibration_degree is None or (isinstance(self.calibration_degree, str)
                                               and self.calibration_degree == "auto"):
            return self.calibration_degree
        if isinstance(self.calibration_degree, str):
            raise ValueError(f"calibration_degree must be None, 'auto' or an integer >= 0, got "
                             f"{self.calibration_degree!r}")
        return check_integer(self.calibration_degree, "calibration_degree", minimum=0)

    def calibration_degree_for(self, has_stellar: bool, has_telluric: bool) -> int | None:
        """The degree of the wavelength correction fitted: ``calibration_degree``, or with
        ``"auto"`` a linear correction (degree 1) in a telluric-only fit, whose telluric lines fix
        the wavelength scale with no RV to trade against, and none otherwise (beside a stellar
        clone a per-order shift and the RV are degenerate unless the order holds many telluric
        lines: ask for it with an integer)."""
        if self.calibration_degree != "auto":
            return self.calibration_degree
        return AUTO_CALIBRATION_DEGREE if (has_telluric and not has_stellar) else None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the settings (the keyword arguments of ``fit_spectrum`` they hold)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def buffer_angstrom(self) -> float:
        """``buffer`` in Å."""
        return float(self.buffer.to_value(u.AA))

    def replace(self, **changes) -> "FitSettings":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def tune_telluric_for(self, has_stellar: bool) -> tuple[str, ...]:
        """The telluric line parameters tuned: ``tune_telluric``, or by default none beside a stellar
        clone and the amplitudes and widths in a telluric-only fit (X and R then keep their
        template-matching values in the line stage). On the IGRINS A0V standard the widths took the
        median χ²_red over 24 orders from 1.9 to 1.1 (benchmarks/RESULTS.md)."""
        if self.tune_telluric is not None:
            return self.tune_telluric
        return () if has_stellar else TELLURIC_ONLY_TUNED
