"""Systematic checks that the curvature of χ² cannot see: an RV that rests on the continuum, and
telluric transmission extrapolated from a saturated template.

:func:`rv_by_continuum_degree` finds the RV again with continuum polynomials of higher degree. A
star whose lines are narrow sets its RV with the line cores, and any smooth continuum leaves it
where it is. A fast rotator's lines are a few per cent deep and hundreds of km/s wide: there the
continuum polynomial and the RV share the same pixels, the χ² surface in RV is shallow and wide,
and a slightly different continuum moves its minimum by many times the σ from its curvature. The
spread of those minima is the RV's continuum systematic (``TransferResult.uncertainties
["rv_continuum"]``); :func:`~blase_specutils.core.diagnostics.check_fit` flags an RV whose spread
exceeds the ``unconstrained_fraction`` rule (``rv_depends_on_continuum``).

:func:`telluric_saturation_flags` finds pixels where a telluric template transmits almost nothing
at its own column, but the fitted power X makes them transmit: Beer's law scales optical depths,
and a template convolved to a finite resolution (PSG's at R = 100,000) or stored with finite
precision keeps no depth inside its saturated bands, so T^X there is an extrapolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..constants import (CONTINUUM_TEST_EXTRA_DEGREES, CONTINUUM_TEST_GRID, SATURATED_PIXEL_FRACTION,
                         SATURATED_TEMPLATE_TRANSMISSION, SEEN_TRANSMISSION)
from .clone import SPEED_OF_LIGHT_KMS
from .diagnostics import FitFlag
from .transfer import TransferModel

__all__ = ["rv_by_continuum_degree", "continuum_spread", "telluric_saturation_flags"]


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
        RVs on the grid (default 41).

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


@torch.no_grad()
def telluric_saturation_flags(model: TransferModel, weight: Tensor, *,
                              template_floor: float = SATURATED_TEMPLATE_TRANSMISSION,
                              seen: float = SEEN_TRANSMISSION,
                              max_fraction: float = SATURATED_PIXEL_FRACTION) -> list[FitFlag]:
    r"""``telluric_template_saturated`` for the orders whose fitted transmission is extrapolated
    from a saturated template.

    On the model grid, with :math:`\tau_k = -\ln T_k` of each telluric component as cloned (its
    own column, X = 1) and the fitted powers :math:`X_k`, a data pixel (weight > 0, nearest grid
    point) is *extrapolated* where :math:`T_1 = e^{-\sum_k \tau_k}` < ``template_floor`` but
    :math:`e^{-\sum_k X_k \tau_k}` > ``seen``. An order with more than ``max_fraction`` of its
    fitted pixels extrapolated is flagged: a drier atmosphere than the template's, seen through
    bands that the template saturates, needs a template for that column or one at native
    resolution there. Nothing is flagged near X = 1, whatever the saturation.

    Parameters
    ----------
    model : TransferModel
        The fitted model (no telluric clone: ``[]``).
    weight : Tensor
        1/σ² of the data pixels (0 where masked).
    template_floor, seen, max_fraction : float
        The rule's numbers (defaults 1e-3, 0.05 and 0.05).

    Returns
    -------
    list of FitFlag
        At most one flag, naming the orders (the model's order indices) and their fractions.
    """
    tel = model.telluric
    if tel is None:
        return []
    lam_z = model.lam_z
    x = model.telluric_power.detach()
    if model.telluric_masks is None:
        tau = -tel.log_flux(lam_z)
        tau_fit = x * tau
    else:
        taus = [-tel.log_flux(lam_z, lines=m) for m in model.telluric_masks]
        tau = sum(taus)
        tau_fit = sum(x[k] * t for k, t in enumerate(taus))
    idx = torch.searchsorted(lam_z, model.lam_d).clamp(0, lam_z.numel() - 1)
    good = weight > 0
    extrapolated = good & (tau[idx] > -math.log(template_floor)) & (tau_fit[idx] < -math.log(seen))
    oi = model.order_of_pixel
    n_orders = int(oi.max()) + 1 if oi.numel() else 0
    n_good = torch.bincount(oi[good], minlength=n_orders).double()
    n_bad = torch.bincount(oi[extrapolated], minlength=n_orders).double()
    frac = torch.where(n_good > 0, n_bad / n_good.clamp(min=1), torch.zeros_like(n_good))
    hit = [(k, float(frac[k])) for k in range(n_orders) if float(frac[k]) > max_fraction]
    if not hit:
        return []
    where = ", ".join(f"order {k}: {100 * f:.0f} %" for k, f in hit)
    return [FitFlag("telluric_template_saturated", f"the fitted telluric transmission is extrapolated from a "
                    f"saturated template ({where} of the fitted pixels): there the template transmits less than "
                    f"{100 * template_floor:.2g} % at its own column but the fit, at its power X, more than "
                    f"{100 * seen:.2g} %, and Beer's law cannot recover depths the template does not record "
                    "(saturated, and convolved to its resolution). Use a template computed for a column near "
                    "this night's, or mask these pixels", "telluric")]
