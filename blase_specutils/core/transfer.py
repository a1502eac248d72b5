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

(Eq. 11 with χ² in place of the MSE), with optional pulls on the widths. A ``likelihood``
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
from .training import TrainingHistory, train

__all__ = ["TransferModel", "transfer_loss", "fit_transfer", "TransferFit"]


class TransferModel(nn.Module):
    r"""The full forward model M(λ_D) of Eq. 10 for one or more échelle orders.

    Parameters
    ----------
    stellar : LineCloneModel
        The stellar clone (its lines are tuned in place when asked).
    data_wavelength : array_like
        Data pixel centres λ_D (Å), strictly increasing; gaps between orders are allowed.
    order_index : array_like of int, optional
        Order number of each pixel (for the per-order continuum); default: split at gaps.
    telluric : LineCloneModel, optional
        Telluric clone, multiplied before the instrumental kernel (not Doppler shifted).
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
    """

    def __init__(
        self,
        stellar: LineCloneModel,
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
    ) -> None:
        super().__init__()
        lam = torch.as_tensor(np.asarray(data_wavelength, dtype=np.float64), device=stellar.lam_centers.device)
        if lam.ndim != 1 or lam.numel() < 2 or not bool((torch.diff(lam) > 0).all()):
            raise ValueError("data_wavelength must be 1-D, strictly increasing, with at least 2 pixels")
        if int(continuum_degree) < 0:
            raise ValueError("continuum_degree must be >= 0")
        self.stellar = stellar
        self.telluric = telluric
        dtype = stellar.dtype
        device = stellar.lam_centers.device
        self.rot = RotationalBroadening(max(float(vsini), 1e-3), dv, limb_darkening=limb_darkening,
                                        max_vsini=max_vsini, dtype=dtype, device=device)
        self.inst = InstrumentalBroadening(resolving_power, dv, dtype=dtype, device=device)
        margin_v = self.rot.max_vsini + self.inst.half_width + 2.0 * dv
        lo = float(lam[0]) * math.exp(-margin_v / SPEED_OF_LIGHT_KMS) - 1.0
        hi = float(lam[-1]) * math.exp(margin_v / SPEED_OF_LIGHT_KMS) + 1.0
        self.register_buffer("lam_z", log_lambda_grid(lo, hi, dv, device=device), persistent=False)
        self.resampler = PixelResampler(self.lam_z, lam)
        self.register_buffer("lam_d", lam, persistent=False)
        self.rv = nn.Parameter(torch.tensor(float(rv), dtype=dtype, device=device))
        self.max_rv = float(max_rv)
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

    @property
    def n_orders(self) -> int:
        return int(self.continuum_coeffs.shape[0])

    @property
    def vsini(self) -> Tensor:
        return self.rot.vsini

    @property
    def resolving_power(self) -> Tensor:
        return self.inst.resolving_power

    def continuum(self) -> Tensor:
        """P_data at the data pixels."""
        return (self._powers * self.continuum_coeffs[self.order_of_pixel]).sum(1)

    def extrinsic(self) -> Tensor:
        """S_ext(λ_Z): the RV-shifted clone convolved with the rotation kernel (Eq. 7)."""
        s = self.stellar(self.lam_z, self.rv)
        return self.rot(s)

    def joint(self) -> Tensor:
        """M_joint(λ_Z) = S_ext ⊙ T_clone (Eq. 9)."""
        m = self.extrinsic()
        if self.telluric is not None:
            m = m * self.telluric(self.lam_z)
        return m

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
    def scan_rv(self, data: Tensor, weight: Tensor, rvs: Sequence[float]) -> tuple[float, np.ndarray]:
        """χ² (with the continuum solved at each step) on a grid of RVs; sets the best one."""
        chi2 = []
        for v in rvs:
            self.rv.fill_(float(v))
            self.solve_continuum(data, weight)
            r = data - self()
            chi2.append(float((weight * r * r).sum()))
        chi2 = np.asarray(chi2)
        best = float(rvs[int(np.argmin(chi2))])
        self.rv.fill_(best)
        self.solve_continuum(data, weight)
        return best, chi2


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
) -> Tensor:
    r"""χ² plus the L1 pull :math:`\sum_j |\ln a_j - \ln \hat a_j| / \Lambda` (and the same pull on
    ln σ and ln γ if asked).

    ``weight`` is 1/σ² per pixel (0 for masked pixels). ``regularization`` is Λ (None: none).
    ``likelihood``, if given, replaces χ²: it is called on the residual R = data − M(λ_D) at every
    pixel and returns a scalar on the χ² scale (twice a negative log-likelihood up to a
    constant); it handles its own noise model and masked pixels (``weight`` is then unused).
    """
    r = data - model()
    loss = (weight * r * r).sum() if likelihood is None else likelihood(r)
    st = model.stellar
    if regularization is not None and log_amp_prior is not None and st.log_amplitudes.requires_grad:
        loss = loss + (st.log_amplitudes - log_amp_prior).abs().sum() / regularization
    if width_regularization is not None and width_prior is not None:
        if st.log_sigmas.requires_grad:
            loss = loss + (st.log_sigmas - width_prior[0]).abs().sum() / width_regularization
        if st.log_gammas.requires_grad:
            loss = loss + (st.log_gammas - width_prior[1]).abs().sum() / width_regularization
    return loss


