r"""Compiled CPU kernel of the near-field line sum (numba), with its hand-written backward pass.

For every line *j* and every grid pixel *p* of its own window, this adds

.. math::
    t_j(\lambda_p) = \ln\big(1 - s\,a_j V(\lambda_p - \lambda_{c,j};\sigma_j,\gamma_j)\big)
    \quad\text{or}\quad -s\,a_j V, \qquad [+\,c_j h + e_j h^2]

(the second form in log mode; the bracket is the far-field kernel added back when the near-field
residual is wanted, see :mod:`.farfield`) to the output, and its backward pass sums
:math:`\partial t_j/\partial\theta_j` times the incoming gradient over the same window for
λc, a, σ, γ, c_j and e_j. It evaluates the same pseudo-Voigt and the same derivatives as
:mod:`.fused` in compiled loops, so nothing of size (lines × window) is ever stored. The Gaussian
component is evaluated within 9σ of the centre only: beyond, exp(−x²/2σ²) < 1e-17. Outside each
line's core (that reach and, in linear mode, the pixels where :math:`|t|` may exceed 0.02) the term
is the Lorentzian alone and ln(1 + t) its series to t¹⁰: those loops have no branches and
vectorise.

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

from .fused import compiled_kernel_arguments, compiled_kernel_gradients
from .profiles import _W_COEFFS, _W_L

try:  # numba is a dependency, but the torch path stays usable without it
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    HAVE_NUMBA = False

__all__ = ["HAVE_NUMBA", "windowed_pseudo_voigt_sum_cpu", "interpolate_cpu", "spread_cpu", "correlate_cpu"]

_MIN_ARG = -1.0 + 1e-12
_INV_PI = 1.0 / math.pi
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT2 = math.sqrt(2.0)
_CORE = 9.0
#: |t| below which ln(1 + t) is summed as its series to t¹⁰ (truncation error below 2e-20)
_SMALL = 0.02


def _log1p_small(t):
    """ln(1 + t) for |t| <= _SMALL, by its series (Horner form)."""
    return t * (1.0 + t * (-1.0 / 2.0 + t * (1.0 / 3.0 + t * (-1.0 / 4.0 + t * (1.0 / 5.0 + t * (
        -1.0 / 6.0 + t * (1.0 / 7.0 + t * (-1.0 / 8.0 + t * (1.0 / 9.0 - t / 10.0)))))))))


def _core_range(wl, p0, p1, cj, half):
    """[pa, pb): the pixels of the window [p0, p1) with |λ - λc| < ``half`` (and possibly a few at
    exactly ``half``); every pixel outside has |λ - λc| >= half."""
    pa = min(max(np.searchsorted(wl, cj - half), p0), p1)
    pb = min(max(np.searchsorted(wl, cj + half), pa), p1)
    return pa, pb


def _forward_py(wl, start, npix, c, a, s, g, eta, kc, ke, bb, linear, sign, j0, j1, out):
    lin = 1.0 if linear else 0.0
    for j in range(j0, j1):
        cj = c[j]
        aj = -sign * a[j]
        sj = s[j]
        g2 = g[j] * g[j]
        b2 = bb[j] * bb[j]
        ej = eta[j]
        inv2s2 = 0.5 / (sj * sj)
        lnorm = aj * ej * g[j] * _INV_PI  # a × the Lorentzian's numerator
        gnorm = aj * (1.0 - ej) * _INV_SQRT_2PI / sj
        reach = _CORE * sj
        kcj = kc[j]
        kej = ke[j]
        p0 = start[j]
        p1 = p0 + npix[j]
        # the core: the Gaussian's reach and, in linear mode, where |t| may exceed _SMALL. Outside,
        # t is the Lorentzian alone and ln(1+t) its series: straight-line code that vectorises
        half = reach
        if linear:
            half = max(half, math.sqrt(max(abs(lnorm) / _SMALL - g2, 0.0)))
        pa, pb = _core_range(wl, p0, p1, cj, half)
        for q0, q1 in ((p0, pa), (pb, p1)):
            w = wl[q0:q1]
            o = out[q0:q1]
            for i in range(w.size):
                x = w[i] - cj
                x2 = x * x
                u = x2 + g2
                q = x2 + b2
                r = 1.0 / (u * q)  # one division for 1/(x²+γ²) = q r and h = 1/(x²+b²) = u r
                t = lnorm * q * r
                h = u * r
                o[i] += t * (1.0 + lin * t * (-0.5 + t * (1.0 / 3.0 + t * (-0.25 + t * (0.2 + t * (
                    -1.0 / 6.0 + t * (1.0 / 7.0 + t * (-0.125 + t * (1.0 / 9.0 - 0.1 * t))))))))) + h * (kcj + kej * h)
        for p in range(pa, pb):
            x = wl[p] - cj
            x2 = x * x
            u = x2 + g2
            q = x2 + b2
            r = 1.0 / (u * q)
            t = lnorm * q * r
            h = u * r
            if -reach < x < reach:
                t += gnorm * math.exp(-x2 * inv2s2)
            if linear:
                if t < _MIN_ARG:
                    t = _MIN_ARG
                if -_SMALL < t < _SMALL:
                    t = _log1p_small(t)
                else:
                    t = math.log1p(t)
            out[p] += t + h * (kcj + kej * h)


def _backward_py(grad, wl, start, npix, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, bb, linear, sign,
                 j0, j1, gc, ga, gs, gg, gkc, gke):
    lin = 1.0 if linear else 0.0
    for j in range(j0, j1):
        cj = c[j]
        aj = -sign * a[j]
        sj = s[j]
        gj = g[j]
        ej = eta[j]
        g2 = gj * gj
        b2 = bb[j] * bb[j]
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
        half = reach
        if linear:
            half = max(half, math.sqrt(max(abs(aj * ej * lnorm) / _SMALL - g2, 0.0)))
        pa, pb = _core_range(wl, start[j], start[j] + npix[j], cj, half)
        acc_a = 0.0
        acc_c = 0.0
        acc_s = 0.0
        acc_g = 0.0
        acc_kc = 0.0
        acc_ke = 0.0
        # the wings (no Gaussian, 1 + aV > 0.98): straight-line code that vectorises
        for q0, q1 in ((start[j], pa), (pb, start[j] + npix[j])):
            w = wl[q0:q1]
            gr = grad[q0:q1]
            for i in range(w.size):
                gt = gr[i]
                x = w[i] - cj
                x2 = x * x
                u = x2 + g2
                q = x2 + b2
                r = 1.0 / (u * q)
                inv = q * r  # 1/(x²+γ²)
                h = u * r  # 1/(x²+b²)
                lor = lnorm * inv
                v = ej * lor
                wt = gt / (1.0 + lin * aj * v)
                wv = wt * aj  # grad × dt/dV
                acc_a += wt * v
                acc_c += wv * x * (2.0 * v * inv) + gt * 2.0 * x * h * h * (kcj + 2.0 * kej * h)
                acc_s += wv * des * lor
                acc_g += wv * (v * (inv_g - 2.0 * gj * inv) + deg * lor)
                acc_kc += gt * h
                acc_ke += gt * h * h
        for p in range(pa, pb):
            gt = grad[p]
            x = wl[p] - cj
            x2 = x * x
            u = x2 + g2
            q = x2 + b2
            r = 1.0 / (u * q)
            inv = q * r
            h = u * r
            lor = lnorm * inv
            gau = 0.0
            if -reach < x < reach:
                gau = gnorm * math.exp(-x2 * inv2s2)
            v = ej * lor + (1.0 - ej) * gau
            if linear:
                arg = aj * v
                wt = 0.0 if arg < _MIN_ARG else gt / (1.0 + arg)
            else:
                wt = gt
            acc_a += wt * v
            wv = wt * aj
            # dV/dx = -x (2 η L / (x²+γ²) + (1-η) G / σ²); dx/dλc = -1
            acc_c += wv * x * (2.0 * ej * lor * inv + (1.0 - ej) * gau * inv_s2)
            lmg = lor - gau
            acc_s += wv * (gau * (1.0 - ej) * (x2 * inv_s2 * inv_s - inv_s) + des * lmg)
            acc_g += wv * (ej * lor * (inv_g - 2.0 * gj * inv) + deg * lmg)
            acc_kc += gt * h
            acc_ke += gt * h * h
            acc_c += gt * 2.0 * x * h * h * (kcj + 2.0 * kej * h)
        ga[j] = -sign * acc_a
        gc[j] = acc_c
        gs[j] = acc_s
        gg[j] = acc_g
        gkc[j] = acc_kc
        gke[j] = acc_ke


#: Beyond |z| = 8 the Faddeeva function is its asymptotic series to z^-29 (truncation below 2e-16;
#: to z^-13 beyond |z| = 20)
_ASYM_R2 = 64.0
_ASYM_TERMS = 15
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def _asymptotic_coefficients(k: int) -> tuple[np.ndarray, np.ndarray]:
    """c_k = (2k-1)!!/2^k of w(z) ~ (i/√π z) Σ c_k z^-2k, and (2k+1) c_k for w'(z)."""
    c = np.ones(k)
    for i in range(1, k):
        c[i] = c[i - 1] * (2 * i - 1) / 2.0
    return c, c * (2 * np.arange(k) + 1)


