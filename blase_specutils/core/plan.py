r"""Window plans: the sparse engine without host synchronisations, so that an epoch can be a CUDA graph.

:func:`.engine.windowed_log_flux` decides at every call, from the current parameters, how long each
line's window is, which far-field level takes each line and how the windows are cut into the Triton
kernel's chunks. Those decisions read numbers back from the device (15 to 20 synchronisations per
epoch), and their shapes change from call to call, so an epoch cannot be recorded as a CUDA graph.

A :class:`WindowPlan` fixes the *shapes* once and keeps the *values* on the device:

- the set of far-field levels evaluated, the lines each level sums directly (beyond its grid's
  margin) and the interpolation weights to the pixels (:class:`.farfield.FarFieldPlan`);
- a capacity for the chunk table of the Triton kernel (the chunks needed when the plan was made,
  times ``headroom``).

Every line's level, kernel width :math:`b_j`, window and the chunk table are then recomputed on the
device at every update, exactly as :func:`~.engine.windowed_log_flux` computes them, into buffers of
fixed size: the windows still follow the current line centres and widths, nothing is truncated
that the unplanned engine would evaluate, and the two give the same sums. An update also raises a
flag (:attr:`WindowPlan.stale`) when the lines no longer fit the plan: more chunks than the
capacity, a line on a level that is not evaluated, or a line too close to a level grid's edge.
Reading the flag is the only synchronisation left; a stale plan is rebuilt (:meth:`WindowPlan.rebuild`).

Plans cover the compiled kernels (numba on CPUs, Triton on GPUs) for plain pseudo-Voigt and exact
Voigt lines. The few lines with the Appendix C.4 wing correction take a :class:`BroadLinePlan`
(fixed-size windows in torch operations), and a :class:`ClonePlan` holds the two.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable

import torch
from torch import Tensor

from .cpu_kernel import HAVE_NUMBA, windowed_pseudo_voigt_sum_cpu
from .engine import _bucket_sizes, line_terms, window_half_widths
from .farfield import FarFieldSettings, far_field, plan_far_field, residual_half_widths
from .profiles import PROFILES, wing_factor
from .fused import _eta_and_derivatives, eta_and_derivatives, stored_eta
from .gpu_kernel import (HAVE_TRITON, line_coefficients_triton, plan_lines_triton, plan_windows_triton,
                         windowed_pseudo_voigt_sum_triton)
from .options import EngineOptions

__all__ = ["WindowPlan", "BroadLinePlan", "ClonePlan"]

#: Source of the per-line parameters: () -> (λc, a, σ, γ), each shape (L,).
LineSource = Callable[[], "tuple[Tensor, Tensor, Tensor, Tensor]"]


class WindowPlan:
    r"""The fixed shapes of a windowed line sum, with its windows recomputed on the device.

    Parameters
    ----------
    wavelength : Tensor
        The pixel grid (Å), float64, strictly increasing, shape (N,). The plan is for this grid only.
    source : callable
        ``source()`` returns the current line centres λc (Å, float64), areas a (Å), σ and γ (Å),
        each of shape (L,): the plan reads the lines from it when it is updated or rebuilt.
    profile : {"pseudo-voigt", "voigt"}
    mode : {"linear", "log"}
    sign : float
        +1 for absorption, -1 for emission.
    tolerance : float
        Each line's windowed term (or near-field residual) is evaluated out to where it falls below
        this value, as in :func:`~.engine.windowed_log_flux`.
    min_half_width : float
        Smallest window half width (Å).
    far_field : FarFieldSettings, optional
        The near-field / far-field split (:mod:`.farfield`); None: plain truncated windows.
    half_widths : Tensor, optional
        Fixed per-line half widths (Å) instead of ``tolerance`` (windows still follow the centres).
    kernel : {"auto", "numba", "triton"}, optional
        The compiled kernel: numba on CPUs, Triton on CUDA devices (``"auto"``); default
        ``engine.backend``.
    headroom : float
        Capacity of the Triton chunk table, relative to what the lines need when the plan is made
        (>= 1); more headroom means fewer rebuilds while the widths grow during training. It grows
        by half (up to 4) at every rebuild that the lines forced.
    engine : EngineOptions, optional
        Kernel settings (default ``EngineOptions()``): ``chunk``, ``num_warps``, ``triton_lines``,
        ``triton_windows``, ``triton_coefficients``, ``overlap_streams`` and the far field's.
    """

    def __init__(
        self,
        wavelength: Tensor,
        source: LineSource,
        *,
        profile: str = "pseudo-voigt",
        mode: str = "linear",
        sign: float = 1.0,
        tolerance: float = 1e-6,
        min_half_width: float = 0.0,
        far_field: FarFieldSettings | None = None,
        half_widths: Tensor | None = None,
        kernel: str | None = None,
        headroom: float = 1.25,
        engine: EngineOptions | None = None,
    ) -> None:
        self.rebuilds = 0
        if not torch.is_tensor(wavelength) or wavelength.ndim != 1 or wavelength.dtype != torch.float64:
            raise TypeError("wavelength must be a 1-D float64 tensor (Å)")
        if wavelength.numel() < 2:
            raise ValueError("a window plan needs at least two pixels")
        if profile not in ("pseudo-voigt", "voigt"):
            raise ValueError(f"profile must be 'pseudo-voigt' or 'voigt', got {profile!r}")
        if mode not in ("linear", "log"):
            raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
        if not (tolerance > 0 and headroom >= 1.0):
            raise ValueError("tolerance must be > 0 and headroom >= 1")
        if far_field is not None and not isinstance(far_field, FarFieldSettings):
            raise TypeError("far_field must be a FarFieldSettings or None")
        engine = EngineOptions() if engine is None else engine
        if kernel is None:
            kernel = engine.backend
        on_cpu = wavelength.device.type == "cpu"
        if kernel == "auto":
            kernel = "numba" if on_cpu else "triton"
        if kernel == "numba" and not (on_cpu and HAVE_NUMBA):
            raise ValueError("kernel='numba' needs numba and CPU tensors; use kernel='triton' on CUDA devices")
        if kernel == "triton":
            if not HAVE_TRITON:
                raise ImportError("window plans on GPUs need triton (it ships with the CUDA builds of torch)")
            if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("kernel='triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
        elif kernel != "numba":
            raise ValueError(f"kernel must be 'auto', 'numba' or 'triton', got {kernel!r}")
        self.wavelength = wavelength
        self._grid = wavelength.contiguous()  # what the kernels index (the plan checks the caller's grid by identity)
        self.source = source
        self.profile, self.mode, self.sign = profile, mode, float(sign)
        self.tolerance, self.min_half_width = float(tolerance), float(min_half_width)
        self.far_field = far_field
        self.half_widths = None if half_widths is None else half_widths.detach()
        self.kernel = kernel
        self.engine = engine
        self.headroom = float(headroom)
        #: Keep the buffers as they are when evaluating (set by :class:`.graphs.GraphedEpoch`, which
        #: updates the plan after each optimizer step instead).
        self.frozen = False
        #: How many times the plan was rebuilt because the lines outgrew it.
        self.rebuilds = 0
        self._span = float(wavelength[-1] - wavelength[0])
        self.rebuild()
        self.rebuilds = 0

    # ------------------------------------------------------------------ building and updating
    @torch.no_grad()
    def rebuild(self, lines: tuple | None = None) -> None:
        """Make the plan again from the current lines, or from ``lines`` = (λc, a, σ, γ)
        (synchronises with the device).

        When the lines had outgrown the plan, the chunk table's :attr:`headroom` grows by half (up
        to 4×): lines that keep widening, early in a fit with a large learning rate, would
        otherwise need a rebuild (and a new CUDA graph) every few epochs."""
        if getattr(self, "_stale", None) is not None and bool(self._stale):
            self.headroom = min(4.0, self.headroom * 1.5)
        c, a, s, g = (t.detach() for t in (self.source() if lines is None else lines))
        if c.ndim != 1 or c.numel() == 0 or any(t.shape != c.shape for t in (a, s, g)):
            raise ValueError("a window plan needs at least one line, with λc, a, σ, γ of one shape (L,)")
        levels = b_line = None
        self._whole = False
        eta = self._eta(s, g)
        if self.far_field is not None:
            levels, b_line = self._levels(a, g)
            self.ff_plan = plan_far_field(self.wavelength, c, levels, self.far_field, a.dtype)
            self._whole = bool((levels < 0).any())
        start, count = self._windows(c, a, s, g, eta[0], levels, b_line)
        self.capacity = 0
        self.chunk = self.engine.chunk
        if self.kernel == "triton":
            need = int(((count + self.chunk - 1) // self.chunk).sum())
            self.capacity = max(16, int(math.ceil(need * self.headroom)))
        n = c.numel()
        dev = c.device
        self.n_lines = n
        self.start = torch.zeros(n, dtype=torch.long, device=dev)
        self.count = torch.zeros(n, dtype=torch.long, device=dev)
        self.levels = torch.zeros(n, dtype=torch.long, device=dev)
        self.b_line = torch.zeros(n, dtype=a.dtype, device=dev)
        self.eta = torch.zeros((3, n), dtype=a.dtype, device=dev)  # η, ∂η/∂σ, ∂η/∂γ
        self.chunks = tuple(torch.zeros(self.capacity, dtype=torch.long, device=dev) for _ in range(3))
        self._per = torch.zeros(n, dtype=torch.long, device=dev)  # chunks per line, and their running sum
        self._ends = torch.zeros(n, dtype=torch.long, device=dev)
        self._stale = torch.zeros((), dtype=torch.int32, device=dev)  # > 0: the lines outgrew the plan
        ff = self.far_field
        top = ff.top_level(self._span) if ff is not None else 0
        self._top = top
        self._params = torch.tensor([self.sign, self.tolerance, self.min_half_width, ff.b if ff else 1.0,
                                     float(ff.level_ratio) if ff else 2.0, math.log(ff.level_ratio) if ff else 1.0,
                                     float(top)], dtype=torch.float64, device=dev)
        self._write(c, eta, levels, b_line, start, count)
        self.rebuilds += 1

    @torch.no_grad()
    def update(self, lines: tuple | None = None) -> None:
        """Recompute every line's level, window and the chunk table from the current lines (or from
        ``lines`` = (λc, a, σ, γ)), on the device and without synchronising; :attr:`stale` tells
        whether they still fit the plan."""
        c, a, s, g = (t.detach() for t in (self.source() if lines is None else lines))
        if c.numel() != self.n_lines:
            raise ValueError(f"the plan is for {self.n_lines} lines, the source now gives {c.numel()}")
        triton_lines = self.engine.triton_lines and self.kernel == "triton"
        if triton_lines and self.engine.triton_windows:
            # everything in three kernels, straight into the buffers
            ff = self.ff_plan if self.far_field is not None else None
            plan_windows_triton(
                c.contiguous(), a.contiguous(), s.contiguous(), g.contiguous(), self._params, self.eta, self.levels,
                self.b_line, wavelength=self._grid, start=self.start, count=self.count, per_line=self._per,
                ends=self._ends, chunks=self.chunks, flag=self._stale, chunk=self.chunk, profile=self.profile,
                far=ff is not None, linear=self.mode == "linear", cap=self.half_widths is not None,
                max_level=self._top, half_widths=self.half_widths, spreadable=None if ff is None else ff.spreadable,
                direct_level=None if ff is None else ff.direct_level, whole=self._whole)
            return
        if triton_lines:
            # η, levels and b_j straight into the buffers, and the window ends, in one kernel
            lo, hi = plan_lines_triton(
                c.contiguous(), a.contiguous(), s.contiguous(), g.contiguous(), self._params, self.eta, self.levels,
                self.b_line, profile=self.profile, far=self.far_field is not None, linear=self.mode == "linear",
                cap=self.half_widths is not None, max_level=self._top, half_widths=self.half_widths)
            start, count = self._pixels(lo, hi)
            self._write(c, None, None if self.far_field is None else self.levels, None, start, count)
            return
        levels = b_line = None
        eta = self._eta(s, g)
        if self.far_field is not None:
            levels, b_line = self._levels(a, g)
        start, count = self._windows(c, a, s, g, eta[0], levels, b_line)
        self._write(c, eta, levels, b_line, start, count)

    @property
    def stale(self) -> bool:
        """True when the lines outgrew the plan at an update since it was (re)built (one
        synchronisation): evaluations since then may have missed pixels; rebuild it."""
        return bool(self._stale)

    def _eta(self, s: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """η, ∂η/∂σ, ∂η/∂γ of the pseudo-Voigt (η = 1 and zeros for the exact Voigt)."""
        if self.profile == "voigt":
            zero = torch.zeros_like(g)
            return torch.ones_like(g), zero, zero
        return _eta_and_derivatives(s, g)

    def _levels(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        ff = self.far_field
        levels = ff.line_levels(g, self._span, cap=self.half_widths is not None)
        b_line = (ff.b * torch.pow(float(ff.level_ratio), levels.clamp(min=0).to(torch.float64))).to(a.dtype)
        return levels, b_line

    def _windows(self, c, a, s, g, eta, levels, b_line) -> tuple[Tensor, Tensor]:
        """First pixel and length of every line's window (as the unplanned engine computes them)."""
        if self.half_widths is not None:
            hw = self.half_widths
        elif self.far_field is None:
            hw = window_half_widths(a, s, g, self.tolerance, self.min_half_width)
        else:
            kc = self.sign * a * eta * g / math.pi
            hw = residual_half_widths(a, s, g, eta, kc, b_line, self.tolerance, self.mode,
                                      voigt=self.profile == "voigt").clamp(min=self.min_half_width)
            if self._whole:
                # (the pseudo-Voigt's η for the whole lines' windows, also for the exact Voigt, as the engine does)
                hw = torch.where(levels < 0, window_half_widths(
                    a, s, g, self.tolerance, self.min_half_width, eta=None if self.profile == "voigt" else eta), hw)
        return self._pixels(c - hw, c + hw)

    def _pixels(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """First pixel and number of pixels of the windows [lo, hi] (Å)."""
        n = self.wavelength.numel()
        start = torch.searchsorted(self.wavelength, lo).clamp_(min=0, max=n)
        hi = torch.searchsorted(self.wavelength, hi, right=True).clamp_(max=n)
        return start, hi.sub_(start).clamp_(min=0)

    def _write(self, c, eta, levels, b_line, start, count) -> None:
        self.start.copy_(start)
        self.count.copy_(count)
        if eta is not None:
            for buf, x in zip(self.eta, eta):
                buf.copy_(x)
        stale = self._stale
        if levels is not None:
            if levels is not self.levels:
                self.levels.copy_(levels)
                self.b_line.copy_(b_line)
            stale = stale | self.ff_plan.violations(c, levels)
            if not self._whole:
                stale = stale | (levels < 0).any()
        if self.kernel == "triton":
            stale = stale | self._chunk_table(start, count)
        self._stale.copy_(stale)

    def _chunk_table(self, start: Tensor, count: Tensor) -> Tensor:
        """Fill the chunk table (line, first pixel, end pixel of every chunk of at most
        :attr:`chunk` pixels; unused slots are empty chunks); True if the lines need more than the
        capacity."""
        per_line = (count + self.chunk - 1) // self.chunk
        ends = torch.cumsum(per_line, 0)
        k = torch.arange(self.capacity, device=start.device)
        line = torch.searchsorted(ends, k, right=True).clamp(max=self.n_lines - 1)
        p0 = start[line] + (k - (ends[line] - per_line[line])) * self.chunk
        p1 = torch.where(k < ends[-1], start[line] + count[line], p0)
        self.chunks[0].copy_(line)
        self.chunks[1].copy_(p0)
        self.chunks[2].copy_(p1)
        return ends[-1] > self.capacity

    # ------------------------------------------------------------------ evaluation
    def log_flux(self, centers: Tensor, amplitude: Tensor, sigma: Tensor, gamma: Tensor) -> Tensor:
        r""":math:`\ln S_\mathrm{clone}` on the plan's grid for these lines (differentiable in all four).

        Unless the plan is :attr:`frozen`, it is first updated for these lines and, if they
        outgrew it, rebuilt (the one synchronisation per call). A frozen plan evaluates the windows
        of its last update as they are: the lines must then be those ``source`` gave it.
        """
        lines = (centers, amplitude, sigma, gamma)
        if any(t.shape != (self.n_lines,) for t in lines):
            raise ValueError(f"the plan is for {self.n_lines} lines: λc, a, σ and γ must each have shape "
                             f"({self.n_lines},), got {[tuple(t.shape) for t in lines]}")
        start, count, chunks, b_line, levels = self.start, self.count, self.chunks, self.b_line, self.levels
        if not self.frozen:
            self.update(lines)
            if self.stale:
                self.rebuild(lines)
            # this evaluation's backward pass keeps its own windows and levels: the next update
            # overwrites the buffers, and a second evaluation before backward() would otherwise change them
            start, count, b_line = self.start.clone(), self.count.clone(), self.b_line.clone()
            levels = self.levels.clone()
            chunks = tuple(t.clone() for t in self.chunks)
        voigt = self.profile == "voigt"
        kc = ke = None
        b = 0.0
        eta_parts = None
        # c_j and e_j in one Triton kernel each way (which also takes η's derivatives from the buffers)
        coefficients = (self.far_field is not None and self.engine.triton_coefficients and self.frozen
                        and self.kernel == "triton" and not self._whole)
        if not voigt:
            if self.frozen:
                # the plan was updated for exactly these lines (GraphedEpoch): η is in the buffers
                eta = self.eta[0] if coefficients else stored_eta(sigma, gamma, *self.eta)
                rest = self.eta[1:]
            else:
                eta, *rest = eta_and_derivatives(sigma, gamma)
            eta_parts = (eta.detach()[:, None], *(x[:, None] for x in rest))
        if coefficients:
            b = b_line
            kc, ke = line_coefficients_triton(amplitude, sigma, gamma, self.eta, b_line, self._params, voigt=voigt)
        elif self.far_field is not None:
            b = b_line
            kc = self.sign * amplitude * (1.0 if voigt else eta) * gamma / math.pi
            ke = kc * (b * b - gamma * gamma + (3.0 * sigma * sigma if voigt else 0.0))
            if self._whole:
                whole = levels < 0
                kc = torch.where(whole, torch.zeros_like(kc), kc)
                ke = torch.where(whole, torch.zeros_like(ke), ke)
        args = (self.wavelength, start, count, centers[:, None], amplitude[:, None], sigma[:, None], gamma[:, None])
        kw = dict(mode=self.mode, sign=self.sign, kc=None if kc is None else kc[:, None],
                  ke=None if ke is None else ke[:, None], b=b if isinstance(b, float) else b[:, None],
                  profile=self.profile, eta=eta_parts)
        if self.kernel == "triton":
            near = functools.partial(windowed_pseudo_voigt_sum_triton, *args, chunks=(*chunks, self.chunk),
                                     num_warps=self.engine.num_warps, **kw)
        else:
            near = functools.partial(windowed_pseudo_voigt_sum_cpu, *args, **kw)
        if self.far_field is None:
            return near()
        far = functools.partial(far_field, self.wavelength, centers, kc, ke, self.far_field, levels,
                                plan=self.ff_plan, engine=self.engine)
        if self.engine.overlap_streams and self.wavelength.is_cuda:
            # the near field's kernels on a second stream, alongside the far field's many small ones;
            # autograd runs each backward pass on its forward's stream, so they overlap there too
            main = torch.cuda.current_stream(self.wavelength.device)
            if getattr(self, "_side", None) is None:
                self._side = torch.cuda.Stream(self.wavelength.device)
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                out = near()
            ff = far()
            main.wait_stream(self._side)
            out.record_stream(main)
            return out + ff.to(out.dtype)
        out = near()
        return out + far().to(out.dtype)


class BroadLinePlan:
    r"""Windows of fixed size for the few lines with the Appendix C.4 wing correction.

    These lines are evaluated whole (outside the far field), with the corrected profile
    :math:`\tilde V = V\,[1 + (e^{\alpha_j} - 1)\,\mathcal{S}((|\lambda - \lambda_{c,j}| - \lambda_{t,j})/b_j)]`,
    in torch operations on a (lines × :attr:`width`) block of pixels. Each line's window is what
    the unplanned engine evaluates for it: out to where the term falls below ``tolerance`` (with the
    area scaled by :math:`\max(e^{\alpha_j}, 1)`), padded to the engine's bucket length and centred
    on the line. The block is as wide as the longest padded window when the plan is made, times
    ``headroom``; an update raises the flag (:attr:`stale`) when a window no longer fits.

    Parameters
    ----------
    wavelength : Tensor
        The pixel grid (Å), float64, strictly increasing, shape (N,).
    source : callable
        ``source()`` returns λc (Å, float64), a, σ, γ (Å), α, λ_t and b (Å) of the lines, each of
        shape (L,).
    profile : {"pseudo-voigt", "voigt"}
    mode : {"linear", "log"}
    sign : float
        +1 for absorption, -1 for emission.
    tolerance : float
        Truncation tolerance of the windows.
    headroom : float
        Width of the block relative to the longest window when the plan is made (>= 1); it grows
        by half (up to 4) at every rebuild that the lines forced.
    """

    def __init__(self, wavelength: Tensor, source: Callable, *, profile: str = "pseudo-voigt", mode: str = "linear",
                 sign: float = 1.0, tolerance: float = 1e-6, headroom: float = 1.25) -> None:
        if not torch.is_tensor(wavelength) or wavelength.ndim != 1 or wavelength.dtype != torch.float64:
            raise TypeError("wavelength must be a 1-D float64 tensor (Å)")
        if wavelength.numel() < 2:
            raise ValueError("a window plan needs at least two pixels")
        if profile not in PROFILES:
            raise ValueError(f"profile must be 'pseudo-voigt' or 'voigt', got {profile!r}")
        if mode not in ("linear", "log"):
            raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
        if not (tolerance > 0 and headroom >= 1.0):
            raise ValueError("tolerance must be > 0 and headroom >= 1")
        self.wavelength = wavelength
        self._grid = wavelength.contiguous()
        self.source = source
        self.profile, self.mode, self.sign = profile, mode, float(sign)
        self._shape = PROFILES[profile]
        self.tolerance = float(tolerance)
        self.headroom = float(headroom)
        self.frozen = False
        self._sizes = torch.tensor(_bucket_sizes(wavelength.numel()), device=wavelength.device)
        self._stale = None
        self.rebuild()
        self.rebuilds = 0

    @torch.no_grad()
    def _windows(self, c: Tensor, a: Tensor, s: Tensor, g: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """First pixel and padded length of every line's window, as the unplanned engine takes them
        (zero length for a window entirely off the grid)."""
        n = self._grid.numel()
        hw = window_half_widths(a * torch.clamp(alpha.exp(), min=1.0), s, g, self.tolerance)
        lo = torch.searchsorted(self._grid, c - hw)
        hi = torch.searchsorted(self._grid, c + hw, right=True)
        npix = hi - lo
        m = self._sizes[torch.searchsorted(self._sizes, torch.clamp(npix, min=8, max=n))]  # the engine's buckets
        start = torch.clamp(lo - (m - npix.clamp(max=m)) // 2, min=0)
        start = torch.minimum(start, n - m)
        offgrid = (hi <= 0) | (lo >= n)
        return start, torch.where(offgrid, torch.zeros_like(m), m)

    @torch.no_grad()
    def rebuild(self, lines: tuple | None = None) -> None:
        """Size the block again for the current lines (synchronises with the device)."""
        if self._stale is not None and bool(self._stale):
            self.headroom = min(4.0, self.headroom * 1.5)
        c, a, s, g, alpha, lt, b = (t.detach() for t in (self.source() if lines is None else lines))
        if c.ndim != 1 or c.numel() == 0 or any(t.shape != c.shape for t in (a, s, g, alpha, lt, b)):
            raise ValueError("a broad-line plan needs at least one line, with its seven parameters of one shape (L,)")
        start, length = self._windows(c, a, s, g, alpha)
        n = self._grid.numel()
        self.n_lines = c.numel()
        self.width = int(min(n, max(8, math.ceil(int(length.max()) * self.headroom))))
        self._offsets = torch.arange(self.width, device=c.device)
        self.start = start.clone()
        self.length = length.clone()
        self._stale = torch.zeros((), dtype=torch.int32, device=c.device)
        self.rebuilds = getattr(self, "rebuilds", 0) + 1

    @torch.no_grad()
    def update(self, lines: tuple | None = None) -> None:
        """Recompute the windows on the device, without synchronising; :attr:`stale` tells whether
        they still fit the block."""
        c, a, s, g, alpha, _, _ = (t.detach() for t in (self.source() if lines is None else lines))
        if c.numel() != self.n_lines:
            raise ValueError(f"the plan is for {self.n_lines} lines, the source now gives {c.numel()}")
        start, length = self._windows(c, a, s, g, alpha)
        self.start.copy_(start)
        self.length.copy_(length)
        torch.maximum(self._stale, (length > self.width).any().to(torch.int32), out=self._stale)

    @property
    def stale(self) -> bool:
        """True when a window outgrew the block at an update since the plan was (re)built."""
        return bool(self._stale)

    def log_flux(self, centers: Tensor, amplitude: Tensor, sigma: Tensor, gamma: Tensor, alpha: Tensor,
                 transition: Tensor, scale: Tensor) -> Tensor:
        r""":math:`\ln S` of these lines on the plan's grid (differentiable in all seven parameters)."""
        lines = (centers, amplitude, sigma, gamma, alpha, transition, scale)
        if any(t.shape != (self.n_lines,) for t in lines):
            raise ValueError(f"the plan is for {self.n_lines} lines: every parameter must have shape ({self.n_lines},)")
        start, length = self.start, self.length
        if not self.frozen:
            self.update(lines)
            if self.stale:
                self.rebuild(lines)
            start, length = self.start.clone(), self.length.clone()
        n = self._grid.numel()
        with torch.no_grad():
            idx = start[:, None] + self._offsets[None, :]
            inside = self._offsets[None, :] < length[:, None]
            idx = torch.where(inside, idx, torch.zeros_like(idx)).clamp_(max=n - 1)
        dtype = amplitude.dtype
        x = (self._grid[idx] - centers[:, None]).to(dtype)
        v = self._shape(x, sigma[:, None], gamma[:, None])
        v = v * wing_factor(x, alpha, transition, scale)
        t = line_terms(v, amplitude[:, None], self.mode, self.sign)
        t = torch.where(inside, t, torch.zeros_like(t))
        return torch.zeros(n, dtype=dtype, device=self._grid.device).index_add(0, idx.reshape(-1), t.reshape(-1))


class ClonePlan:
    """The plans of a clone with wing-corrected lines: a :class:`WindowPlan` of its plain lines and
    a :class:`BroadLinePlan` of the others (made by ``LineCloneModel.make_plan``).

    It is updated, rebuilt, frozen and checked as one plan (:class:`.graphs.GraphedEpoch` takes it
    like a :class:`WindowPlan`).
    """

    def __init__(self, wavelength: Tensor, plain: WindowPlan | None, broad: BroadLinePlan, plain_lines: Tensor,
                 broad_lines: Tensor) -> None:
        self.wavelength = wavelength
        self.plain, self.broad = plain, broad
        self.plain_lines, self.broad_lines = plain_lines.clone(), broad_lines.clone()
        self._watched = (broad_lines, broad_lines._version)  # the model's own buffer: see check_lines

    def check_lines(self, broad_lines: Tensor) -> None:
        """Raise if the model's broad lines are no longer those of the plan (e.g. after a
        ``load_state_dict`` from another clone); a synchronisation only when the buffer was written."""
        buffer, version = self._watched
        if broad_lines is buffer and broad_lines._version == version:
            return
        if broad_lines.shape != self.broad_lines.shape or not torch.equal(broad_lines, self.broad_lines):
            raise ValueError("the model's wing-corrected (broad) lines changed since this plan was made; "
                             "make a new plan with make_plan")
        self._watched = (broad_lines, broad_lines._version)

    @property
    def parts(self) -> list:
        """The plans held: the plain lines' (if any) and the broad lines'."""
        return [p for p in (self.plain, self.broad) if p is not None]

    @property
    def frozen(self) -> bool:
        """Evaluate the windows of the last update as they are (set for both parts together)."""
        return self.broad.frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        for p in self.parts:
            p.frozen = bool(value)

    @property
    def rebuilds(self) -> int:
        """Rebuilds of either part since the plan was made."""
        return sum(p.rebuilds for p in self.parts)

    @property
    def stale(self) -> bool:
        """True when the lines outgrew either part (one synchronisation per part)."""
        return any(p.stale for p in self.parts)

    def update(self) -> None:
        """Update both parts from the model's current lines, without synchronising."""
        for p in self.parts:
            p.update()

    def rebuild(self) -> None:
        """Rebuild the parts that the lines outgrew (every part when none did)."""
        stale = [p for p in self.parts if p.stale]
        for p in stale or self.parts:
            p.rebuild()

    def log_flux(self, centers: Tensor, amplitude: Tensor, sigma: Tensor, gamma: Tensor, alpha: Tensor,
                 transition: Tensor, scale: Tensor) -> Tensor:
        r""":math:`\ln S_\mathrm{clone}` of all the lines: the plain ones' sums and the broad ones'
        (``alpha``, ``transition`` λ_t and ``scale`` b: the broad lines' wing parameters)."""
        lines = (centers, amplitude, sigma, gamma)
        out = self.broad.log_flux(*(t[self.broad_lines] for t in lines), alpha, transition, scale)
        if self.plain is not None:
            out = out + self.plain.log_flux(*(t[self.plain_lines] for t in lines))
        return out