class TransferFit:
    """Results of :func:`fit_transfer`: the stages' histories and χ² values."""

    def __init__(self) -> None:
        self.stages: dict[str, TrainingHistory] = {}
        self.chi2: dict[str, float] = {}
        self.rv_scan: tuple[np.ndarray, np.ndarray] | None = None


def _chi2(model: TransferModel, data: Tensor, weight: Tensor) -> float:
    with torch.no_grad():
        r = data - model()
        return float((weight * r * r).sum())


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
) -> TransferFit:
    """Fit in the order users need: RV scan, then extrinsic + continuum, then lines.

    Parameters
    ----------
    model : TransferModel
    data, weight : Tensor
        Data flux at λ_D and 1/σ² (0 where masked).
    rv_scan : sequence of float, optional
        RVs (km/s) for the initial χ² scan.
    template_epochs : int
        Adam epochs of the template-matching stage (RV, v sin i, continuum, optionally R).
    line_epochs : int
        Epochs of the line stage (lines plus the extrinsic and continuum parameters); 0 skips it.
    tune_lines : sequence of str
        Line parameters tuned in the line stage.
    regularization : float or None
        Λ of the L1 pull of ln a towards the clone (None: no pull).
    width_regularization : float or None
        Λ of an L1 pull of ln σ, ln γ (None: none).
    lr : float
        Adam learning rate (log parameters); the RV moves by steps of 5·lr km/s, line centres by
        lr/30 Å and the continuum coefficients by lr/20.
    patience : int or None
        Early stopping of the line stage after this many epochs without 0.01 % improvement.
    tune_vsini_with_lines : bool or None
        Keep v sin i free during the line stage. Default (None): free unless line widths are tuned,
        because widths and v sin i are nearly degenerate; then v sin i keeps its template-matching
        value.
    progress : bool
        Progress bars.
    likelihood : callable, optional
        Replaces χ² in the loss of both stages (see :func:`transfer_loss`); None (default): χ².
        If it is an ``nn.Module``, its trainable parameters (e.g. a Gaussian process's amplitude
        and length scale) are tuned together with the model at the rate ``lr``. The RV scan and
        the initial continuum stay χ² least squares; the χ² values in the result are always the
        plain χ².
    """
    fit = TransferFit()
    st = model.stellar
    prior = st.log_amplitudes.detach().clone()
    wprior = (st.log_sigmas.detach().clone(), st.log_gammas.detach().clone())
    if rv_scan is not None:
        best, chi2 = model.scan_rv(data, weight, list(rv_scan))
        fit.rv_scan = (np.asarray(rv_scan, dtype=float), chi2)
    else:
        model.solve_continuum(data, weight)
    fit.chi2["start"] = _chi2(model, data, weight)
    # RV moves in km/s, centres in Å, continuum coefficients in flux units: their own step sizes
    overrides = {"rv": lr * 5.0, "continuum_coeffs": lr / 20.0, "stellar.lam_centers": lr / 30.0}
    # stage 1: template matching (lines frozen)
    tuned_before = st.tuned
    st.set_tuned(())
    model.inst.log_resolving_power.requires_grad_(bool(tune_resolving_power))
    extra = likelihood if isinstance(likelihood, nn.Module) else None
    if template_epochs:
        fit.stages["template"] = train(
            model, lambda: transfer_loss(model, data, weight, likelihood=likelihood), epochs=template_epochs, lr=lr,
            patience=50, progress=progress, desc="template matching", lr_overrides=overrides, extra=extra,
        )
    fit.chi2["template"] = _chi2(model, data, weight)
    # stage 2: lines, with everything else still free
    if line_epochs:
        st.set_tuned(tune_lines)
        vsini_free = model.rot.log_vsini.requires_grad
        if tune_vsini_with_lines is None:
            tune_vsini_with_lines = not ({"sigma", "gamma"} & set(tune_lines))
        model.rot.log_vsini.requires_grad_(bool(tune_vsini_with_lines) and vsini_free)
        fit.stages["lines"] = train(
            model,
            lambda: transfer_loss(model, data, weight, log_amp_prior=prior, regularization=regularization,
                                  width_prior=wprior, width_regularization=width_regularization,
                                  likelihood=likelihood),
            epochs=line_epochs, lr=lr, patience=patience, progress=progress, desc="transfer learning",
            lr_overrides=overrides, extra=extra,
        )
        fit.chi2["lines"] = _chi2(model, data, weight)
        model.rot.log_vsini.requires_grad_(vsini_free)
    st.set_tuned(tuned_before)
    return fit
