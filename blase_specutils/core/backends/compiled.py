"""What the two compiled backends (``"numba"``, ``"triton"``) share: one pass over every line's
own window, by a kernel with the signature of :func:`..cpu_kernel.windowed_pseudo_voigt_sum_cpu`."""

from __future__ import annotations

import torch
from torch import Tensor

from .autograd import padded_lengths
from .base import LineSet, NearField, Windows

__all__ = ["CompiledBackend"]


class CompiledBackend:
    """A fused kernel that evaluates each line on exactly its window (pseudo-Voigt and exact Voigt).

    Subclasses give :attr:`name`, :meth:`runs_on` and :meth:`kernel`, the kernel with its settings.
    """

    name = "compiled"

    def supports(self, profile: str | None) -> bool:
        """The pseudo-Voigt and the exact Voigt."""
        return profile in ("pseudo-voigt", "voigt")

    def runs_on(self, device: torch.device) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def kernel(self, engine):  # pragma: no cover - overridden
        """``kernel(wavelength, start, count, c, a, s, g, *, mode, sign, kc, ke, b, profile, eta)``."""
        raise NotImplementedError

    def add_lines(self, out: Tensor, wavelength: Tensor, lines: LineSet, windows: Windows, *, mode: str,
                  sign: float, near: NearField | None, engine) -> Tensor:
        """``out`` plus every taken line on the grid, in one kernel call."""
        n = wavelength.shape[0]
        with torch.no_grad():
            rows = (windows.hi > 0) & (windows.lo < n) & (windows.npix > 0)
            if windows.take is not None:
                rows &= windows.take
        if not bool(rows.any()):
            return out
        s_ = None if bool(rows.all()) else torch.nonzero(rows).flatten()  # every line: views, no gathers

        def pick(t: Tensor) -> Tensor:
            return t[:, None] if s_ is None else t[s_, None]

        start, count = self._starts(windows, s_, n, engine.pad_windows)
        return out + self.kernel(engine)(
            wavelength, start, count, pick(lines.centers), pick(lines.amplitude), pick(lines.sigma),
            pick(lines.gamma), mode=mode, sign=sign, kc=None if near is None else pick(near.kc),
            ke=None if near is None else pick(near.ke), b=0.0 if near is None else pick(near.b_line),
            profile=lines.profile_name, eta=None if lines.eta is None else tuple(pick(t) for t in lines.eta))

    @staticmethod
    @torch.no_grad()
    def _starts(windows: Windows, s_: Tensor | None, n: int, pad: bool) -> tuple[Tensor, Tensor]:
        """First pixel and pixel count of each line's window on the grid (``pad``: its bucket's padded
        window, as the bucketed backends take it, to compare the two to rounding)."""
        lo, hi, npix = (windows.lo, windows.hi, windows.npix) if s_ is None else (
            windows.lo[s_], windows.hi[s_], windows.npix[s_])
        if pad:
            count = padded_lengths(npix, n)
            start = torch.clamp(lo - (count - npix.clamp(max=count)) // 2, min=0)
            return torch.minimum(start, n - count), count
        start = lo.clamp(min=0)
        return start, hi.clamp(max=n) - start
