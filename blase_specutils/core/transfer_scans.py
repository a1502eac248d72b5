"""The χ² scans of the transfer model that start the optimiser: RV, RV × v sin i and the
telluric power, each with the continuum solved at every point.

:class:`ChiSquareScans` is a mixin of :class:`~.transfer.TransferModel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ChiSquareScans"]


class ChiSquareScans:
    """χ² on grids of RV, RV × v sin i and telluric power X, the continuum solved at each point; each
    scan sets the best value in the model."""

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
