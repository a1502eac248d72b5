r"""Transfer learning: the clone warped, multiplied, convolved and resampled to the data (Sect. 5).

.. math::
    M(\lambda_D) = P_\mathrm{data}(\lambda_D)\;
    \mathrm{resample}\Big[\big(S_\mathrm{clone}(\lambda_Z;\,\lambda_c(1+RV/c)) * \zeta(v/v\sin i)\big)
    \odot T_\mathrm{clone}(\lambda_Z) * g(R)\Big]

(Eqs. 7-10): the radial velocity moves the line centres, rotation is a convolution on the
exponential grid :math:`\lambda_Z`, the telluric clone multiplies *before* the instrumental
kernel, the model is averaged over each data pixel, and a smooth per-order polynomial
:math:`P_\mathrm{data}` takes up the residual continuum. The loss is

.. math::
    \mathcal{L} = \chi^2 + \sum_j \left|\frac{\ln a_j - \ln \hat a_j}{\Lambda}\right|

(Eq. 11 with χ² in place of the MSE), with optional pulls on the widths.

The telluric transmission enters through Beer's law with a free exponent,

.. math::
    T(\lambda_Z)^X = \exp\big(X \ln T_\mathrm{clone}(\lambda_Z)\big), \qquad X = e^{\ln X},

which takes up the difference in water column and airmass between the telluric template and
the night (X = 1: the template as cloned). The telluric lines can be tuned too, with their own
L1 pull of :math:`\ln a` towards the telluric clone (the same form as Eq. 11); they never take the
stellar RV. Without a stellar clone the model is :math:`P_\mathrm{data}\,\mathrm{resample}[T^X * g(R)]`
(a telluric-only fit, e.g. of an A0V standard). A ``likelihood``
callable can replace the χ² term (e.g. the Gaussian-process likelihood of Appendix C.2 in
:mod:`blase_specutils.gp`); it must be on the χ² scale, i.e. twice a negative log-likelihood of
the residual up to a constant, so that the balance with the L1 pull is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clone import SPEED_OF_LIGHT_KMS, LineCloneModel
from .extrinsic import (
    InstrumentalBroadening,
    PixelResampler,
    RotationalBroadening,
    log_lambda_grid,
    pixel_edges,
)
from .options import EngineOptions
from .training import TrainingHistory, train, use_plans

__all__ = ["TransferModel", "transfer_loss", "fit_transfer", "TransferFit", "FitBounds", "FitFlag", "check_fit",
           "chi2_curvature", "MAX_VSINI_KMS", "VSINI_SCAN_KMS", "TELLURIC_POWER_SCAN"]

#: Physical upper bound of v sin i (km/s): the fixed half width of the rotation kernel. The fastest
#: known rotators (early B and Be stars near break-up) reach 400-500 km/s.
MAX_VSINI_KMS = 600.0

#: v sin i (km/s) of the coarse scan that starts the optimiser: 14 values log-spaced from 2 to
#: 400 km/s (ratio 1.50), evaluated jointly with the RV scan.
VSINI_SCAN_KMS = tuple(float(v) for v in np.geomspace(2.0, 400.0, 14))

#: Telluric powers X of the χ² scan that starts template matching when X is tuned: 70 values
#: log-spaced from 0.01 to 10 (ratio 1.105). Dry nights against a wet template reach X ≈ 0.02 in
#: water (the IGRINS A0V night against PSG's default atmosphere).
TELLURIC_POWER_SCAN = tuple(float(x) for x in np.exp(np.linspace(math.log(0.01), math.log(10.0), 70)))


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
    * ``rv_unconstrained``, ``vsini_unconstrained``, ``telluric_power_unconstrained``: the σ from
      the curvature of χ² (:func:`chi2_curvature`) exceeds ``unconstrained_fraction`` (30 %) of
      the value, or χ² has no minimum there (curvature ≤ 0). RV has no natural zero (it depends on
      the frame), so it is compared with :math:`\max(|RV|, 	ext{rv\_scale\_floor})`: flagged when
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
    """

    max_vsini: float = MAX_VSINI_KMS
    vsini_scan: tuple = field(default=VSINI_SCAN_KMS)
    rv_step: float = 1.0
    rv_edge_tolerance: float = 1.0
    bound_tolerance: float = 0.01
    resolving_power_runaway: float = 2.5
    telluric_power_runaway: float = 3.0
    unconstrained_fraction: float = 0.3
    rv_scale_floor: float = 10.0
    min_coverage: float = 0.9

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


def _components(telluric, components, names) -> tuple[list[Tensor] | None, tuple[str, ...]]:
    """Boolean line masks of the telluric components and their names (None, ("",) for one power)."""
    if components is None:
        if names is not None and len(names) != 1:
            raise ValueError("telluric_names needs telluric_components (one name per component)")
        return None, tuple(names or ("",))
    if telluric is None:
        raise ValueError("telluric_components needs a telluric clone")
    comp = torch.as_tensor(np.asarray(components), device=telluric.lam_centers.device).long()
    if comp.shape != (telluric.n_lines,):
        raise ValueError(f"telluric_components must hold one index per telluric line ({telluric.n_lines}), "
                         f"got shape {tuple(comp.shape)}")
    n = int(comp.max()) + 1 if comp.numel() else 1
    if comp.numel() and int(comp.min()) < 0:
        raise ValueError("telluric_components must be indices >= 0")
    names = tuple(str(k) for k in range(n)) if names is None else tuple(str(x) for x in names)
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"telluric_names must be {n} distinct names, one per component, got {list(names)}")
    return [comp == k for k in range(n)], names


