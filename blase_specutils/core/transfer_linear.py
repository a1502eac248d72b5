"""The linear parts of the transfer model, solved by weighted least squares: the per-order
continuum polynomial P_data and the smooth per-order wavelength correction δv.

:class:`LinearParts` is a mixin of :class:`~.transfer.TransferModel`: its methods read the model's
buffers (``_powers``, ``_cal_powers``, ``order_of_pixel``) and parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LinearParts"]


class LinearParts:
    """The continuum polynomial and the wavelength correction of a :class:`~.transfer.TransferModel`:
    their values, their least-squares solutions and the correction's Gaussian pull."""

    def continuum(self) -> Tensor:
        """P_data at the data pixels."""
        return (self._powers * self.continuum_coeffs[self.order_of_pixel]).sum(1)

    def continuum_powers(self, degree: int) -> Tensor:
        """The continuum basis of another polynomial degree: x⁰ … x^degree at each data pixel, x the
        wavelength scaled to [−1, 1] within the pixel's order (the model's own basis at its degree)."""
        x = self._order_x
        return torch.stack([x**d for d in range(int(degree) + 1)], dim=1)

    @torch.no_grad()
    def _continuum_for(self, base: Tensor, data: Tensor, weight: Tensor, powers: Tensor | None = None) -> Tensor:
        """Per-order coefficients of P_data by weighted linear least squares for the model ``base``
        (:meth:`unscaled`); orders with too few good pixels keep their current coefficients. With
        ``powers`` (:meth:`continuum_powers`), for that basis instead (such orders then get 0)."""
        own = powers is None
        current = self.continuum_coeffs.detach()
        if not own:
            current = current.new_zeros(current.shape[0], powers.shape[1])
        n_o, n_p = current.shape
        oi = self.order_of_pixel
        a = (self._powers if own else powers) * base[:, None]  # pixels × powers
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

    @torch.no_grad()
    def solve_continuum(self, data: Tensor, weight: Tensor) -> None:
        """Set P_data by weighted linear least squares given the current line model."""
        self.continuum_coeffs.copy_(self._continuum_for(self.unscaled(), data, weight))

    @torch.no_grad()
    def _profiled_chi2(self, base: Tensor, data: Tensor, weight: Tensor, powers: Tensor | None = None) -> float:
        """χ² of ``base`` (:meth:`unscaled`) with the continuum solved for it (the model is not changed);
        ``powers``: in that continuum basis instead of the model's own (:meth:`continuum_powers`)."""
        coeffs = self._continuum_for(base, data, weight, powers)
        r = data - base * ((self._powers if powers is None else powers) * coeffs[self.order_of_pixel]).sum(1)
        return float((weight * r * r).sum())

    def velocity_correction(self) -> Tensor | None:
        """δv (km/s) of the wavelength correction at each data pixel, or None without one."""
        if self.calibration_degree is None:
            return None
        return (self._cal_powers * self.calibration_coeffs[self.order_of_pixel]).sum(1)

    def _velocity_derivative(self, m: Tensor) -> Tensor:
        """dm/dv (per km/s) on the log grid λ_Z, by central differences (one-sided at the ends)."""
        grad = torch.empty_like(m)
        grad[1:-1] = (m[2:] - m[:-2]) / (2.0 * self.rot.dv)
        grad[0] = (m[1] - m[0]) / self.rot.dv
        grad[-1] = (m[-1] - m[-2]) / self.rot.dv
        return grad

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
