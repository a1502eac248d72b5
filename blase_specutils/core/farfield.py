r"""Near-field / far-field split of the Lorentzian wings.

Far from its core, every line's log-flux term falls off like a Lorentzian,
:math:`t_j(d) \simeq -c_j/d^2 + c_j\gamma_j^2/d^4`, with :math:`c_j = s\,a_j\eta_j\gamma_j/\pi`
(pseudo-Voigt; :math:`\eta = 1` and an extra :math:`3\sigma^2/d^4` for the exact Voigt). With two
smooth kernels of a common width *b*,

.. math::
    h(d) = \frac{1}{d^2 + b^2}, \qquad h_2(d) = \frac{1}{(d^2 + b^2)^2},

the far field :math:`T(\lambda) = -\sum_j [c_j h(d_j) + e_j h_2(d_j)]`, with
:math:`e_j = c_j(b^2 - \gamma_j^2\,[+3\sigma_j^2])`, matches the sum of all wings to
:math:`O(d^{-6})`. It is a convolution of two spike trains with fixed kernels, computed for all
lines at once with FFTs on a uniform grid of spacing Δ < b (spikes spread with Lagrange
weights, the result interpolated with Lagrange polynomials of the same order: errors of
O((Δ/b)⁸) with the default 8-point stencils). Lines too far outside the pixels to be spread onto
that grid (beyond its margin) are summed directly, :math:`-\sum_j [c_j h + e_j h_2]` at every pixel.
Each line then only needs its *near-field residual*
:math:`t_j + c_j h + e_j h_2`, which decays like :math:`d^{-6}`, inside a short window. The
split is exact in the sense that nothing is neglected but that fast-decaying residual beyond
the window and the discretisation of the far field.

For a Lorentzian the residual is exactly :math:`-c_j(b^2-\gamma_j^2)^2/[(d^2+\gamma_j^2)(d^2+b^2)^2]`:
it is small only when γ is not much larger than *b*. Lines broader than the kernel therefore go
to coarser *levels*: level *l* has the kernel width :math:`b\,r^l` and the grid spacing
:math:`\Delta\,r^l` (ratio *r* = 8 by default) and takes the lines with
:math:`b\,r^{l-1} < \gamma \le b\,r^l`. Each level is its own (r^l times shorter) FFT; the coarse
levels are interpolated onto the finest grid before the one interpolation to the pixels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu_kernel import interpolate_cpu, spread_cpu
from .gpu_kernel import HAVE_TRITON, far_field_levels_triton, interpolate_triton, spread_triton
from .options import EngineOptions

__all__ = ["FarFieldSettings", "FarFieldPlan", "far_field", "plan_far_field", "residual_half_widths"]


@dataclass(frozen=True)
class FarFieldSettings:
    """Kernel width *b*, grid spacing Δ and grid margin (Å) of the far field, and the number of
    points of the Lagrange stencils used to spread the lines onto the grid and to interpolate the
    result back to the pixels (errors of O((Δ/b)^order))."""

    b: float
    spacing: float
    margin: float = 50.0
    order: int = 8
    level_ratio: int = 8

    def __post_init__(self):
        if not (self.b > 0 and self.spacing > 0 and self.margin >= 0):
            raise ValueError("far-field b and spacing must be > 0 and margin >= 0")
        if self.order not in (2, 4, 6, 8):
            raise ValueError("far-field order must be 2, 4, 6 or 8 (points of the Lagrange stencil)")
        if not (isinstance(self.level_ratio, int) and self.level_ratio >= 2):
            raise ValueError("far-field level_ratio must be an integer >= 2")

    def at_level(self, level: int) -> "FarFieldSettings":
        """The settings of level ``level``: b, Δ scaled by r^level, the margin at least 10 b."""
        f = self.level_ratio**level
        return FarFieldSettings(b=self.b * f, spacing=self.spacing * f, margin=max(self.margin, 10.0 * self.b * f),
                                order=self.order, level_ratio=self.level_ratio)

    @torch.no_grad()
    def line_levels(self, gamma: Tensor, span: float, cap: bool = False) -> Tensor:
        r"""Level of each line: the smallest *l* with :math:`\gamma \le b\,r^l`, as an int64 tensor.

        Lines that would need a kernel wider than ``span`` (Å, the extent of the pixels) get -1
        (no level is useful for them: they are evaluated whole), or with ``cap`` the top level.
        """
        ratio = gamma.to(torch.float64) / self.b
        level = torch.ceil(torch.log(torch.clamp(ratio, min=1.0)) / math.log(self.level_ratio) - 1e-12)
        level = torch.clamp(level, min=0).long()
        top = self.top_level(span)
        return torch.where(level > top, torch.full_like(level, top if cap else -1), level)

    def top_level(self, span: float) -> int:
        """The coarsest level whose kernel is not wider than ``span`` (Å)."""
        return max(0, int(math.floor(math.log(max(span, self.b) / self.b) / math.log(self.level_ratio))))

    @classmethod
    def for_grid(
        cls, wavelength: Tensor, b_pixels: float = 50.0, spacing_pixels: float = 4.0, order: int = 8
    ) -> "FarFieldSettings":
        """Settings scaled to the median pixel size of ``wavelength``: b = 50 px, Δ = 4 px, 8-point
        stencils (on the paper's HPF problem the far field is then within 2e-8 of the direct sum of
        its kernels, and its FFTs are short enough to stay in cache)."""
        d = float(torch.median(torch.diff(wavelength)).item()) if wavelength.numel() > 1 else 0.01
        return cls(b=b_pixels * d, spacing=spacing_pixels * d, margin=max(50.0, 10 * b_pixels * d), order=order)


_KERNEL_CACHE: dict = {}


def _kernel_ffts(n: int, nfft: int, spacing: float, b: float, dtype, device):
    key = (n, nfft, spacing, b, dtype, str(device))
    hit = _KERNEL_CACHE.get(key)
    if hit is not None:
        return hit
    k = torch.arange(-(n - 1), n, dtype=dtype, device=device) * spacing
    q = 1.0 / (k * k + b * b)
    out = (torch.fft.rfft(q, nfft), torch.fft.rfft(q * q, nfft))
    if len(_KERNEL_CACHE) > 16:
        _KERNEL_CACHE.clear()
    _KERNEL_CACHE[key] = out
    return out


def _next_fast_len(n: int) -> int:
    """The smallest even 5-smooth number (2^a 3^b 5^c, a >= 1) that is >= n: the FFT sizes that
    torch's CPU and GPU FFTs handle fastest (3·2^k alone can be 2.5× slower on CPUs)."""
    best = None
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            m = 2 * p35
            while m < n:
                m *= 2
            if best is None or m < best:
                best = m
            p35 *= 3
        p5 *= 5
    return best


