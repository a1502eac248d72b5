"""Systematic checks that the curvature of χ² cannot see: an RV that rests on the continuum, a
v sin i that the two halves of the orders do not agree on, and telluric transmission extrapolated
from a saturated template.

:func:`rv_by_continuum_degree` finds the RV again with continuum polynomials of higher degree. A
star whose lines are narrow sets its RV with the line cores, and any smooth continuum leaves it
where it is. A fast rotator's lines are a few per cent deep and hundreds of km/s wide: there the
continuum polynomial and the RV share the same pixels, the χ² surface in RV is shallow and wide,
and a slightly different continuum moves its minimum by many times the σ from its curvature. The
spread of those minima is the RV's continuum systematic (``TransferResult.uncertainties
["rv_continuum"]``); :func:`~blase_specutils.core.diagnostics.check_fit` flags an RV whose spread
exceeds the ``unconstrained_fraction`` rule (``rv_depends_on_continuum``).

:func:`vsini_by_order_half` measures v sin i again on the blue and on the red half of every order,
each half on its own (a split-sample test). Where the template describes the star, both halves
see the same rotation. Where v sin i rests on a few lines whose shapes the template gets wrong
(the Stark-broadened hydrogen lines of an A star, whose wings are wider than its rotation, or a
blend the synthesis misplaces), the halves disagree by far more than their statistical σ: the
spread is ``uncertainties["vsini_halves"]`` and the flag ``vsini_differs_between_halves``.
Where the information on v sin i sits in one or two lines, the halves can agree and still share
the template's error: :func:`vsini_information_widths` counts how many independent broadened line
widths of data carry that information, and ``vsini_from_few_lines`` flags fewer than
``VSINI_MIN_INFORMATION_WIDTHS``. :func:`rv_information_widths` counts the same for the RV
(``rv_from_few_lines``): the RV of one or two broad lines rests on where the template puts them.

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

from ..constants import (CONTINUUM_TEST_EXTRA_DEGREES, CONTINUUM_TEST_GRID, HALVES_TEST_GRID,
                         HALVES_TEST_VSINI_RANGE, SATURATED_PIXEL_FRACTION, SATURATED_TEMPLATE_TRANSMISSION,
                         RV_MIN_INFORMATION_WIDTHS, SEEN_TRANSMISSION,
                         VSINI_MIN_INFORMATION_WIDTHS)
from .clone import SPEED_OF_LIGHT_KMS
from .diagnostics import FitFlag
from .transfer import TransferModel

__all__ = ["rv_by_continuum_degree", "vsini_by_order_half", "value_spread", "vsini_information_widths",
           "vsini_information_flags", "rv_information_widths", "rv_information_flags",
           "telluric_saturation_flags"]


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


def value_spread(values: dict | None) -> float | None:
    """Largest minus smallest of a dict's values (:func:`rv_by_continuum_degree`'s RVs,
    :func:`vsini_by_order_half`'s v sin i); None with fewer than two."""
    if not values or len(values) < 2:
        return None
    v = list(values.values())
    return float(max(v) - min(v))


def _half_weights(model: TransferModel, weight: Tensor) -> dict[str, Tensor]:
    """``weight`` zeroed outside the blue (red) half of each order's fitted pixels, split at the
    order's median fitted wavelength."""
    oi, lam, good = model.order_of_pixel, model.lam_d, weight > 0
    blue = torch.zeros_like(good)
    for k in torch.unique(oi[good]).tolist():
        in_k = good & (oi == k)
        blue |= in_k & (lam < lam[in_k].median())
    return {"blue": torch.where(blue, weight, torch.zeros_like(weight)),
            "red": torch.where(good & ~blue, weight, torch.zeros_like(weight))}


