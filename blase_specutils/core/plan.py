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

import math
import os
from typing import Callable

import torch
from torch import Tensor

from .cpu_kernel import HAVE_NUMBA, windowed_pseudo_voigt_sum_cpu
from .backends import auto_backend_name
from .backends.autograd import bucket_sizes as _bucket_sizes
from .backends.base import line_terms
from .engine import window_half_widths
from .farfield import FarFieldSettings, far_field, plan_far_field, residual_half_widths
from .profiles import PROFILES, wing_factor
from .fused import _eta_and_derivatives, eta_and_derivatives, stored_eta
from .gpu_kernel import (HAVE_TRITON, line_coefficients_triton, plan_lines_triton, plan_windows_triton,
                         windowed_pseudo_voigt_sum_triton)
from .options import EngineOptions

__all__ = ["WindowPlan", "BroadLinePlan", "ClonePlan"]

#: Source of the per-line parameters: () -> (λc, a, σ, γ), each shape (L,).
LineSource = Callable[[], "tuple[Tensor, Tensor, Tensor, Tensor]"]


def _check_plan_arguments(wavelength: Tensor, profile: str, mode: str, tolerance: float, headroom: float,
                          profiles) -> None:
    """Check the grid, profile, mode, tolerance and headroom a plan is made with."""
    if not torch.is_tensor(wavelength) or wavelength.ndim != 1 or wavelength.dtype != torch.float64:
        raise TypeError("wavelength must be a 1-D float64 tensor (Å)")
    if wavelength.numel() < 2:
        raise ValueError("a window plan needs at least two pixels")
    if profile not in profiles:
        raise ValueError(f"profile must be 'pseudo-voigt' or 'voigt', got {profile!r}")
    if mode not in ("linear", "log"):
        raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
    if not (tolerance > 0 and headroom >= 1.0):
        raise ValueError("tolerance must be > 0 and headroom >= 1")


def _plan_kernel(kernel: str, device: torch.device) -> str:
    """The compiled backend a plan runs on: ``kernel`` checked against ``device`` (``"auto"``: the
    rule of :func:`.backends.select_backend`). Plans need a compiled backend: they keep each line's own
    window, which the bucketed torch backends do not."""
    on_cpu = device.type == "cpu"
    if kernel == "auto":
        kernel = auto_backend_name(device)
        if kernel not in ("numba", "triton"):
            raise ValueError("window plans need a compiled backend: numba on CPUs, triton on CUDA devices")
    if kernel == "numba" and not (on_cpu and HAVE_NUMBA):
        raise ValueError("kernel='numba' needs numba and CPU tensors; use kernel='triton' on CUDA devices")
    if kernel == "triton":
        if not HAVE_TRITON:
            raise ImportError("window plans on GPUs need triton (it ships with the CUDA builds of torch)")
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernel='triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
    elif kernel != "numba":
        raise ValueError(f"kernel must be 'auto', 'numba' or 'triton', got {kernel!r}")
    return kernel


def _fill_chunk_table(chunks: tuple, start: Tensor, count: Tensor, chunk: int, capacity: int) -> Tensor:
    """Fill the chunk table ``chunks`` (line, first pixel, end pixel of every chunk of at most
    ``chunk`` pixels; unused slots are empty chunks); True if the lines need more than ``capacity``."""
    per_line = (count + chunk - 1) // chunk
    ends = torch.cumsum(per_line, 0)
    k = torch.arange(capacity, device=start.device)
    line = torch.searchsorted(ends, k, right=True).clamp(max=start.numel() - 1)
    p0 = start[line] + (k - (ends[line] - per_line[line])) * chunk
    p1 = torch.where(k < ends[-1], start[line] + count[line], p0)
    chunks[0].copy_(line)
    chunks[1].copy_(p0)
    chunks[2].copy_(p1)
    return ends[-1] > capacity


