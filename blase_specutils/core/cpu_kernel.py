r"""Compiled CPU kernel of the near-field line sum (numba), with its hand-written backward pass.

For every line *j* and every grid pixel *p* of its own window, this adds

.. math::
    t_j(\lambda_p) = \ln\big(1 - s\,a_j V(\lambda_p - \lambda_{c,j};\sigma_j,\gamma_j)\big)
    \quad\text{or}\quad -s\,a_j V, \qquad [+\,c_j h + e_j h^2]

(the second form in log mode; the bracket is the far-field kernel added back when the near-field
residual is wanted, see :mod:`.farfield`) to the output, and its backward pass sums
:math:`\partial t_j/\partial\theta_j` times the incoming gradient over the same window for
λc, a, σ, γ, c_j and e_j. It evaluates the same pseudo-Voigt and the same derivatives as
:mod:`.fused` in scalar loops, so nothing of size (lines × window) is ever stored. The Gaussian
component is evaluated within 9σ of the centre only: beyond, exp(−x²/2σ²) < 1e-17.

The loops are compiled by numba (a pip-installable LLVM JIT, no system compiler needed) on first
use and cached on disk. They release the GIL: the lines are split into as many contiguous chunks
as torch has intra-op threads and run on a small thread pool, each chunk summing into its own
output row. Computations are in float64 whatever the working dtype; results are returned in it.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:  # numba is a dependency, but the torch path stays usable without it
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    HAVE_NUMBA = False

__all__ = ["HAVE_NUMBA", "windowed_pseudo_voigt_sum_cpu", "interpolate_cpu"]

_MIN_ARG = -1.0 + 1e-12
_INV_PI = 1.0 / math.pi
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_CORE = 9.0


def _forward_py(wl, start, npix, c, a, s, g, eta, kc, ke, b, linear, sign, use_ff, j0, j1, out):
    b2 = b * b
    for j in range(j0, j1):
        cj = c[j]
        aj = -sign * a[j]
        sj = s[j]
        gj = g[j]
        ej = eta[j]
        g2 = gj * gj
        inv2s2 = 0.5 / (sj * sj)
        lnorm = ej * gj * _INV_PI
        gnorm = (1.0 - ej) * _INV_SQRT_2PI / sj
        reach = _CORE * sj
        kcj = kc[j]
        kej = ke[j]
        p0 = start[j]
        for p in range(p0, p0 + npix[j]):
            x = wl[p] - cj
            x2 = x * x
            if use_ff:
                # one division for both 1/(x²+γ²) and h = 1/(x²+b²)
                q1 = x2 + g2
                q2 = x2 + b2
                r = 1.0 / (q1 * q2)
                v = lnorm * q2 * r
                hb = q1 * r
            else:
                v = lnorm / (x2 + g2)
                hb = 0.0
            if -reach < x < reach:
                v += gnorm * math.exp(-x2 * inv2s2)
            t = aj * v
            if linear:
                if t < _MIN_ARG:
                    t = _MIN_ARG
                if -1e-4 < t < 1e-4:
                    # log1p by its series: the error t⁵/5 is below 2e-21
                    t = t * (1.0 + t * (-0.5 + t * (1.0 / 3.0 - 0.25 * t)))
                else:
                    t = math.log1p(t)
            if use_ff:
                t += hb * (kcj + kej * hb)
            out[p] += t


def _backward_py(grad, wl, start, npix, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b, linear, sign, use_ff,
                 j0, j1, gc, ga, gs, gg, gkc, gke):
    b2 = b * b
    for j in range(j0, j1):
        cj = c[j]
        aj = -sign * a[j]
        sj = s[j]
        gj = g[j]
        ej = eta[j]
        g2 = gj * gj
        inv2s2 = 0.5 / (sj * sj)
        lnorm = gj * _INV_PI
        gnorm = _INV_SQRT_2PI / sj
        reach = _CORE * sj
        kcj = kc[j]
        kej = ke[j]
        des = deta_ds[j]
        deg = deta_dg[j]
        inv_s2 = 1.0 / (sj * sj)
        inv_s = 1.0 / sj
        inv_g = 1.0 / gj
        acc_a = 0.0
        acc_c = 0.0
        acc_s = 0.0
        acc_g = 0.0
        acc_kc = 0.0
        acc_ke = 0.0
        p0 = start[j]
        for p in range(p0, p0 + npix[j]):
            gt = grad[p]
            x = wl[p] - cj
            x2 = x * x
            x2g2 = x2 + g2
            if use_ff:
                q2 = x2 + b2
                r = 1.0 / (x2g2 * q2)
                inv = q2 * r  # 1/(x²+γ²)
                hb = x2g2 * r  # 1/(x²+b²)
            else:
                inv = 1.0 / x2g2
                hb = 0.0
            lor = lnorm * inv
            gau = 0.0
            if -reach < x < reach:
                gau = gnorm * math.exp(-x2 * inv2s2)
            v = ej * lor + (1.0 - ej) * gau
            if linear:
                arg = aj * v
                w = 0.0 if arg < _MIN_ARG else gt / (1.0 + arg)
            else:
                w = gt
            acc_a += w * v
            wv = w * aj  # grad × dt/dV
            # dV/dx = -x (2 η L / (x²+γ²) + (1-η) G / σ²); dx/dλc = -1
            acc_c += wv * x * (2.0 * ej * lor * inv + (1.0 - ej) * gau * inv_s2)
            lmg = lor - gau
            acc_s += wv * (gau * (1.0 - ej) * (x2 * inv_s2 * inv_s - inv_s) + des * lmg)
            acc_g += wv * (ej * lor * (inv_g - 2.0 * gj * inv) + deg * lmg)
            if use_ff:
                acc_kc += gt * hb
                acc_ke += gt * hb * hb
                acc_c += gt * 2.0 * x * hb * hb * (kcj + 2.0 * kej * hb)
        ga[j] = -sign * acc_a
        gc[j] = acc_c
        gs[j] = acc_s
        gg[j] = acc_g
        gkc[j] = acc_kc
        gke[j] = acc_ke


def _interp_forward_py(conv, i0, w, out):
    for p in range(i0.size):
        k = i0[p]
        acc = 0.0
        for q in range(w.shape[1]):
            acc += conv[k + q] * w[p, q]
        out[p] = acc


def _interp_backward_py(grad, i0, w, gconv):
    for p in range(i0.size):
        k = i0[p]
        gp = grad[p]
        for q in range(w.shape[1]):
            gconv[k + q] += gp * w[p, q]


if HAVE_NUMBA:
    _JIT = dict(nogil=True, cache=True, error_model="numpy")
    _forward = numba.njit(**_JIT)(_forward_py)
    _backward = numba.njit(**_JIT)(_backward_py)
    _interp_forward = numba.njit(**_JIT)(_interp_forward_py)
    _interp_backward = numba.njit(**_JIT)(_interp_backward_py)
else:  # pragma: no cover
    _forward = _backward = _interp_forward = _interp_backward = None

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """A thread pool of ``size`` workers, kept for the life of the process (one per size, so that
    callers in other threads never see a pool shut down under them)."""
    with _POOL_LOCK:
        pool = _POOLS.get(size)
        if pool is None:
            pool = _POOLS[size] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="blase-cpu")
        return pool


def _chunks(npix: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Contiguous line ranges with about equal numbers of (line, pixel) pairs."""
    n = npix.size
    if parts <= 1 or n < 2 * parts:
        return [(0, n)]
    cum = np.cumsum(npix, dtype=np.int64)
    edges = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts)
    bounds = [0, *sorted(set(int(e) for e in edges if 0 < e < n)), n]
    return list(zip(bounds[:-1], bounds[1:]))


