"""The ``"torch"`` backend: the fused pseudo-Voigt term in blocks of torch operations.

The lines are bucketed by window length as in the ``"autograd"`` backend, and each bucket is summed
by :func:`..fused.windowed_pseudo_voigt_sum`: blocks of lines small enough to stay in cache on a
CPU, one block per bucket on a GPU, with a hand-written backward pass that keeps no
(lines × pixels) array. It runs on any device and takes the pseudo-Voigt only (the engine sends
exact-Voigt lines to ``"autograd"``). It is what runs where neither numba (CPUs) nor Triton (GPUs)
is installed: 327 ms per epoch of the paper's HPF problem on 2 CPU cores against numba's 80, and
65-117 ms on an H200 against Triton's 9-15 (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..fused import windowed_pseudo_voigt_sum
from .autograd import bucket_windows, buckets
from .base import LineSet, NearField, Windows

__all__ = ["TorchBlockedBackend"]


class TorchBlockedBackend:
    """Bucketed windows, each bucket summed by the fused, blocked pseudo-Voigt function."""

    name = "torch"

    def supports(self, profile: str | None) -> bool:
        """The pseudo-Voigt only."""
        return profile == "pseudo-voigt"

    def runs_on(self, device: torch.device) -> bool:
        """Every device torch runs on."""
        return True

    def add_lines(self, out: Tensor, wavelength: Tensor, lines: LineSet, windows: Windows, *, mode: str,
                  sign: float, near: NearField | None, engine) -> Tensor:
        """``out`` plus the lines' terms, one fused call per bucket of window lengths."""
        n = wavelength.shape[0]
        for bucket in buckets(windows.npix, n):
            sel = bucket.lines
            start, offgrid = bucket_windows(windows, sel, bucket.npix, n)
            rows = ~offgrid if windows.take is None else ~offgrid & windows.take[sel]
            if not bool(rows.any()):
                continue
            s_ = sel[rows]
            out = out + windowed_pseudo_voigt_sum(
                wavelength, start[rows], bucket.npix, lines.centers[s_, None], lines.amplitude[s_, None],
                lines.sigma[s_, None], lines.gamma[s_, None], mode=mode, sign=sign,
                kc=None if near is None else near.kc[s_, None], ke=None if near is None else near.ke[s_, None],
                b=0.0 if near is None else near.b_line[s_, None],
                block_elements=engine.block_elements(wavelength.device))
        return out
