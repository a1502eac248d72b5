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
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..constants import DEFAULT_MAX_RV_KMS
from .clone import SPEED_OF_LIGHT_KMS, LineCloneModel
from .diagnostics import (MAX_VSINI_KMS, TELLURIC_POWER_SCAN, VSINI_SCAN_KMS, _CURVATURE_STEPS,  # noqa: F401
                          FitBounds, FitFlag, _fmt_sigma, _power_flags, check_fit, chi2_curvature)
from .extrinsic import InstrumentalBroadening, PixelResampler, RotationalBroadening, log_lambda_grid, pixel_edges
from .limits import check_resolving_power, check_rv, check_rv_bound, check_vsini, starting_vsini
from .options import EngineOptions
from .stages import TransferFit, _chi2, _fit_stages, _l1_pull, _widths, fit_transfer, transfer_loss  # noqa: F401
from .transfer_linear import LinearParts
from .transfer_scans import ChiSquareScans

__all__ = ["TransferModel", "transfer_loss", "fit_transfer", "TransferFit", "FitBounds", "FitFlag", "check_fit",
           "chi2_curvature", "MAX_VSINI_KMS", "VSINI_SCAN_KMS", "TELLURIC_POWER_SCAN"]


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


def _reference_clone(stellar: LineCloneModel | None, telluric: LineCloneModel | None) -> LineCloneModel:
    """The clone whose device, dtype and engine the model takes: the stellar one, else the telluric one."""
    if stellar is None and telluric is None:
        raise ValueError("a TransferModel needs a stellar clone, a telluric clone, or both")
    return stellar if stellar is not None else telluric


def _check_settings(data_wavelength, device, *, telluric_power, continuum_degree, calibration_degree,
                    calibration_prior) -> Tensor:
    """Check the settings of a :class:`TransferModel` that only it uses; returns λ_D as a tensor."""
    if not (math.isfinite(float(telluric_power)) and float(telluric_power) > 0):
        raise ValueError(f"telluric_power must be finite and > 0, got {telluric_power}")
    lam = torch.as_tensor(np.asarray(data_wavelength, dtype=np.float64), device=device)
    if lam.ndim != 1 or lam.numel() < 2 or not bool((torch.diff(lam) > 0).all()):
        raise ValueError("data_wavelength must be 1-D, strictly increasing, with at least 2 pixels")
    if int(continuum_degree) < 0:
        raise ValueError("continuum_degree must be >= 0")
    if calibration_degree is not None and int(calibration_degree) < 0:
        raise ValueError("calibration_degree must be None or an integer >= 0")
    if not (math.isfinite(float(calibration_prior)) and float(calibration_prior) > 0):
        raise ValueError(f"calibration_prior must be finite and > 0 km/s, got {calibration_prior}")
    return lam


def _telluric_powers(telluric, components, names, power: float, dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor | None, tuple[str, ...], Tensor]:
    """The component index of each telluric line (None for one power; the model keeps it as a buffer,
    which follows ``.to(device)``), the components' names and the starting ln X (a scalar, or one
    entry per component)."""
    masks, names = _components(telluric, components, names)
    index = None if masks is None else torch.stack(masks).long().argmax(0)
    n_power = () if masks is None else (len(masks),)
    return index, names, torch.full(n_power, math.log(power), dtype=dtype, device=device)


def _order_basis(lam: Tensor, order_index, degree: int, calibration_degree: int | None,
                 dtype: torch.dtype) -> dict[str, Tensor]:
    """The per-order polynomial bases at the data pixels: each pixel's order, the powers of the
    scaled wavelength x in [−1, 1] within its order for the continuum (starting at P = 1) and for
    the wavelength correction (starting at δv = 0)."""
    device = lam.device
    if order_index is None:
        lo_e, hi_e = pixel_edges(lam)
        order_index = torch.cumsum(torch.cat([torch.zeros(1, device=device), (lo_e[1:] > hi_e[:-1] + 1e-9).double()]), 0)
    oi = torch.as_tensor(np.asarray(order_index), device=device).long()
    if oi.shape != lam.shape:
        raise ValueError("order_index must have one entry per data pixel")
    uniq, inv = torch.unique(oi, return_inverse=True)
    n_orders = int(uniq.numel())
    x = torch.empty_like(lam)
    for k in range(n_orders):
        sel = inv == k
        w = lam[sel]
        x[sel] = (w - 0.5 * (w[0] + w[-1])) / max(0.5 * float(w[-1] - w[0]), 1e-12)
    powers = torch.stack([x**d for d in range(degree + 1)], dim=1)
    coeffs = torch.zeros(n_orders, degree + 1, dtype=dtype, device=device)
    coeffs[:, 0] = 1.0
    n_cal = 0 if calibration_degree is None else int(calibration_degree) + 1
    cal_powers = torch.stack([x**d for d in range(n_cal)], dim=1) if n_cal else x[:, None][:, :0]
    return {"order_of_pixel": inv, "x": x.to(dtype), "powers": powers.to(dtype), "continuum_coeffs": coeffs,
            "cal_powers": cal_powers.to(dtype),
            "calibration_coeffs": torch.zeros(n_orders, n_cal, dtype=dtype, device=device)}


