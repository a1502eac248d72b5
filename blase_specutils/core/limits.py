"""The bounds of a fit's physical parameters, each checked in one place, on plain floats.

The user layer (:class:`~blase_specutils.fit_settings.FitSettings`) turns quantities into plain
numbers (km/s, R) and calls these checks; the core (:class:`~.transfer.TransferModel`) calls the
same ones, so a value is refused with one message wherever it enters. The limits themselves are
in :mod:`blase_specutils.constants`.
"""

from __future__ import annotations

import math

from ..constants import (KERNEL_ROOM_FACTOR, KERNEL_ROOM_MARGIN_KMS, MAX_RV_RANGE_KMS, MAX_VSINI_KMS,
                         MIN_RESOLVING_POWER, MIN_START_VSINI_KMS)
from .training import check_real

__all__ = ["check_resolving_power", "check_rv_range", "check_rv_bound", "check_rv", "check_vsini",
           "starting_vsini", "kernel_room"]


def check_resolving_power(value, name: str = "resolving_power") -> float:
    """R as a float: one finite number > 0 and >= :data:`~blase_specutils.constants.MIN_RESOLVING_POWER`.

    Raises
    ------
    TypeError
        Not one number.
    ValueError
        Not finite, not > 0, or below the minimum (the LSF kernel grows as 1/R, the cost as 1/R²).
    """
    r = check_real(value, name, positive=True)
    if r < MIN_RESOLVING_POWER:
        raise ValueError(f"{name} must be >= {MIN_RESOLVING_POWER:g} (the LSF kernel grows as 1/R, the cost as "
                         f"1/R²; the method needs resolved lines), got {r:g}")
    return r


def check_rv_range(value: float) -> float:
    """The half width (km/s) of the RV scan: 0 < ``value`` <= :data:`~blase_specutils.constants.MAX_RV_RANGE_KMS`."""
    v = float(value)
    if not 0 < v <= MAX_RV_RANGE_KMS:
        raise ValueError(f"rv_range must be > 0 km/s and at most {MAX_RV_RANGE_KMS:g} km/s (the half width of the RV "
                         f"scan and of the line selection; stars move slower: tag a larger known velocity on the "
                         f"spectral axis with spectrum.set_radial_velocity_to), got {v} km/s")
    return v


def check_rv_bound(value: float) -> float:
    """The bound of |RV| of a model (km/s, ``max_rv``): finite and > 0."""
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"max_rv must be finite and > 0 km/s, got {value}")
    return v


def check_rv(rv: float, bound: float, *, bound_name: str = "max_rv", fix: str = "") -> float:
    """An RV (km/s) within the bound: :math:`|RV| \\le` ``bound``, named ``bound_name`` in the message
    (with ``fix``, a hint, appended)."""
    v = float(rv)
    if not abs(v) <= float(bound):
        raise ValueError(f"rv = {rv} km/s is outside the RV bound ±{bound_name} = ±{float(bound)} km/s{fix}")
    return v


def check_vsini(value: float, bound: float = MAX_VSINI_KMS) -> float:
    """A v sin i (km/s): finite, >= 0 and at most ``bound`` (default
    :data:`~blase_specutils.constants.MAX_VSINI_KMS`; ``FitBounds.max_vsini`` in a fit)."""
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"vsini must be finite and >= 0 km/s, got {value}")
    if v > bound:
        raise ValueError(f"vsini = {v} km/s is above the bound max_vsini = {bound} km/s (FitBounds)")
    return v


def starting_vsini(value: float) -> float:
    """The v sin i (km/s) a model starts from for a checked ``value``: at least
    :data:`~blase_specutils.constants.MIN_START_VSINI_KMS`, since its logarithm is tuned."""
    return max(float(value), MIN_START_VSINI_KMS)


def kernel_room(vsini: float, bound: float) -> float:
    """Half width (km/s) of the rotation kernel for a fit at ``vsini``: max(2 v sin i, v sin i + 20 km/s),
    at most the v sin i bound. A working size, not a bound: a fit enlarges it when v sin i reaches it."""
    return min(float(bound), max(KERNEL_ROOM_FACTOR * vsini, vsini + KERNEL_ROOM_MARGIN_KMS))