class TransferModel(nn.Module):
    r"""The full forward model M(λ_D) of Eq. 10 for one or more échelle orders.

    Parameters
    ----------
    stellar : LineCloneModel or None
        The stellar clone (its lines are tuned in place when asked). None: a telluric-only model
        (then ``telluric`` is required, and the RV and v sin i parameters are present but unused
        and frozen).
    data_wavelength : array_like
        Data pixel centres λ_D (Å), strictly increasing; gaps between orders are allowed.
    order_index : array_like of int, optional
        Order number of each pixel (for the per-order continuum); default: split at gaps.
    telluric : LineCloneModel, optional
        Telluric clone, raised to the power X and multiplied before the instrumental kernel (never
        Doppler shifted).
    rv, vsini, resolving_power : float
        Initial RV (km/s), v sin i (km/s), R.
    limb_darkening : float
        ε of the rotation kernel (fixed).
    continuum_degree : int
        Degree of the per-order polynomial P_data.
    dv : float
        Velocity step of λ_Z (km/s).
    max_vsini : float, optional
        Half width (km/s) of the fixed-length rotation kernel (see
        :class:`~blase_specutils.core.extrinsic.RotationalBroadening`): the largest v sin i the
        model represents; v sin i is held at it if pushed beyond, and :meth:`set_max_vsini`
        resizes it. ``fit_spectrum`` sizes it to the v sin i it finds and doubles it whenever v sin
        i reaches it, up to the bound :attr:`FitBounds.max_vsini` (600 km/s).
    max_rv : float
        Bound of the RV (km/s): :math:`|RV| \le` ``max_rv``. :func:`fit_transfer` projects the RV
        back into it after each step (:meth:`project_`), the scans refuse RVs beyond it and the
        initial ``rv`` must lie within it (default 300; ``fit_spectrum`` passes its ``rv_range``).
    telluric_power : float
        Initial Beer's-law exponent X of the telluric transmission (> 0). Its logarithm
        ``log_telluric_power`` is the parameter; it requires grad whenever a telluric clone is
        present.
    lsf_half_width : float, optional
        Fixed half width (km/s) of the instrumental kernel; default 6 σ_v at 0.75 × the initial R
        (see :class:`~blase_specutils.core.extrinsic.InstrumentalBroadening`). Give it to rebuild
        a saved model exactly.
    telluric_instrumental : bool
        The telluric clone already carries the instrument's line-spread function (a template
        computed at, or smoothed to, the instrument's resolution, such as muler's TelFit HPF file):
        its transmission multiplies *after* the instrumental kernel,
        :math:`\mathrm{resample}[(S_\mathrm{ext} * g(R)) \odot T^X]`, so that its lines are not
        broadened twice. This is an approximation (the LSF of a product is not the product of the
        LSFs); exact for lines much narrower or much broader than the LSF. Default False: the
        physical order of Eq. 9, the telluric clone at native resolution multiplies before.
    calibration_degree : int or None
        Degree of a smooth per-order wavelength correction δv(x) = Σ_k c_k x^k (km/s, x in [−1, 1]
        across each order, paper Section 8.8), shared by the star and the tellurics: the model at
        pixel λ is evaluated at λ (1 + δv/c), to first order in δv. Its coefficients
        ``calibration_coeffs`` start at 0 and are frozen (``requires_grad=False``) until a fit
        tunes them. None (default): no correction.
    telluric_components : array_like of int, optional
        Per line of the telluric clone, the index of its component (e.g. its molecule, from
        :meth:`LineCloneModel.concatenate`): each component k gets its own Beer's-law power,
        :math:`T = \exp(\sum_k X_k \ln T_k)` (water varies with the weather, the well-mixed gases
        with airmass). ``log_telluric_power`` is then a vector, one entry per component (all start
        at ``telluric_power``). None (default): one power for the whole clone.
    telluric_names : sequence of str, optional
        Names of the components (default ``"0"``, ``"1"``, …).
    calibration_prior : float
        Width (km/s) of the Gaussian pull of each coefficient towards 0 when tuned: a term
        :math:`\sum_k (c_k / \sigma_\mathrm{cal})^2` in the loss (default 1 km/s: weak against the
        telluric lines of one order, enough to hold an order without them at 0).
    engine : EngineOptions, optional
        Which code runs the model's own operations (the convolutions, and whether ``plan="auto"``
        trains through window plans); default the stellar clone's (else the telluric clone's)
        :attr:`~.LineCloneModel.engine`. Each clone's line sums follow its own engine.

    Raises
    ------
    ValueError
        Neither a stellar nor a telluric clone, bad wavelengths, a negative continuum degree or a
        non-positive telluric power.
    """

    def __init__(
        self,
        stellar: LineCloneModel | None,
        data_wavelength,
        *,
        order_index=None,
        telluric: LineCloneModel | None = None,
        rv: float = 0.0,
        vsini: float = 2.0,
        resolving_power: float = 55000.0,
        limb_darkening: float = 0.6,
        continuum_degree: int = 2,
        dv: float = 0.5,
        max_vsini: float | None = None,
        max_rv: float = 300.0,
        telluric_power: float = 1.0,
        lsf_half_width: float | None = None,
        telluric_instrumental: bool = False,
        calibration_degree: int | None = None,
        calibration_prior: float = 1.0,
        telluric_components=None,
        telluric_names: Sequence[str] | None = None,
        engine: EngineOptions | None = None,
    ) -> None:
        super().__init__()
        if stellar is None and telluric is None:
            raise ValueError("a TransferModel needs a stellar clone, a telluric clone, or both")
        ref = stellar if stellar is not None else telluric
        if engine is not None and not isinstance(engine, EngineOptions):
            raise TypeError(f"engine must be an EngineOptions or None, got {type(engine).__name__}")
        self.engine = ref.engine if engine is None else engine
        if not (math.isfinite(float(telluric_power)) and float(telluric_power) > 0):
            raise ValueError(f"telluric_power must be finite and > 0, got {telluric_power}")
        lam = torch.as_tensor(np.asarray(data_wavelength, dtype=np.float64), device=ref.lam_centers.device)
        if lam.ndim != 1 or lam.numel() < 2 or not bool((torch.diff(lam) > 0).all()):
            raise ValueError("data_wavelength must be 1-D, strictly increasing, with at least 2 pixels")
        if int(continuum_degree) < 0:
            raise ValueError("continuum_degree must be >= 0")
        if not (math.isfinite(float(max_rv)) and float(max_rv) > 0):
            raise ValueError(f"max_rv must be finite and > 0 km/s, got {max_rv}")
        if not abs(float(rv)) <= float(max_rv):
            raise ValueError(f"rv = {rv} km/s is outside the RV bound ±max_rv = ±{float(max_rv)} km/s")
        self.stellar = stellar
        self.telluric = telluric
        dtype = ref.dtype
        device = ref.lam_centers.device
        self.rot = RotationalBroadening(max(float(vsini), 1e-3), dv, limb_darkening=limb_darkening,
                                        max_vsini=max_vsini, tune=stellar is not None, dtype=dtype, device=device,
                                        engine=self.engine)
        self.inst = InstrumentalBroadening(resolving_power, dv, half_width=lsf_half_width, dtype=dtype, device=device,
                                           engine=self.engine)
        self.register_buffer("lam_d", lam, persistent=False)
        self._build_grid()
        self.rv = nn.Parameter(torch.tensor(float(rv), dtype=dtype, device=device), requires_grad=stellar is not None)
        self.max_rv = float(max_rv)
        masks, self.telluric_names = _components(telluric, telluric_components, telluric_names)
        # per telluric line, the index of its component (a buffer: it follows .to(device))
        self.register_buffer("_component_index", None if masks is None else torch.stack(masks).long().argmax(0),
                             persistent=False)
        n_power = () if masks is None else (len(masks),)
        self.log_telluric_power = nn.Parameter(
            torch.full(n_power, math.log(float(telluric_power)), dtype=dtype, device=device),
            requires_grad=telluric is not None,
        )
        if order_index is None:
            lo_e, hi_e = pixel_edges(lam)
            order_index = torch.cumsum(torch.cat([torch.zeros(1, device=device), (lo_e[1:] > hi_e[:-1] + 1e-9).double()]), 0)
        oi = torch.as_tensor(np.asarray(order_index), device=device).long()
        if oi.shape != lam.shape:
            raise ValueError("order_index must have one entry per data pixel")
        uniq, inv = torch.unique(oi, return_inverse=True)
        self.register_buffer("order_of_pixel", inv, persistent=False)
        n_orders = int(uniq.numel())
        # scaled wavelength in [-1, 1] within each order
        x = torch.empty_like(lam)
        for k in range(n_orders):
            sel = inv == k
            w = lam[sel]
            x[sel] = (w - 0.5 * (w[0] + w[-1])) / max(0.5 * float(w[-1] - w[0]), 1e-12)
        powers = torch.stack([x**d for d in range(int(continuum_degree) + 1)], dim=1)
        self.register_buffer("_powers", powers.to(dtype), persistent=False)
        coeffs = torch.zeros(n_orders, int(continuum_degree) + 1, dtype=dtype, device=device)
        coeffs[:, 0] = 1.0
        self.continuum_coeffs = nn.Parameter(coeffs)
        self.telluric_instrumental = bool(telluric_instrumental)
        if calibration_degree is not None and int(calibration_degree) < 0:
            raise ValueError("calibration_degree must be None or an integer >= 0")
        self.calibration_degree = None if calibration_degree is None else int(calibration_degree)
        n_cal = 0 if calibration_degree is None else int(calibration_degree) + 1
        cal_powers = torch.stack([x**d for d in range(n_cal)], dim=1) if n_cal else x[:, None][:, :0]
        self.register_buffer("_cal_powers", cal_powers.to(dtype), persistent=False)
        self.calibration_coeffs = nn.Parameter(torch.zeros(n_orders, n_cal, dtype=dtype, device=device),
                                               requires_grad=False)
        if not (math.isfinite(float(calibration_prior)) and float(calibration_prior) > 0):
            raise ValueError(f"calibration_prior must be finite and > 0 km/s, got {calibration_prior}")
        self.calibration_prior = float(calibration_prior)

    def _build_grid(self) -> None:
        """λ_Z with margins that hold the rotation and instrumental kernels, and the pixel resampler."""
        lam, dv = self.lam_d, self.rot.dv
        margin_v = self.rot.max_vsini + self.inst.half_width + 2.0 * dv
        lo = float(lam[0]) * math.exp(-margin_v / SPEED_OF_LIGHT_KMS) - 1.0
        hi = float(lam[-1]) * math.exp(margin_v / SPEED_OF_LIGHT_KMS) + 1.0
        self.register_buffer("lam_z", log_lambda_grid(lo, hi, dv, device=lam.device), persistent=False)
        self.resampler = PixelResampler(self.lam_z, lam)

    def set_max_vsini(self, max_vsini: float) -> None:
        """Resize the rotation kernel to the half width ``max_vsini`` (km/s) and rebuild λ_Z, whose
        margins must hold it (v sin i itself is kept, held at the new ``max_vsini`` if above it).

        The cost of an epoch grows with the kernel (a 600 km/s kernel has 2403 taps), so a fit
        keeps it as small as the current v sin i allows and enlarges it when v sin i reaches it
        (``fit_spectrum``). Plans made before must be made again (:meth:`make_plans`).
        """
        mv = float(max_vsini)
        if not (math.isfinite(mv) and mv > 0):
            raise ValueError(f"max_vsini must be finite and > 0 km/s, got {max_vsini}")
        self.rot.max_vsini = mv
        with torch.no_grad():
            self.rot.log_vsini.clamp_(max=math.log(mv))
        self._build_grid()
        self.clear_plans()

    @torch.no_grad()
    def project_(self) -> None:
        """Put the parameters back within their bounds, in place: RV into [−max_rv, max_rv], ln v sin i
        to at most ln ``max_vsini`` and ln R to at least ln ``min_resolving_power`` (what the model
        evaluates anyway). :func:`fit_transfer` calls it after every Adam step."""
        self.rv.clamp_(-self.max_rv, self.max_rv)
        self.rot.log_vsini.clamp_(max=math.log(self.rot.max_vsini))
        self.inst.log_resolving_power.clamp_(min=math.log(self.inst.min_resolving_power))

    def engine_info(self) -> dict:
        """What computes this model: ``{"backend", "device", "dtype"}`` (JSON-ready; see
        :meth:`.EngineOptions.describe`), the backend resolved on the model's device."""
        return self.engine.describe(self.lam_z.device, self.rv.dtype)

    def make_plans(self, *, headroom: float = 1.25, kernel: str | None = None) -> list:
        """Window plans of the clones on the model grid λ_Z (``LineCloneModel.make_plan``; the
        stellar one follows the RV parameter). Evaluations go through them until
        :meth:`clear_plans`: the same sums, with fewer synchronisations with the device.

        Parameters
        ----------
        headroom : float
            As in ``LineCloneModel.make_plan``.
        kernel : {"auto", "numba", "triton"}, optional
            The compiled kernel of the plans (default each clone's ``engine.backend``).

        Returns
        -------
        list
            The plans, for :func:`~blase_specutils.core.train` (``plans=``).
        """
        self._plans = {}
        if self.stellar is not None:
            self._plans["stellar"] = self.stellar.make_plan(self.lam_z, self.rv, headroom=headroom, kernel=kernel)
        if self.telluric is not None and self.telluric_masks is None:  # components are evaluated without plans
            self._plans["telluric"] = self.telluric.make_plan(self.lam_z, headroom=headroom, kernel=kernel)
        return list(self._plans.values())

    def clear_plans(self) -> None:
        """Evaluate the clones without plans again (after :meth:`make_plans`)."""
        self._plans = {}

    def _plan(self, name: str):
        return getattr(self, "_plans", {}).get(name)

    @property
    def telluric_masks(self) -> list[Tensor] | None:
        """Boolean masks of the telluric lines of each component (None for one power)."""
        idx = self._component_index
        return None if idx is None else [idx == k for k in range(len(self.telluric_names))]

    @property
    def n_orders(self) -> int:
        return int(self.continuum_coeffs.shape[0])

    @property
    def vsini(self) -> Tensor:
        return self.rot.vsini

    @property
    def resolving_power(self) -> Tensor:
        return self.inst.resolving_power

    @property
    def telluric_power(self) -> Tensor:
        """The Beer's-law exponent X of the telluric transmission (1: the template as cloned)."""
        return self.log_telluric_power.exp()

    def continuum(self) -> Tensor:
        """P_data at the data pixels."""
        return (self._powers * self.continuum_coeffs[self.order_of_pixel]).sum(1)

    def extrinsic(self) -> Tensor | None:
        """S_ext(λ_Z): the RV-shifted clone convolved with the rotation kernel (Eq. 7); None
        without a stellar clone."""
        if self.stellar is None:
            return None
        s = self.stellar(self.lam_z, self.rv, plan=self._plan("stellar"))
        return self.rot(s)

    def telluric_transmission(self) -> Tensor | None:
        r"""T(λ_Z)^X = exp(X ln T_clone(λ_Z)) on the model grid; None without a telluric clone.

        Formed from the clone's log flux, so it stays finite and differentiable in saturated
        bands (each linear-mode line's transmission is floored at 1e-12 by the engine); at
        X = 1 it equals the clone exactly.
        """
        if self.telluric is None:
            return None
        if self.telluric_masks is None:
            return torch.exp(self.telluric_power * self.telluric.log_flux(self.lam_z, plan=self._plan("telluric")))
        x = self.telluric_power
        tel = self.telluric
        if tel.mode == "log":  # ln T = −Σ a V: the power of a line's component scales its amplitude, one pass
            return torch.exp(tel._log_flux_of(self.lam_z, None, amplitude_scale=x[self._component_index]))
        log_t = sum(x[k] * tel.log_flux(self.lam_z, lines=m) for k, m in enumerate(self.telluric_masks))
        return torch.exp(log_t)

    def joint(self) -> Tensor:
        """M_joint(λ_Z) = S_ext ⊙ T_clone^X (Eq. 9), or T_clone^X alone without a stellar clone."""
        t = self.telluric_transmission()
        m = self.extrinsic()
        if m is None:
            return t
        return m if t is None else m * t

    def _to_pixels(self, ext: Tensor | None, trans: Tensor | None) -> Tensor:
        """The model at the data pixels, before the continuum polynomial, from S_ext and T^X on λ_Z:
        resample[(S_ext ⊙ T^X) * g(R)] (Eq. 10), or resample[(S_ext * g(R)) ⊙ T^X] for a telluric
        clone at the instrument's resolution (``telluric_instrumental``); with the wavelength
        correction δv applied to first order."""
        m = self._observed(ext, trans)
        out = self.resampler(m)
        dv = self.velocity_correction()
        if dv is not None:  # M(λ (1 + δv/c)) ≈ M(λ) + δv dM/dv
            out = out + dv * self.resampler(self._velocity_derivative(m))
        return out

    def _observed(self, ext: Tensor | None, trans: Tensor | None) -> Tensor:
        """The model on λ_Z after the instrument: (S_ext ⊙ T^X) * g(R), or (S_ext * g(R)) ⊙ T^X."""
        if self.telluric_instrumental:
            return trans if ext is None else (self.inst(ext) if trans is None else self.inst(ext) * trans)
        return self.inst(ext if trans is None else (trans if ext is None else ext * trans))

    def _velocity_derivative(self, m: Tensor) -> Tensor:
        """dm/dv (per km/s) on the log grid λ_Z, by central differences (one-sided at the ends)."""
        grad = torch.empty_like(m)
        grad[1:-1] = (m[2:] - m[:-2]) / (2.0 * self.rot.dv)
        grad[0] = (m[1] - m[0]) / self.rot.dv
        grad[-1] = (m[-1] - m[-2]) / self.rot.dv
        return grad

    def velocity_correction(self) -> Tensor | None:
        """δv (km/s) of the wavelength correction at each data pixel, or None without one."""
        if self.calibration_degree is None:
            return None
        return (self._cal_powers * self.calibration_coeffs[self.order_of_pixel]).sum(1)

    def unscaled(self) -> Tensor:
        """resample[M_joint * g(R)] at the data pixels, before the continuum polynomial."""
        return self._to_pixels(self.extrinsic(), self.telluric_transmission())

    def transmission_at_pixels(self) -> Tensor | None:
        """The telluric transmission T^X at the data's resolution and sampling: resample[T^X * g(R)]
        (resample[T^X] for a clone at the instrument's resolution), with the wavelength correction;
        None without a telluric clone."""
        t = self.telluric_transmission()
        return None if t is None else self._to_pixels(None, t)

    def forward(self) -> Tensor:
        """M(λ_D) (Eq. 10 times P_data)."""
        return self.unscaled() * self.continuum()

    @torch.no_grad()
    def _continuum_for(self, base: Tensor, data: Tensor, weight: Tensor) -> Tensor:
        """Per-order coefficients of P_data by weighted linear least squares for the model ``base``
        (:meth:`unscaled`); orders with too few good pixels keep their current coefficients."""
        current = self.continuum_coeffs.detach()
        n_o, n_p = current.shape
        oi = self.order_of_pixel
        a = self._powers * base[:, None]  # pixels × powers
        wa = a * weight[:, None]
        zeros = dict(dtype=a.dtype, device=a.device)
        ata = torch.zeros(n_o, n_p, n_p, **zeros).index_add_(0, oi, wa[:, :, None] * a[:, None, :])
        atb = torch.zeros(n_o, n_p, **zeros).index_add_(0, oi, wa * data[:, None])
        n_good = torch.zeros(n_o, **zeros).index_add_(0, oi, (weight > 0).to(a.dtype))
        ok = n_good > n_p
        eye = torch.eye(n_p, dtype=a.dtype, device=a.device).expand(n_o, n_p, n_p)
        # orders with too few good pixels solve I c = c_now, i.e. keep their coefficients (no host sync)
        sol = torch.linalg.solve(torch.where(ok[:, None, None], ata, eye), torch.where(ok[:, None], atb, current))
        return sol.to(current.dtype)

    def calibration_penalty(self) -> Tensor | None:
        """Σ (c_k / σ_cal)² of the wavelength correction when it is tuned, else None."""
        if self.calibration_degree is None or not self.calibration_coeffs.requires_grad:
            return None
        return (self.calibration_coeffs / self.calibration_prior).square().sum()

    @torch.no_grad()
    def solve_calibration(self, data: Tensor, weight: Tensor) -> None:
        """Set the wavelength-correction coefficients by weighted linear least squares, with their
        Gaussian pull, for the current lines and continuum: the model is linear in δv (to the first
        order it is evaluated at), so one solve is exact; Adam's steps cannot resolve m/s."""
        if self.calibration_degree is None:
            return
        saved = self.calibration_coeffs.detach().clone()
        self.calibration_coeffs.zero_()
        base = self.forward()
        m = self._observed(self.extrinsic(), self.telluric_transmission())
        g = self.resampler(self._velocity_derivative(m)) * self.continuum()  # dM/dδv at each pixel
        a = self._cal_powers * g[:, None]
        n_o, n_c = self.calibration_coeffs.shape
        oi = self.order_of_pixel
        wa = a * weight[:, None]
        ata = torch.zeros(n_o, n_c, n_c, dtype=a.dtype, device=a.device).index_add_(0, oi, wa[:, :, None] * a[:, None, :])
        ata = ata + torch.eye(n_c, dtype=a.dtype, device=a.device) / self.calibration_prior**2
        atb = torch.zeros(n_o, n_c, dtype=a.dtype, device=a.device).index_add_(0, oi, wa * (data - base)[:, None])
        sol = torch.linalg.solve(ata, atb)
        self.calibration_coeffs.copy_(torch.where(torch.isfinite(sol), sol, saved))

    @torch.no_grad()
    def _profiled_chi2(self, base: Tensor, data: Tensor, weight: Tensor) -> float:
        """χ² of ``base`` (:meth:`unscaled`) with the continuum solved for it (the model is not changed)."""
        coeffs = self._continuum_for(base, data, weight)
        r = data - base * (self._powers * coeffs[self.order_of_pixel]).sum(1)
        return float((weight * r * r).sum())

    @torch.no_grad()
    def solve_continuum(self, data: Tensor, weight: Tensor) -> None:
        """Set P_data by weighted linear least squares given the current line model."""
        self.continuum_coeffs.copy_(self._continuum_for(self.unscaled(), data, weight))

    @torch.no_grad()
    def _scan(self, data: Tensor, weight: Tensor, values: Sequence[float], set_value) -> np.ndarray:
        """χ² at each value (set by ``set_value``), with the continuum solved at each step."""
        chi2 = []
        for v in values:
            set_value(v)
            chi2.append(self._profiled_chi2(self.unscaled(), data, weight))
        return np.asarray(chi2)

    def _check_rvs(self, rvs: Sequence[float]) -> np.ndarray:
        rvs = np.asarray(rvs, dtype=float).ravel()
        if rvs.size == 0 or not np.all(np.isfinite(rvs)):
            raise ValueError("the RV scan needs at least one finite RV")
        if np.any(np.abs(rvs) > self.max_rv + 1e-9):
            raise ValueError(f"the RV scan reaches {np.abs(rvs).max():.6g} km/s, beyond the RV bound "
                             f"±max_rv = ±{self.max_rv:.6g} km/s")
        return rvs

    @torch.no_grad()
    def scan_rv(self, data: Tensor, weight: Tensor, rvs: Sequence[float]) -> tuple[float, np.ndarray]:
        """χ² (with the continuum solved at each step) on a grid of RVs; sets the best one."""
        if self.stellar is None:
            raise ValueError("a telluric-only model has no RV to scan (the RV never applies to telluric lines)")
        rvs = self._check_rvs(rvs)
        chi2 = self._scan(data, weight, rvs, lambda v: self.rv.fill_(float(v)))
        best = float(rvs[int(np.argmin(chi2))])
        self.rv.fill_(best)
        self.solve_continuum(data, weight)
        return best, chi2

    @torch.no_grad()
    def scan_rv_vsini(self, data: Tensor, weight: Tensor, rvs: Sequence[float],
                      vsinis: Sequence[float]) -> tuple[float, float, np.ndarray]:
        """χ² (continuum solved at each point) on the grid RV × v sin i; sets the best pair.

        The clone is evaluated once per RV and broadened by each v sin i (rotation commutes with
        the Doppler shift), so the grid costs about one clone evaluation per RV. A line broadened
        by v sin i needs no finer RV steps than about v sin i / 5: each v sin i is evaluated on
        every ``max(1, floor(v sin i / (5 ΔRV)))``-th RV of the grid (and its last one), ΔRV the
        grid's step; the other entries of the χ² grid are NaN.

        Parameters
        ----------
        data, weight : Tensor
            Data flux and 1/σ² (0 where masked).
        rvs : sequence of float
            RVs (km/s), within ±``max_rv``.
        vsinis : sequence of float
            v sin i values (km/s), in (0, ``max_vsini``].

        Returns
        -------
        rv, vsini : float
            The best pair (now set in the model, with its continuum).
        chi2 : ndarray
            χ² of shape (len(rvs), len(vsinis)), NaN where not evaluated.
        """
        if self.stellar is None:
            raise ValueError("a telluric-only model has no RV or v sin i to scan")
        rvs = self._check_rvs(rvs)
        vs = np.asarray(vsinis, dtype=float).ravel()
        if vs.size == 0 or not np.all(np.isfinite(vs) & (vs > 0) & (vs <= self.rot.max_vsini * (1 + 1e-12))):
            raise ValueError(f"v sin i of the scan must be in (0, max_vsini = {self.rot.max_vsini:.6g}] km/s, got "
                             f"{vs.tolist()}")
        kernels = []
        for v in vs:
            self.rot.log_vsini.fill_(math.log(float(v)))
            kernels.append(self.rot.kernel())
        t = self.telluric_transmission()
        # the FFT convolution of _convolve_same, with the transforms of the kernels and of each
        # RV's clone computed once
        ntap = int(kernels[0].numel())
        half = (ntap - 1) // 2
        n_x = int(self.lam_z.numel()) + 2 * half
        n_fft = 1 << (n_x + ntap - 2).bit_length()
        k_hat = [torch.fft.rfft(k.to(self.lam_z.dtype), n_fft) for k in kernels]
        step = float(np.median(np.abs(np.diff(rvs)))) if rvs.size > 1 else 1.0
        stride = [max(1, int(math.floor(float(v) / (5.0 * step)))) if step > 0 else 1 for v in vs]
        chi2 = np.full((rvs.size, vs.size), np.nan)
        for i, rv in enumerate(rvs):
            todo = [j for j, n in enumerate(stride) if i % n == 0 or i == rvs.size - 1]
            if not todo:
                continue
            self.rv.fill_(float(rv))
            s = self.stellar(self.lam_z, self.rv)
            s_hat = torch.fft.rfft(F.pad(s.view(1, 1, -1), (half, half), mode="replicate").view(-1), n_fft)
            for j in todo:
                m = torch.fft.irfft(s_hat * k_hat[j], n_fft)[ntap - 1 : n_x].to(s.dtype)
                chi2[i, j] = self._profiled_chi2(self._to_pixels(m, t), data, weight)
        i, j = np.unravel_index(int(np.nanargmin(chi2)), chi2.shape)
        self.rv.fill_(float(rvs[i]))
        self.rot.log_vsini.fill_(math.log(float(vs[j])))
        self.solve_continuum(data, weight)
        return float(rvs[i]), float(vs[j]), chi2

    @torch.no_grad()
    def scan_telluric_power(self, data: Tensor, weight: Tensor, powers: Sequence[float]) -> tuple[float, np.ndarray]:
        """χ² (with the continuum solved at each step) on a grid of telluric powers X; sets the best one."""
        if self.telluric is None:
            raise ValueError("the model has no telluric clone: there is no telluric power to scan")
        bad = [x for x in powers if not float(x) > 0]
        if bad:
            raise ValueError(f"telluric powers must be > 0, got {bad[0]}")
        ext = self.extrinsic()  # the star does not change during this scan
        # with several components, one power common to all is scanned (a start for Adam)
        log_t = self.telluric.log_flux(self.lam_z, plan=self._plan("telluric"))
        chi2 = []
        for x in powers:
            chi2.append(self._profiled_chi2(self._to_pixels(ext, torch.exp(float(x) * log_t)), data, weight))
        chi2 = np.asarray(chi2)
        best = float(powers[int(np.argmin(chi2))])
        self.log_telluric_power.fill_(math.log(best))
        self.solve_continuum(data, weight)
        return best, chi2