_ASYM_C, _ASYM_D = _asymptotic_coefficients(_ASYM_TERMS)


def _faddeeva_py(z, with_derivative):
    """w(z) for Im z >= 0 and, if asked, w'(z): Weideman's 40-term rational expansion (as
    :func:`.profiles.faddeeva`) inside |z| = 8, the asymptotic series outside."""
    r2 = z.real * z.real + z.imag * z.imag
    if r2 >= _ASYM_R2:
        u = 1.0 / (z * z)
        p = 0j
        q = 0j
        # beyond |z| = 20 seven terms suffice (the next is below 7e-16 of the sum)
        for k in range((7 if r2 >= 400.0 else _ASYM_TERMS) - 1, -1, -1):
            p = p * u + _ASYM_C[k]
            if with_derivative:
                q = q * u + _ASYM_D[k]
        w = 1j * _INV_SQRT_PI * p / z
        return w, -1j * _INV_SQRT_PI * q * u
    iz = 1j * z
    lmiz = _W_L - iz
    zz = (_W_L + iz) / lmiz
    p = _W_COEFFS[0] + 0j
    for k in range(1, _W_COEFFS.size):
        p = p * zz + _W_COEFFS[k]
    w = 2.0 * p / (lmiz * lmiz) + _INV_SQRT_PI / lmiz
    return w, -2.0 * z * w + 2j * _INV_SQRT_PI


