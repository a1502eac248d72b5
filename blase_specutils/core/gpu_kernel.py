r"""Triton kernel of the near-field line sum for GPUs, with its hand-written backward pass.

The same sum as :mod:`.cpu_kernel`: for every plain pseudo-Voigt line *j* and every pixel of its
own window,

.. math::
    t_j(\lambda_p) = \ln\big(1 - s\,a_j V(\lambda_p - \lambda_{c,j};\sigma_j,\gamma_j)\big)
    \quad\text{or}\quad -s\,a_j V, \qquad [+\,c_j h + e_j h^2],

with :math:`h = 1/(x^2 + b_j^2)` when the near-field residual is wanted (:mod:`.farfield`). Each
window is cut into chunks of :data:`CHUNK` pixels and every chunk is one Triton program: the forward
pass adds its terms to the output with atomic adds, the backward pass reduces
:math:`\partial t/\partial\theta_j` times the incoming gradient over the chunk into one row of a
(chunks × 6) array that is then summed per line. Nothing of size (lines × window) is stored.
Computations are in float64; results are returned in the working dtype.

Triton is optional (it comes with the CUDA builds of torch). The kernel is used where it is asked
for (``windowed_log_flux(kernel="triton")``, or :data:`.engine.KERNEL_ON_CUDA`); on a CPU it runs
only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks it
against the compiled CPU kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:  # optional: only GPU runs need it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = tl = None
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "CHUNK", "windowed_pseudo_voigt_sum_triton"]

#: Pixels per Triton program (a power of two).
CHUNK = 512



if HAVE_TRITON:

    @triton.jit
    def _log1p(t):
        # ln(1 + t): its series to t^10 where |t| < 0.02 (exact to rounding), the logarithm elsewhere
        s = t * (1.0 + t * (-0.5 + t * (1.0 / 3.0 + t * (-0.25 + t * (0.2 + t * (
            -1.0 / 6.0 + t * (1.0 / 7.0 + t * (-0.125 + t * (1.0 / 9.0 - 0.1 * t)))))))))
        return tl.where((t > -0.02) & (t < 0.02), s, tl.log(1.0 + t))

    @triton.jit
    def _forward_kernel(wl_ptr, line_ptr, p0_ptr, p1_ptr, c_ptr, a_ptr, s_ptr, g_ptr, eta_ptr, kc_ptr, ke_ptr,
                        b_ptr, out_ptr, sign, LINEAR: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        j = tl.load(line_ptr + pid)
        p0 = tl.load(p0_ptr + pid)
        p1 = tl.load(p1_ptr + pid)
        cj = tl.load(c_ptr + j)
        aj = -sign * tl.load(a_ptr + j)
        sj = tl.load(s_ptr + j)
        gj = tl.load(g_ptr + j)
        ej = tl.load(eta_ptr + j)
        kcj = tl.load(kc_ptr + j)
        kej = tl.load(ke_ptr + j)
        bj = tl.load(b_ptr + j)
        offs = p0 + tl.arange(0, BLOCK)
        mask = offs < p1
        x = tl.load(wl_ptr + offs, mask=mask, other=0.0) - cj
        x2 = x * x
        lor = ej * gj * 0.3183098861837907 / (x2 + gj * gj)
        gau = (1.0 - ej) * 0.3989422804014327 / sj * tl.exp(-0.5 * x2 / (sj * sj))
        t = aj * (lor + gau)
        if LINEAR:
            t = _log1p(tl.maximum(t, -1.0 + 1e-12))
        h = 1.0 / (x2 + bj * bj)
        t += h * (kcj + kej * h)
        tl.atomic_add(out_ptr + offs, t, mask=mask)

    @triton.jit
    def _backward_kernel(grad_ptr, wl_ptr, line_ptr, p0_ptr, p1_ptr, c_ptr, a_ptr, s_ptr, g_ptr, eta_ptr,
                         des_ptr, deg_ptr, kc_ptr, ke_ptr, b_ptr, part_ptr, sign, LINEAR: tl.constexpr,
                         BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        j = tl.load(line_ptr + pid)
        p0 = tl.load(p0_ptr + pid)
        p1 = tl.load(p1_ptr + pid)
        cj = tl.load(c_ptr + j)
        aj = -sign * tl.load(a_ptr + j)
        sj = tl.load(s_ptr + j)
        gj = tl.load(g_ptr + j)
        ej = tl.load(eta_ptr + j)
        des = tl.load(des_ptr + j)
        deg = tl.load(deg_ptr + j)
        kcj = tl.load(kc_ptr + j)
        kej = tl.load(ke_ptr + j)
        bj = tl.load(b_ptr + j)
        offs = p0 + tl.arange(0, BLOCK)
        mask = offs < p1
        gt = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        x = tl.load(wl_ptr + offs, mask=mask, other=0.0) - cj
        x2 = x * x
        inv = 1.0 / (x2 + gj * gj)
        lor = gj * 0.3183098861837907 * inv
        gau = 0.3989422804014327 / sj * tl.exp(-0.5 * x2 / (sj * sj))
        v = ej * lor + (1.0 - ej) * gau
        if LINEAR:
            arg = aj * v
            w = tl.where(arg < -1.0 + 1e-12, 0.0, gt / (1.0 + arg))
        else:
            w = gt
        wv = w * aj  # grad × dt/dV
        inv_s2 = 1.0 / (sj * sj)
        lmg = lor - gau
        # dV/dx = -x (2 η L/(x²+γ²) + (1-η) G/σ²); dx/dλc = -1
        d_c = wv * x * (2.0 * ej * lor * inv + (1.0 - ej) * gau * inv_s2)
        d_s = wv * (gau * (1.0 - ej) * (x2 * inv_s2 - 1.0) / sj + des * lmg)
        d_g = wv * (ej * lor * (1.0 / gj - 2.0 * gj * inv) + deg * lmg)
        h = 1.0 / (x2 + bj * bj)
        d_c += gt * 2.0 * x * h * h * (kcj + 2.0 * kej * h)
        row = part_ptr + pid * 6
        tl.store(row + 0, tl.sum(tl.where(mask, d_c, 0.0), axis=0))
        tl.store(row + 1, -sign * tl.sum(tl.where(mask, w * v, 0.0), axis=0))
        tl.store(row + 2, tl.sum(tl.where(mask, d_s, 0.0), axis=0))
        tl.store(row + 3, tl.sum(tl.where(mask, d_g, 0.0), axis=0))
        tl.store(row + 4, tl.sum(tl.where(mask, gt * h, 0.0), axis=0))
        tl.store(row + 5, tl.sum(tl.where(mask, gt * h * h, 0.0), axis=0))


def _chunk_table(start: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Line index, first and end pixel of every chunk of at most :data:`CHUNK` pixels."""
    n_chunks = (count.clamp(min=0) + CHUNK - 1) // CHUNK
    line = torch.repeat_interleave(torch.arange(start.numel(), device=start.device), n_chunks)
    first = torch.cumsum(n_chunks, 0) - n_chunks
    k = torch.arange(line.numel(), device=start.device) - first[line]
    p0 = start[line] + k * CHUNK
    return line, p0, start[line] + count[line]


