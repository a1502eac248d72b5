r"""Triton kernels of the near-field line sum for GPUs, with their hand-written backward passes.

The same sum as :mod:`.cpu_kernel`: for every plain pseudo-Voigt or exact Voigt line *j* and every
pixel of its own window,

.. math::
    t_j(\lambda_p) = \ln\big(1 - s\,a_j V(\lambda_p - \lambda_{c,j};\sigma_j,\gamma_j)\big)
    \quad\text{or}\quad -s\,a_j V, \qquad [+\,c_j h + e_j h^2],

with :math:`h = 1/(x^2 + b_j^2)` when the near-field residual is wanted (:mod:`.farfield`). Each
window is cut into chunks of ``EngineOptions.chunk`` pixels and every chunk is one Triton program: the forward
pass adds its terms to the output with atomic adds, the backward pass reduces
:math:`\partial t/\partial\theta_j` times the incoming gradient over the chunk into one row of a
(chunks × 6) array that is then summed per line. Nothing of size (lines × window) is stored.
Computations are in float64; results are returned in the working dtype. The exact Voigt evaluates
the Faddeeva function as the CPU kernel does (Weideman's expansion within :math:`|z| = 8`, the
asymptotic series beyond).

Triton is optional (it comes with the CUDA builds of torch). The kernel is used where it is asked
for (``windowed_log_flux(kernel="triton")``, or ``EngineOptions(backend="auto")`` on CUDA devices); on a CPU it runs
only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks it
against the compiled CPU kernel. The test suite also compiles every kernel for sm_90 without a GPU
(``benchmarks/triton_compile.py``) and checks that the compiled code computes in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused import compiled_kernel_arguments, compiled_kernel_gradients

try:  # optional: only GPU runs need it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = tl = None
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "windowed_pseudo_voigt_sum_triton"]

# Every launch passes ``enable_fp_fusion=True``: the compiler may fuse a multiplication and an
# addition into one multiply-add (rounded once; what the GPU measurements used), so that the kernels
# do not change with Triton's default, which Triton 3.10 turns off. The chunk length and the warps
# per program are settings of :class:`.options.EngineOptions` (``chunk``, ``num_warps``).



if HAVE_TRITON:

    @triton.jit
    def _log1p(t):
        # ln(1 + t): its series to t^10 where |t| < 0.02 (exact to rounding), the logarithm elsewhere.
        # (Triton 3.6 compiles a float literal compared with a float64 tensor as float32: 0.02 became
        # 0.019999999552965164. Here and below the literal goes into float64 arithmetic, and the
        # comparison is with 0.0.)
        s = t * (1.0 + t * (-0.5 + t * (0.3333333333333333 + t * (-0.25 + t * (0.2 + t * (
            -0.16666666666666666 + t * (0.14285714285714285 + t * (-0.125 + t * (0.1111111111111111 - 0.1 * t)))))))))
        return tl.where(tl.abs(t) - 0.02 < 0.0, s, tl.log(1.0 + t))

    @triton.jit
    def _floor(t):
        # max(t, -1 + 1e-12) as the CPU kernel takes it. Float literals in arithmetic with float64
        # tensors are float64; compared with them (t < -0.999999999999) Triton 3.6 made the literal
        # float32, -1.0, and tl.maximum(t, c) is not safe from that either
        return tl.where(t + 0.999999999999 < 0.0, t * 0.0 - 0.999999999999, t)

    @triton.jit
    def _chunk(line_ptr, p0_ptr, p1_ptr, BLOCK: tl.constexpr):
        """This program's line, the pixel indices of its chunk and their mask."""
        pid = tl.program_id(0)
        offs = tl.load(p0_ptr + pid) + tl.arange(0, BLOCK)
        return tl.load(line_ptr + pid), offs, offs < tl.load(p1_ptr + pid)

    @triton.jit
    def _store_partials(part_ptr, mask, d_c, d_a, d_s, d_g, d_kc, d_ke):
        """The chunk's sums of the six per-line gradient terms: row ``pid`` of the (chunks × 6) array."""
        row = part_ptr + tl.program_id(0) * 6
        tl.store(row + 0, tl.sum(tl.where(mask, d_c, 0.0), axis=0))
        tl.store(row + 1, tl.sum(tl.where(mask, d_a, 0.0), axis=0))
        tl.store(row + 2, tl.sum(tl.where(mask, d_s, 0.0), axis=0))
        tl.store(row + 3, tl.sum(tl.where(mask, d_g, 0.0), axis=0))
        tl.store(row + 4, tl.sum(tl.where(mask, d_kc, 0.0), axis=0))
        tl.store(row + 5, tl.sum(tl.where(mask, d_ke, 0.0), axis=0))

    @triton.jit
    def _forward_kernel(wl_ptr, line_ptr, p0_ptr, p1_ptr, c_ptr, a_ptr, s_ptr, g_ptr, eta_ptr, kc_ptr, ke_ptr,
                        b_ptr, out_ptr, SIGN: tl.constexpr, LINEAR: tl.constexpr, BLOCK: tl.constexpr):
        j, offs, mask = _chunk(line_ptr, p0_ptr, p1_ptr, BLOCK)
        cj = tl.load(c_ptr + j)
        aj = -SIGN * tl.load(a_ptr + j)
        sj = tl.load(s_ptr + j)
        gj = tl.load(g_ptr + j)
        ej = tl.load(eta_ptr + j)
        kcj = tl.load(kc_ptr + j)
        kej = tl.load(ke_ptr + j)
        bj = tl.load(b_ptr + j)
        x = tl.load(wl_ptr + offs, mask=mask, other=0.0) - cj
        x2 = x * x
        lor = ej * gj * 0.3183098861837907 / (x2 + gj * gj)
        gau = (1.0 - ej) * 0.3989422804014327 / sj * tl.exp(-0.5 * x2 / (sj * sj))
        t = aj * (lor + gau)
        if LINEAR:
            t = _log1p(_floor(t))
        h = 1.0 / (x2 + bj * bj)
        t += h * (kcj + kej * h)
        tl.atomic_add(out_ptr + offs, t, mask=mask)

    @triton.jit
    def _backward_kernel(grad_ptr, wl_ptr, line_ptr, p0_ptr, p1_ptr, c_ptr, a_ptr, s_ptr, g_ptr, eta_ptr,
                         des_ptr, deg_ptr, kc_ptr, ke_ptr, b_ptr, part_ptr, SIGN: tl.constexpr, LINEAR: tl.constexpr,
                         BLOCK: tl.constexpr):
        j, offs, mask = _chunk(line_ptr, p0_ptr, p1_ptr, BLOCK)
        cj = tl.load(c_ptr + j)
        aj = -SIGN * tl.load(a_ptr + j)
        sj = tl.load(s_ptr + j)
        gj = tl.load(g_ptr + j)
        ej = tl.load(eta_ptr + j)
        des = tl.load(des_ptr + j)
        deg = tl.load(deg_ptr + j)
        kcj = tl.load(kc_ptr + j)
        kej = tl.load(ke_ptr + j)
        bj = tl.load(b_ptr + j)
        gt = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        x = tl.load(wl_ptr + offs, mask=mask, other=0.0) - cj
        x2 = x * x
        inv = 1.0 / (x2 + gj * gj)
        lor = gj * 0.3183098861837907 * inv
        gau = 0.3989422804014327 / sj * tl.exp(-0.5 * x2 / (sj * sj))
        v = ej * lor + (1.0 - ej) * gau
        if LINEAR:
            arg = aj * v
            w = tl.where(arg + 0.999999999999 < 0.0, 0.0, gt / (1.0 + arg))
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
        _store_partials(part_ptr, mask, d_c, -SIGN * w * v, d_s, d_g, gt * h, gt * h * h)

    @triton.jit
    def _cmul(ar, ai, br, bi):
        return ar * br - ai * bi, ar * bi + ai * br

    @triton.jit
    def _cdiv(ar, ai, br, bi):
        d = 1.0 / (br * br + bi * bi)
        return (ar * br + ai * bi) * d, (ai * br - ar * bi) * d

    @triton.jit
    def _faddeeva(zr, zi, wc_ptr, ac_ptr, ad_ptr, NW: tl.constexpr, NA: tl.constexpr):
        """w(z) and w'(z) for Im z >= 0: Weideman's expansion inside |z| = 8, the asymptotic series
        outside (both are computed; the right one is kept). ``wc_ptr`` holds Weideman's NW
        coefficients and then his L. Float constants are written inline, next to float64 tensors:
        a float literal bound to a name would be a float32 scalar in Triton."""
        ell = tl.load(wc_ptr + NW)
        # Weideman: lmiz = L - iz, Z = (L + iz)/lmiz, w = 2 p(Z)/lmiz² + 1/(√π lmiz)
        lr = ell + zi
        li = -zr
        qr, qi = _cdiv(ell - zi, zr, lr, li)
        pr = tl.zeros_like(zr) + tl.load(wc_ptr)
        pi = tl.zeros_like(zr)
        for k in tl.static_range(1, NW):
            pr, pi = _cmul(pr, pi, qr, qi)
            pr += tl.load(wc_ptr + k)
        l2r, l2i = _cmul(lr, li, lr, li)
        ar, ai = _cdiv(2.0 * pr, 2.0 * pi, l2r, l2i)
        br, bi = _cdiv(tl.zeros_like(zr) + 0.5641895835477563, tl.zeros_like(zr), lr, li)
        wr_w = ar + br
        wi_w = ai + bi
        # w' = -2 z w + 2i/√π
        tr, ti = _cmul(zr, zi, wr_w, wi_w)
        dwr_w = -2.0 * tr
        dwi_w = -2.0 * ti + 1.1283791670955126
        # asymptotic: u = 1/z², w = (i/√π) P(u)/z, w' = -(i/√π) Q(u) u
        z2r, z2i = _cmul(zr, zi, zr, zi)
        ur, ui = _cdiv(tl.zeros_like(zr) + 1.0, tl.zeros_like(zr), z2r, z2i)
        pr = tl.zeros_like(zr) + tl.load(ac_ptr + NA - 1)
        pi = tl.zeros_like(zr)
        sr = tl.zeros_like(zr) + tl.load(ad_ptr + NA - 1)
        si = tl.zeros_like(zr)
        for i in tl.static_range(NA - 1):
            pr, pi = _cmul(pr, pi, ur, ui)
            pr += tl.load(ac_ptr + NA - 2 - i)
            sr, si = _cmul(sr, si, ur, ui)
            sr += tl.load(ad_ptr + NA - 2 - i)
        fr, fi = _cdiv(pr, pi, zr, zi)
        wr_a = fi * -0.5641895835477563
        wi_a = fr * 0.5641895835477563
        gr, gi = _cmul(sr, si, ur, ui)
        dwr_a = gi * 0.5641895835477563
        dwi_a = gr * -0.5641895835477563
        far = zr * zr + zi * zi >= 64.0
        return (tl.where(far, wr_a, wr_w), tl.where(far, wi_a, wi_w),
                tl.where(far, dwr_a, dwr_w), tl.where(far, dwi_a, dwi_w))

    @triton.jit
    def _voigt_forward_kernel(wl_ptr, line_ptr, p0_ptr, p1_ptr, c_ptr, a_ptr, s_ptr, g_ptr, kc_ptr, ke_ptr, b_ptr,
                              out_ptr, wc_ptr, ac_ptr, ad_ptr, SIGN: tl.constexpr, NW: tl.constexpr, NA: tl.constexpr,
                              LINEAR: tl.constexpr, BLOCK: tl.constexpr):
        j, offs, mask = _chunk(line_ptr, p0_ptr, p1_ptr, BLOCK)
        cj = tl.load(c_ptr + j)
        inv = 0.7071067811865476 / tl.load(s_ptr + j)  # z = (x + iγ)/(σ√2)
        amp = tl.load(a_ptr + j) * inv * 0.5641895835477563 * -SIGN
        kcj = tl.load(kc_ptr + j)
        kej = tl.load(ke_ptr + j)
        bj = tl.load(b_ptr + j)
        x = tl.load(wl_ptr + offs, mask=mask, other=0.0) - cj
        wr, wi, dwr, dwi = _faddeeva(x * inv, tl.zeros_like(x) + tl.load(g_ptr + j) * inv, wc_ptr, ac_ptr, ad_ptr,
                                     NW, NA)
        t = amp * wr
        if LINEAR:
            t = _log1p(_floor(t))
        h = 1.0 / (x * x + bj * bj)
        t += h * (kcj + kej * h)
        tl.atomic_add(out_ptr + offs, t, mask=mask)

    @triton.jit
    def _voigt_backward_kernel(grad_ptr, wl_ptr, line_ptr, p0_ptr, p1_ptr, c_ptr, a_ptr, s_ptr, g_ptr, kc_ptr,
                               ke_ptr, b_ptr, part_ptr, wc_ptr, ac_ptr, ad_ptr, SIGN: tl.constexpr, NW: tl.constexpr,
                               NA: tl.constexpr, LINEAR: tl.constexpr, BLOCK: tl.constexpr):
        j, offs, mask = _chunk(line_ptr, p0_ptr, p1_ptr, BLOCK)
        cj = tl.load(c_ptr + j)
        sj = tl.load(s_ptr + j)
        inv = 0.7071067811865476 / sj
        norm = inv * 0.5641895835477563  # 1/(σ√(2π))
        aj = -SIGN * tl.load(a_ptr + j)
        kcj = tl.load(kc_ptr + j)
        kej = tl.load(ke_ptr + j)
        bj = tl.load(b_ptr + j)
        gt = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        x = tl.load(wl_ptr + offs, mask=mask, other=0.0) - cj
        zr = x * inv
        zi = tl.zeros_like(x) + tl.load(g_ptr + j) * inv
        wr, wi, dwr, dwi = _faddeeva(zr, zi, wc_ptr, ac_ptr, ad_ptr, NW, NA)
        v = norm * wr
        if LINEAR:
            arg = aj * v
            w = tl.where(arg + 0.999999999999 < 0.0, 0.0, gt / (1.0 + arg))
        else:
            w = gt
        wv = w * aj
        # ∂V/∂x = norm Re w'/(σ√2), ∂V/∂γ = −norm Im w'/(σ√2), ∂V/∂σ = −norm Re(w' z)/σ − V/σ
        h = 1.0 / (x * x + bj * bj)
        d_c = -wv * norm * dwr * inv + gt * 2.0 * x * h * h * (kcj + 2.0 * kej * h)
        d_g = -wv * norm * dwi * inv
        d_s = wv * (-norm * (dwr * zr - dwi * zi) - v) / sj
        _store_partials(part_ptr, mask, d_c, -SIGN * w * v, d_s, d_g, gt * h, gt * h * h)