def _voigt_forward_py(wl, start, npix, c, a, s, g, eta, kc, ke, bb, linear, sign, j0, j1, out):
    for j in range(j0, j1):
        cj = c[j]
        inv = 1.0 / (s[j] * _SQRT2)  # z = (x + iγ)/(σ√2)
        y = g[j] * inv
        amp = -sign * a[j] * inv * _INV_SQRT_PI  # -s a /(σ√(2π))
        b2 = bb[j] * bb[j]
        kcj = kc[j]
        kej = ke[j]
        for p in range(start[j], start[j] + npix[j]):
            x = wl[p] - cj
            w, _ = _faddeeva(complex(x * inv, y), False)
            t = amp * w.real
            if linear:
                if t < _MIN_ARG:
                    t = _MIN_ARG
                if -_SMALL < t < _SMALL:
                    t = _log1p_small(t)
                else:
                    t = math.log1p(t)
            h = 1.0 / (x * x + b2)
            out[p] += t + h * (kcj + kej * h)


def _voigt_backward_py(grad, wl, start, npix, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, bb, linear, sign,
                       j0, j1, gc, ga, gs, gg, gkc, gke):
    for j in range(j0, j1):
        cj = c[j]
        sj = s[j]
        inv = 1.0 / (sj * _SQRT2)
        y = g[j] * inv
        norm = inv * _INV_SQRT_PI  # 1/(σ√(2π))
        aj = -sign * a[j]
        b2 = bb[j] * bb[j]
        kcj = kc[j]
        kej = ke[j]
        acc_a = 0.0
        acc_c = 0.0
        acc_s = 0.0
        acc_g = 0.0
        acc_kc = 0.0
        acc_ke = 0.0
        for p in range(start[j], start[j] + npix[j]):
            gt = grad[p]
            x = wl[p] - cj
            z = complex(x * inv, y)
            w, dw = _faddeeva(z, True)
            v = norm * w.real
            if linear:
                arg = aj * v
                wt = 0.0 if arg < _MIN_ARG else gt / (1.0 + arg)
            else:
                wt = gt
            acc_a += wt * v
            wv = wt * aj  # grad × dt/dV
            # V = Re w(z)/(σ√(2π)): ∂V/∂x = Re w' /(σ√2) × norm, ∂V/∂γ = −Im w'/(σ√2) × norm,
            # ∂V/∂σ = Re(w' (−z/σ)) norm − V/σ; dx/dλc = −1
            acc_c -= wv * norm * dw.real * inv
            acc_g -= wv * norm * dw.imag * inv
            acc_s += wv * (norm * (dw * z).real * (-1.0 / sj) - v / sj)
            h = 1.0 / (x * x + b2)
            acc_kc += gt * h
            acc_ke += gt * h * h
            acc_c += gt * 2.0 * x * h * h * (kcj + 2.0 * kej * h)
        ga[j] = -sign * acc_a
        gc[j] = acc_c
        gs[j] = acc_s
        gg[j] = acc_g
        gkc[j] = acc_kc
        gke[j] = acc_ke


