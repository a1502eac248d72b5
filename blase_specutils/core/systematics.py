"""Systematic checks of a fitted RV that the curvature of χ² cannot see.

:func:`rv_by_continuum_degree` finds the RV again with continuum polynomials of higher degree. A
star whose lines are narrow sets its RV with the line cores, and any smooth continuum leaves it
where it is. A fast rotator's lines are a few per cent deep and hundreds of km/s wide: there the
continuum polynomial and the RV share the same pixels, the χ² surface in RV is shallow and wide,
and a slightly different continuum moves its minimum by many times the σ from its curvature. The
spread of those minima is the RV's continuum systematic (``TransferResult.uncertainties
["rv_continuum"]``); :func:`~blase_specutils.core.diagnostics.check_fit` flags an RV whose spread
exceeds the ``unconstrained_fraction`` rule (``rv_depends_on_continuum``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..constants import CONTINUUM_TEST_EXTRA_DEGREES, CONTINUUM_TEST_GRID
from .clone import SPEED_OF_LIGHT_KMS
from .transfer import TransferModel

__all__ = ["rv_by_continuum_degree", "continuum_spread"]


def _parabola_min(x: np.ndarray, y: np.ndarray) -> float:
    """The minimum of ``y`` on the grid ``x``, refined by a parabola through it and its neighbours
    (the grid point itself at an end of the grid or where the three points do not curve up)."""
    k = int(np.argmin(y))
    if 0 < k < x.size - 1:
        y0, y1, y2 = y[k - 1], y[k], y[k + 1]
        denom = y0 - 2.0 * y1 + y2
        if denom > 0:
            return float(x[k] + 0.5 * (x[1] - x[0]) * (y0 - y2) / denom)
    return float(x[k])


@torch.no_grad()
def rv_by_continuum_degree(model: TransferModel, data: Tensor, weight: Tensor, *,
                           extra_degrees: Sequence[int] = CONTINUUM_TEST_EXTRA_DEGREES,
                           n_grid: int = CONTINUUM_TEST_GRID) -> dict[int, float]:
    r"""The RV (km/s) that minimises χ² with continuum polynomials of several degrees.

    The model is evaluated on ``n_grid`` RVs across :math:`RV \pm w`, with
    :math:`w = \sqrt{(c/R)^2 + (v\sin i)^2}` the broadened line width (kept within ±``max_rv``),
    everything else as it stands (call it after template matching: the lines as cloned, v sin i,
    R and X as matched). At each RV the per-order continuum :math:`P_\mathrm{data}` is solved by
    weighted least squares in the model's own degree d and in d + k for each k of
    ``extra_degrees``; the minimum of each χ² curve is refined by a parabola. The model is left
    as it was.

    Parameters
    ----------
    model : TransferModel
        With a stellar clone (a telluric-only model has no RV: returns ``{}``).
    data, weight : Tensor
        Data flux and 1/σ² (0 where masked).
    extra_degrees : sequence of int
        Degrees added to the model's own (default (2, 4)).
    n_grid : int
        RVs on the grid (default 81).

    Returns
    -------
    dict of int to float
        Degree → the RV of least χ² (km/s, the model's own RV parameter, tag included).
    """
    if model.stellar is None:
        return {}
    d = int(model._powers.shape[1]) - 1
    degrees = [d] + [d + int(k) for k in extra_degrees if int(k) > 0]
    bases = {deg: model.continuum_powers(deg) for deg in degrees}
    rv0 = float(model.rv.detach())
    w = math.hypot(float(SPEED_OF_LIGHT_KMS) / float(model.resolving_power.detach()), float(model.vsini.detach()))
    lo, hi = max(rv0 - w, -model.max_rv), min(rv0 + w, model.max_rv)
    rvs = np.linspace(lo, hi, max(int(n_grid), 3))
    chi2 = {deg: np.empty(rvs.size) for deg in degrees}
    try:
        for i, v in enumerate(rvs):
            model.rv.fill_(float(v))
            base = model.unscaled()
            for deg, powers in bases.items():
                chi2[deg][i] = model._profiled_chi2(base, data, weight, powers)
    finally:
        model.rv.fill_(rv0)
    return {deg: _parabola_min(rvs, c) for deg, c in chi2.items()}


def continuum_spread(rvs: dict[int, float] | None) -> float | None:
    """Largest minus smallest of :func:`rv_by_continuum_degree`'s RVs (km/s); None with fewer than two."""
    if not rvs or len(rvs) < 2:
        return None
    values = list(rvs.values())
    return float(max(values) - min(values))
