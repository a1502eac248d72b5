"""The ``"dense"`` backend: every line at every pixel, untruncated. The reference of every test.

It ignores the windows: each line is summed over the whole grid, in chunks of pixels, through
plain autograd. With nothing truncated there is no far field to add, so it takes no
:class:`.base.NearField`. ``LineCloneModel.log_flux(..., dense=True)`` and
:func:`dense_log_flux` are this backend; it is never picked to train (its cost is lines × pixels).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import LineSet, NearField, ProfileFn, Windows, line_terms

__all__ = ["DenseBackend", "dense_log_flux"]


def dense_log_flux(
    wavelength: Tensor,
    centers: Tensor,
    amplitude: Tensor,
    sigma: Tensor,
    gamma: Tensor,
    *,
    profile: ProfileFn,
    mode: str = "linear",
    sign: float = 1.0,
    chunk_elements: int = 2**24,
    wing: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Every line at every pixel, in chunks of pixels: the untruncated reference (slow)."""
    n_lines = max(int(centers.numel()), 1)
    step = max(1, chunk_elements // n_lines)
    pieces = []
    all_lines = torch.arange(centers.numel(), device=wavelength.device)
    for i in range(0, wavelength.shape[0], step):
        w = wavelength[i : i + step]
        x = (w[None, :] - centers[:, None]).to(amplitude.dtype)
        v = profile(x, sigma[:, None], gamma[:, None])
        if wing is not None:
            v = v * wing(x, all_lines)
        pieces.append(line_terms(v, amplitude[:, None], mode, sign).sum(0))
    if not pieces:
        return torch.zeros(0, dtype=amplitude.dtype, device=wavelength.device)
    return torch.cat(pieces)


class DenseBackend:
    """Every taken line over the whole grid (the windows are ignored)."""

    name = "dense"

    def supports(self, profile: str | None) -> bool:
        """Every profile."""
        return True

    def runs_on(self, device: torch.device) -> bool:
        """Every device torch runs on."""
        return True

    def add_lines(self, out: Tensor, wavelength: Tensor, lines: LineSet, windows: Windows, *, mode: str,
                  sign: float, near: NearField | None = None, engine=None) -> Tensor:
        """``out`` plus the untruncated sum of the taken lines (wing-corrected ones with their wings)."""
        if near is not None:
            raise ValueError("the dense backend sums every line whole: it takes no far-field split")
        take = torch.arange(lines.centers.numel(), device=lines.centers.device) if windows.take is None else \
            torch.nonzero(windows.take).flatten()
        wing = None
        if lines.wing is not None:
            mask = lines.wing_mask

            def wing(x: Tensor, k: Tensor) -> Tensor:
                corr = lines.wing(x, take[k])
                return corr if mask is None else torch.where(mask[take[k]][:, None], corr, torch.ones_like(corr))
        return out + dense_log_flux(wavelength, lines.centers[take], lines.amplitude[take], lines.sigma[take],
                                    lines.gamma[take], profile=lines.profile, mode=mode, sign=sign, wing=wing)