def _interp_forward_py(conv, i0, w, p0, p1, out):
    for p in range(p0, p1):
        k = i0[p]
        acc = 0.0
        for q in range(w.shape[1]):
            acc += conv[k + q] * w[p, q]
        out[p] = acc


def _interp_backward_py(grad, i0, w, p0, p1, gconv):
    for p in range(p0, p1):
        k = i0[p]
        gp = grad[p]
        for q in range(w.shape[1]):
            gconv[k + q] += gp * w[p, q]


def _lagrange_py(f, m, q):
    """Weight of node q - (m - 1) of the 2m-point Lagrange stencil at position f, and its derivative."""
    o = q - (m - 1)
    w = 1.0
    dw = 0.0
    den = 1.0
    for k in range(2 * m):
        if k != q:
            d = f - (k - (m - 1))
            dw = dw * d + w
            w = w * d
            den *= o - (k - (m - 1))
    return w / den, dw / den


def _stencil_py(pj, m, n):
    k0 = math.floor(pj)
    k0 = min(max(k0, m - 1), n - m - 1)
    f = pj - k0
    inside = -(m - 1) <= f <= m
    return int(k0), min(max(f, -(m - 1.0)), float(m)), inside


def _spread_forward_py(pos, c, e, m, n, grid_c, grid_e):
    for j in range(pos.size):
        k0, f, _ = _stencil_py(pos[j], m, n)
        for q in range(2 * m):
            w, _ = _lagrange_py(f, m, q)
            grid_c[k0 + q - (m - 1)] += c[j] * w
            grid_e[k0 + q - (m - 1)] += e[j] * w


def _spread_backward_py(pos, c, e, m, n, gr_c, gr_e, g_pos, g_c, g_e):
    for j in range(pos.size):
        k0, f, inside = _stencil_py(pos[j], m, n)
        acc_c = 0.0
        acc_e = 0.0
        acc_f = 0.0
        for q in range(2 * m):
            w, dw = _lagrange_py(f, m, q)
            gc = gr_c[k0 + q - (m - 1)]
            ge = gr_e[k0 + q - (m - 1)]
            acc_c += w * gc
            acc_e += w * ge
            acc_f += dw * (c[j] * gc + e[j] * ge)
        g_c[j] = acc_c
        g_e[j] = acc_e
        g_pos[j] = acc_f if inside else 0.0  # a clamped position carries no gradient