@torch.no_grad()
def vsini_by_order_half(model: TransferModel, data: Tensor, weight: Tensor, *,
                        n_grid: int = HALVES_TEST_GRID, span: float = HALVES_TEST_VSINI_RANGE) -> dict[str, float]:
    r"""v sin i (km/s) of least χ² on the blue and on the red half of every order, each on its own.

    Each order's fitted pixels are split at their median wavelength. The model is evaluated on
    ``n_grid`` values of ln v sin i across ``[ln(v/span), ln(v·span)]`` (within the rotation
    kernel's room), everything else as it stands (call it after template matching: the lines as
    cloned, RV, R and X as matched). At each value the per-order continuum
    :math:`P_\mathrm{data}` is solved by weighted least squares on each half alone (the other
    half's weight set to 0), so one evaluation of the model gives both halves' χ²; each minimum is
    refined by a parabola. The model is left as it was.

    Parameters
    ----------
    model : TransferModel
        With a stellar clone (a telluric-only model: returns ``{}``).
    data, weight : Tensor
        Data flux and 1/σ² (0 where masked).
    n_grid : int
        Values of v sin i on the grid (default 21).
    span : float
        The grid reaches from v/span to v·span (default 3).

    Returns
    -------
    dict of str to float
        ``{"blue": v sin i, "red": v sin i}`` (km/s).
    """
    if model.stellar is None:
        return {}
    lv0 = model.rot.log_vsini.detach().clone()
    vs0 = float(model.vsini.detach())
    lo = math.log(max(vs0 / span, 0.1))
    hi = math.log(min(vs0 * span, model.rot.max_vsini))
    ln_vs = np.linspace(lo, hi, max(int(n_grid), 3))
    halves = _half_weights(model, weight)
    chi2 = {name: np.empty(ln_vs.size) for name in halves}
    try:
        for i, v in enumerate(ln_vs):
            model.rot.log_vsini.fill_(float(v))
            base = model.unscaled()
            for name, w_half in halves.items():
                chi2[name][i] = model._profiled_chi2(base, data, w_half)
    finally:
        model.rot.log_vsini.copy_(lv0)
    return {name: math.exp(_parabola_min(ln_vs, c)) for name, c in chi2.items()}


@torch.no_grad()
def _information_widths(model: TransferModel, weight: Tensor, derivative: Tensor) -> float | None:
    r"""The count of :func:`vsini_information_widths` and :func:`rv_information_widths` from the
    model's derivative with respect to the parameter: :math:`(\sum_i J_i)^2 / \sum_i n_i J_i^2`
    with :math:`J_i = w_i\,(\partial M_i/\partial\theta)^2` and :math:`n_i` the broadened line
    width in pixels (None without information)."""
    info = weight * derivative ** 2
    total = float(info.sum())
    if not total > 0:
        return None
    lam, oi = model.lam_d, model.order_of_pixel
    pix = torch.ones_like(lam)
    for k in torch.unique(oi).tolist():
        in_k = oi == k
        lk = lam[in_k]
        if lk.numel() > 1:
            pix[in_k] = torch.diff(torch.sort(lk).values).median()
    n_pix = 2.0 * _broadened_width(model) * lam / float(SPEED_OF_LIGHT_KMS) / pix
    return total ** 2 / float((n_pix * info ** 2).sum())


def _derivative(model: TransferModel, param: Tensor, step: float) -> Tensor:
    """∂M/∂θ at the data pixels by central differences of ±``step`` in the scalar parameter
    ``param`` of ``model`` (restored afterwards)."""
    value = param.detach().clone()
    try:
        param.fill_(float(value) + step)
        plus = model()
        param.fill_(float(value) - step)
        minus = model()
    finally:
        param.copy_(value)
    return (plus - minus) / (2.0 * step)


def _broadened_width(model: TransferModel) -> float:
    """:math:`w = \sqrt{(c/R)^2 + (v\sin i)^2}` in km/s."""
    return math.hypot(float(SPEED_OF_LIGHT_KMS) / float(model.resolving_power.detach()), float(model.vsini.detach()))


@torch.no_grad()
def vsini_information_widths(model: TransferModel, weight: Tensor, *, step: float = 0.02) -> float | None:
    r"""How many independent broadened line widths of data carry the information on v sin i.

    With :math:`J_i = w_i\,(\partial M_i/\partial \ln v\sin i)^2` the Fisher information of
    pixel *i* (central differences of ±``step`` in ln v sin i, the model as it stands) and
    :math:`n_i = 2 w \lambda_i / (c\,\Delta\lambda_i)` the broadened line width in pixels
    (:math:`w = \sqrt{(c/R)^2 + (v\sin i)^2}`, :math:`\Delta\lambda_i` the order's median
    pixel step), the count is :math:`(\sum_i J_i)^2 / \sum_i n_i J_i^2`: the number of equal,
    independent line widths that would hold the same information. A K dwarf's HPF order (WASP 69)
    spreads it over 10.6 widths; one HPF order of an A star at 130-170 km/s holds it in 1.7-2.6.

    Parameters
    ----------
    model : TransferModel
        With a stellar clone (otherwise None).
    weight : Tensor
        1/σ² of the data pixels (0 where masked).
    step : float
        The finite-difference step in ln v sin i.

    Returns
    -------
    float or None
        The count (None without a stellar clone or without information).
    """
    if model.stellar is None:
        return None
    return _information_widths(model, weight, _derivative(model, model.rot.log_vsini, step))