if HAVE_TRITON:

    @triton.jit
    def _gauss_width(a, s, eta, tol):
        # distance where a (1 - η) G(d; σ) falls to ε: σ sqrt(2 ln(peak/ε)), 0 where the peak is below ε
        peak = a * (1.0 - eta) * 0.3989422804014327 / s
        r = peak / tol
        return s * tl.sqrt(2.0 * tl.log(tl.where(r < 1.0, r * 0.0 + 1.0, r)))

    @triton.jit
    def _search(x_ptr, v, n, mask, RIGHT: tl.constexpr, STEPS: tl.constexpr):
        """torch.searchsorted of the values ``v`` in the sorted array ``x_ptr[:n]`` (``RIGHT``:
        side='right'), by bisection: ``STEPS`` >= n.bit_length() halvings reach the answer."""
        lo = tl.zeros(v.shape, dtype=tl.int64)
        hi = lo + n
        for _ in tl.static_range(STEPS):
            live = lo < hi
            mid = (lo + hi) // 2
            x = tl.load(x_ptr + mid, mask=mask & live, other=0)
            if RIGHT:
                go = x <= v
                stay = x > v
            else:
                go = x < v
                stay = x >= v
            lo = tl.where(live & go, mid + 1, lo)
            hi = tl.where(live & stay, mid, hi)
        return lo

    @triton.jit
    def _plan_lines_kernel(c_ptr, a_ptr, s_ptr, g_ptr, hw_ptr, par_ptr, eta_ptr, lev_ptr, b_ptr, lo_ptr, hi_ptr,
                           n_lines, wl_ptr, n_px, start_ptr, count_ptr, per_ptr, tab_ptr, n_tab, dlev_ptr, flag_ptr,
                           VOIGT: tl.constexpr, FAR: tl.constexpr, LINEAR: tl.constexpr,
                           CAP: tl.constexpr, FIXED: tl.constexpr, MAX_LEVEL: tl.constexpr, BLOCK: tl.constexpr,
                           WINDOWS: tl.constexpr = False, STEPS: tl.constexpr = 1, CHECK: tl.constexpr = False,
                           WHOLE: tl.constexpr = False, CHUNK_PX: tl.constexpr = 256):
        """Per line: η, ∂η/∂σ, ∂η/∂γ, the far-field level and its kernel width b_j, and the window
        [λc − w, λc + w] (as :class:`.plan.WindowPlan` computes them with torch operations).
        ``par_ptr``: sign, ε, smallest half width, b, r, ln r, top level (float64).

        With ``WINDOWS``, the window's first pixel and pixel count (a bisection of the grid
        ``wl_ptr``) and its number of chunks go to ``start_ptr``, ``count_ptr``, ``per_ptr`` instead
        of its ends to ``lo_ptr``, ``hi_ptr``; with ``CHECK`` also the far-field plan's checks
        (:meth:`.farfield.FarFieldPlan.violations`; ``tab_ptr``: its (n_tab, 2) table of the
        centres each level's grid can spread, ``dlev_ptr``: the level summing each line directly),
        and, unless ``WHOLE``, a line on no level: any of them raises the flag ``flag_ptr``."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_lines
        c = tl.load(c_ptr + i, mask=mask, other=0.0)
        a = tl.load(a_ptr + i, mask=mask, other=1.0).to(tl.float64)
        s = tl.load(s_ptr + i, mask=mask, other=1.0).to(tl.float64)
        g = tl.load(g_ptr + i, mask=mask, other=1.0).to(tl.float64)
        sign = tl.load(par_ptr + 0)
        tol = tl.load(par_ptr + 1)
        min_hw = tl.load(par_ptr + 2)
        # Ida et al.: f = P(f_G, f_L)^(1/5), r = f_L / f, η(r); derivatives as fused._eta_and_derivatives
        fg = 2.3548 * s
        fl = 2.0 * g
        fg2 = fg * fg
        poly = fg2 * fg2 * fg + fl * (2.69269 * fg2 * fg2 + fl * (2.42843 * fg2 * fg + fl * (
            4.47163 * fg2 + fl * (0.07842 * fg + fl))))
        dp_dfg = 5.0 * fg2 * fg2 + fl * (10.77076 * fg2 * fg + fl * (7.28529 * fg2 + fl * (
            8.94326 * fg + 0.07842 * fl)))
        dp_dfl = 2.69269 * fg2 * fg2 + fl * (4.85686 * fg2 * fg + fl * (13.41489 * fg2 + fl * (
            0.31368 * fg + 5.0 * fl)))
        f = tl.exp(tl.log(poly) * 0.2)
        r = fl / f
        eta = r * (1.36603 + r * (-0.47719 + 0.11116 * r))
        deta_dr = 1.36603 + r * (-0.95438 + 0.33348 * r)
        f_over_5p = f / (5.0 * poly)
        des = deta_dr * (-r / f * f_over_5p * dp_dfg * 2.3548)
        deg = deta_dr * (2.0 / f - r / f * f_over_5p * dp_dfl * 2.0)
        # the whole line's window (with the pseudo-Voigt's η for either profile, as the engine takes it):
        # the Lorentzian wing a η γ / (π d²) and the Gaussian core down to ε, at least 6σ + 6γ
        d_lor = tl.sqrt(a * eta * g * 0.3183098861837907 / tol)
        core = 6.0 * s + 6.0 * g
        whole = tl.maximum(tl.maximum(d_lor, _gauss_width(a, s, eta, tol)), tl.maximum(core, core * 0.0 + min_hw))
        if VOIGT:
            eta = g * 0.0 + 1.0
            des = g * 0.0
            deg = g * 0.0
        tl.store(eta_ptr + i, eta, mask=mask)
        tl.store(eta_ptr + n_lines + i, des, mask=mask)
        tl.store(eta_ptr + 2 * n_lines + i, deg, mask=mask)
        d_gau = _gauss_width(a, s, eta, tol)
        if FIXED:
            hw = tl.load(hw_ptr + i, mask=mask, other=0.0).to(tl.float64)
        else:
            hw = whole
        if FAR:
            b0 = tl.load(par_ptr + 3)
            ratio = tl.load(par_ptr + 4)
            log_ratio = tl.load(par_ptr + 5)
            top = tl.load(par_ptr + 6)
            q = g / b0
            lvl = tl.ceil(tl.log(tl.where(q < 1.0, q * 0.0 + 1.0, q)) / log_ratio - 1e-12)
            lvl = tl.where(lvl < 0.0, lvl * 0.0, lvl)
            if CAP:
                lvl = tl.where(lvl > top, lvl * 0.0 + top, lvl)
            else:
                lvl = tl.where(lvl > top, lvl * 0.0 - 1.0, lvl)
            # b r^l by repeated products (exact powers, as torch.pow of the integer level)
            pw = lvl * 0.0 + 1.0
            for k in tl.static_range(MAX_LEVEL):
                pw = tl.where(lvl > k, pw * ratio, pw)
            b = b0 * pw
            # a NaN width (a diverged fit) on no level, -1, as on the CPU (a GPU would convert NaN to 0)
            lvl_int = tl.where(lvl == lvl, lvl, tl.zeros_like(lvl) - 1.0).to(tl.int64)
            tl.store(lev_ptr + i, lvl_int, mask=mask)
            tl.store(b_ptr + i, b, mask=mask)
            if not FIXED:
                ca = tl.abs(sign * a * eta * g * 0.3183098861837907)
                if VOIGT:
                    k2 = b * b + g * g + 3.0 * s * s
                else:
                    k2 = b * b - g * g
                x6 = ca * k2 * k2 / tol
                d6 = tl.exp(tl.log(x6) * 0.16666666666666666)
                near = tl.maximum(d6, d_gau)
                if LINEAR:
                    near = tl.maximum(near, tl.sqrt(tl.sqrt(ca * ca / (2.0 * tol))))
                if VOIGT:
                    near = tl.maximum(near, 3.0 * b + 6.0 * s + 6.0 * g)
                near = tl.maximum(near, near * 0.0 + min_hw)
                hw = tl.where(lvl < 0.0, whole, near)
        if WINDOWS:
            start = _search(wl_ptr, c - hw, n_px, mask, RIGHT=False, STEPS=STEPS)
            end = _search(wl_ptr, c + hw, n_px, mask, RIGHT=True, STEPS=STEPS)
            count = tl.where(end > start, end - start, end * 0)
            tl.store(start_ptr + i, start, mask=mask)
            tl.store(count_ptr + i, count, mask=mask)
            tl.store(per_ptr + i, (count + (CHUNK_PX - 1)) // CHUNK_PX, mask=mask)
            if FAR:
                bad = mask & (lvl != lvl)  # NaN widths: as the torch checks, which see a negative level
                if not WHOLE:
                    bad = bad | (mask & (lvl < 0.0))
                if CHECK:
                    top_t = tl.zeros_like(lvl) + n_tab - 1.0  # (float64: see _stencil)
                    row = tl.where(lvl == lvl, lvl, tl.zeros_like(lvl))  # (NaN: flagged above)
                    row = tl.where(row < 0.0, row * 0.0, tl.where(row > top_t, row * 0.0 + top_t, row)).to(tl.int64)
                    r0 = tl.load(tab_ptr + 2 * row, mask=mask, other=0.0)
                    r1 = tl.load(tab_ptr + 2 * row + 1, mask=mask, other=0.0)
                    off = (c < r0) | (c > r1) | (lvl > top_t)
                    direct = tl.load(dlev_ptr + i, mask=mask, other=-2) == lvl_int
                    bad = bad | (mask & (lvl >= 0.0) & (off != direct))
                tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), axis=0))
        else:
            tl.store(lo_ptr + i, c - hw, mask=mask)
            tl.store(hi_ptr + i, c + hw, mask=mask)

    @triton.jit
    def _chunk_slots_kernel(ends_ptr, per_ptr, start_ptr, count_ptr, line_ptr, p0_ptr, p1_ptr, flag_ptr, n_lines,
                            capacity, STEPS: tl.constexpr, CHUNK_PX: tl.constexpr, BLOCK: tl.constexpr):
        """Slot k of the chunk table: its line (the first with more than k chunks up to and
        including it: ``ends_ptr`` holds the running sum of the chunks per line), first and end
        pixel; slots past the last chunk are empty. Raises the flag when the lines need more
        chunks than the ``capacity``."""
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = k < capacity
        total = tl.load(ends_ptr + n_lines - 1)
        line = _search(ends_ptr, k.to(tl.int64), n_lines, mask, RIGHT=True, STEPS=STEPS)
        line = tl.where(line > n_lines - 1, line * 0 + (n_lines - 1), line)
        before = tl.load(ends_ptr + line, mask=mask, other=0) - tl.load(per_ptr + line, mask=mask, other=0)
        first = tl.load(start_ptr + line, mask=mask, other=0)
        p0 = first + (k - before) * CHUNK_PX
        p1 = tl.where(k < total, first + tl.load(count_ptr + line, mask=mask, other=0), p0)
        tl.store(line_ptr + k, line, mask=mask)
        tl.store(p0_ptr + k, p0, mask=mask)
        tl.store(p1_ptr + k, p1, mask=mask)
        tl.atomic_max(flag_ptr, (total > capacity).to(tl.int32))


if HAVE_TRITON:

    @triton.jit
    def _stencil(p, n, M: tl.constexpr):
        """First stencil point k0 - (M - 1) and the clamped offset f of positions p (grid units)."""
        k0 = tl.floor(p)
        # a NaN position (a diverged fit) takes the first stencil, not an index outside the grid
        k0 = tl.where(p == p, k0, tl.zeros_like(p) + (M - 1.0))
        k0 = tl.where(k0 < M - 1.0, k0 * 0.0 + (M - 1.0), k0)
        # (an int scalar with a float constant is float32: the last start point is made from a
        # float64 zero)
        last = tl.zeros_like(k0) + n - (M + 1.0)
        k0 = tl.where(k0 > last, last, k0)
        f = p - k0
        inside = (f >= 1.0 - M) & (f <= M * 1.0)
        f = tl.where(f < 1.0 - M, f * 0.0 + (1.0 - M), f)
        f = tl.where(f > M * 1.0, f * 0.0 + M, f)
        return k0.to(tl.int64) - (M - 1), f, inside

    @triton.jit
    def _lagrange(f, q: tl.constexpr, M: tl.constexpr):
        """The Lagrange weight of stencil point q (offset q - (M - 1)) at offset f, and its derivative
        (the product rule, term by term)."""
        w = f * 0.0 + 1.0
        dw = f * 0.0
        den = 1
        for k in tl.static_range(2 * M):
            if k != q:
                dw = dw * (f - (k - (M - 1))) + w
                w = w * (f - (k - (M - 1)))
                den = den * (q - k)
        return w / den, dw / den

    @triton.jit
    def _spread_kernel(p_ptr, c_ptr, e_ptr, gc_ptr, ge_ptr, n_lines, n, M: tl.constexpr, BLOCK: tl.constexpr):
        """Each line adds c_j w_q and e_j w_q to the 2M grid points of its stencil (atomic adds)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_lines
        p = tl.load(p_ptr + i, mask=mask, other=M * 1.0)
        c = tl.load(c_ptr + i, mask=mask, other=0.0).to(tl.float64)
        e = tl.load(e_ptr + i, mask=mask, other=0.0).to(tl.float64)
        first, f, _ = _stencil(p, n, M)
        for q in tl.static_range(2 * M):
            # w_q = Π_{k≠q} (f - o_k) / Π_{k≠q} (o_q - o_k), o_k = k - (M - 1)
            w, dw = _lagrange(f, q, M)
            tl.atomic_add(gc_ptr + first + q, c * w, mask=mask)
            tl.atomic_add(ge_ptr + first + q, e * w, mask=mask)

    @triton.jit
    def _spread_backward_kernel(p_ptr, c_ptr, e_ptr, gc_ptr, ge_ptr, dp_ptr, dc_ptr, de_ptr, n_lines, n,
                                M: tl.constexpr, BLOCK: tl.constexpr):
        """∂/∂c_j = Σ_q w_q G_c, ∂/∂e_j = Σ_q w_q G_e, ∂/∂p_j = Σ_q w_q' (c_j G_c + e_j G_e) (zero
        where the position was clamped)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_lines
        p = tl.load(p_ptr + i, mask=mask, other=M * 1.0)
        c = tl.load(c_ptr + i, mask=mask, other=0.0).to(tl.float64)
        e = tl.load(e_ptr + i, mask=mask, other=0.0).to(tl.float64)
        first, f, inside = _stencil(p, n, M)
        dc = f * 0.0
        de = f * 0.0
        dp = f * 0.0
        for q in tl.static_range(2 * M):
            gc = tl.load(gc_ptr + first + q, mask=mask, other=0.0)
            ge = tl.load(ge_ptr + first + q, mask=mask, other=0.0)
            w, dw = _lagrange(f, q, M)
            dc += w * gc
            de += w * ge
            dp += dw * (c * gc + e * ge)
        tl.store(dc_ptr + i, dc, mask=mask)
        tl.store(de_ptr + i, de, mask=mask)
        tl.store(dp_ptr + i, tl.where(inside, dp, dp * 0.0), mask=mask)


if HAVE_TRITON:

    @triton.jit
    def _level_of(lev_ptr, i, mask, geo_ptr, lay_ptr, n_rows):
        """The grid of each line's far-field level: whether the line is spread (its level is
        evaluated), the grid's start and spacing (Å), length, offset in the buffer, row stride and
        the offset of the convolution's output in the rows of its backward pass."""
        lvl = tl.load(lev_ptr + i, mask=mask, other=-1)
        ok = mask & (lvl >= 0) & (lvl < n_rows)
        row = tl.where(ok, lvl, lvl * 0)
        lo = tl.load(geo_ptr + 2 * row, mask=ok, other=0.0)
        dx = tl.load(geo_ptr + 2 * row + 1, mask=ok, other=1.0)
        n = tl.load(lay_ptr + 4 * row, mask=ok, other=0)
        off = tl.load(lay_ptr + 4 * row + 1, mask=ok, other=0)
        stride = tl.load(lay_ptr + 4 * row + 2, mask=ok, other=0)
        shift = tl.load(lay_ptr + 4 * row + 3, mask=ok, other=0)
        return ok & (n > 0), lo, dx, n.to(tl.float64), off, stride, shift

    @triton.jit
    def _spread_levels_kernel(x_ptr, c_ptr, e_ptr, lev_ptr, geo_ptr, lay_ptr, n_rows, buf_ptr, n_lines,
                              M: tl.constexpr, BLOCK: tl.constexpr):
        """Every line spreads c_j and e_j onto the two rows of its level's grid (atomic adds)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_lines
        ok, lo, dx, n, off, stride, shift = _level_of(lev_ptr, i, mask, geo_ptr, lay_ptr, n_rows)
        x = tl.load(x_ptr + i, mask=mask, other=0.0)
        c = tl.load(c_ptr + i, mask=mask, other=0.0).to(tl.float64)
        e = tl.load(e_ptr + i, mask=mask, other=0.0).to(tl.float64)
        first, f, inside = _stencil((x - lo) / dx, n, M)
        at = buf_ptr + off + first
        for q in tl.static_range(2 * M):
            w, dw = _lagrange(f, q, M)
            tl.atomic_add(at + q, c * w, mask=ok, sem="relaxed")
            tl.atomic_add(at + stride + q, e * w, mask=ok, sem="relaxed")

    @triton.jit
    def _spread_levels_backward_kernel(x_ptr, c_ptr, e_ptr, lev_ptr, geo_ptr, lay_ptr, n_rows, grad_ptr, dx_ptr,
                                       dc_ptr, de_ptr, n_lines, M: tl.constexpr, BLOCK: tl.constexpr):
        """∂/∂c_j = Σ_q w_q G_c, ∂/∂e_j = Σ_q w_q G_e, ∂/∂λc,j = Σ_q w_q' (c_j G_c + e_j G_e) / Δx (zero
        where the position was clamped, and for the lines on no evaluated level)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_lines
        ok, lo, dx, n, off, stride, shift = _level_of(lev_ptr, i, mask, geo_ptr, lay_ptr, n_rows)
        x = tl.load(x_ptr + i, mask=mask, other=0.0)
        c = tl.load(c_ptr + i, mask=mask, other=0.0).to(tl.float64)
        e = tl.load(e_ptr + i, mask=mask, other=0.0).to(tl.float64)
        first, f, inside = _stencil((x - lo) / dx, n, M)
        at = grad_ptr + off + shift + first
        dc = f * 0.0
        de = f * 0.0
        dp = f * 0.0
        for q in tl.static_range(2 * M):
            gc = tl.load(at + q, mask=ok, other=0.0)
            ge = tl.load(at + stride + q, mask=ok, other=0.0)
            w, dw = _lagrange(f, q, M)
            dc += w * gc
            de += w * ge
            dp += dw * (c * gc + e * ge)
        zero = f * 0.0
        tl.store(dc_ptr + i, tl.where(ok, dc, zero), mask=mask)
        tl.store(de_ptr + i, tl.where(ok, de, zero), mask=mask)
        tl.store(dx_ptr + i, tl.where(ok & inside, dp / dx, zero), mask=mask)

    @triton.jit
    def _interpolate_kernel(conv_ptr, i0_ptr, w_ptr, base_ptr, out_ptr, n_out, M2: tl.constexpr,
                            BASE: tl.constexpr, NEG: tl.constexpr, BLOCK: tl.constexpr):
        """out_p = base_p ± Σ_q w[p, q] conv[i0_p + q]."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_out
        first = tl.load(i0_ptr + i, mask=mask, other=0)
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
        for q in tl.static_range(M2):
            acc += tl.load(w_ptr + i * M2 + q, mask=mask, other=0.0) * tl.load(conv_ptr + first + q, mask=mask,
                                                                               other=0.0)
        if NEG:
            acc = -acc
        if BASE:
            acc = tl.load(base_ptr + i, mask=mask, other=0.0) + acc
        tl.store(out_ptr + i, acc, mask=mask)

    @triton.jit
    def _interpolate_backward_kernel(grad_ptr, i0_ptr, w_ptr, gconv_ptr, n_out, M2: tl.constexpr,
                                     NEG: tl.constexpr, BLOCK: tl.constexpr):
        """The adjoint: every output point adds ± w[p, q] G_p to conv's gradient (atomic adds)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_out
        first = tl.load(i0_ptr + i, mask=mask, other=0)
        g = tl.load(grad_ptr + i, mask=mask, other=0.0)
        if NEG:
            g = -g
        for q in tl.static_range(M2):
            w = tl.load(w_ptr + i * M2 + q, mask=mask, other=0.0)
            tl.atomic_add(gconv_ptr + first + q, w * g, mask=mask, sem="relaxed")