def _run(fn, ranges, make_args):
    """Run fn on each (j0, j1) range, on the pool when there are several."""
    if len(ranges) == 1:
        fn(*make_args(0, *ranges[0]))
        return
    pool = _pool(len(ranges))
    futures = [pool.submit(fn, *make_args(k, j0, j1)) for k, (j0, j1) in enumerate(ranges)]
    for f in futures:
        f.result()


def _np64(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().reshape(-1).to(torch.float64).cpu().numpy())


class _WindowedSumCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wavelength, start, npix, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b: float, linear: bool,
                sign: float):
        wl = _np64(wavelength)
        st = np.ascontiguousarray(start.cpu().numpy().astype(np.int64))
        nn = np.ascontiguousarray(npix.cpu().numpy().astype(np.int64))
        arrs = [_np64(x) for x in (c, a, s, g, eta)]
        use_ff = kc is not None
        kc_, ke_ = (_np64(kc), _np64(ke)) if use_ff else (np.zeros(1), np.zeros(1))
        if not use_ff:
            kc_ = np.zeros(nn.size)
            ke_ = np.zeros(nn.size)
        ranges = _chunks(nn, max(1, torch.get_num_threads()))
        outs = np.zeros((len(ranges), wl.size))
        _run(_forward, ranges, lambda k, j0, j1: (wl, st, nn, *arrs, kc_, ke_, float(b), bool(linear), float(sign),
                                                 use_ff, j0, j1, outs[k]))
        out = outs[0] if len(ranges) == 1 else outs.sum(0)
        ctx.np = (wl, st, nn, arrs, _np64(deta_ds), _np64(deta_dg), kc_, ke_, use_ff, ranges)
        ctx.b, ctx.linear, ctx.sign = float(b), bool(linear), float(sign)
        ctx.dtypes = (c.dtype, a.dtype)
        return torch.from_numpy(out).to(dtype=a.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        wl, st, nn, arrs, des, deg, kc_, ke_, use_ff, ranges = ctx.np
        grad = _np64(grad_out)
        n = nn.size
        gc, ga, gs, gg, gkc, gke = (np.zeros(n) for _ in range(6))
        _run(_backward, ranges, lambda k, j0, j1: (grad, wl, st, nn, *arrs, des, deg, kc_, ke_, ctx.b, ctx.linear,
                                                  ctx.sign, use_ff, j0, j1, gc, ga, gs, gg, gkc, gke))
        cdt, wdt = ctx.dtypes
        needs = ctx.needs_input_grad
        out = [None] * 15
        for pos, arr, dt in ((3, gc, cdt), (4, ga, wdt), (5, gs, wdt), (6, gg, wdt), (10, gkc, wdt), (11, gke, wdt)):
            if needs[pos]:
                out[pos] = torch.from_numpy(arr).to(dtype=dt).reshape(-1, 1)
        return tuple(out)


def windowed_pseudo_voigt_sum_cpu(
    wavelength: Tensor,
    start: Tensor,
    npix: Tensor,
    c: Tensor,
    a: Tensor,
    s: Tensor,
    g: Tensor,
    *,
    mode: str,
    sign: float,
    kc: Tensor | None = None,
    ke: Tensor | None = None,
    b: float = 0.0,
) -> Tensor:
    """Sum of the fused pseudo-Voigt line terms over per-line windows, on the CPU (numba).

    Parameters
    ----------
    wavelength : Tensor
        The grid (Å), shape (N,), on the CPU.
    start, npix : Tensor of int
        First grid index and number of pixels of each line's window, shape (L,);
        ``0 <= start`` and ``start + npix <= N``.
    c, a, s, g : Tensor
        λc, a, σ, γ, shape (L, 1).
    mode : {"linear", "log"}
    sign : float
        +1 absorption, -1 emission.
    kc, ke : Tensor, optional
        Far-field coefficients :math:`c_j`, :math:`e_j` (L, 1): the near-field residual is summed.
    b : float
        Far-field kernel width (Å).

    Returns
    -------
    Tensor
        Shape (N,), in the dtype of ``a``.
    """
    if not HAVE_NUMBA:
        raise ImportError("the compiled CPU kernel needs numba: pip install numba")
    from .fused import _eta_and_derivatives, check_term_arguments

    check_term_arguments(mode, kc, ke)

    eta, deta_ds, deta_dg = _eta_and_derivatives(s, g)
    return _WindowedSumCPU.apply(wavelength, start, npix, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, float(b),
                                 mode == "linear", float(sign))


class _InterpolateCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, conv: Tensor, i0: np.ndarray, w: np.ndarray):
        c = _np64(conv)
        out = np.empty(i0.size)
        _interp_forward(c, i0, w, out)
        ctx.plan = (i0, w, c.size)
        ctx.dtype = conv.dtype
        return torch.from_numpy(out).to(dtype=conv.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        i0, w, n = ctx.plan
        g = np.zeros(n)
        _interp_backward(_np64(grad), i0, w, g)
        return torch.from_numpy(g).to(dtype=ctx.dtype), None, None


def interpolate_cpu(conv: Tensor, i0: Tensor, weights: Tensor) -> Tensor:
    r""":math:`\sum_q w_{pq}\,\mathrm{conv}[i_{0,p} + q]` for every pixel *p* (Lagrange interpolation
    of a uniform grid to the pixels), with its backward pass, in compiled loops.

    Parameters
    ----------
    conv : Tensor
        Values on the uniform grid, shape (n,), on the CPU.
    i0 : Tensor of int
        First grid index of each pixel's stencil, shape (N,).
    weights : Tensor
        Stencil weights, shape (N, k); ``i0 + k <= n``.
    """
    if not HAVE_NUMBA:
        raise ImportError("the compiled CPU kernel needs numba: pip install numba")
    return _InterpolateCPU.apply(conv, np.ascontiguousarray(i0.cpu().numpy().astype(np.int64)),
                                 np.ascontiguousarray(weights.detach().to(torch.float64).cpu().numpy()))