@torch.no_grad()
def rv_information_widths(model: TransferModel, weight: Tensor, *, step: float = 0.02) -> float | None:
    r"""How many independent broadened line widths of data carry the information on the RV.

    The count of :func:`vsini_information_widths` with :math:`J_i = w_i\,(\partial M_i/\partial
    RV)^2` (central differences of ±``step``·w in RV, w the broadened line width). Only the stellar
    lines move with the RV (the telluric lines stay in the observatory frame), so this is where
    the stellar RV comes from. WASP 69's HPF order (a K5 dwarf) spreads it over 24.6 widths; one
    HPF order of HR 4829 (an A star at 100-170 km/s) holds it in 0.6-6.6, and the orders below 3
    widths give RVs from -15 to +52 km/s (four more at the edge of the RV scan) against the
    22-order value of +22.

    Parameters
    ----------
    model : TransferModel
        With a stellar clone (otherwise None).
    weight : Tensor
        1/σ² of the data pixels (0 where masked).
    step : float
        The finite-difference step, as a fraction of the broadened line width w.

    Returns
    -------
    float or None
        The count (None without a stellar clone or without information).
    """
    if model.stellar is None:
        return None
    return _information_widths(model, weight, _derivative(model, model.rv, step * _broadened_width(model)))


def vsini_information_flags(model: TransferModel, weight: Tensor, *, widths: float | None = None,
                            min_widths: float = VSINI_MIN_INFORMATION_WIDTHS) -> list[FitFlag]:
    """``vsini_from_few_lines`` where fewer than ``min_widths`` independent broadened line widths
    carry the information on v sin i (:func:`vsini_information_widths`, or ``widths`` where it was
    counted already: ``fit_spectrum`` counts after template matching, the lines as cloned): v sin i
    then rests on the template's shapes of one or two lines (a hydrogen line's Stark wings, a
    blend) as much as on the rotation, and no σ of these data shows it."""
    if model.stellar is None:
        return []
    n = vsini_information_widths(model, weight) if widths is None else widths
    return _few_lines_flag("vsini_from_few_lines", f"v sin i = {float(model.vsini.detach()):.1f} km/s", n, min_widths,
                           "the template's shapes of those lines set it as much as the rotation does", "vsini")


def rv_information_flags(model: TransferModel, weight: Tensor, *, widths: float | None = None,
                         min_widths: float = RV_MIN_INFORMATION_WIDTHS) -> list[FitFlag]:
    """``rv_from_few_lines`` where fewer than ``min_widths`` independent broadened line widths carry
    the information on the RV (:func:`rv_information_widths`, or ``widths`` where it was counted
    already): the RV then rests on where the template puts one or two lines (a blend, a hydrogen
    line's asymmetric wings) as much as on the Doppler shift that all lines share, and no σ of
    these data shows it."""
    if model.stellar is None:
        return []
    n = rv_information_widths(model, weight) if widths is None else widths
    return _few_lines_flag("rv_from_few_lines", f"RV = {float(model.rv.detach()):.2f} km/s", n, min_widths,
                           "where the template puts those lines sets it as much as the Doppler shift does", "rv")


def _few_lines_flag(code: str, value: str, n: float | None, min_widths: float, sets: str,
                    parameter: str) -> list[FitFlag]:
    """The ``*_from_few_lines`` flag where ``n`` < ``min_widths`` (none where ``n`` is None)."""
    if n is None or n >= min_widths:
        return []
    return [FitFlag(code, f"{value} rests on {n:.1f} broadened line widths of data (fewer than {min_widths:g}): the "
                    f"information on it sits in one or two lines, so {sets}, and its σ does not show this. Fit "
                    "several orders jointly", parameter)]


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