def _profile_eta(profile: str, s: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """η, ∂η/∂σ, ∂η/∂γ of the pseudo-Voigt (η = 1 and zeros for the exact Voigt)."""
    if profile == "voigt":
        zero = torch.zeros_like(g)
        return torch.ones_like(g), zero, zero
    return _eta_and_derivatives(s, g)


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
        Kernel settings (default ``EngineOptions()``): ``chunk``, ``num_warps``, ``triton_windows``,
        ``triton_coefficients`` and the far field's.
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
        _check_plan_arguments(wavelength, profile, mode, tolerance, headroom, ("pseudo-voigt", "voigt"))
        if far_field is not None and not isinstance(far_field, FarFieldSettings):
            raise TypeError("far_field must be a FarFieldSettings or None")
        engine = EngineOptions() if engine is None else engine
        kernel = _plan_kernel(engine.backend if kernel is None else kernel, wavelength.device)
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
        eta = _profile_eta(self.profile, s, g)
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
        if self.kernel != "triton":
            self._update_in_torch(c, a, s, g)
        elif self.engine.triton_windows:
            self._update_with_window_kernels(c, a, s, g)
        else:
            self._update_with_line_kernel(c, a, s, g)

    def _update_with_window_kernels(self, c: Tensor, a: Tensor, s: Tensor, g: Tensor) -> None:
        """Update everything in three Triton kernels, straight into the buffers."""
        ff = self.ff_plan if self.far_field is not None else None
        plan_windows_triton(
            c.contiguous(), a.contiguous(), s.contiguous(), g.contiguous(), self._params, self.eta, self.levels,
            self.b_line, wavelength=self._grid, start=self.start, count=self.count, per_line=self._per,
            ends=self._ends, chunks=self.chunks, flag=self._stale, chunk=self.chunk, profile=self.profile,
            far=ff is not None, linear=self.mode == "linear", cap=self.half_widths is not None,
            max_level=self._top, half_widths=self.half_widths, spreadable=None if ff is None else ff.spreadable,
            direct_level=None if ff is None else ff.direct_level, whole=self._whole)

    def _update_with_line_kernel(self, c: Tensor, a: Tensor, s: Tensor, g: Tensor) -> None:
        """Update η, levels, b_j and the window ends in one Triton kernel, the rest in torch operations."""
        lo, hi = plan_lines_triton(
            c.contiguous(), a.contiguous(), s.contiguous(), g.contiguous(), self._params, self.eta, self.levels,
            self.b_line, profile=self.profile, far=self.far_field is not None, linear=self.mode == "linear",
            cap=self.half_widths is not None, max_level=self._top, half_widths=self.half_widths)
        start, count = self._pixels(lo, hi)
        self._write(c, None, None if self.far_field is None else self.levels, None, start, count)

    def _update_in_torch(self, c: Tensor, a: Tensor, s: Tensor, g: Tensor) -> None:
        """Update every buffer with torch operations (the numba plans' way)."""
        levels = b_line = None
        eta = _profile_eta(self.profile, s, g)
        if self.far_field is not None:
            levels, b_line = self._levels(a, g)
        start, count = self._windows(c, a, s, g, eta[0], levels, b_line)
        self._write(c, eta, levels, b_line, start, count)

    @property
    def stale(self) -> bool:
        """True when the lines outgrew the plan at an update since it was (re)built (one
        synchronisation): evaluations since then may have missed pixels; rebuild it."""
        return bool(self._stale)

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
            stale = stale | _fill_chunk_table(self.chunks, start, count, self.chunk, self.capacity)
        self._stale.copy_(stale)

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
        start, count, chunks, b_line, levels = self._evaluation_buffers(lines)
        kc, ke, eta_parts = self._line_coefficients(amplitude, sigma, gamma, b_line, levels)
        b = 0.0 if kc is None else b_line[:, None]
        args = (self.wavelength, start, count, centers[:, None], amplitude[:, None], sigma[:, None], gamma[:, None])
        kw = dict(mode=self.mode, sign=self.sign, kc=None if kc is None else kc[:, None],
                  ke=None if ke is None else ke[:, None], b=b, profile=self.profile, eta=eta_parts)
        if self.kernel == "triton":
            out = windowed_pseudo_voigt_sum_triton(*args, chunks=(*chunks, self.chunk),
                                                   num_warps=self.engine.num_warps, **kw)
        else:
            out = windowed_pseudo_voigt_sum_cpu(*args, **kw)
        if self.far_field is None:
            return out
        far = far_field(self.wavelength, centers, kc, ke, self.far_field, levels, plan=self.ff_plan,
                        engine=self.engine)
        return out + far.to(out.dtype)

    def _evaluation_buffers(self, lines: tuple) -> tuple:
        """Update the plan for ``lines`` unless it is frozen, and return the windows, chunk table,
        kernel widths and levels this evaluation (and its backward pass) uses."""
        if self.frozen:
            return self.start, self.count, self.chunks, self.b_line, self.levels
        self.update(lines)
        if self.stale:
            self.rebuild(lines)
        # this evaluation's backward pass keeps its own windows and levels: the next update
        # overwrites the buffers, and a second evaluation before backward() would otherwise change them
        return (self.start.clone(), self.count.clone(), tuple(t.clone() for t in self.chunks),
                self.b_line.clone(), self.levels.clone())

    def _line_coefficients(self, amplitude: Tensor, sigma: Tensor, gamma: Tensor, b_line: Tensor,
                           levels: Tensor) -> tuple:
        """Compute the far-field coefficients c_j, e_j (None without a far field) and the
        pseudo-Voigt's η with its derivatives (None for the exact Voigt), each line's own."""
        voigt = self.profile == "voigt"
        # c_j and e_j in one Triton kernel each way (which also takes η's derivatives from the buffers)
        coefficients = (self.far_field is not None and self.engine.triton_coefficients and self.frozen
                        and self.kernel == "triton" and not self._whole)
        eta_parts = None
        eta = 1.0
        if not voigt:
            if self.frozen:
                # the plan was updated for exactly these lines (GraphedEpoch): η is in the buffers
                eta = self.eta[0] if coefficients else stored_eta(sigma, gamma, *self.eta)
                rest = self.eta[1:]
            else:
                eta, *rest = eta_and_derivatives(sigma, gamma)
            eta_parts = (eta.detach()[:, None], *(x[:, None] for x in rest))
        if coefficients:
            kc, ke = line_coefficients_triton(amplitude, sigma, gamma, self.eta, b_line, self._params, voigt=voigt)
            return kc, ke, eta_parts
        if self.far_field is None:
            return None, None, eta_parts
        kc = self.sign * amplitude * eta * gamma / math.pi
        ke = kc * (b_line * b_line - gamma * gamma + (3.0 * sigma * sigma if voigt else 0.0))
        if self._whole:
            whole = levels < 0
            kc = torch.where(whole, torch.zeros_like(kc), kc)
            ke = torch.where(whole, torch.zeros_like(ke), ke)
        return kc, ke, eta_parts


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
        _check_plan_arguments(wavelength, profile, mode, tolerance, headroom, PROFILES)
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
