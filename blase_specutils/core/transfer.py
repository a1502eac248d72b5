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

import numpy as np
import torch
from torch import Tensor, nn

from .clone import SPEED_OF_LIGHT_KMS, LineCloneModel
from .extrinsic import InstrumentalBroadening, PixelResampler, RotationalBroadening, log_lambda_grid, pixel_edges
from .training import TrainingHistory, train, use_plans

__all__ = ["TransferModel", "transfer_loss", "fit_transfer", "TransferFit"]


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
        Largest v sin i the fixed-length rotation kernel allows.
    max_rv : float
        Largest absolute RV (km/s) the model grid allows for (lines from outside the data move in).
    telluric_power : float
        Initial Beer's-law exponent X of the telluric transmission (> 0). Its logarithm
        ``log_telluric_power`` is the parameter; it requires grad whenever a telluric clone is
        present.
    lsf_half_width : float, optional
        Fixed half width (km/s) of the instrumental kernel; default 6 σ_v at 0.75 × the initial R
        (see :class:`~blase_specutils.core.extrinsic.InstrumentalBroadening`). Give it to rebuild
        a saved model exactly.

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
    ) -> None:
        super().__init__()
        if stellar is None and telluric is None:
            raise ValueError("a TransferModel needs a stellar clone, a telluric clone, or both")
        ref = stellar if stellar is not None else telluric
        if not (math.isfinite(float(telluric_power)) and float(telluric_power) > 0):
            raise ValueError(f"telluric_power must be finite and > 0, got {telluric_power}")
        lam = torch.as_tensor(np.asarray(data_wavelength, dtype=np.float64), device=ref.lam_centers.device)
        if lam.ndim != 1 or lam.numel() < 2 or not bool((torch.diff(lam) > 0).all()):
            raise ValueError("data_wavelength must be 1-D, strictly increasing, with at least 2 pixels")
        if int(continuum_degree) < 0:
            raise ValueError("continuum_degree must be >= 0")
        self.stellar = stellar
        self.telluric = telluric
        dtype = ref.dtype
        device = ref.lam_centers.device
        self.rot = RotationalBroadening(max(float(vsini), 1e-3), dv, limb_darkening=limb_darkening,
                                        max_vsini=max_vsini, tune=stellar is not None, dtype=dtype, device=device)
        self.inst = InstrumentalBroadening(resolving_power, dv, half_width=lsf_half_width, dtype=dtype, device=device)
        margin_v = self.rot.max_vsini + self.inst.half_width + 2.0 * dv
        lo = float(lam[0]) * math.exp(-margin_v / SPEED_OF_LIGHT_KMS) - 1.0
        hi = float(lam[-1]) * math.exp(margin_v / SPEED_OF_LIGHT_KMS) + 1.0
        self.register_buffer("lam_z", log_lambda_grid(lo, hi, dv, device=device), persistent=False)
        self.resampler = PixelResampler(self.lam_z, lam)
        self.register_buffer("lam_d", lam, persistent=False)
        self.rv = nn.Parameter(torch.tensor(float(rv), dtype=dtype, device=device), requires_grad=stellar is not None)
        self.max_rv = float(max_rv)
        self.log_telluric_power = nn.Parameter(
            torch.tensor(math.log(float(telluric_power)), dtype=dtype, device=device), requires_grad=telluric is not None
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

    def make_plans(self, *, headroom: float = 1.25, kernel: str = "auto") -> list:
        """Window plans of the clones on the model grid λ_Z (``LineCloneModel.make_plan``; the
        stellar one follows the RV parameter). Evaluations go through them until
        :meth:`clear_plans`: the same sums, with fewer synchronisations with the device.

        Parameters
        ----------
        headroom : float
            As in ``LineCloneModel.make_plan``.
        kernel : {"auto", "numba", "triton"}
            The compiled kernel of the plans.

        Returns
        -------
        list
            The plans, for :func:`~blase_specutils.core.train` (``plans=``).
        """
        self._plans = {}
        if self.stellar is not None:
            self._plans["stellar"] = self.stellar.make_plan(self.lam_z, self.rv, headroom=headroom, kernel=kernel)
        if self.telluric is not None:
            self._plans["telluric"] = self.telluric.make_plan(self.lam_z, headroom=headroom, kernel=kernel)
        return list(self._plans.values())

    def clear_plans(self) -> None:
        """Evaluate the clones without plans again (after :meth:`make_plans`)."""
        self._plans = {}

    def _plan(self, name: str):
        return getattr(self, "_plans", {}).get(name)

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
        return torch.exp(self.telluric_power * self.telluric.log_flux(self.lam_z, plan=self._plan("telluric")))

    def joint(self) -> Tensor:
        """M_joint(λ_Z) = S_ext ⊙ T_clone^X (Eq. 9), or T_clone^X alone without a stellar clone."""
        t = self.telluric_transmission()
        m = self.extrinsic()
        if m is None:
            return t
        return m if t is None else m * t

    def unscaled(self) -> Tensor:
        """resample[M_joint * g(R)] at the data pixels, before the continuum polynomial."""
        return self.resampler(self.inst(self.joint()))

    def forward(self) -> Tensor:
        """M(λ_D) (Eq. 10 times P_data)."""
        return self.unscaled() * self.continuum()

    @torch.no_grad()
    def solve_continuum(self, data: Tensor, weight: Tensor) -> None:
        """Set P_data by weighted linear least squares given the current line model."""
        base = self.unscaled()
        for k in range(self.n_orders):
            sel = (self.order_of_pixel == k) & (weight > 0)
            if int(sel.sum()) <= self._powers.shape[1]:
                continue
            a = self._powers[sel] * base[sel, None]
            w = weight[sel]
            ata = (a * w[:, None]).T @ a
            atb = (a * w[:, None]).T @ data[sel]
            self.continuum_coeffs[k] = torch.linalg.solve(ata, atb)

    @torch.no_grad()
    def _scan(self, data: Tensor, weight: Tensor, values: Sequence[float], set_value) -> np.ndarray:
        """χ² at each value (set by ``set_value``), with the continuum solved at each step."""
        chi2 = []
        for v in values:
            set_value(v)
            self.solve_continuum(data, weight)
            r = data - self()
            chi2.append(float((weight * r * r).sum()))
        return np.asarray(chi2)

    @torch.no_grad()
    def scan_rv(self, data: Tensor, weight: Tensor, rvs: Sequence[float]) -> tuple[float, np.ndarray]:
        """χ² (with the continuum solved at each step) on a grid of RVs; sets the best one."""
        if self.stellar is None:
            raise ValueError("a telluric-only model has no RV to scan (the RV never applies to telluric lines)")
        chi2 = self._scan(data, weight, rvs, lambda v: self.rv.fill_(float(v)))
        best = float(rvs[int(np.argmin(chi2))])
        self.rv.fill_(best)
        self.solve_continuum(data, weight)
        return best, chi2

    @torch.no_grad()
    def scan_telluric_power(self, data: Tensor, weight: Tensor, powers: Sequence[float]) -> tuple[float, np.ndarray]:
        """χ² (with the continuum solved at each step) on a grid of telluric powers X; sets the best one."""
        if self.telluric is None:
            raise ValueError("the model has no telluric clone: there is no telluric power to scan")
        bad = [x for x in powers if not float(x) > 0]
        if bad:
            raise ValueError(f"telluric powers must be > 0, got {bad[0]}")
        chi2 = self._scan(data, weight, powers, lambda x: self.log_telluric_power.fill_(math.log(float(x))))
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
        RVs (km/s) and χ² of the initial RV scan.
    telluric_power_scan : (ndarray, ndarray) or None
        Powers X and χ² of the initial telluric-power scan.
    """

    def __init__(self) -> None:
        self.stages: dict[str, TrainingHistory] = {}
        self.chi2: dict[str, float] = {}
        self.rv_scan: tuple[np.ndarray, np.ndarray] | None = None
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
) -> TransferFit:
    """Fit in the order users need: RV scan, then extrinsic + continuum, then lines.

    Parameters
    ----------
    model : TransferModel
    data, weight : Tensor
        Data flux at λ_D and 1/σ² (0 where masked).
    rv_scan : sequence of float, optional
        RVs (km/s) for the initial χ² scan (not for a telluric-only model: ValueError).
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
        devices when :data:`blase_specutils.core.training.PLANS_ON_CUDA` is set; never on CPUs.

    Returns
    -------
    TransferFit
        The model is left holding the fitted parameters; the clones' tuned/frozen state and the
        power's ``requires_grad`` are restored.
    """
    want_plan = use_plans(plan, model.lam_z.device)
    fit = TransferFit()
    st, tel = model.stellar, model.telluric
    prior = None if st is None else st.log_amplitudes.detach().clone()
    wprior = _widths(st)
    tprior = None if tel is None else tel.log_amplitudes.detach().clone()
    twprior = _widths(tel)
    if rv_scan is not None:
        best, chi2 = model.scan_rv(data, weight, list(rv_scan))
        fit.rv_scan = (np.asarray(rv_scan, dtype=float), chi2)
    else:
        model.solve_continuum(data, weight)
    if telluric_power_scan is not None:
        best, chi2 = model.scan_telluric_power(data, weight, list(telluric_power_scan))
        fit.telluric_power_scan = (np.asarray(telluric_power_scan, dtype=float), chi2)
    fit.chi2["start"] = _chi2(model, data, weight)
    # RV moves in km/s, centres in Å, continuum coefficients in flux units: their own step sizes
    overrides = {"rv": lr * 5.0, "continuum_coeffs": lr / 20.0}
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
    extra = likelihood if isinstance(likelihood, nn.Module) else None
    plans = model.make_plans() if want_plan else None
    try:
        _fit_stages(model, data, weight, fit, template_epochs=template_epochs, line_epochs=line_epochs, lr=lr,
                    likelihood=likelihood, overrides=overrides, extra=extra, plans=plans, progress=progress,
                    tune_lines=tune_lines, tune_telluric=tune_telluric, tune_vsini_with_lines=tune_vsini_with_lines,
                    patience=patience, prior=prior, wprior=wprior, tprior=tprior, twprior=twprior,
                    regularization=regularization, width_regularization=width_regularization,
                    telluric_regularization=telluric_regularization)
    finally:
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
                regularization, width_regularization, telluric_regularization) -> None:
    """The two training stages of :func:`fit_transfer` (template matching, then the lines)."""
    st, tel = model.stellar, model.telluric
    graph = None if likelihood is None else False  # a likelihood (e.g. a GP's Cholesky) may read values back
    if template_epochs:
        fit.stages["template"] = train(
            model, lambda: transfer_loss(model, data, weight, likelihood=likelihood), epochs=template_epochs, lr=lr,
            patience=50, progress=progress, desc="template matching", lr_overrides=overrides, extra=extra,
            plans=plans, graph=graph,
        )
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
            lr_overrides=overrides, extra=extra, plans=plans, graph=graph,
        )
        fit.chi2["lines"] = _chi2(model, data, weight)
        model.rot.log_vsini.requires_grad_(vsini_free)