if HAVE_TRITON:

    @triton.jit
    def _coefficients_kernel(a_ptr, s_ptr, g_ptr, eta_ptr, b_ptr, par_ptr, kc_ptr, ke_ptr, ga_ptr, gs_ptr, gg_ptr,
                             gkc_ptr, gke_ptr, n_lines, VOIGT: tl.constexpr, BACKWARD: tl.constexpr,
                             BLOCK: tl.constexpr):
        """c_j = ±a η γ / π and e_j = c_j (b_j² − γ² [+ 3σ² for the exact Voigt]), or (``BACKWARD``)
        the gradients of a loss in a, σ, γ from those in c_j and e_j. ``eta_ptr``: the rows η,
        ∂η/∂σ, ∂η/∂γ (unused for the exact Voigt, η = 1); ``par_ptr``: the sign (float64)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n_lines
        a = tl.load(a_ptr + i, mask=mask, other=0.0).to(tl.float64)
        s = tl.load(s_ptr + i, mask=mask, other=0.0).to(tl.float64)
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float64)
        b = tl.load(b_ptr + i, mask=mask, other=0.0).to(tl.float64)
        sign = tl.load(par_ptr + 0)
        if VOIGT:
            eta = g * 0.0 + 1.0
            des = g * 0.0
            deg = g * 0.0
            q = b * b - g * g + 3.0 * s * s
        else:
            eta = tl.load(eta_ptr + i, mask=mask, other=0.0).to(tl.float64)
            des = tl.load(eta_ptr + n_lines + i, mask=mask, other=0.0).to(tl.float64)
            deg = tl.load(eta_ptr + 2 * n_lines + i, mask=mask, other=0.0).to(tl.float64)
            q = b * b - g * g
        k = sign * 0.3183098861837907
        kc = k * a * eta * g
        if BACKWARD:
            gkc = tl.load(gkc_ptr + i, mask=mask, other=0.0).to(tl.float64)
            gke = tl.load(gke_ptr + i, mask=mask, other=0.0).to(tl.float64)
            # ∂e/∂x = q ∂c/∂x + c ∂q/∂x
            t = gkc + q * gke
            ds = k * a * g * des
            dg = k * a * (eta + g * deg)
            gs = t * ds
            if VOIGT:
                gs += gke * kc * 6.0 * s
            tl.store(ga_ptr + i, t * (k * eta * g), mask=mask)
            tl.store(gs_ptr + i, gs, mask=mask)
            tl.store(gg_ptr + i, t * dg - gke * kc * 2.0 * g, mask=mask)
        else:
            tl.store(kc_ptr + i, kc, mask=mask)
            tl.store(ke_ptr + i, kc * q, mask=mask)


class _CoefficientsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, s: Tensor, g: Tensor, eta: Tensor, b: Tensor, params: Tensor, voigt: bool):
        a_, s_, g_ = (t.detach().contiguous() for t in (a, s, g))
        kc = torch.empty(a_.shape, dtype=torch.float64, device=a_.device)
        ke = torch.empty_like(kc)
        if kc.numel():
            _coefficients_kernel[(triton.cdiv(kc.numel(), _COEF_BLOCK),)](
                a_, s_, g_, eta, b, params, kc, ke, kc, kc, kc, kc, kc, kc.numel(), VOIGT=bool(voigt), BACKWARD=False,
                BLOCK=_COEF_BLOCK, enable_fp_fusion=True)
        ctx.save_for_backward(a_, s_, g_, eta, b, params)
        ctx.voigt, ctx.dtype = bool(voigt), a.dtype
        return kc.to(a.dtype), ke.to(a.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gkc: Tensor, gke: Tensor):
        a_, s_, g_, eta, b, params = ctx.saved_tensors
        gkc = torch.zeros_like(a_) if gkc is None else gkc.contiguous()
        gke = torch.zeros_like(a_) if gke is None else gke.contiguous()
        out = [torch.empty(a_.shape, dtype=torch.float64, device=a_.device) for _ in range(3)]
        if a_.numel():
            _coefficients_kernel[(triton.cdiv(a_.numel(), _COEF_BLOCK),)](
                a_, s_, g_, eta, b, params, gkc, gkc, *out, gkc, gke, a_.numel(), VOIGT=ctx.voigt, BACKWARD=True,
                BLOCK=_COEF_BLOCK, enable_fp_fusion=True)
        return (*(t.to(ctx.dtype) for t in out), None, None, None, None)


_COEF_BLOCK = 256


def line_coefficients_triton(a: Tensor, s: Tensor, g: Tensor, eta: Tensor, b: Tensor, params: Tensor,
                             voigt: bool = False) -> tuple[Tensor, Tensor]:
    r"""The far-field coefficients :math:`c_j = \pm a_j\eta_j\gamma_j/\pi` and
    :math:`e_j = c_j(b_j^2-\gamma_j^2)` (:math:`+3\sigma_j^2` for the exact Voigt) in one Triton kernel,
    differentiable in a, σ, γ (one kernel backward). ``eta``: (3, L) rows η, ∂η/∂σ, ∂η/∂γ computed for
    these σ, γ (a window plan's buffer); ``b``: kernel widths b_j; ``params``: float64 tensor whose
    first element is the sign (+1 absorption, −1 emission)."""
    return _CoefficientsTriton.apply(a, s, g, eta.contiguous(), b.contiguous(), params, voigt)


class _SpreadConvolveTriton(torch.autograd.Function):
    """All far-field levels of a plan: the lines spread onto their levels' grids (one kernel) and
    each grid convolved with its two kernels (one batched real FFT of both rows, the products, one
    inverse FFT). Returns each level's convolution, shape (n_l,)."""

    @staticmethod
    def forward(ctx, centers: Tensor, c: Tensor, e: Tensor, levels: Tensor, layout):
        x = centers.detach().to(torch.float64).contiguous()
        c_, e_ = (t.detach().to(torch.float64).contiguous() for t in (c, e))
        lev = levels.contiguous()
        buf = torch.zeros(layout.total, dtype=torch.float64, device=x.device)
        if x.numel():
            _spread_levels_kernel[(triton.cdiv(x.numel(), _SPREAD_BLOCK),)](
                x, c_, e_, lev, layout.geo, layout.table, layout.geo.shape[0], buf, x.numel(), M=layout.m,
                BLOCK=_SPREAD_BLOCK, enable_fp_fusion=True)
        outs = []
        for off, n, nfft, spectra in layout.levels:
            z = torch.fft.rfft(buf[off : off + 2 * nfft].view(2, nfft), dim=1)
            outs.append(torch.fft.irfft((z * spectra).sum(0), nfft)[n - 1 : 2 * n - 1])
        ctx.save_for_backward(x, c_, e_, lev)
        ctx.layout, ctx.dtypes = layout, (centers.dtype, c.dtype, e.dtype)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, c_, e_, lev = ctx.saved_tensors
        layout = ctx.layout
        buf = torch.empty(layout.total, dtype=torch.float64, device=x.device)
        for (off, n, nfft, spectra), g in zip(layout.levels, grads):
            if g is None:
                buf[off : off + 2 * nfft].zero_()
                continue
            spec = torch.fft.rfft(g.to(torch.float64), nfft)
            torch.fft.irfft(spec * spectra, nfft, dim=1, out=buf[off : off + 2 * nfft].view(2, nfft))
        out = [torch.empty_like(x) for _ in range(3)]
        if x.numel():
            _spread_levels_backward_kernel[(triton.cdiv(x.numel(), _SPREAD_BLOCK),)](
                x, c_, e_, lev, layout.geo, layout.table, layout.geo.shape[0], buf, *out, x.numel(), M=layout.m,
                BLOCK=_SPREAD_BLOCK, enable_fp_fusion=True)
        return (*(t.to(dt) for t, dt in zip(out, ctx.dtypes)), None, None)


class _InterpolateTriton(torch.autograd.Function):
    """base ± Σ_q w[p, q] conv[i0_p + q] (base may be None), one kernel each way."""

    @staticmethod
    def forward(ctx, base, conv: Tensor, i0: Tensor, w: Tensor, neg: bool):
        conv_ = conv.detach().contiguous()
        out = torch.empty(i0.shape[0], dtype=torch.float64, device=conv.device)
        if out.numel():
            _interpolate_kernel[(triton.cdiv(out.numel(), _INTERP_BLOCK),)](
                conv_, i0, w, conv_ if base is None else base.detach().contiguous(), out, out.numel(), M2=w.shape[1],
                BASE=base is not None, NEG=bool(neg), BLOCK=_INTERP_BLOCK, enable_fp_fusion=True)
        ctx.save_for_backward(i0, w)
        ctx.n, ctx.neg, ctx.base = conv.shape[0], bool(neg), base is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        i0, w = ctx.saved_tensors
        grad = grad.contiguous()
        gconv = torch.zeros(ctx.n, dtype=torch.float64, device=grad.device)
        if grad.numel():
            _interpolate_backward_kernel[(triton.cdiv(grad.numel(), _INTERP_BLOCK),)](
                grad, i0, w, gconv, grad.numel(), M2=w.shape[1], NEG=ctx.neg, BLOCK=_INTERP_BLOCK,
                enable_fp_fusion=True)
        return grad if ctx.base else None, gconv, None, None, None


_INTERP_BLOCK = 256


def far_field_levels_triton(centers: Tensor, c: Tensor, e: Tensor, levels: Tensor, layout) -> tuple[Tensor, ...]:
    """Each evaluated level's convolution of the lines' spikes with its kernels (float64): the
    Triton path of a planned far field (:class:`.farfield.FarFieldPlan`; ``layout``: its
    ``triton`` attribute). Differentiable in ``centers``, ``c`` and ``e``."""
    return _SpreadConvolveTriton.apply(centers, c, e, levels, layout)


def interpolate_triton(base: Tensor | None, conv: Tensor, i0: Tensor, w: Tensor, neg: bool = False) -> Tensor:
    """``base`` (or 0) plus (``neg``: minus) the Lagrange interpolation Σ_q w[p, q] conv[i0_p + q],
    float64, differentiable in ``base`` and ``conv``."""
    return _InterpolateTriton.apply(base, conv, i0.contiguous(), w.contiguous(), neg)


class _SpreadTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos: Tensor, c: Tensor, e: Tensor, n: int, m: int):
        p64, c_, e_ = (x.detach().reshape(-1).to(torch.float64).contiguous() for x in (pos, c, e))
        gc = torch.zeros(n, dtype=torch.float64, device=pos.device)
        ge = torch.zeros_like(gc)
        if p64.numel():
            _spread_kernel[(triton.cdiv(p64.numel(), _SPREAD_BLOCK),)](p64, c_, e_, gc, ge, p64.numel(), n, M=m,
                                                                      BLOCK=_SPREAD_BLOCK, enable_fp_fusion=True)
        ctx.save_for_backward(p64, c_, e_)
        ctx.n, ctx.m, ctx.dtypes = n, m, (pos.dtype, c.dtype, e.dtype)
        return gc, ge

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_c: Tensor, grad_e: Tensor):
        p64, c_, e_ = ctx.saved_tensors
        gc = torch.zeros(ctx.n, dtype=torch.float64, device=p64.device) if grad_c is None else grad_c
        ge = torch.zeros(ctx.n, dtype=torch.float64, device=p64.device) if grad_e is None else grad_e
        gc, ge = (g.to(torch.float64).contiguous() for g in (gc, ge))
        out = [torch.empty_like(p64) for _ in range(3)]
        if p64.numel():
            _spread_backward_kernel[(triton.cdiv(p64.numel(), _SPREAD_BLOCK),)](
                p64, c_, e_, gc, ge, *out, p64.numel(), ctx.n, M=ctx.m, BLOCK=_SPREAD_BLOCK, enable_fp_fusion=True)
        return (*(g.to(dt) for g, dt in zip(out, ctx.dtypes)), None, None)