class _WindowedSumTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wavelength, start, count, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b, linear: bool,
                sign: float):
        f64 = [x.detach().reshape(-1).to(torch.float64).contiguous() for x in (c, a, s, g, eta, deta_ds, deta_dg)]
        n = start.numel()
        zeros = torch.zeros(n, dtype=torch.float64, device=wavelength.device)
        if kc is None:
            kc_ = ke_ = zeros
            bb = torch.ones_like(zeros)  # any b > 0: h is then multiplied by c = e = 0
        else:
            kc_, ke_ = (x.detach().reshape(-1).to(torch.float64).contiguous() for x in (kc, ke))
            bb = (b.detach().reshape(-1).to(torch.float64) if isinstance(b, Tensor)
                  else torch.full((n,), float(b), dtype=torch.float64, device=wavelength.device)).contiguous()
        wl = wavelength.to(torch.float64).contiguous()
        line, p0, p1 = _chunk_table(start.long(), count.long())
        out = torch.zeros(wl.numel(), dtype=torch.float64, device=wl.device)
        if line.numel():
            _forward_kernel[(line.numel(),)](wl, line, p0, p1, *f64[:5], kc_, ke_, bb, out, float(sign),
                                             LINEAR=bool(linear), BLOCK=CHUNK)
        ctx.save_for_backward(wl, line, p0, p1, *f64, kc_, ke_, bb)
        ctx.linear, ctx.sign, ctx.n = bool(linear), float(sign), n
        ctx.dtypes = (c.dtype, a.dtype)
        return out.to(a.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        wl, line, p0, p1, c, a, s, g, eta, des, deg, kc_, ke_, bb = ctx.saved_tensors
        part = torch.zeros((line.numel(), 6), dtype=torch.float64, device=wl.device)
        if line.numel():
            _backward_kernel[(line.numel(),)](grad_out.to(torch.float64).contiguous(), wl, line, p0, p1, c, a, s,
                                              g, eta, des, deg, kc_, ke_, bb, part, ctx.sign, LINEAR=ctx.linear,
                                              BLOCK=CHUNK)
        sums = torch.zeros((ctx.n, 6), dtype=torch.float64, device=wl.device).index_add_(0, line, part)
        cdt, wdt = ctx.dtypes
        needs = ctx.needs_input_grad
        out = [None] * 15
        for pos, col, dt in ((3, 0, cdt), (4, 1, wdt), (5, 2, wdt), (6, 3, wdt), (10, 4, wdt), (11, 5, wdt)):
            if needs[pos]:
                out[pos] = sums[:, col].to(dt).reshape(-1, 1)
        return tuple(out)


def windowed_pseudo_voigt_sum_triton(
    wavelength: Tensor,
    start: Tensor,
    count: Tensor,
    c: Tensor,
    a: Tensor,
    s: Tensor,
    g: Tensor,
    *,
    mode: str,
    sign: float,
    kc: Tensor | None = None,
    ke: Tensor | None = None,
    b: float | Tensor = 0.0,
) -> Tensor:
    """Sum of the fused pseudo-Voigt line terms over per-line windows, with Triton.

    Arguments as :func:`.cpu_kernel.windowed_pseudo_voigt_sum_cpu` (pseudo-Voigt only); the tensors
    may live on any device Triton runs on (a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``).
    """
    if not HAVE_TRITON:
        raise ImportError("the GPU kernel needs triton (it ships with the CUDA builds of torch): pip install triton")
    from .fused import _eta_and_derivatives, check_term_arguments

    check_term_arguments(mode, kc, ke)
    eta, deta_ds, deta_dg = _eta_and_derivatives(s, g)
    b = b.detach() if isinstance(b, Tensor) else float(b)
    return _WindowedSumTriton.apply(wavelength, start, count, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b,
                                    mode == "linear", float(sign))