class TransferModel(LinearParts, ChiSquareScans, nn.Module):
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
        Initial RV (km/s), v sin i (km/s, 0 to ``max_vsini``, raised to 0.05) and R (>= 1000): :mod:`.limits`.
    limb_darkening : float
        ε of the rotation kernel (fixed).
    continuum_degree : int
        Degree of the per-order polynomial P_data.
    dv : float
        Velocity step of λ_Z (km/s). The stellar lines' Gaussian σ and Lorentzian γ are raised to
        at least one step (λ_c dv / c), in place, here and after every step of a fit
        (:meth:`project_`). A profile narrower than the grid is sampled at one or two points, so
        its sampled area depends on where the RV puts it between them, and χ² ripples with the RV
        at the period dv: on an HPF order of an A star, whose clone holds lines with γ of 0.03 grid
        steps (the Lorentzian part of the pseudo-Voigt, η ≈ 2 % of the area, is a spike that is
        sampled only when the RV puts it on a grid point), a line's sampled area moved by 16 % and
        χ² by 40 between RVs 0.25 km/s apart. At one step the sampled area of the Gaussian part is
        independent of the phase to 10⁻⁸ and that of the Lorentzian part to 0.4 %; after the
        instrument (σ ≈ 2.3 km/s at R = 55,000) such a line widens by 2-3 % at most.
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
        Neither a stellar nor a telluric clone, bad wavelengths, a negative continuum degree, a
        non-positive telluric power, or an RV, v sin i or R outside the bounds of :mod:`.limits`.
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
        max_rv: float = DEFAULT_MAX_RV_KMS,
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
        ref = _reference_clone(stellar, telluric)
        if engine is not None and not isinstance(engine, EngineOptions):
            raise TypeError(f"engine must be an EngineOptions or None, got {type(engine).__name__}")
        self.engine = ref.engine if engine is None else engine
        lam = _check_settings(data_wavelength, ref.lam_centers.device, telluric_power=telluric_power,
                              continuum_degree=continuum_degree, calibration_degree=calibration_degree,
                              calibration_prior=calibration_prior)
        max_rv = check_rv_bound(max_rv)
        check_rv(rv, max_rv)
        vsini = starting_vsini(check_vsini(vsini, MAX_VSINI_KMS if max_vsini is None else max_vsini))
        self.stellar = stellar
        self.telluric = telluric
        dtype, device = ref.dtype, ref.lam_centers.device
        self.rot = RotationalBroadening(vsini, dv, limb_darkening=limb_darkening, max_vsini=max_vsini,
                                        tune=stellar is not None, dtype=dtype, device=device, engine=self.engine)
        floor = None
        if stellar is not None:  # ln of one grid step (Å) at each line: the narrowest σ and γ λ_Z resolves
            floor = torch.log(stellar.lam_centers.detach() * (float(dv) / float(SPEED_OF_LIGHT_KMS)))
        self.register_buffer("_stellar_log_width_floor", floor, persistent=False)
        self.inst = InstrumentalBroadening(check_resolving_power(resolving_power), dv, half_width=lsf_half_width,
                                           dtype=dtype, device=device, engine=self.engine)
        self.register_buffer("lam_d", lam, persistent=False)
        self._build_grid()
        self.rv = nn.Parameter(torch.tensor(float(rv), dtype=dtype, device=device), requires_grad=stellar is not None)
        self.max_rv = max_rv
        index, self.telluric_names, log_power = _telluric_powers(telluric, telluric_components, telluric_names,
                                                                 float(telluric_power), dtype, device)
        self.register_buffer("_component_index", index, persistent=False)
        self.log_telluric_power = nn.Parameter(log_power, requires_grad=telluric is not None)
        basis = _order_basis(lam, order_index, int(continuum_degree), calibration_degree, dtype)
        self.register_buffer("order_of_pixel", basis["order_of_pixel"], persistent=False)
        self.register_buffer("_powers", basis["powers"], persistent=False)
        self.register_buffer("_order_x", basis["x"], persistent=False)
        self.continuum_coeffs = nn.Parameter(basis["continuum_coeffs"])
        self.telluric_instrumental = bool(telluric_instrumental)
        self.calibration_degree = None if calibration_degree is None else int(calibration_degree)
        self.register_buffer("_cal_powers", basis["cal_powers"], persistent=False)
        self.calibration_coeffs = nn.Parameter(basis["calibration_coeffs"], requires_grad=False)
        self.calibration_prior = float(calibration_prior)
        self._floor_stellar_widths()

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
        evaluates anyway), and the stellar lines' ln σ and ln γ to at least one grid step (see ``dv``).
        :func:`fit_transfer` calls it after every Adam step."""
        self.rv.clamp_(-self.max_rv, self.max_rv)
        self.rot.log_vsini.clamp_(max=math.log(self.rot.max_vsini))
        self.inst.log_resolving_power.clamp_(min=math.log(self.inst.min_resolving_power))
        self._floor_stellar_widths()

    @torch.no_grad()
    def _floor_stellar_widths(self) -> None:
        """Raise the stellar lines' ln σ and ln γ to one grid step of λ_Z where they are below it (see ``dv``)."""
        floor = self._stellar_log_width_floor
        if floor is not None:
            self.stellar.log_sigmas.copy_(torch.maximum(self.stellar.log_sigmas, floor))
            self.stellar.log_gammas.copy_(torch.maximum(self.stellar.log_gammas, floor))

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