_SPREAD_BLOCK = 128


def spread_triton(pos: Tensor, c: Tensor, e: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """:func:`.cpu_kernel.spread_cpu` with Triton: spikes at grid positions ``pos`` spread with 2m-point
    Lagrange weights onto two grids of ``n`` points (float64), differentiable in ``pos``, ``c`` and
    ``e`` (a position clamped to the grid gets no gradient). One kernel each way, where the torch
    operations take about fifteen."""
    if not HAVE_TRITON:
        raise ImportError("the GPU kernel needs triton (it ships with the CUDA builds of torch): pip install triton")
    if not (1 <= int(m) and 2 * int(m) <= int(n)):
        raise ValueError(f"need 1 <= m and 2m <= n, got m={m}, n={n}")
    return _SpreadTriton.apply(pos, c, e, int(n), int(m))


def plan_lines_triton(c: Tensor, a: Tensor, s: Tensor, g: Tensor, params: Tensor, eta: Tensor, levels: Tensor,
                      b_line: Tensor, *, profile: str, far: bool, linear: bool, cap: bool, max_level: int,
                      half_widths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The per-line quantities of a window plan's update in one Triton kernel.

    Writes η, ∂η/∂σ, ∂η/∂γ into the rows of ``eta`` (3, L) and, with ``far``, each line's level and
    kernel width into ``levels`` and ``b_line``; returns the window ends λc ∓ w (float64).
    ``params``: float64 tensor of sign, ε, smallest half width, b, r, ln r and the top level.
    """
    n = c.numel()
    lo = torch.empty(n, dtype=torch.float64, device=c.device)
    hi = torch.empty_like(lo)
    block = 256
    _plan_lines_kernel[(triton.cdiv(n, block),)](
        c, a, s, g, lo if half_widths is None else half_widths, params, eta, levels, b_line, lo, hi, n,
        lo, 0, lo, lo, lo, lo, 0, lo, lo,
        VOIGT=profile == "voigt", FAR=bool(far), LINEAR=bool(linear), CAP=bool(cap),
        FIXED=half_widths is not None, MAX_LEVEL=max(1, int(max_level)), BLOCK=block, enable_fp_fusion=True)
    return lo, hi


def plan_windows_triton(c: Tensor, a: Tensor, s: Tensor, g: Tensor, params: Tensor, eta: Tensor, levels: Tensor,
                        b_line: Tensor, *, wavelength: Tensor, start: Tensor, count: Tensor, per_line: Tensor,
                        ends: Tensor, chunks: tuple[Tensor, Tensor, Tensor], flag: Tensor, chunk: int,
                        profile: str, far: bool, linear: bool, cap: bool, max_level: int,
                        half_widths: Tensor | None = None, spreadable: Tensor | None = None,
                        direct_level: Tensor | None = None, whole: bool = False) -> None:
    """A window plan's whole update in three kernels (where the torch operations take about fifty):
    what :func:`plan_lines_triton` computes, then each window's first pixel and pixel count (into
    ``start``, ``count``), the chunks per line (``per_line``; their running sum into ``ends``), the
    chunk table (``chunks``: line, first and end pixel of each slot) and the checks of the plan:
    ``flag`` (a 0-d int32 tensor) is raised where the lines outgrew it. Nothing is read back.

    ``spreadable`` and ``direct_level``: the far-field plan's table of the centres each level's grid
    can spread and the level that sums each line directly (:class:`.farfield.FarFieldPlan`), None
    without far field; ``whole``: the plan evaluates lines that are on no level."""
    n = c.numel()
    n_px = wavelength.numel()
    check = spreadable is not None
    block = 256
    _plan_lines_kernel[(triton.cdiv(n, block),)](
        c, a, s, g, start if half_widths is None else half_widths, params, eta, levels, b_line, start, start, n,
        wavelength, n_px, start, count, per_line, spreadable if check else wavelength,
        spreadable.shape[0] if check else 1, direct_level if check else start, flag,
        VOIGT=profile == "voigt", FAR=bool(far), LINEAR=bool(linear), CAP=bool(cap),
        FIXED=half_widths is not None, MAX_LEVEL=max(1, int(max_level)), BLOCK=block,
        WINDOWS=True, STEPS=max(1, int(n_px).bit_length()), CHECK=check, WHOLE=bool(whole), CHUNK_PX=int(chunk),
        enable_fp_fusion=True)
    torch.cumsum(per_line, 0, out=ends)
    capacity = chunks[0].numel()
    if capacity:
        _chunk_slots_kernel[(triton.cdiv(capacity, block),)](
            ends, per_line, start, count, *chunks, flag, n, capacity, STEPS=max(1, int(n).bit_length()),
            CHUNK_PX=int(chunk), BLOCK=block, enable_fp_fusion=True)


def _chunk_table(start: Tensor, count: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Line index, first and end pixel of every chunk of at most ``chunk`` pixels."""
    n_chunks = (count.clamp(min=0) + chunk - 1) // chunk
    line = torch.repeat_interleave(torch.arange(start.numel(), device=start.device), n_chunks)
    first = torch.cumsum(n_chunks, 0) - n_chunks
    k = torch.arange(line.numel(), device=start.device) - first[line]
    p0 = start[line] + k * chunk
    return line, p0, start[line] + count[line]


_CONSTANTS: dict = {}


def _voigt_constants(device) -> tuple[Tensor, Tensor, Tensor]:
    """Weideman's coefficients (then his L) and the asymptotic series' coefficients of w(z) and w'(z),
    on ``device`` (copied there once)."""
    import numpy as np

    from .cpu_kernel import _ASYM_C, _ASYM_D
    from .profiles import _W_COEFFS, _W_L

    key = str(device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = tuple(torch.as_tensor(x, dtype=torch.float64, device=device).contiguous()
                                for x in (np.append(_W_COEFFS, _W_L), _ASYM_C, _ASYM_D))
    return _CONSTANTS[key]


class _WindowedSumTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wavelength, start, count, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b, linear: bool,
                sign: float, voigt: bool, chunks, chunk: int, num_warps: int):
        f64 = [x.detach().reshape(-1).to(torch.float64).contiguous() for x in (c, a, s, g, eta, deta_ds, deta_dg)]
        n = start.numel()
        if kc is None:
            kc_ = ke_ = torch.zeros(n, dtype=torch.float64, device=wavelength.device)
            bb = torch.ones_like(kc_)  # any b > 0: h is then multiplied by c = e = 0
        else:
            kc_, ke_ = (x.detach().reshape(-1).to(torch.float64).contiguous() for x in (kc, ke))
            bb = (b.detach().reshape(-1).to(torch.float64) if isinstance(b, Tensor)
                  else torch.full((n,), float(b), dtype=torch.float64, device=wavelength.device)).contiguous()
        wl = wavelength.to(torch.float64).contiguous()
        if chunks is None:
            line, p0, p1 = _chunk_table(start.long(), count.long(), chunk)
            block = chunk
        else:
            line, p0, p1, block = chunks
        out = torch.zeros(wl.numel(), dtype=torch.float64, device=wl.device)
        consts = _voigt_constants(wl.device) if voigt else None
        if line.numel():
            grid = (line.numel(),)
            if voigt:
                _voigt_forward_kernel[grid](wl, line, p0, p1, *f64[:4], kc_, ke_, bb, out, *consts, SIGN=float(sign),
                                            **_voigt_sizes(consts), LINEAR=bool(linear), BLOCK=block,
                                            enable_fp_fusion=True)
            else:
                _forward_kernel[grid](wl, line, p0, p1, *f64[:5], kc_, ke_, bb, out, SIGN=float(sign),
                                      LINEAR=bool(linear), BLOCK=block, num_warps=num_warps, enable_fp_fusion=True)
        ctx.save_for_backward(wl, line, p0, p1, *f64, kc_, ke_, bb)
        ctx.linear, ctx.sign, ctx.n, ctx.voigt, ctx.block = bool(linear), float(sign), n, bool(voigt), block
        ctx.num_warps = num_warps
        ctx.dtypes = (c.dtype, a.dtype)
        return out.to(a.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        wl, line, p0, p1, c, a, s, g, eta, des, deg, kc_, ke_, bb = ctx.saved_tensors
        part = torch.zeros((line.numel(), 6), dtype=torch.float64, device=wl.device)
        grad = grad_out.to(torch.float64).contiguous()
        if line.numel():
            grid = (line.numel(),)
            if ctx.voigt:
                consts = _voigt_constants(wl.device)
                _voigt_backward_kernel[grid](grad, wl, line, p0, p1, c, a, s, g, kc_, ke_, bb, part, *consts,
                                             SIGN=ctx.sign, **_voigt_sizes(consts), LINEAR=ctx.linear,
                                             BLOCK=ctx.block, enable_fp_fusion=True)
            else:
                _backward_kernel[grid](grad, wl, line, p0, p1, c, a, s, g, eta, des, deg, kc_, ke_, bb, part,
                                       SIGN=ctx.sign, LINEAR=ctx.linear, BLOCK=ctx.block, num_warps=ctx.num_warps,
                                       enable_fp_fusion=True)
        sums = torch.zeros((ctx.n, 6), dtype=torch.float64, device=wl.device).index_add_(0, line, part)
        return (*compiled_kernel_gradients(ctx.needs_input_grad[:-3], list(sums.unbind(1)), ctx.dtypes),
                None, None, None)


def _voigt_sizes(consts) -> dict:
    return dict(NW=int(consts[0].numel()) - 1, NA=int(consts[1].numel()))


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
    profile: str = "pseudo-voigt",
    eta: tuple[Tensor, Tensor, Tensor] | None = None,
    chunks: tuple[Tensor, Tensor, Tensor, int] | None = None,
    chunk: int = 256,
    num_warps: int = 4,
) -> Tensor:
    """Sum of the fused line terms over per-line windows, with Triton.

    Arguments as :func:`.cpu_kernel.windowed_pseudo_voigt_sum_cpu` (the pseudo-Voigt or the exact
    Voigt, whose Faddeeva function is evaluated as there); the tensors may live on any device
    Triton runs on (a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``). ``chunks``: the chunk
    table (line, first pixel, end pixel of each chunk, int64) and its chunk length, a power of
    two, if the caller keeps one (:class:`.plan.WindowPlan`); it is made from ``start`` and
    ``count`` otherwise, of chunks of ``chunk`` pixels (a power of two). ``num_warps``: warps per
    Triton program of the pseudo-Voigt kernels. Both are settings of :class:`.options.EngineOptions`.
    """
    if not HAVE_TRITON:
        raise ImportError("the GPU kernel needs triton (it ships with the CUDA builds of torch): pip install triton")
    eta, deta_ds, deta_dg, b = compiled_kernel_arguments(mode, kc, ke, s, g, b, profile, eta)
    return _WindowedSumTriton.apply(wavelength, start, count, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b,
                                    mode == "linear", float(sign), profile == "voigt", chunks, int(chunk),
                                    int(num_warps))
