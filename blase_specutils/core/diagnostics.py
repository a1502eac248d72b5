"""What to doubt in a transfer-learning fit: its bounds and flag rules, the σ of its parameters from
the curvature of χ², and the flags themselves.

:class:`FitBounds` holds the bounds and the rules, :func:`chi2_curvature` the uncertainties and
:func:`check_fit` applies the rules to a fitted :class:`~.transfer.TransferModel`. The numbers are
in :mod:`blase_specutils.constants`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..constants import (WAVELENGTH_CORRECTION_FLAG_PULLS, BOUND_TOLERANCE, CURVATURE_STEPS, MAX_VSINI_KMS, MIN_CLONE_COVERAGE,
                         RESOLVING_POWER_RUNAWAY, RV_EDGE_TOLERANCE_KMS, CONTINUUM_TEST_EXTRA_DEGREES, RV_SCALE_FLOOR_KMS, RV_SCAN_STEP_KMS,
                         TELLURIC_POWER_RUNAWAY, TELLURIC_POWER_SCAN_LOGSPACE, UNCONSTRAINED_FRACTION,
                         VSINI_SCAN_GEOMSPACE_KMS)
from .clone import SPEED_OF_LIGHT_KMS

if TYPE_CHECKING:
    from .stages import TransferFit
    from .transfer import TransferModel

__all__ = ["FitBounds", "FitFlag", "check_fit", "chi2_curvature", "MAX_VSINI_KMS", "VSINI_SCAN_KMS",
           "TELLURIC_POWER_SCAN"]

#: v sin i (km/s) of the coarse scan that starts the optimiser: 14 values log-spaced from 2 to
#: 400 km/s (ratio 1.50), evaluated jointly with the RV scan.
VSINI_SCAN_KMS = tuple(float(v) for v in np.geomspace(*VSINI_SCAN_GEOMSPACE_KMS))

#: Telluric powers X of the χ² scan that starts template matching when X is tuned: 70 values
#: log-spaced from 0.01 to 10 (ratio 1.105). Dry nights against a wet template reach X ≈ 0.02 in
#: water (the IGRINS A0V night against PSG's default atmosphere).
TELLURIC_POWER_SCAN = tuple(float(x) for x in np.exp(np.linspace(math.log(TELLURIC_POWER_SCAN_LOGSPACE[0]),
                                                                 math.log(TELLURIC_POWER_SCAN_LOGSPACE[1]),
                                                                 TELLURIC_POWER_SCAN_LOGSPACE[2])))

#: Finite-difference steps of :func:`chi2_curvature` (see :data:`blase_specutils.constants.CURVATURE_STEPS`).
_CURVATURE_STEPS = CURVATURE_STEPS


@dataclass(frozen=True)
class FitBounds:
    r"""The bounds of a transfer-learning fit and the rules that flag a suspect result.

    Bounds (enforced):

    * RV: :math:`|RV| \le` ``max_rv`` of the :class:`TransferModel` (``fit_spectrum`` sets it to
      its ``rv_range``, the half width of the RV scan): the parameter is projected back after each
      Adam step, and scans beyond it are refused.
    * v sin i: :math:`0 < v\sin i \le` ``max_vsini`` (600 km/s); ln v sin i is the parameter.
      The rotation kernel of a fit is sized to the v sin i found (max(2 v sin i, v sin i + 20
      km/s), a working size, not a bound: it is doubled and the stage run again whenever v sin i
      reaches it) and never exceeds ``max_vsini``, where v sin i is held.
    * R (when tuned): :math:`R \ge` 0.375 × its starting value, the smallest R the fixed
      instrumental kernel represents (:attr:`~.extrinsic.InstrumentalBroadening.min_resolving_power`).
    * The telluric power X is not bounded (ln X is the parameter, so X > 0); it is flagged instead
      (below).

    Flags (:func:`check_fit`), codes in brackets:

    * ``rv_at_bound``: :math:`|RV|` ends within ``rv_edge_tolerance`` (1 km/s) of ``max_rv``.
    * ``rv_scan_edge``: the best RV of the initial scan is its first or last value.
    * ``vsini_at_bound``: v sin i ends within ``bound_tolerance`` (1 %) of ``max_vsini``.
    * ``vsini_scan_edge``: the best v sin i of the scan is its largest value (400 km/s).
    * ``resolving_power_at_bound``: R (tuned) ends within 1 % of its lower bound;
      ``resolving_power_runaway``: R (tuned) ends above ``resolving_power_runaway`` (2.5) times its
      start.
    * ``telluric_power_grid_edge``: the best X of the scan is its first (0.01) or last (10) value.
    * ``telluric_power_runaway``: X ends outside the scanned range (0.01-10), or more than a factor
      ``telluric_power_runaway`` (3) from the best X of the scan (the χ² surface the scan saw and
      the one the optimiser ended on disagree: the continuum, the lines or the star took over).
      With several telluric components (one power per molecule) the scan is of one power common
      to all, so only the range applies to each X_k.
    * ``stellar_clone_is_telluric`` and ``stellar_clone_coverage`` / ``telluric_clone_coverage``
      (set by ``fit_spectrum``, which sees the clones' metadata): a telluric clone given as the
      stellar one; a clone whose band covers less than ``min_coverage`` (90 %) of the good data
      pixels.
    * ``rv_moved_by_lines``, ``vsini_moved_by_lines``: the line stage moved RV (v sin i, when
      free) from its template-matching value by more than the same 30 % (RV: of max(|RV|,
      10 km/s)): the tuned lines (centres, widths) and the parameter are degenerate in this
      order, so its value is set by the lines, not measured (the σ below are conditional on the
      lines and do not show it).
    * ``rv_depends_on_continuum``: after template matching, the RV of least χ² moves by more than
      the same 30 % of max(|RV|, 10 km/s) when the continuum polynomial's degree d is raised to
      d + 2 and d + 4 (``continuum_test_degrees``;
      :func:`~blase_specutils.core.systematics.rv_by_continuum_degree`): broad, shallow stellar
      lines (a fast rotator) share their pixels with the continuum, and the RV rests on the
      continuum model as much as on the lines (its σ from the curvature of χ² does not show it;
      the spread is ``uncertainties["rv_continuum"]``).
    * ``vsini_differs_between_halves``: after template matching, the v sin i of least χ² found on
      the blue half of every order and the one found on the red half
      (:func:`~blase_specutils.core.systematics.vsini_by_order_half`) differ by more than the same
      30 % of max(v sin i, c/R): v sin i rests on a few lines whose shapes the template does not
      match, not on the rotation that all lines share (the spread is
      ``uncertainties["vsini_halves"]``).
    * ``vsini_from_few_lines`` (set by ``fit_spectrum``): the information on v sin i fills fewer
      than 3 independent broadened line widths of data
      (:func:`~blase_specutils.core.systematics.vsini_information_flags`), so the template's shapes
      of one or two lines set it.
    * ``rv_from_few_lines`` (set by ``fit_spectrum``): the same for the RV
      (:func:`~blase_specutils.core.systematics.rv_information_flags`): where the template puts one
      or two broad lines sets it.
    * ``rv_unconstrained``, ``vsini_unconstrained``, ``telluric_power_unconstrained``: the σ from
      the curvature of χ² (:func:`chi2_curvature`) exceeds ``unconstrained_fraction`` (30 %) of
      the value, or χ² has no minimum there (curvature ≤ 0). RV has no natural zero (it depends on
      the frame), so it is compared with :math:`\max(|RV|, \text{rv\_scale\_floor})`: flagged when
      σ_RV > 0.3 × max(|RV|, 10 km/s), i.e. when it is uncertain by more than 3 km/s near zero.

    Parameters
    ----------
    max_vsini : float
        Upper bound of v sin i, km/s (default :data:`MAX_VSINI_KMS`, 600).
    vsini_scan : tuple of float
        v sin i values (km/s) of the coarse scan that starts the optimiser (default
        :data:`VSINI_SCAN_KMS`: 2-400 km/s, 14 values); each must be in (0, ``max_vsini``].
    rv_step : float
        Step (km/s) of the RV scan (default 1).
    rv_edge_tolerance : float
        km/s; an RV this close to ``max_rv`` counts as at the bound (default 1).
    bound_tolerance : float
        Relative distance to a bound that counts as at it (default 0.01).
    resolving_power_runaway : float
        A tuned R above this factor times its start is flagged (default 2.5).
    telluric_power_runaway : float
        Factor from the scan's best X beyond which X is flagged as running away (default 3).
    unconstrained_fraction : float
        σ / value above which a parameter is flagged as not constrained by the data (default 0.3).
    rv_scale_floor : float
        km/s; the RV's σ is compared with ``unconstrained_fraction`` × max(|RV|, this) (default 10).
    min_coverage : float
        Smallest fraction (0-1] of the good data pixels a clone's band must cover (default 0.9).
    continuum_test_degrees : tuple of int
        Degrees added to the continuum polynomial's in the RV's continuum test (default (2, 4);
        ``()``: no test).
    """

    max_vsini: float = MAX_VSINI_KMS
    vsini_scan: tuple = field(default=VSINI_SCAN_KMS)
    rv_step: float = RV_SCAN_STEP_KMS
    rv_edge_tolerance: float = RV_EDGE_TOLERANCE_KMS
    bound_tolerance: float = BOUND_TOLERANCE
    resolving_power_runaway: float = RESOLVING_POWER_RUNAWAY
    telluric_power_runaway: float = TELLURIC_POWER_RUNAWAY
    unconstrained_fraction: float = UNCONSTRAINED_FRACTION
    rv_scale_floor: float = RV_SCALE_FLOOR_KMS
    min_coverage: float = MIN_CLONE_COVERAGE
    continuum_test_degrees: tuple = field(default=CONTINUUM_TEST_EXTRA_DEGREES)

    def __post_init__(self) -> None:
        for name in ("max_vsini", "rv_step", "rv_edge_tolerance", "bound_tolerance", "resolving_power_runaway",
                     "telluric_power_runaway", "unconstrained_fraction", "rv_scale_floor", "min_coverage"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or \
                    not (math.isfinite(float(v)) and float(v) > 0):
                raise ValueError(f"FitBounds.{name} must be a finite number > 0, got {v!r}")
        if self.min_coverage > 1:
            raise ValueError(f"FitBounds.min_coverage must be in (0, 1], got {self.min_coverage!r}")
        scan = tuple(float(v) for v in self.vsini_scan)
        if not scan or any(not (math.isfinite(v) and 0 < v <= self.max_vsini) for v in scan):
            raise ValueError(f"FitBounds.vsini_scan must hold values in (0, max_vsini = {self.max_vsini}] km/s, "
                             f"got {self.vsini_scan!r}")
        object.__setattr__(self, "vsini_scan", tuple(sorted(scan)))
        degrees = self.continuum_test_degrees
        degrees = tuple(degrees) if isinstance(degrees, (tuple, list)) else (None,)
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in degrees):
            raise ValueError("FitBounds.continuum_test_degrees must hold whole numbers ≥ 1 (degrees added to the "
                             f"continuum polynomial's), got {self.continuum_test_degrees!r}")
        object.__setattr__(self, "continuum_test_degrees", tuple(int(k) for k in degrees))


@dataclass(frozen=True)
class FitFlag:
    """One reason to doubt a fitted number.

    Attributes
    ----------
    code : str
        Short machine-readable code, e.g. ``"vsini_at_bound"`` (see :class:`FitBounds`).
    message : str
        One human sentence with the numbers.
    parameter : str or None
        The parameter concerned (``"rv"``, ``"vsini"``, ``"resolving_power"``, ``"telluric_power"``,
        ``"stellar"`` / ``"telluric"`` for a clone), or None.
    """

    code: str
    message: str
    parameter: str | None = None

    def to_dict(self) -> dict:
        """``{"code", "message", "parameter"}`` (for JSON)."""
        return {"code": self.code, "message": self.message, "parameter": self.parameter}


def _curvature_handles(model: TransferModel, parameters: Sequence[str]) -> dict[str, tuple]:
    """For each parameter of :func:`chi2_curvature` the model has: (the tensor the optimiser tunes,
    its index or None, its value now, the finite-difference step, the value its σ scales by or None
    for the RV, whose σ is in km/s already)."""
    names = [p for p in parameters if (p in ("rv", "vsini") and model.stellar is not None)
             or (p == "telluric_power" and model.telluric is not None)]
    if not names:
        return {}
    vs0 = float(model.vsini.detach())
    width = math.hypot(float(SPEED_OF_LIGHT_KMS) / float(model.resolving_power.detach()), vs0)
    handles = {}
    for name in names:
        if name == "rv":
            handles[name] = (model.rv, None, float(model.rv.detach()), _CURVATURE_STEPS["rv"] * width, None)
        elif name == "vsini":
            handles[name] = (model.rot.log_vsini, None, math.log(vs0), _CURVATURE_STEPS["vsini"], vs0)
    if "telluric_power" in names:  # one entry per power, after RV and v sin i
        log_x = model.log_telluric_power.detach()
        keys = ([("telluric_power", None)] if log_x.ndim == 0 else
                [(f"telluric_power_{n}", k) for k, n in enumerate(model.telluric_names)])
        for key, k in keys:
            x0 = float(log_x if k is None else log_x[k])
            handles[key] = (model.log_telluric_power, k, x0, _CURVATURE_STEPS["telluric_power"], math.exp(x0))
    return handles


def _hessian(chi2_at, f0: float, handles: dict[str, tuple]) -> np.ndarray:
    """The Hessian of χ² in the parameters of ``handles`` by central differences (the RV-v sin i term
    included), ``chi2_at`` giving χ² at a shift of some of them and ``f0`` at none."""
    names = list(handles)
    n = len(names)
    hess = np.zeros((n, n))
    for i, a in enumerate(names):
        h = handles[a][3]
        hess[i, i] = (chi2_at({a: h}) - 2.0 * f0 + chi2_at({a: -h})) / (h * h)
    if "rv" in names and "vsini" in names:
        i, j = names.index("rv"), names.index("vsini")
        hi, hj = handles["rv"][3], handles["vsini"][3]
        mixed = (chi2_at({"rv": hi, "vsini": hj}) - chi2_at({"rv": hi, "vsini": -hj})
                 - chi2_at({"rv": -hi, "vsini": hj}) + chi2_at({"rv": -hi, "vsini": -hj})) / (4 * hi * hj)
        hess[i, j] = hess[j, i] = mixed
    return hess


def _variances(hess: np.ndarray) -> np.ndarray:
    """The diagonal of the covariance 2 H⁻¹, or of 2 / diag(H) where H is not positive definite;
    ``inf`` where the curvature is ≤ 0."""
    diag = np.diag(hess)
    var = np.full(len(diag), np.inf)
    if np.all(diag > 0):
        try:
            cov = 2.0 * np.linalg.inv(hess)
            if np.all(np.linalg.eigvalsh(hess) > 0):
                var = np.diag(cov)
            else:
                var = 2.0 / diag
        except np.linalg.LinAlgError:
            var = 2.0 / diag
    else:
        var = np.where(diag > 0, 2.0 / np.where(diag > 0, diag, 1.0), np.inf)
    return var


@torch.no_grad()
def chi2_curvature(model: TransferModel, data: Tensor, weight: Tensor, *,
                   parameters: Sequence[str] = ("rv", "vsini", "telluric_power")) -> dict[str, float]:
    r"""1σ uncertainties of RV, v sin i and the telluric power X from the curvature of χ².

    χ² is evaluated at the model's current (fitted) values and at finite steps around them (RV:
    ±0.05 w, with :math:`w = \sqrt{(c/R)^2 + (v\sin i)^2}` the broadened line width; v sin i and
    X: ±5 % in the logarithm, the parameter the optimiser tunes), with the continuum solved at
    every point (profiled out) and the lines held fixed. The Hessian :math:`H` of χ² in these
    parameters (mixed RV-v sin i term included: 9 to 13 evaluations of the model) gives the
    covariance :math:`2H^{-1}`; when :math:`H` is not positive definite the diagonal alone is used.
    The σ are scaled by :math:`\max(1, \sqrt{\chi^2_\mathrm{red}})` (a misfit widens them) and
    conditional on the lines, R and the other parameters not listed. The model is left as it was.

    Parameters
    ----------
    model : TransferModel
    data, weight : Tensor
        Data flux and 1/σ² (0 where masked).
    parameters : sequence of str
        Which of ``"rv"``, ``"vsini"``, ``"telluric_power"`` (those the model lacks are skipped).

    Returns
    -------
    dict of float
        σ of each parameter in its own units (km/s; X dimensionless); ``inf`` where χ² has no
        minimum there (curvature ≤ 0, e.g. v sin i held at its bound or below the resolution).
    """
    handles = _curvature_handles(model, parameters)
    if not handles:
        return {}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def chi2_at(shift: dict[str, float]) -> float:
        for n, (t, k, x0, _, _) in handles.items():
            (t if k is None else t[k]).fill_(x0 + shift.get(n, 0.0))
        return model._profiled_chi2(model.unscaled(), data, weight)

    try:
        f0 = chi2_at({})
        hess = _hessian(chi2_at, f0, handles)
    finally:
        model.load_state_dict(state)
    n_good = int((weight > 0).sum())
    scale = math.sqrt(max(1.0, f0 / max(n_good - 3, 1)))
    var = _variances(hess)
    out = {}
    for k, (name, handle) in enumerate(handles.items()):
        s_log = math.sqrt(var[k]) * scale if math.isfinite(var[k]) else math.inf
        out[name] = s_log if handle[4] is None else handle[4] * s_log  # σ of ln x → σ of x
    return out


def check_fit(model: TransferModel, fit: TransferFit, *, bounds: FitBounds | None = None,
              sigmas: dict[str, float] | None = None, tuned: Sequence[str] = (),
              start: dict[str, float] | None = None, template: dict[str, float] | None = None,
              weight: Tensor | None = None) -> list[FitFlag]:
    """The flags of a fitted model: parameters at a bound, scans that peak at an edge, a runaway
    telluric power, parameters the data do not constrain (the rules of :class:`FitBounds`).

    Parameters
    ----------
    model : TransferModel
        The fitted model.
    fit : TransferFit
        Its scans.
    bounds : FitBounds, optional
        The rules (default ``FitBounds()``).
    sigmas : dict, optional
        σ of ``"rv"``, ``"vsini"``, ``"telluric_power"`` (:func:`chi2_curvature`).
    tuned : sequence of str
        The parameters that were free: any of ``"rv"``, ``"vsini"``, ``"resolving_power"``,
        ``"telluric_power"`` (a parameter held fixed is not flagged at a bound).
    start : dict, optional
        Starting values (``"resolving_power"``) for the runaway rules.
    template : dict, optional
        ``"rv"`` and ``"vsini"`` after template matching, when a line stage followed (for the
        ``*_moved_by_lines`` rules).
    weight : Tensor, optional
        1/σ² of the data pixels (0 where masked): the wavelength correction is judged at the
        fitted pixels only (None: at every pixel).

    Returns
    -------
    list of FitFlag
    """
    b = FitBounds() if bounds is None else bounds
    sigmas = sigmas or {}
    tuned = set(tuned)
    flags: list[FitFlag] = []
    if model.stellar is not None:
        flags += _bound_and_scan_flags(model, fit, b, tuned)
        flags += _measurement_flags(model, b, sigmas, tuned, template or {})
    if "resolving_power" in tuned:
        flags += _resolving_power_flags(model, b, start or {})
    if model.telluric is not None and "telluric_power" in tuned:
        flags += _power_flags(model, fit, b, sigmas)
    flags += _calibration_flags(model, weight)
    return flags


def _calibration_flags(model: TransferModel, weight: Tensor | None = None) -> list[FitFlag]:
    """``wavelength_correction_large``: a per-order wavelength correction that reaches more than
    ``WAVELENGTH_CORRECTION_FLAG_PULLS`` times its Gaussian pull at a fitted pixel of the order (a
    masked stretch at an order's end, where the polynomial only extrapolates, does not count). Its
    pull shrinks it, and it is applied to first order (M + δv dM/dv), which fails as δv approaches
    the lines' widths: such a correction says the wavelength scale, or the frame, is off."""
    dv = model.velocity_correction()
    if dv is None:
        return []
    if weight is not None:
        dv = torch.where(weight > 0, dv, torch.zeros_like(dv))
    limit = WAVELENGTH_CORRECTION_FLAG_PULLS * model.calibration_prior
    worst = torch.zeros(model.n_orders, dtype=dv.dtype, device=dv.device).index_reduce_(
        0, model.order_of_pixel, dv.detach().abs(), "amax", include_self=True).cpu().numpy()
    bad = [(k, float(v)) for k, v in enumerate(worst) if v > limit]
    if not bad:
        return []
    text = ", ".join(f"order {k}: {1000 * v:.0f} m/s" for k, v in bad)
    return [FitFlag("wavelength_correction_large", f"the wavelength correction reaches {text}, more than "
                    f"{WAVELENGTH_CORRECTION_FLAG_PULLS:g} times its {1000 * model.calibration_prior:.0f} m/s pull: "
                    "the wavelength solution or the stated frame of the data is off by about that much (the "
                    "correction is shrunk by its pull and applied to first order, so it does not fully repair it)",
                    "wavelength_correction")]


def _bound_and_scan_flags(model: TransferModel, fit: TransferFit, b: FitBounds, tuned: set) -> list[FitFlag]:
    """The RV and v sin i flags of bounds and scans: at a bound, or the scan's best at its edge."""
    flags: list[FitFlag] = []
    rv, vs = float(model.rv.detach()), float(model.vsini.detach())
    if "rv" in tuned and abs(rv) >= model.max_rv - b.rv_edge_tolerance:
        flags.append(FitFlag("rv_at_bound", f"RV = {rv:.2f} km/s ended at its bound ±{model.max_rv:.6g} km/s "
                             "(the RV range): the star's lines were not found within it; widen rv_range, or "
                             "check that the stellar clone is a stellar one of this band", "rv"))
    if fit.rv_scan is not None and fit.rv_scan[0].size > 2:
        rvs, chi2 = fit.rv_scan
        k = int(np.argmin(chi2))
        if k in (0, rvs.size - 1):
            flags.append(FitFlag("rv_scan_edge", f"the RV scan ({rvs[0]:.6g} to {rvs[-1]:.6g} km/s) has its "
                                 f"best χ² at its edge, {rvs[k]:.6g} km/s: no minimum inside the scan (a telluric clone "
                                 "given as the stellar one, or a star outside the range, does this)", "rv"))
    if "vsini" in tuned and vs >= model.rot.max_vsini * (1.0 - b.bound_tolerance):
        flags.append(FitFlag("vsini_at_bound", f"v sin i = {vs:.1f} km/s ended at its upper bound "
                             f"{model.rot.max_vsini:.6g} km/s", "vsini"))
    if fit.vsini_scan is not None and fit.vsini_scan[0].size > 1:
        v, chi2 = fit.vsini_scan
        if int(np.argmin(chi2)) == v.size - 1:
            flags.append(FitFlag("vsini_scan_edge", f"the v sin i scan ({v[0]:.3g}-{v[-1]:.3g} km/s) has its "
                                 f"best χ² at its largest value, {v[-1]:.3g} km/s", "vsini"))
    return flags


def _measurement_flags(model: TransferModel, b: FitBounds, sigmas: dict[str, float], tuned: set,
                       template: dict[str, float]) -> list[FitFlag]:
    """The RV and v sin i flags of what the data say: moved by the line stage, or not constrained."""
    flags: list[FitFlag] = []
    frac = b.unconstrained_fraction
    rv, vs = float(model.rv.detach()), float(model.vsini.detach())
    rv_t, vs_t = template.get("rv"), template.get("vsini")
    if "rv" in tuned and rv_t is not None and abs(rv - rv_t) > frac * max(abs(rv_t), b.rv_scale_floor):
        flags.append(FitFlag("rv_moved_by_lines", f"the line stage moved the RV from {rv_t:.2f} (template "
                             f"matching) to {rv:.2f} km/s: the tuned lines (their centres) and the RV are "
                             "degenerate in these data, so the RV is set by the lines, not measured", "rv"))
    if "vsini" in tuned and vs_t is not None and abs(vs - vs_t) > frac * vs_t:
        flags.append(FitFlag("vsini_moved_by_lines", f"the line stage moved v sin i from {vs_t:.2f} (template "
                             f"matching) to {vs:.2f} km/s: the tuned lines (their widths) and v sin i are "
                             "degenerate in these data, so v sin i is set by the lines, not measured", "vsini"))
    spread = sigmas.get("rv_continuum")
    if "rv" in tuned and spread is not None and spread > frac * max(abs(rv), b.rv_scale_floor):
        flags.append(FitFlag("rv_depends_on_continuum", f"RV = {rv:.2f} km/s rests on the continuum model: with "
                             f"the lines as cloned, its best value moves by {spread:.3g} km/s when the continuum "
                             "polynomial's degree is raised, more than "
                             f"{100 * frac:.0f} % of max(|RV|, {b.rv_scale_floor:.3g} km/s); its σ from the curvature "
                             f"of χ² ({_fmt_sigma(sigmas.get('rv', math.inf), ' km/s')}) does not include this. Broad, "
                             "shallow stellar lines do this (a fast rotator): fit several orders jointly", "rv"))
    halves = sigmas.get("vsini_halves")
    scale = max(vs, float(SPEED_OF_LIGHT_KMS) / float(model.resolving_power.detach()))
    if "vsini" in tuned and halves is not None and halves > frac * scale:
        flags.append(FitFlag("vsini_differs_between_halves", f"v sin i = {vs:.1f} km/s is not the same in the "
                             f"two halves of the orders: with the lines as cloned, the blue and the red halves "
                             f"give values {halves:.3g} km/s apart, more than {100 * frac:.0f} % of max(v sin i, "
                             f"c/R); its σ from the curvature of χ² ({_fmt_sigma(sigmas.get('vsini', math.inf), ' km/s')}) "
                             "does not include this. v sin i rests on a few lines whose shapes the template does not "
                             "match (hydrogen lines, blends): fit several orders jointly, or use a template closer "
                             "to the star", "vsini"))
    s_rv = sigmas.get("rv")
    if "rv" in tuned and s_rv is not None and not s_rv <= frac * max(abs(rv), b.rv_scale_floor):
        flags.append(FitFlag("rv_unconstrained", f"RV = {rv:.2f} km/s is not constrained by the data: its σ from "
                             f"the curvature of χ² is {_fmt_sigma(s_rv, ' km/s')}, more than "
                             f"{100 * frac:.0f} % of "
                             f"max(|RV|, {b.rv_scale_floor:.3g} km/s)", "rv"))
    s_vs = sigmas.get("vsini")
    if "vsini" in tuned and s_vs is not None and not s_vs <= frac * vs:
        flags.append(FitFlag("vsini_unconstrained", f"v sin i = {vs:.2f} km/s is not constrained by the data: its σ "
                             f"from the curvature of χ² is {_fmt_sigma(s_vs, ' km/s')}, more than {100 * frac:.0f} % of "
                             "its value", "vsini"))
    return flags


def _resolving_power_flags(model: TransferModel, b: FitBounds, start: dict[str, float]) -> list[FitFlag]:
    """The flags of a tuned R: at its lower bound, or run away from its start."""
    flags: list[FitFlag] = []
    r = float(model.resolving_power.detach())
    r_min = model.inst.min_resolving_power
    if r <= r_min * (1.0 + b.bound_tolerance):
        flags.append(FitFlag("resolving_power_at_bound", f"R = {r:.0f} ended at its lower bound {r_min:.0f} (the "
                             "widest instrumental kernel the model holds)", "resolving_power"))
    r0 = start.get("resolving_power")
    if r0 is not None and r > b.resolving_power_runaway * r0:
        flags.append(FitFlag("resolving_power_runaway", f"R ran away to {r:.0f}, more than "
                             f"{b.resolving_power_runaway:g} times its start {r0:.0f} (a template already at the "
                             "instrument's resolution does this)", "resolving_power"))
    return flags


def _power_flags(model: TransferModel, fit: TransferFit, b: FitBounds, sigmas: dict[str, float]) -> list[FitFlag]:
    """The flags of the telluric power(s): scan edge, runaway, unconstrained (one set per component)."""
    flags: list[FitFlag] = []
    log_x = model.log_telluric_power.detach().cpu()
    if log_x.ndim == 0:
        entries = [("telluric_power", "X", math.exp(float(log_x)))]
    else:
        entries = [(f"telluric_power_{n}", f"X({n})", math.exp(float(v))) for n, v in zip(model.telluric_names, log_x)]
    x_scan = None
    if fit.telluric_power_scan is not None and fit.telluric_power_scan[0].size > 1:
        grid, chi2 = fit.telluric_power_scan
        k = int(np.argmin(chi2))
        x_scan = float(grid[k])
        lo, hi = float(grid.min()), float(grid.max())
        if k in (0, grid.size - 1):
            flags.append(FitFlag("telluric_power_grid_edge", f"the telluric power scan ({lo:.3g}-{hi:.3g}) has its "
                                 f"best χ² at its edge, X = {x_scan:.3g}", "telluric_power"))
    f = b.telluric_power_runaway
    frac = b.unconstrained_fraction
    several = len(entries) > 1  # the scan is of one power common to all components: only its range applies
    for key, label, x in entries:
        if x_scan is not None and (not (lo <= x <= hi) or (not several and not (x_scan / f <= x <= x_scan * f))):
            flags.append(FitFlag("telluric_power_runaway", f"the telluric power ran away: {label} = {x:.4g}, outside "
                                 f"the scanned range {lo:.3g}-{hi:.3g} or more than a factor {f:g} from the scan's best "
                                 f"X = {x_scan:.3g}", key))
        s_x = sigmas.get(key)
        if s_x is not None and not s_x <= frac * x:
            flags.append(FitFlag("telluric_power_unconstrained", f"the telluric power {label} = {x:.4g} is not "
                                 f"constrained by the data: its σ from the curvature of χ² is {_fmt_sigma(s_x)}, more "
                                 f"than {100 * frac:.0f} % of its value", key))
    return flags


def _fmt_sigma(s: float, unit: str = "") -> str:
    return "infinite (χ² has no minimum there)" if not math.isfinite(s) else f"{s:.3g}{unit}"