def far_field(wavelength: Tensor, centers: Tensor, c: Tensor, e: Tensor, settings: FarFieldSettings,
              levels: Tensor | None = None, plan: "FarFieldPlan | None" = None, *,
              engine: EngineOptions | None = None) -> Tensor:
    r"""The far field :math:`T(\lambda) = -\sum_j [c_j h_{l_j}(\lambda-\lambda_{c,j}) + e_j h_{2,l_j}(\lambda-\lambda_{c,j})]`.

    Parameters
    ----------
    wavelength : Tensor
        Increasing pixel wavelengths (Å), shape (N,).
    centers, c, e : Tensor
        Line centres (Å) and the coefficients :math:`c_j`, :math:`e_j`, shape (L,). Autograd flows
        to all three (to the centres through the spreading weights).
    settings : FarFieldSettings
    levels : Tensor of int, optional
        Far-field level :math:`l_j` of each line (kernel width :math:`b\,r^{l_j}`), shape (L,);
        default all 0. Lines with a negative level are left out.
    plan : FarFieldPlan, optional
        The levels, grids and interpolation weights fixed in advance (:func:`plan_far_field`): the
        evaluation then needs no synchronisation with the host (it can be captured in a CUDA
        graph). Lines must be where the plan expects them (:meth:`FarFieldPlan.violations`).
    engine : EngineOptions, optional
        Which operations run (default ``EngineOptions()``): ``compiled_cpu`` (numba's spreading and
        interpolation on CPUs), ``mask_levels``, ``triton_spread`` and, with a plan, ``triton_far``
        (the whole far field in a few Triton kernels and batched FFTs: every level's spreading in
        one kernel each way, both of a level's grids in one real FFT, each interpolation in one
        kernel each way).

    Returns
    -------
    Tensor
        T on ``wavelength``, shape (N,).
    """
    if centers.numel() == 0:
        return torch.zeros_like(wavelength)
    if plan is not None:
        present, ends = plan.present, plan.ends
    elif levels is None:
        present = [0]
    else:
        present = sorted(int(v) for v in torch.unique(levels[levels >= 0]).tolist())
    if not present:
        return torch.zeros_like(wavelength)
    engine = EngineOptions() if engine is None else engine
    if (plan is not None and plan.triton is not None and levels is not None and engine.triton_far and HAVE_TRITON
            and (wavelength.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")):
        return _planned_far_field_triton(centers, c, e, levels, plan)
    m = settings.order // 2
    if plan is None:
        ends = wavelength[[0, -1]].tolist()  # one device-to-host copy for all levels
    base = None  # (conv, lo, dx, n) of the finest level present
    val = None  # direct sums of lines beyond a level's margin, at the pixels
    for level in present:
        st = settings.at_level(level)
        on = None
        if levels is None:
            cl, el, xl = c, e, centers
        elif plan is None and not engine.masks_levels(wavelength.device):
            sel = torch.nonzero(levels == level).flatten()
            cl, el, xl = c[sel], e[sel], centers[sel]
        else:
            # on GPUs the other levels' lines spread zeros: masks, not gathers, whose backward sorts
            on = levels == level
            cl, el, xl = torch.where(on, c, 0.0), torch.where(on, e, 0.0), centers
        conv, lo, dx, n, direct = _level_conv(wavelength, xl, cl, el, st, ends, on,
                                              None if plan is None else plan.outside[level],
                                              None if plan is None else plan.kernels[level], engine=engine)
        if direct is not None:
            val = direct if val is None else val + direct
        if base is None:
            base = (conv, lo, dx, n)
        else:
            # a coarse level, smooth on its own (r^l times wider) scale: onto the finest grid
            b_conv, b_lo, b_dx, b_n = base
            if plan is not None and plan.grids[level][1].dtype == conv.dtype:
                i0, iw = plan.grids[level]
            else:
                i0, iw = _grid_plan(b_lo, b_dx, b_n, lo, dx, n, m, conv.dtype, conv.device)
            base = (b_conv + _interpolate(conv, i0, iw, engine), b_lo, b_dx, b_n)
    conv, lo, dx, n = base
    if plan is not None and plan.pixels[1].dtype == conv.dtype:
        i0, iw = plan.pixels
    else:
        i0, iw = _interpolation_plan(wavelength, lo, dx, n, m, conv.dtype)
    out = _interpolate(conv, i0, iw, engine)
    if val is not None:
        out = out + val.to(out.dtype)
    return -out


def _planned_far_field_triton(centers: Tensor, c: Tensor, e: Tensor, levels: Tensor, plan: "FarFieldPlan") -> Tensor:
    """:func:`far_field` with a plan, in Triton kernels: the levels' convolutions, each coarse one
    interpolated onto the finest grid, the sum interpolated to the pixels (float64)."""
    convs = far_field_levels_triton(centers, c, e, levels, plan.triton)
    base = convs[0]
    for level, conv in zip(plan.present[1:], convs[1:]):
        base = interpolate_triton(base, conv, *plan.grids[level])
    return interpolate_triton(None, base, *plan.pixels, neg=True)


def _level_geometry(ends, st: FarFieldSettings) -> tuple[float, float, int]:
    """Start, spacing and length of a level's uniform grid: the pixels plus the margin."""
    lo = ends[0] - st.margin
    return lo, st.spacing, int(math.ceil((ends[1] + st.margin - lo) / st.spacing)) + 2


def _spreadable(centers: Tensor, lo: float, dx: float, n: int, m: int) -> Tensor:
    """Which centres lie far enough inside a grid for their whole Lagrange stencil."""
    p = (centers.detach() - lo) / dx
    return (p >= m - 1) & (p <= n - m)


def _level_conv(wavelength: Tensor, centers: Tensor, c: Tensor, e: Tensor, st: FarFieldSettings,
                ends: list[float], on: Tensor | None = None, outside: Tensor | None = None,
                kernels: tuple | None = None, *, engine: EngineOptions):
    """One level: the lines spread onto its uniform grid and convolved with its kernels (``ends``:
    the first and last pixel wavelengths; ``on``: which lines belong to the level, the others
    having c = e = 0; ``outside``: indices of the lines to sum directly, and ``kernels``: the
    kernels' FFTs, both kept by a plan; ``engine``: which spreading runs).

    Returns the convolution on the grid, the grid's start, spacing and length, and the direct sum
    (at the pixels) of the lines beyond the grid's margin, or None.
    """
    c_all, e_all = c, e
    b = st.b
    lo, dx, n = _level_geometry(ends, st)
    nfft = _next_fast_len(2 * n - 1)
    # spread the coefficients onto the grid with Lagrange weights (moments exact to order 2m-1)
    m = st.order // 2
    p = (centers - lo) / dx
    direct = None
    if outside is not None:
        # a plan: these lines are summed directly; the others are on the grid (FarFieldPlan.violations)
        inside = None
        if outside.numel():
            inside = torch.ones_like(c, dtype=torch.bool).index_fill_(0, outside, False)
    else:
        # lines beyond the grid's margin cannot be spread onto it (clamping would move them to its edge)
        inside = _spreadable(centers, lo, dx, n, m)
        if on is not None:
            inside |= ~on
        outside = None if bool(inside.all()) else torch.nonzero(~inside).flatten()
    if outside is not None and outside.numel():
        c = torch.where(inside, c, torch.zeros_like(c))
        e = torch.where(inside, e, torch.zeros_like(e))
        direct = _direct_sum(wavelength, centers[outside], c_all[outside], e_all[outside], b)
    if engine.numba_on(wavelength.device):
        grid_c, grid_e = spread_cpu(p, c, e, n, m)
    elif engine.triton_spread and HAVE_TRITON and (wavelength.device.type == "cuda"
                                            or os.environ.get("TRITON_INTERPRET") == "1"):
        grid_c, grid_e = spread_triton(p, c, e, n, m)
    else:
        k0 = torch.clamp(torch.floor(p.detach()), m - 1, n - m - 1)
        f = torch.clamp(p - k0, -float(m - 1), float(m))
        k0 = k0.long()
        # one scatter per grid for all stencil points (few operations: this is the GPU path)
        idx = (k0[:, None] + torch.arange(-(m - 1), m + 1, device=k0.device)).reshape(-1)
        w = _lagrange_weights(f, m)
        grid_c = torch.zeros(n, dtype=torch.promote_types(c.dtype, f.dtype), device=wavelength.device)
        grid_e = torch.zeros_like(grid_c)
        grid_c = grid_c.index_add(0, idx, (c[:, None] * w).reshape(-1))
        grid_e = grid_e.index_add(0, idx, (e[:, None] * w).reshape(-1))
    if kernels is not None and kernels[0].dtype == torch.promote_types(grid_c.dtype, torch.complex64):
        hk, h2k = kernels
    else:
        hk, h2k = _kernel_ffts(n, nfft, dx, b, grid_c.dtype, wavelength.device)
    conv = _KernelConvolution.apply(grid_c, grid_e, hk, h2k, nfft)
    return conv, lo, dx, n, direct


class _KernelConvolution(torch.autograd.Function):
    r"""Linear convolution of two grids of length *n* with the even kernels *h*, *h²*:
    :math:`y_p = \sum_k [g_{c,k}\,h(p-k) + g_{e,k}\,h_2(p-k)]`, by real FFTs of length ``nfft``.

    The kernels are even, so the adjoint is the same convolution: the backward pass is one real
    FFT and two inverse real FFTs (autograd of ``rfft`` would need full complex transforms).
    """

    @staticmethod
    def forward(ctx, grid_c: Tensor, grid_e: Tensor, hk: Tensor, h2k: Tensor, nfft: int):
        n = grid_c.shape[0]
        spec = torch.fft.rfft(grid_c, nfft) * hk + torch.fft.rfft(grid_e, nfft) * h2k
        ctx.save_for_backward(hk, h2k)
        ctx.nfft = nfft
        return torch.fft.irfft(spec, nfft)[n - 1 : 2 * n - 1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        hk, h2k = ctx.saved_tensors
        n, nfft = grad.shape[0], ctx.nfft
        g = torch.fft.rfft(grad, nfft)
        gc = ge = None
        if ctx.needs_input_grad[0]:
            gc = torch.fft.irfft(g * hk, nfft)[n - 1 : 2 * n - 1]
        if ctx.needs_input_grad[1]:
            ge = torch.fft.irfft(g * h2k, nfft)[n - 1 : 2 * n - 1]
        return gc, ge, None, None, None


def _interpolate(conv: Tensor, i0: Tensor, iw: Tensor, engine: EngineOptions) -> Tensor:
    """Σ_q iw[p, q] conv[i0[p] + q]: compiled loops on CPUs (``engine.compiled_cpu``), a gather elsewhere."""
    if engine.numba_on(conv.device):
        return interpolate_cpu(conv, i0, iw)
    return _GatherInterpolation.apply(conv, i0[:, None] + torch.arange(iw.shape[1], device=i0.device), iw)


class _GatherInterpolation(torch.autograd.Function):
    """Σ_q w[p, q] conv[idx[p, q]] by a gather; the backward pass adds into the grid with one
    ``index_add`` (atomic adds on a GPU) where autograd's gather backward would sort the indices."""

    @staticmethod
    def forward(ctx, conv: Tensor, idx: Tensor, w: Tensor):
        ctx.save_for_backward(idx, w)
        ctx.n = conv.shape[0]
        return (conv[idx] * w).sum(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        idx, w = ctx.saved_tensors
        g = torch.zeros(ctx.n, dtype=grad.dtype, device=grad.device)
        return g.index_add_(0, idx.reshape(-1), (grad[:, None] * w).reshape(-1)), None, None


def _direct_sum(wavelength: Tensor, centers: Tensor, c: Tensor, e: Tensor, b: float,
                chunk_elements: int = 2**22) -> Tensor:
    """Σ_j [c_j h(λ − λ_c,j) + e_j h_2(λ − λ_c,j)] at every pixel, in chunks of lines."""
    out = torch.zeros(wavelength.shape, dtype=c.dtype, device=wavelength.device)
    step = max(1, chunk_elements // max(int(wavelength.numel()), 1))
    for i in range(0, centers.numel(), step):
        x = (wavelength[None, :] - centers[i : i + step, None]).to(c.dtype)
        h = 1.0 / (x * x + b * b)
        out = out + (h * (c[i : i + step, None] + e[i : i + step, None] * h)).sum(0)
    return out


_PLAN_CACHE: dict = {}


def _cached(key, build):
    hit = _PLAN_CACHE.get(key)
    if hit is None:
        if len(_PLAN_CACHE) > 16:
            _PLAN_CACHE.clear()
        hit = _PLAN_CACHE[key] = build()
    return hit


@torch.no_grad()
def _interpolation_plan(wavelength: Tensor, lo: float, dx: float, n: int, m: int, dtype):
    """First grid index (N,) and Lagrange weights (N, 2m) that interpolate the far-field grid to the
    pixels; they depend on the pixels and the grid only, so they are kept for the next call."""
    key = (wavelength.data_ptr(), wavelength.numel(), wavelength._version, float(wavelength.sum()), lo, dx, n, m, dtype,
           str(wavelength.device))
    return _cached(key, lambda: _build_plan((wavelength - lo) / dx, n, m, dtype))


@torch.no_grad()
def _grid_plan(lo_f: float, dx_f: float, n_f: int, lo: float, dx: float, n: int, m: int, dtype, device):
    """The plan that interpolates a coarse level's grid (lo, dx, n) onto the points of a finer one."""
    key = ("grid", lo_f, dx_f, n_f, lo, dx, n, m, dtype, str(device))
    points = lambda: (lo_f - lo + dx_f * torch.arange(n_f, dtype=torch.float64, device=device)) / dx  # noqa: E731
    return _cached(key, lambda: _build_plan(points(), n, m, dtype))


def _build_plan(q: Tensor, n: int, m: int, dtype):
    """First stencil index (contiguous) and the 2m Lagrange weights at positions ``q`` (in grid
    units) of a grid of ``n`` points."""
    i0 = torch.clamp(torch.floor(q), m - 1, n - m - 1)
    iw = _lagrange_weights_scan((q - i0).to(dtype), m).contiguous()
    return (i0.long() - (m - 1)).contiguous(), iw


def _lagrange_weights(f: Tensor, m: int) -> Tensor:
    """Lagrange basis weights of the 2m stencil points at offsets -(m-1) ... m for positions ``f``
    (in grid units), shape (len(f), 2m), in a few whole-array operations (differentiable in f).

    The product over the other points, Π_{k≠j}(f − k), is formed without dividing by f − j, so it
    stays exact when f sits on a grid point: one product over a (len(f), 2m, 2m) array, with an
    analytic backward pass (:class:`_LagrangeWeights`: on a GPU two kernels each way, where the
    prefix products of :func:`_lagrange_weights_scan` are slow scans)."""
    return _LagrangeWeights.apply(f, m)


def _lagrange_weights_scan(f: Tensor, m: int) -> Tensor:
    """The weights of :func:`_lagrange_weights` as a prefix product times a suffix product: less
    memory for long arrays (the cached interpolation plans), differentiable by autograd."""
    offsets, inv_denom, _, _ = _lagrange_constants(m, f.dtype, f.device)
    d = f[:, None] - offsets[None, :]
    ones = torch.ones_like(d[:, :1])
    before = torch.cumprod(torch.cat([ones, d[:, :-1]], dim=1), dim=1)
    after = torch.cumprod(torch.cat([ones, d[:, 1:].flip(1)], dim=1), dim=1).flip(1)
    return before * after * inv_denom


class _LagrangeWeights(torch.autograd.Function):
    r"""Lagrange weights :math:`w_j(f) = \prod_{k\ne j}(f - o_k) / \prod_{k\ne j}(o_j - o_k)` and
    their derivative :math:`w_j'(f) = \sum_{i\ne j}\prod_{k\notin\{i,j\}}(f - o_k) /
    \prod_{k\ne j}(o_j - o_k)`, each as one product over the stencil with the excluded factors set
    to 1."""

    @staticmethod
    def forward(ctx, f: Tensor, m: int):
        offsets, inv_denom, diag, _ = _lagrange_constants(m, f.dtype, f.device)
        d = f[:, None] - offsets
        ctx.save_for_backward(d)
        ctx.m = m
        return torch.where(diag, 1.0, d[:, None, :]).prod(-1) * inv_denom

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (d,) = ctx.saved_tensors
        _, inv_denom, diag, pair = _lagrange_constants(ctx.m, d.dtype, d.device)
        # p[:, j, i] = Π over k ∉ {i, j}; the terms i = j are dropped
        p = torch.where(pair, 1.0, d[:, None, None, :]).prod(-1)
        dw = torch.where(diag, 0.0, p).sum(-1) * inv_denom
        return (grad * dw).sum(-1), None


_LAGRANGE: dict = {}


def _lagrange_constants(m: int, dtype, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The stencil offsets -(m-1) ... m, the reciprocals of the Lagrange denominators
    Π_{k≠j}(o_j − o_k), and the masks k = j (2m, 2m) and k ∈ {i, j} (2m, 2m, 2m), made once per
    device (a copy to the device during a CUDA graph's recording is not allowed)."""
    key = (m, dtype, str(device))
    if key not in _LAGRANGE:
        o = list(range(-(m - 1), m + 1))
        denom = [math.prod(oj - ok for ok in o if ok != oj) for oj in o]
        k = torch.arange(2 * m, device=device)
        diag = k[:, None] == k[None, :]
        pair = diag[:, None, :] | diag[None, :, :]  # [j, i, k]: k == j or k == i
        _LAGRANGE[key] = (torch.tensor(o, dtype=dtype, device=device),
                          torch.tensor([1.0 / x for x in denom], dtype=dtype, device=device), diag, pair)
    return _LAGRANGE[key]


@torch.no_grad()
def residual_half_widths(
    amplitude: Tensor,
    sigma: Tensor,
    gamma: Tensor,
    eta: Tensor,
    c: Tensor,
    b: float | Tensor,
    tolerance: float,
    mode: str,
    voigt: bool = False,
) -> Tensor:
    r"""Half widths (Å) beyond which a line's near-field residual is below ``tolerance``.

    The larger of the distances where each part of the residual falls to ε:

    - the Lorentzian part. For the pseudo-Voigt it is exactly
      :math:`-c(b^2-\gamma^2)^2/[(d^2+\gamma^2)(d^2+b^2)^2]`, bounded at every *d* by
      :math:`|c|(b^2-\gamma^2)^2/d^6`; for the exact Voigt :math:`|c|(b^2+\gamma^2+3\sigma^2)^2/d^6`
      holds only asymptotically, so its window is also at least 3b + 6σ + 6γ;
    - the Gaussian core :math:`a(1-\eta)G(d)`;
    - in linear mode, the second-order term of :math:`\ln(1-aV)`, :math:`c^2/2d^4`.

    ``b`` is the kernel width of each line's far-field level (a float or a tensor like ``c``).
    """
    ca = c.abs()
    if voigt:
        k = (b * b + gamma * gamma + 3.0 * sigma * sigma) ** 2
    else:
        k = (b * b - gamma * gamma) ** 2
    d6 = (ca * k / tolerance) ** (1.0 / 6.0)
    peak_g = amplitude * (1.0 - eta) / (sigma * math.sqrt(2.0 * math.pi))
    d_g = sigma * torch.sqrt(2.0 * torch.log(torch.clamp(peak_g / tolerance, min=1.0)))
    w = torch.maximum(d6, d_g)
    if mode == "linear":
        w = torch.maximum(w, (ca * ca / (2.0 * tolerance)) ** 0.25)
    if voigt:
        w = torch.maximum(w, 3.0 * b + 6.0 * sigma + 6.0 * gamma)
    return w


@dataclass
class FarFieldPlan:
    """What :func:`far_field` otherwise decides from the data at every call, fixed in advance.

    Attributes
    ----------
    present : tuple of int
        The levels evaluated (each an FFT of its own).
    ends : tuple of float
        First and last pixel wavelength (Å).
    outside : dict
        For each level, the indices of the lines summed directly at the pixels (beyond the level
        grid's margin when the plan was made).
    pixels : tuple of Tensor
        First stencil index and Lagrange weights from the finest grid to the pixels.
    """

    present: tuple
    ends: tuple
    outside: dict
    pixels: tuple
    #: (top level + 1, 2): the centres (Å) each level's grid can spread; an empty range for the
    #: levels not evaluated
    spreadable: Tensor
    #: (L,): the level whose direct sum takes each line (-2 for the lines spread onto a grid)
    direct_level: Tensor
    #: For each level, the FFTs of its two kernels, and for each coarse level the weights that
    #: interpolate its grid onto the finest: held here, since a CUDA graph that was recorded
    #: reading them must keep reading the same memory (the caches they come from are emptied
    #: when they grow)
    kernels: dict
    grids: dict
    #: What the Triton far field needs (:class:`TritonLayout`); None where lines are summed
    #: directly
    triton: "TritonLayout | None" = None

    @torch.no_grad()
    def violations(self, centers: Tensor, levels: Tensor) -> Tensor:
        """A 0-d bool tensor, True where a line is not where the plan expects it: on a level that
        is not evaluated, or too close to a level grid's edge to be spread onto it while the plan
        spreads it. Computed on the device in a few operations, without synchronising."""
        off = _off_grid(self.spreadable, centers, levels)
        direct = self.direct_level == levels
        # a line the plan sums directly that is now on its grid would be spread by the engine
        return ((levels >= 0) & (off != direct)).any()


@dataclass
class TritonLayout:
    """The far-field grids of a plan as the Triton kernels take them: all levels' grids in one
    buffer of ``total`` float64 values, each level two rows (c and e) of its FFT length.

    Attributes
    ----------
    m : int
        Half the Lagrange stencil (the settings' order / 2).
    total : int
        Length of the buffer.
    geo : Tensor
        (levels, 2) float64: each level's grid start and spacing (Å); the rows of the levels not
        evaluated are unused.
    table : Tensor
        (levels, 4) int64: grid length n (0 for a level not evaluated), offset in the buffer, row
        length (the FFT length) and n - 1, where the convolution's output starts in its rows.
    levels : list
        For each evaluated level, from the finest: offset, n, FFT length and the (2, n_fft // 2 + 1)
        spectra of its two kernels.
    """

    m: int
    total: int
    geo: Tensor
    table: Tensor
    levels: list


@torch.no_grad()
def plan_far_field(wavelength: Tensor, centers: Tensor, levels: Tensor, settings: FarFieldSettings,
                   dtype: torch.dtype) -> FarFieldPlan:
    """The plan of :func:`far_field` for lines at ``centers`` on ``levels`` (this synchronises
    with the device a few times; evaluations with the plan do not)."""
    present = tuple(sorted(int(v) for v in torch.unique(levels[levels >= 0]).tolist()))
    ends = tuple(wavelength[[0, -1]].tolist())
    m = settings.order // 2
    outside = {}
    top = settings.top_level(ends[1] - ends[0])
    spreadable = torch.tensor([[math.inf, -math.inf]] * (max(top, *present, 0) + 1), dtype=torch.float64)
    kernels, grids = {}, {}
    for level in present:
        st = settings.at_level(level)
        lo, dx, n = _level_geometry(ends, st)
        spreadable[level] = torch.tensor([lo + (m - 1) * dx, lo + (n - m) * dx], dtype=torch.float64)
        kernels[level] = _kernel_ffts(n, _next_fast_len(2 * n - 1), dx, st.b, torch.float64, wavelength.device)
        if level != present[0]:
            f_lo, f_dx, f_n = _level_geometry(ends, settings.at_level(present[0]))
            grids[level] = _grid_plan(f_lo, f_dx, f_n, lo, dx, n, m, torch.float64, wavelength.device)
    spreadable = spreadable.to(centers.device)
    # the lines summed directly: the same test as the plan's checks (FarFieldPlan.violations)
    off = _off_grid(spreadable, centers, levels)
    direct_level = torch.where((levels >= 0) & off, levels, torch.full_like(levels, -2))
    for level in present:
        outside[level] = torch.nonzero(direct_level == level).flatten()
    # the grids hold float64 sums whatever the working dtype (the centres are float64)
    dtype = torch.promote_types(dtype, centers.dtype)
    if present:
        lo, dx, n = _level_geometry(ends, settings.at_level(present[0]))
        pixels = _build_plan((wavelength - lo) / dx, n, m, dtype)
    else:
        pixels = (torch.zeros(0, dtype=torch.long, device=wavelength.device),
                  torch.zeros((0, 2 * m), dtype=dtype, device=wavelength.device))
    layout = None
    if present and not any(v.numel() for v in outside.values()):
        rows = spreadable.shape[0]
        geo = torch.zeros((rows, 2), dtype=torch.float64)
        geo[:, 1] = 1.0
        table = torch.zeros((rows, 4), dtype=torch.long)
        entries, total = [], 0
        for level in present:
            lo, dx, n = _level_geometry(ends, settings.at_level(level))
            nfft = _next_fast_len(2 * n - 1)
            geo[level] = torch.tensor([lo, dx], dtype=torch.float64)
            table[level] = torch.tensor([n, total, nfft, n - 1])
            entries.append((total, n, nfft, torch.stack(kernels[level])))
            total += 2 * nfft
        layout = TritonLayout(m=m, total=total, geo=geo.to(wavelength.device), table=table.to(wavelength.device),
                              levels=entries)
    return FarFieldPlan(present=present, ends=ends, outside=outside, pixels=pixels, spreadable=spreadable,
                        direct_level=direct_level, kernels=kernels, grids=grids, triton=layout)


def _off_grid(spreadable: Tensor, centers: Tensor, levels: Tensor) -> Tensor:
    """Which centres lie outside the range their level's grid can spread (levels beyond the
    table: outside)."""
    top = spreadable.shape[0] - 1
    rng = spreadable[levels.clamp(min=0, max=top)]
    return (centers < rng[:, 0]) | (centers > rng[:, 1]) | (levels > top)