def _correlate_forward_py(x, k, out):
    # out[r, i] = sum_j k[j] x[r, i + j]
    nk = k.size
    for r in range(out.shape[0]):
        for i in range(out.shape[1]):
            acc = 0.0
            for j in range(nk):
                acc += k[j] * x[r, i + j]
            out[r, i] = acc


def _correlate_backward_py(grad, x, k, gx, gk, need_x, need_k):
    nk = k.size
    for r in range(grad.shape[0]):
        for i in range(grad.shape[1]):
            gi = grad[r, i]
            if need_x:
                for j in range(nk):
                    gx[r, i + j] += gi * k[j]
            if need_k:
                for j in range(nk):
                    gk[j] += gi * x[r, i + j]

if HAVE_NUMBA:
    _JIT = dict(nogil=True, cache=True, error_model="numpy")
    # reassociation lets the wing loops' sums vectorise (results change at the rounding level only)
    _FAST = dict(_JIT, fastmath={"nsz", "arcp", "contract", "reassoc"})
    _log1p_small = numba.njit(**_JIT)(_log1p_small)
    _core_range = numba.njit(**_JIT)(_core_range)
    _forward = numba.njit(**_FAST)(_forward_py)
    _faddeeva = numba.njit(**_JIT)(_faddeeva_py)
    _voigt_forward = numba.njit(**_JIT)(_voigt_forward_py)
    _voigt_backward = numba.njit(**_JIT)(_voigt_backward_py)
    _backward = numba.njit(**_FAST)(_backward_py)
    _interp_forward = numba.njit(**_JIT)(_interp_forward_py)
    _lagrange_py = numba.njit(**_JIT)(_lagrange_py)
    _stencil_py = numba.njit(**_JIT)(_stencil_py)
    _spread_forward = numba.njit(**_JIT)(_spread_forward_py)
    _spread_backward = numba.njit(**_JIT)(_spread_backward_py)
    _interp_backward = numba.njit(**_JIT)(_interp_backward_py)
    _correlate_forward = numba.njit(**_FAST)(_correlate_forward_py)
    _correlate_backward = numba.njit(**_FAST)(_correlate_backward_py)
