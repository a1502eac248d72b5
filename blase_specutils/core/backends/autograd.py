"""The ``"autograd"`` backend: windowed torch operations, differentiated by autograd.

Lines are grouped into buckets of similar window length, so that each bucket is one dense
(lines × pixels) block gathered from the grid, evaluated with the profile callable, and
scatter-added onto the sum. It takes every profile (any callable) and the Appendix C.4 wing
correction, which the fused backends do not: the engine sends it the wing-corrected lines, and
every line when ``windowed_log_flux(..., fused=False)`` asks for plain autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import LineSet, NearField, Windows, line_terms

__all__ = ["AutogradBackend", "bucket_sizes", "padded_lengths", "buckets"]


@dataclass
class Bucket:
    """The lines of one window length: their indices and the (padded) length in pixels."""

    lines: Tensor
    npix: int


def bucket_sizes(n_grid: int, growth: float = 1.25, quantum: int = 8) -> list[int]:
    """The window lengths of the buckets: multiples of ``quantum`` growing by ``growth``, up to ``n_grid``."""
    sizes = []
    s = quantum
    while s < n_grid:
        sizes.append(s)
        s = int(math.ceil(s * growth / quantum) * quantum)
    sizes.append(n_grid)
    return sizes


def padded_lengths(npix: Tensor, n_grid: int, quantum: int = 8) -> Tensor:
    """Each line's window length padded up to its bucket's length (see :func:`buckets`)."""
    sizes_t = torch.tensor(bucket_sizes(n_grid, quantum=quantum), device=npix.device)
    return sizes_t[torch.searchsorted(sizes_t, torch.clamp(npix, min=quantum, max=n_grid))]


def buckets(npix: Tensor, n_grid: int, growth: float = 1.25, quantum: int = 8) -> list[Bucket]:
    """Group lines by window length; every line is padded up to its bucket's length."""
    npix = torch.clamp(npix, min=quantum, max=n_grid)
    sizes = bucket_sizes(n_grid, growth, quantum)
    sizes_t = torch.tensor(sizes, device=npix.device)
    which = torch.searchsorted(sizes_t, npix)
    out = []
    for b in torch.unique(which).tolist():
        lines = torch.nonzero(which == b).flatten()
        out.append(Bucket(lines=lines, npix=int(sizes[b])))
    return out


@torch.no_grad()
def bucket_windows(windows: Windows, sel: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    """First pixel of each padded window of a bucket's lines ``sel`` (centred on the line's own
    window, kept on the grid), and which of them lie wholly off the grid."""
    lo, hi, npix = windows.lo[sel], windows.hi[sel], windows.npix[sel]
    start = torch.clamp(lo - (m - npix.clamp(max=m)) // 2, min=0, max=n - m)
    return start, (hi <= 0) | (lo >= n)


def _with_wings(v: Tensor, x: Tensor, idx: Tensor, lines_: Tensor, wrows: Tensor, wing) -> tuple:
    """The profile values of a block with the wing correction applied to the rows ``wrows``,
    those rows moved to the end (with their pixel indices, offsets and line indices)."""
    corr = wing(x[wrows], lines_[wrows])
    if bool(wrows.all()):
        return v * corr, x, idx, lines_
    v = torch.cat([v[~wrows], v[wrows] * corr])
    order = torch.cat([torch.nonzero(~wrows).flatten(), torch.nonzero(wrows).flatten()])
    return v, x[order], idx[order], lines_[order]


class AutogradBackend:
    """Bucketed torch operations and autograd, for any profile and the wing correction."""

    name = "autograd"

    def supports(self, profile: str | None) -> bool:
        """Every profile, given by name or as a callable."""
        return True

    def runs_on(self, device: torch.device) -> bool:
        """Every device torch runs on."""
        return True

    def add_lines(self, out: Tensor, wavelength: Tensor, lines: LineSet, windows: Windows, *, mode: str,
                  sign: float, near: NearField | None, engine=None) -> Tensor:
        """``out`` plus the lines' terms, bucket by bucket, in one ``index_add`` at the end."""
        n = wavelength.shape[0]
        subset = None if windows.take is None else torch.nonzero(windows.take).flatten()
        npix = windows.npix if subset is None else windows.npix[subset]
        terms, idxs = [], []
        for bucket in buckets(npix, n):
            sel = bucket.lines if subset is None else subset[bucket.lines]
            start, offgrid = bucket_windows(windows, sel, bucket.npix, n)
            if bool(offgrid.all()):
                continue
            rows = ~offgrid
            t, idx = self._block(wavelength, lines, sel[rows], start[rows], bucket.npix, mode, sign, near)
            terms.append(t.reshape(-1))
            idxs.append(idx.reshape(-1))
        if terms:
            out = out.index_add(0, torch.cat(idxs), torch.cat(terms))
        return out

    @staticmethod
    def _block(wavelength: Tensor, lines: LineSet, s_: Tensor, start: Tensor, m: int, mode: str, sign: float,
               near: NearField | None) -> tuple[Tensor, Tensor]:
        """The terms of the lines ``s_`` on their windows of ``m`` pixels from ``start``, and the pixels."""
        with torch.no_grad():
            idx = start[:, None] + torch.arange(m, device=wavelength.device)[None, :]
        x = (wavelength[idx] - lines.centers[s_, None]).to(lines.amplitude.dtype)
        v = lines.profile(x, lines.sigma[s_, None], lines.gamma[s_, None])
        if lines.wing_mask is not None:
            wrows = lines.wing_mask[s_]
            if bool(wrows.any()):
                v, x, idx, s_ = _with_wings(v, x, idx, s_, wrows, lines.wing)
        t = line_terms(v, lines.amplitude[s_, None], mode, sign)
        if near is not None:
            # near-field residual for lines without a wing correction (those have kc = ke = 0)
            hb = 1.0 / (x * x + near.b_line[s_, None] ** 2)
            t = t + hb * (near.kc[s_, None] + near.ke[s_, None] * hb)
        return t, idx