def _l1_pull(param: Tensor, prior: Tensor | None, scale: float | None) -> Tensor | None:
    """Σ |param − prior| / scale, or None when there is no pull (no prior, no scale or a frozen param)."""
    if scale is None or prior is None or not param.requires_grad:
        return None
    return (param - prior).abs().sum() / scale


def transfer_loss(
    model: TransferModel,
    data: Tensor,
    weight: Tensor,
    *,
    log_amp_prior: Tensor | None = None,
    regularization: float | None = 5.0,
    width_prior: tuple[Tensor, Tensor] | None = None,
    width_regularization: float | None = None,
    likelihood: Callable[[Tensor], Tensor] | None = None,
    telluric_log_amp_prior: Tensor | None = None,
    telluric_regularization: float | None = 5.0,
    telluric_width_prior: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    r"""χ² plus the L1 pull :math:`\sum_j |\ln a_j - \ln \hat a_j| / \Lambda` (and the same pull on
    ln σ and ln γ if asked), for the stellar and the telluric lines.

    Parameters
    ----------
    model : TransferModel
    data, weight : Tensor
        Data flux at λ_D and 1/σ² per pixel (0 for masked pixels).
    log_amp_prior : Tensor, optional
        :math:`\ln\hat a` of the stellar clone.
    regularization : float or None
        Λ of the stellar amplitude pull (None: none).
    width_prior : (Tensor, Tensor), optional
        ln σ and ln γ of the stellar clone.
    width_regularization : float or None
        Λ of the width pulls, for the stellar and (with ``telluric_width_prior``) the telluric lines.
    likelihood : callable, optional
        Replaces χ²: it is called on the residual R = data − M(λ_D) at every pixel and returns a
        scalar on the χ² scale (twice a negative log-likelihood up to a constant); it handles its
        own noise model and masked pixels (``weight`` is then unused).
    telluric_log_amp_prior : Tensor, optional
        :math:`\ln\hat a` of the telluric clone.
    telluric_regularization : float or None
        Λ of the telluric amplitude pull (None: none).
    telluric_width_prior : (Tensor, Tensor), optional
        ln σ and ln γ of the telluric clone.

    Returns
    -------
    Tensor
        The scalar loss. A pull only acts on parameters that require grad (the tuned ones).
    """
    r = data - model()
    loss = (weight * r * r).sum() if likelihood is None else likelihood(r)
    terms = []
    st, tel = model.stellar, model.telluric
    if st is not None:
        terms.append(_l1_pull(st.log_amplitudes, log_amp_prior, regularization))
        if width_prior is not None:
            terms.append(_l1_pull(st.log_sigmas, width_prior[0], width_regularization))
            terms.append(_l1_pull(st.log_gammas, width_prior[1], width_regularization))
    if tel is not None:
        terms.append(_l1_pull(tel.log_amplitudes, telluric_log_amp_prior, telluric_regularization))
        if telluric_width_prior is not None:
            terms.append(_l1_pull(tel.log_sigmas, telluric_width_prior[0], width_regularization))
            terms.append(_l1_pull(tel.log_gammas, telluric_width_prior[1], width_regularization))
    terms.append(model.calibration_penalty())
    for t in terms:
        if t is not None:
            loss = loss + t
    return loss


class TransferFit:
    """Results of :func:`fit_transfer`: the stages' histories, χ² values and scans.

    Attributes
    ----------
    stages : dict of TrainingHistory
        ``"template"`` and ``"lines"``.
    chi2 : dict of float
        χ² at ``"start"``, after ``"template"`` and after ``"lines"``.
    rv_scan : (ndarray, ndarray) or None
        RVs (km/s) and χ² of the initial RV scan (with a v sin i scan: χ² at the best v sin i).
    vsini_scan : (ndarray, ndarray) or None
        v sin i values (km/s) of the initial scan and the lowest χ² over the RVs at each.
    rv_vsini_scan : (ndarray, ndarray, ndarray) or None
        RVs, v sin i values and the χ² grid (RVs × v sin i) of a joint scan.
    telluric_power_scan : (ndarray, ndarray) or None
        Powers X and χ² of the initial telluric-power scan.
    """

    def __init__(self) -> None:
        self.stages: dict[str, TrainingHistory] = {}
        self.chi2: dict[str, float] = {}
        self.rv_scan: tuple[np.ndarray, np.ndarray] | None = None
        self.vsini_scan: tuple[np.ndarray, np.ndarray] | None = None
        self.rv_vsini_scan: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.telluric_power_scan: tuple[np.ndarray, np.ndarray] | None = None


def _chi2(model: TransferModel, data: Tensor, weight: Tensor) -> float:
    with torch.no_grad():
        r = data - model()
        return float((weight * r * r).sum())


def _widths(clone: LineCloneModel | None) -> tuple[Tensor, Tensor] | None:
    if clone is None:
        return None
    return clone.log_sigmas.detach().clone(), clone.log_gammas.detach().clone()


def fit_transfer(
    model: TransferModel,
    data: Tensor,
    weight: Tensor,
    *,
    rv_scan: Sequence[float] | None = None,
    vsini_scan: Sequence[float] | None = None,
    template_epochs: int = 200,
    line_epochs: int = 500,
    tune_lines: Sequence[str] = ("amplitude",),
    tune_resolving_power: bool = False,
    regularization: float | None = 5.0,
    width_regularization: float | None = None,
    lr: float = 0.02,
    patience: int | None = 100,
    tune_vsini_with_lines: bool | None = None,
    progress: bool = True,
    likelihood: Callable[[Tensor], Tensor] | None = None,
    tune_telluric: Sequence[str] = (),
    tune_telluric_power: bool = True,
    telluric_regularization: float | None = 5.0,
    telluric_power_scan: Sequence[float] | None = None,
    plan: bool | str = "auto",
    tune_calibration: bool = False,
) -> TransferFit:
    """Fit in the order users need: RV scan, then extrinsic + continuum, then lines.

    Parameters
    ----------
    model : TransferModel
    data, weight : Tensor
        Data flux at λ_D and 1/σ² (0 where masked).
    rv_scan : sequence of float, optional
        RVs (km/s) for the initial χ² scan (not for a telluric-only model: ValueError), within
        ±``model.max_rv``.
    vsini_scan : sequence of float, optional
        v sin i values (km/s) scanned jointly with ``rv_scan`` (:meth:`TransferModel.scan_rv_vsini`;
        at the model's RV when ``rv_scan`` is None); the best pair starts template matching.
    template_epochs : int
        Adam epochs of the template-matching stage (RV, v sin i, continuum, the telluric power X,
        optionally R; all lines frozen).
    line_epochs : int
        Epochs of the line stage (lines plus the extrinsic and continuum parameters); 0 skips it.
    tune_lines : sequence of str
        Stellar line parameters tuned in the line stage (ignored without a stellar clone).
    regularization : float or None
        Λ of the L1 pull of the stellar ln a towards the clone (None: no pull).
    width_regularization : float or None
        Λ of an L1 pull of ln σ, ln γ (None: none), stellar and telluric.
    lr : float
        Adam learning rate (log parameters); the RV moves by steps of 5·lr km/s, line centres by
        lr/30 Å and the continuum coefficients by lr/20.
    patience : int or None
        Early stopping of the line stage after this many epochs without 0.01 % improvement.
    tune_vsini_with_lines : bool or None
        Keep v sin i free during the line stage. Default (None): free unless stellar line widths
        are tuned, because widths and v sin i are nearly degenerate; then v sin i keeps its
        template-matching value.
    progress : bool
        Progress bars.
    likelihood : callable, optional
        Replaces χ² in the loss of both stages (see :func:`transfer_loss`); None (default): χ².
        If it is an ``nn.Module``, its trainable parameters (e.g. a Gaussian process's amplitude
        and length scale) are tuned together with the model at the rate ``lr``. The scans and
        the initial continuum stay χ² least squares; the χ² values in the result are always the
        plain χ².
    tune_telluric : sequence of str
        Telluric line parameters tuned in the line stage (default none: the telluric lines stay
        as cloned). They get their own L1 pull towards the telluric clone.
    tune_telluric_power : bool
        Tune the Beer's-law exponent X of the telluric transmission in both stages (when the model
        has a telluric clone).
    telluric_regularization : float or None
        Λ of the L1 pull of the telluric ln a towards the telluric clone (None: no pull).
    telluric_power_scan : sequence of float, optional
        Powers X (> 0) for a χ² scan after the RV scan (continuum solved at each); the best one
        starts template matching.
    plan : bool or "auto"
        Train both stages through window plans of the clones (:meth:`TransferModel.make_plans`);
        on a GPU each epoch is then one replay of a CUDA graph (not with a ``likelihood``, whose
        epochs run eagerly). The result is that of training without plans. ``"auto"``: on CUDA
        devices when the model's ``engine.plans_on_cuda`` is set; never on CPUs.
    tune_calibration : bool
        Tune the model's wavelength correction (``calibration_degree`` not None) in both stages:
        Adam with the rest, then a linear least-squares solve (:meth:`TransferModel.solve_calibration`)
        and the continuum solved again at the end of each stage (not with a ``likelihood``).

    Returns
    -------
    TransferFit
        The model is left holding the fitted parameters; the clones' tuned/frozen state and the
        power's ``requires_grad`` are restored. After every Adam step the parameters are put back
        within their bounds (:meth:`TransferModel.project_`).
    """
    want_plan = use_plans(plan, model.lam_z.device, model.engine)
    fit = TransferFit()
    st, tel = model.stellar, model.telluric
    prior = None if st is None else st.log_amplitudes.detach().clone()
    wprior = _widths(st)
    tprior = None if tel is None else tel.log_amplitudes.detach().clone()
    twprior = _widths(tel)
    if vsini_scan is not None:
        rvs = [float(model.rv.detach())] if rv_scan is None else list(rv_scan)
        _, _, grid = model.scan_rv_vsini(data, weight, rvs, list(vsini_scan))
        rvs, vs = np.asarray(rvs, dtype=float), np.asarray(vsini_scan, dtype=float)
        fit.rv_vsini_scan = (rvs, vs, grid)
        best_per_vsini = np.nanmin(grid, axis=0)
        fit.vsini_scan = (vs, best_per_vsini)
        if rv_scan is not None:  # the RV profile at the best v sin i, where it was evaluated
            col = grid[:, int(np.argmin(best_per_vsini))]
            done = np.isfinite(col)
            fit.rv_scan = (rvs[done], col[done])
    elif rv_scan is not None:
        best, chi2 = model.scan_rv(data, weight, list(rv_scan))
        fit.rv_scan = (np.asarray(rv_scan, dtype=float), chi2)
    else:
        model.solve_continuum(data, weight)
    if telluric_power_scan is not None:
        best, chi2 = model.scan_telluric_power(data, weight, list(telluric_power_scan))
        fit.telluric_power_scan = (np.asarray(telluric_power_scan, dtype=float), chi2)
    fit.chi2["start"] = _chi2(model, data, weight)
    # RV moves in km/s, centres in Å, continuum coefficients in flux units: their own step sizes
    overrides = {"rv": lr * 5.0, "continuum_coeffs": lr / 20.0, "calibration_coeffs": lr / 3.0}
    if st is not None:
        overrides["stellar.lam_centers"] = lr / 30.0
    if tel is not None:
        overrides["telluric.lam_centers"] = lr / 30.0
    # stage 1: template matching (lines frozen)
    st_before = None if st is None else st.tuned
    tel_before = None if tel is None else tel.tuned
    power_before = model.log_telluric_power.requires_grad
    for clone in (st, tel):
        if clone is not None:
            clone.set_tuned(())
    model.log_telluric_power.requires_grad_(bool(tune_telluric_power) and tel is not None)
    model.inst.log_resolving_power.requires_grad_(bool(tune_resolving_power))
    calibrate = bool(tune_calibration) and model.calibration_degree is not None
    model.calibration_coeffs.requires_grad_(calibrate)
    extra = likelihood if isinstance(likelihood, nn.Module) else None
    plans = model.make_plans() if want_plan else None
    try:
        _fit_stages(model, data, weight, fit, template_epochs=template_epochs, line_epochs=line_epochs, lr=lr,
                    likelihood=likelihood, overrides=overrides, extra=extra, plans=plans, progress=progress,
                    tune_lines=tune_lines, tune_telluric=tune_telluric, tune_vsini_with_lines=tune_vsini_with_lines,
                    patience=patience, prior=prior, wprior=wprior, tprior=tprior, twprior=twprior,
                    regularization=regularization, width_regularization=width_regularization,
                    telluric_regularization=telluric_regularization, calibrate=calibrate)
    finally:
        model.calibration_coeffs.requires_grad_(False)
        if plans is not None:
            model.clear_plans()
    if st is not None:
        st.set_tuned(st_before)
    if tel is not None:
        tel.set_tuned(tel_before)
    model.log_telluric_power.requires_grad_(power_before)
    return fit


def _fit_stages(model, data, weight, fit, *, template_epochs, line_epochs, lr, likelihood, overrides, extra, plans,
                progress, tune_lines, tune_telluric, tune_vsini_with_lines, patience, prior, wprior, tprior, twprior,
                regularization, width_regularization, telluric_regularization, calibrate=False) -> None:
    """The two training stages of :func:`fit_transfer` (template matching, then the lines)."""
    st, tel = model.stellar, model.telluric
    graph = None if likelihood is None else False  # a likelihood (e.g. a GP's Cholesky) may read values back

    def polish() -> None:  # the wavelength correction and the continuum by linear least squares
        if calibrate and likelihood is None:
            for _ in range(2):
                model.solve_calibration(data, weight)
                model.solve_continuum(data, weight)

    def bounds(epoch: int, loss: float) -> None:  # after each step: back within the bounds
        model.project_()

    if template_epochs:
        fit.stages["template"] = train(
            model, lambda: transfer_loss(model, data, weight, likelihood=likelihood), epochs=template_epochs, lr=lr,
            patience=50, progress=progress, desc="template matching", lr_overrides=overrides, extra=extra,
            plans=plans, graph=graph, callback=bounds,
        )
    polish()
    fit.chi2["template"] = _chi2(model, data, weight)
    # stage 2: lines, with everything else still free
    if line_epochs:
        if st is not None:
            st.set_tuned(tune_lines)
        if tel is not None:
            tel.set_tuned(tune_telluric)
        vsini_free = model.rot.log_vsini.requires_grad
        if tune_vsini_with_lines is None:
            tune_vsini_with_lines = not ({"sigma", "gamma"} & set(tune_lines))
        model.rot.log_vsini.requires_grad_(bool(tune_vsini_with_lines) and vsini_free)
        fit.stages["lines"] = train(
            model,
            lambda: transfer_loss(model, data, weight, log_amp_prior=prior, regularization=regularization,
                                  width_prior=wprior, width_regularization=width_regularization,
                                  likelihood=likelihood, telluric_log_amp_prior=tprior,
                                  telluric_regularization=telluric_regularization, telluric_width_prior=twprior),
            epochs=line_epochs, lr=lr, patience=patience, progress=progress, desc="transfer learning",
            lr_overrides=overrides, extra=extra, plans=plans, graph=graph, callback=bounds,
        )
        polish()
        fit.chi2["lines"] = _chi2(model, data, weight)
        model.rot.log_vsini.requires_grad_(vsini_free)


# ------------------------------------------------------------------------------ uncertainties and flags
#: Finite-difference steps of :func:`chi2_curvature`: RV in units of the broadened line width
#: :math:`w = \sqrt{(c/R)^2 + (v\sin i)^2}`, ln v sin i and ln X in natural-log units.
_CURVATURE_STEPS = {"rv": 0.05, "vsini": 0.05, "telluric_power": 0.05}


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
    names = [p for p in parameters if (p in ("rv", "vsini") and model.stellar is not None)
             or (p == "telluric_power" and model.telluric is not None)]
    if not names:
        return {}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    c = float(SPEED_OF_LIGHT_KMS)
    vs0 = float(model.vsini.detach())
    width = math.hypot(c / float(model.resolving_power.detach()), vs0)
    # each parameter's handle: (the tensor the optimiser tunes, its value now, the finite-difference step)
    handles = {"rv": (model.rv, None, float(model.rv.detach()), _CURVATURE_STEPS["rv"] * width),
               "vsini": (model.rot.log_vsini, None, math.log(vs0), _CURVATURE_STEPS["vsini"])}
    powers = {}  # name of each power's σ -> (its index in log_telluric_power or None, X)
    if "telluric_power" in names:
        names.remove("telluric_power")
        log_x = model.log_telluric_power.detach()
        keys = ([("telluric_power", None)] if log_x.ndim == 0 else
                [(f"telluric_power_{n}", k) for k, n in enumerate(model.telluric_names)])
        for key, k in keys:
            x0 = float(log_x if k is None else log_x[k])
            handles[key] = (model.log_telluric_power, k, x0, _CURVATURE_STEPS["telluric_power"])
            powers[key] = math.exp(x0)
            names.append(key)

    def chi2_at(shift: dict[str, float]) -> float:
        for n in names:
            t, k, x0, _ = handles[n]
            (t if k is None else t[k]).fill_(x0 + shift.get(n, 0.0))
        return model._profiled_chi2(model.unscaled(), data, weight)

    try:
        f0 = chi2_at({})
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
    finally:
        model.load_state_dict(state)
    n_good = int((weight > 0).sum())
    scale = math.sqrt(max(1.0, f0 / max(n_good - 3, 1)))
    diag = np.diag(hess)
    var = np.full(len(names), np.inf)
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
    out = {}
    for k, name in enumerate(names):
        s_log = math.sqrt(var[k]) * scale if math.isfinite(var[k]) else math.inf
        if name == "rv":
            out[name] = s_log
        else:  # σ of ln x → σ of x
            out[name] = (vs0 if name == "vsini" else powers[name]) * s_log
    return out


def check_fit(model: TransferModel, fit: TransferFit, *, bounds: FitBounds | None = None,
              sigmas: dict[str, float] | None = None, tuned: Sequence[str] = (),
              start: dict[str, float] | None = None, template: dict[str, float] | None = None) -> list[FitFlag]:
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

    Returns
    -------
    list of FitFlag
    """
    b = FitBounds() if bounds is None else bounds
    sigmas = sigmas or {}
    start = start or {}
    template = template or {}
    tuned = set(tuned)
    flags: list[FitFlag] = []
    frac = b.unconstrained_fraction
    if model.stellar is not None:
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
        rv_t, vs_t = template.get("rv"), template.get("vsini")
        if "rv" in tuned and rv_t is not None and abs(rv - rv_t) > frac * max(abs(rv_t), b.rv_scale_floor):
            flags.append(FitFlag("rv_moved_by_lines", f"the line stage moved the RV from {rv_t:.2f} (template "
                                 f"matching) to {rv:.2f} km/s: the tuned lines (their centres) and the RV are "
                                 "degenerate in these data, so the RV is set by the lines, not measured", "rv"))
        if "vsini" in tuned and vs_t is not None and abs(vs - vs_t) > frac * vs_t:
            flags.append(FitFlag("vsini_moved_by_lines", f"the line stage moved v sin i from {vs_t:.2f} (template "
                                 f"matching) to {vs:.2f} km/s: the tuned lines (their widths) and v sin i are "
                                 "degenerate in these data, so v sin i is set by the lines, not measured", "vsini"))
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
    if "resolving_power" in tuned:
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
    if model.telluric is not None and "telluric_power" in tuned:
        flags += _power_flags(model, fit, b, sigmas)
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