else:  # pragma: no cover
    _forward = _backward = _interp_forward = _interp_backward = _spread_forward = _spread_backward = None
    _voigt_forward = _voigt_backward = None
    _correlate_forward = _correlate_backward = None

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
    def forward(ctx, wavelength, start, npix, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b, linear: bool,
                sign: float, voigt: bool):
        wl = _np64(wavelength)
        st = np.ascontiguousarray(start.cpu().numpy(), dtype=np.int64)
        nn = np.ascontiguousarray(npix.cpu().numpy(), dtype=np.int64)
        arrs = [_np64(x) for x in (c, a, s, g, eta)]
        if kc is not None:
            kc_, ke_ = _np64(kc), _np64(ke)
            bb = _np64(b) if isinstance(b, Tensor) else np.full(nn.size, float(b))
        else:
            # no far field: c_j = e_j = 0, and any b > 0 keeps the shared division finite
            kc_ = ke_ = np.zeros(nn.size)
            bb = np.ones(nn.size)
        ranges = _chunks(nn, max(1, torch.get_num_threads()))
        outs = np.zeros((len(ranges), wl.size))
        _run(_voigt_forward if voigt else _forward, ranges,
             lambda k, j0, j1: (wl, st, nn, *arrs, kc_, ke_, bb, bool(linear), float(sign), j0, j1, outs[k]))
        out = outs[0] if len(ranges) == 1 else outs.sum(0)
        ctx.np = (wl, st, nn, arrs, _np64(deta_ds), _np64(deta_dg), kc_, ke_, bb, ranges)
        ctx.linear, ctx.sign, ctx.voigt = bool(linear), float(sign), bool(voigt)
        ctx.dtypes = (c.dtype, a.dtype)
        return torch.from_numpy(out).to(dtype=a.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        wl, st, nn, arrs, des, deg, kc_, ke_, bb, ranges = ctx.np
        grad = _np64(grad_out)
        n = nn.size
        gc, ga, gs, gg, gkc, gke = (np.zeros(n) for _ in range(6))
        _run(_voigt_backward if ctx.voigt else _backward, ranges,
             lambda k, j0, j1: (grad, wl, st, nn, *arrs, des, deg, kc_, ke_, bb, ctx.linear, ctx.sign, j0, j1,
                                gc, ga, gs, gg, gkc, gke))
        return compiled_kernel_gradients(ctx.needs_input_grad, [torch.from_numpy(x) for x in (gc, ga, gs, gg, gkc, gke)],
                                         ctx.dtypes)


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
    b: float | Tensor = 0.0,
    profile: str = "pseudo-voigt",
    eta: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Sum of the fused line terms over per-line windows, on the CPU (numba).

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
    b : float or Tensor
        Far-field kernel width (Å): one for all lines, or each line's own, shape (L, 1).
    profile : {"pseudo-voigt", "voigt"}
        The blasé pseudo-Voigt, or the exact Voigt (Faddeeva function: Weideman's expansion of
        :func:`.profiles.faddeeva` within :math:`|z| = 8`, its asymptotic series beyond).
    eta : tuple of Tensor, optional
        η, ∂η/∂σ, ∂η/∂γ of the pseudo-Voigt, shape (L, 1), if already computed
        (:func:`.fused.eta_and_derivatives`); computed here otherwise.

    Returns
    -------
    Tensor
        Shape (N,), in the dtype of ``a``.
    """
    if not HAVE_NUMBA:
        raise ImportError("the compiled CPU kernel needs numba: pip install numba")
    eta, deta_ds, deta_dg, b = compiled_kernel_arguments(mode, kc, ke, s, g, b, profile, eta)
    return _WindowedSumCPU.apply(wavelength, start, npix, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b,
                                 mode == "linear", float(sign), profile == "voigt")


class _InterpolateCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, conv: Tensor, i0: np.ndarray, w: np.ndarray):
        c = _np64(conv)
        out = np.empty(i0.size)
        parts = max(1, min(torch.get_num_threads(), i0.size // 4096))
        ranges = [(i0.size * k // parts, i0.size * (k + 1) // parts) for k in range(parts)]
        _run(_interp_forward, ranges, lambda k, p0, p1: (c, i0, w, p0, p1, out))
        ctx.plan = (i0, w, c.size, ranges)
        ctx.dtype = conv.dtype
        return torch.from_numpy(out).to(dtype=conv.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        i0, w, n, ranges = ctx.plan
        g = np.zeros((len(ranges), n))
        gr = _np64(grad)
        _run(_interp_backward, ranges, lambda k, p0, p1: (gr, i0, w, p0, p1, g[k]))
        return torch.from_numpy(g[0] if len(ranges) == 1 else g.sum(0)).to(dtype=ctx.dtype), None, None


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
    return _InterpolateCPU.apply(conv, np.ascontiguousarray(i0.cpu().numpy(), dtype=np.int64),
                                 np.ascontiguousarray(weights.detach().to(torch.float64).cpu().numpy()))


class _SpreadCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos: Tensor, c: Tensor, e: Tensor, n: int, m: int):
        arrs = [_np64(x) for x in (pos, c, e)]
        grid_c, grid_e = np.zeros(n), np.zeros(n)
        _spread_forward(*arrs, m, n, grid_c, grid_e)
        ctx.arrs, ctx.n, ctx.m = arrs, n, m
        ctx.dtypes = (pos.dtype, c.dtype, e.dtype)
        return torch.from_numpy(grid_c), torch.from_numpy(grid_e)

    @staticmethod
    @once_differentiable
    def backward(ctx, gr_c: Tensor, gr_e: Tensor):
        pos, c, e = ctx.arrs
        g_pos, g_c, g_e = np.zeros(pos.size), np.zeros(pos.size), np.zeros(pos.size)
        gr_c = np.zeros(ctx.n) if gr_c is None else _np64(gr_c)
        gr_e = np.zeros(ctx.n) if gr_e is None else _np64(gr_e)
        _spread_backward(pos, c, e, ctx.m, ctx.n, gr_c, gr_e, g_pos, g_c, g_e)
        out = [torch.from_numpy(g).to(dtype=dt) for g, dt in zip((g_pos, g_c, g_e), ctx.dtypes)]
        return (*out, None, None)


def spread_cpu(pos: Tensor, c: Tensor, e: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    r"""Spread two sets of spikes onto a uniform grid of ``n`` points with 2m-point Lagrange weights.

    Spike *j* at grid position ``pos[j]`` (in grid units) adds :math:`c_j w_q` and :math:`e_j w_q`
    to the grid points of its stencil, :math:`w_q` being the Lagrange basis weights of those points
    at ``pos[j]``: every moment of the spikes to order 2m - 1 is kept. Positions are clamped to
    the grid (the stencil starts at ``m - 1``); a clamped spike's position gets no gradient.

    Returns
    -------
    grid_c, grid_e : Tensor
        Shape (n,), float64, differentiable with respect to ``pos``, ``c`` and ``e``.
    """
    if not HAVE_NUMBA:
        raise ImportError("the compiled CPU kernel needs numba: pip install numba")
    return _SpreadCPU.apply(pos, c, e, int(n), int(m))


class _CorrelateCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor):
        x64 = np.ascontiguousarray(x.detach().to(torch.float64).numpy())
        k64 = _np64(k)
        out = np.empty((x64.shape[0], x64.shape[1] - k64.size + 1))
        _correlate_forward(x64, k64, out)
        ctx.arrs = (x64, k64)
        ctx.dtypes = (x.dtype, k.dtype)
        return torch.from_numpy(out).to(dtype=x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x64, k64 = ctx.arrs
        need_x, need_k = ctx.needs_input_grad[:2]
        gx = np.zeros(x64.shape if need_x else (1, 1))
        gk = np.zeros(k64.size if need_k else 1)
        _correlate_backward(np.ascontiguousarray(grad.to(torch.float64).numpy()), x64, k64, gx, gk, need_x, need_k)
        return (torch.from_numpy(gx).to(dtype=ctx.dtypes[0]) if need_x else None,
                torch.from_numpy(gk).to(dtype=ctx.dtypes[1]) if need_k else None)


def correlate_cpu(x: Tensor, k: Tensor) -> Tensor:
    r"""Valid cross-correlation of each row of ``x`` with ``k``,
    :math:`y_{r,i} = \sum_j k_j\,x_{r,i+j}`, in compiled loops, differentiable in both.

    The direct convolutions of :mod:`.extrinsic` (rotation and instrument kernels of up to a few
    hundred taps) run through it on CPUs, where float64 ``conv1d`` has no fast path.

    Parameters
    ----------
    x : Tensor
        Shape (rows, n), on the CPU.
    k : Tensor
        Shape (m,), m <= n.

    Returns
    -------
    Tensor
        Shape (rows, n - m + 1), in the dtype of ``x``.
    """
    if not HAVE_NUMBA:
        raise ImportError("the compiled CPU kernel needs numba: pip install numba")
    if x.ndim != 2 or k.ndim != 1 or k.numel() > x.shape[1]:
        raise ValueError(f"correlate_cpu needs x of shape (rows, n) and k of shape (m,), m <= n; got "
                         f"{tuple(x.shape)} and {tuple(k.shape)}")
    return _CorrelateCPU.apply(x, k)
