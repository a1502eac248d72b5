r"""A fused pseudo-Voigt line term with a hand-written backward pass.

For a block of lines (rows) and the pixels of their windows (columns) this computes

.. math::
    t = \ln(1 - s\,a V(x;\sigma,\gamma)) \quad\text{or}\quad t = -s\,a V, \qquad x = \lambda - \lambda_c,

in place, with few temporaries, and recomputes what the backward pass needs instead of keeping
the intermediates of every elementary operation. Gradients flow to λc (through x), a, σ and γ;
the pixel wavelengths carry none. It matches the autograd of the plain expressions to rounding
(tested), and ``torch.autograd.gradcheck`` passes in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .profiles import FWHM_GAUSSIAN_PER_SIGMA, pseudo_voigt_eta

__all__ = ["pseudo_voigt_term", "windowed_pseudo_voigt_sum"]

_MIN_ARG = -1.0 + 1e-12  # 1 - aV is floored at 1e-12 in linear mode
_INV_PI = 1.0 / math.pi
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _parts(wl: Tensor, c: Tensor, s: Tensor, g: Tensor):
    """x, Lorentzian L, Gaussian G for a block (fresh tensors).

    x = λ - λc is formed in the dtype of the wavelengths (float64) and then rounded to the
    working dtype of σ, γ.
    """
    x = (wl - c).to(s.dtype)
    x2 = x * x
    lor = (x2 + g * g).reciprocal_().mul_(g * _INV_PI)
    gau = x2.mul_(-0.5 / (s * s)).exp_().mul_(_INV_SQRT_2PI / s)
    return x, lor, gau


def _eta_and_derivatives(s: Tensor, g: Tensor):
    """η(σ, γ) and its partial derivatives ∂η/∂σ, ∂η/∂γ (detached), in closed form.

    With P(f_G, f_L) the Ida et al. polynomial, f = P^{1/5} and r = f_L/f:
    ∂f/∂x = f/(5P) ∂P/∂x, ∂r/∂σ = −r/f ∂f/∂σ, ∂r/∂γ = 2/f − r/f ∂f/∂γ, dη/dr = 1.36603 − 0.95438 r + 0.33348 r².
    """
    with torch.no_grad():
        fg = FWHM_GAUSSIAN_PER_SIGMA * s
        fl = 2.0 * g
        fg2 = fg * fg
        poly = fg2 * fg2 * fg + fl * (2.69269 * fg2 * fg2 + fl * (2.42843 * fg2 * fg + fl * (
            4.47163 * fg2 + fl * (0.07842 * fg + fl))))
        dp_dfg = 5.0 * fg2 * fg2 + fl * (4.0 * 2.69269 * fg2 * fg + fl * (3.0 * 2.42843 * fg2 + fl * (
            2.0 * 4.47163 * fg + 0.07842 * fl)))
        dp_dfl = 2.69269 * fg2 * fg2 + fl * (2.0 * 2.42843 * fg2 * fg + fl * (3.0 * 4.47163 * fg2 + fl * (
            4.0 * 0.07842 * fg + 5.0 * fl)))
        f = poly**0.2
        r = fl / f
        eta = r * (1.36603 + r * (-0.47719 + 0.11116 * r))
        deta_dr = 1.36603 + r * (-2.0 * 0.47719 + 3.0 * 0.11116 * r)
        f_over_5p = f / (5.0 * poly)
        dr_ds = -r / f * f_over_5p * dp_dfg * FWHM_GAUSSIAN_PER_SIGMA
        dr_dg = 2.0 / f - r / f * f_over_5p * dp_dfl * 2.0
    return eta, deta_dr * dr_ds, deta_dr * dr_dg


class _PseudoVoigtEta(torch.autograd.Function):
    """η(σ, γ) with the closed-form derivatives of :func:`_eta_and_derivatives` as its backward
    (two multiplications, where autograd of the polynomial would take dozens of operations)."""

    @staticmethod
    def forward(ctx, s: Tensor, g: Tensor):
        eta, deta_ds, deta_dg = _eta_and_derivatives(s, g)
        ctx.save_for_backward(deta_ds, deta_dg)
        ctx.mark_non_differentiable(deta_ds, deta_dg)
        return eta, deta_ds, deta_dg

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, _g1, _g2):
        deta_ds, deta_dg = ctx.saved_tensors
        return (grad * deta_ds if ctx.needs_input_grad[0] else None,
                grad * deta_dg if ctx.needs_input_grad[1] else None)


class _StoredEta(torch.autograd.Function):
    """η(σ, γ) computed earlier for these very σ, γ (by a window plan's update), with the same
    backward pass as :class:`_PseudoVoigtEta`."""

    @staticmethod
    def forward(ctx, s: Tensor, g: Tensor, eta: Tensor, deta_ds: Tensor, deta_dg: Tensor):
        ctx.save_for_backward(deta_ds, deta_dg)
        return eta.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        deta_ds, deta_dg = ctx.saved_tensors
        return (grad * deta_ds if ctx.needs_input_grad[0] else None,
                grad * deta_dg if ctx.needs_input_grad[1] else None, None, None, None)


def stored_eta(s: Tensor, g: Tensor, eta: Tensor, deta_ds: Tensor, deta_dg: Tensor) -> Tensor:
    """η, differentiable in σ and γ, from values of η, ∂η/∂σ, ∂η/∂γ already computed for them."""
    return _StoredEta.apply(s, g, eta, deta_ds, deta_dg)


def eta_and_derivatives(s: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""The pseudo-Voigt's Lorentzian fraction η(σ, γ), differentiable, with ∂η/∂σ and ∂η/∂γ
    (detached), computed once: pass the three to the compiled kernels as ``eta``."""
    return _PseudoVoigtEta.apply(s, g)


def _forward_block(wl, c, a, s, g, eta, kc, ke, b, linear: bool, sign: float) -> Tensor:
    """The line terms (or near-field residuals) of a block, shape (rows, m)."""
    x, lor, gau = _parts(wl, c, s, g)
    v = lor.mul_(eta).add_(gau.mul_(1.0 - eta))
    del gau
    v.mul_(-sign * a)
    if linear:
        v.clamp_(min=_MIN_ARG).log1p_()
    if kc is not None:
        # near-field residual: add back the far-field kernels c h + e h^2
        hb = x.mul_(x).add_(b * b).reciprocal_()
        v.add_(hb * (kc + ke * hb))
    return v


def _backward_block(grad_t, wl, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, b, linear: bool, sign: float,
                    needs: tuple):
    """Per-line gradients (rows, 1) of a block for λc, a, σ, γ, c_j, e_j (None where not needed)."""
    need_c, need_a, need_s, need_g, need_kc, need_ke = needs
    x, lor, gau = _parts(wl, c, s, g)
    v = eta * lor + (1.0 - eta) * gau
    # dt/dV and dt/da, folded with the incoming gradient
    if linear:
        arg = -sign * a * v
        denom = (1.0 + arg).reciprocal_()
        w = grad_t * denom  # grad * 1/(1 - s a V)
        w.masked_fill_(arg < _MIN_ARG, 0.0)  # floored transmission: no gradient
        del arg
    else:
        w = grad_t.clone()
    grad_a = (w * v).sum(1, keepdim=True).mul_(-sign) if need_a else None
    w.mul_(-sign * a)  # now grad * dt/dV
    x2g2 = x * x + g * g
    grad_c = grad_s = grad_g = grad_kc = grad_ke = None
    hb = None
    if kc is not None:
        hb = (x * x + b * b).reciprocal_()
        if need_kc:
            grad_kc = (grad_t * hb).sum(1, keepdim=True)
        if need_ke:
            grad_ke = (grad_t * hb * hb).sum(1, keepdim=True)
    if need_c:
        # dV/dx = -2 x eta L / (x^2+g^2) - (1-eta) G x / s^2 ; dx/dc = -1
        dvdx = (lor * eta * 2.0 / x2g2 + gau * (1.0 - eta) / (s * s)).mul_(-x)
        grad_c = -(w * dvdx).sum(1, keepdim=True)
        del dvdx
        if hb is not None:
            # d/dc of c h + e h^2 with h = 1/(x^2 + b^2): 2 x h^2 (kc + 2 ke h)
            grad_c = grad_c + (grad_t * (2.0 * x) * hb * hb * (kc + 2.0 * ke * hb)).sum(1, keepdim=True)
        grad_c = grad_c.to(c.dtype)
    lmg = lor - gau
    if need_s:
        dvds = gau * (1.0 - eta) * (x * x / (s * s * s) - 1.0 / s) + deta_ds * lmg
        grad_s = (w * dvds).sum(1, keepdim=True)
        del dvds
    if need_g:
        # dL/dg = L/g - 2 g L / (x^2+g^2)
        dvdg = eta * lor * (1.0 / g - 2.0 * g / x2g2) + deta_dg * lmg
        grad_g = (w * dvdg).sum(1, keepdim=True)
    return grad_c, grad_a, grad_s, grad_g, grad_kc, grad_ke


def check_term_arguments(mode: str, kc: Tensor | None, ke: Tensor | None) -> None:
    """Validate the mode and the far-field coefficients shared by the fused line-sum functions."""
    if mode not in ("linear", "log"):
        raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
    if (kc is None) != (ke is None):
        raise ValueError("give both kc and ke, or neither")


def compiled_kernel_arguments(mode: str, kc: Tensor | None, ke: Tensor | None, s: Tensor, g: Tensor,
                              b: float | Tensor, profile: str, eta: tuple | None = None):
    """Checks and per-line inputs shared by the compiled kernels (numba and Triton): η, ∂η/∂σ,
    ∂η/∂γ (zeros, unused, for the exact Voigt; ``eta`` if the caller has them already) and the
    far-field width(s) b, detached."""
    check_term_arguments(mode, kc, ke)
    if profile == "voigt":
        eta = deta_ds = deta_dg = torch.zeros_like(s)
    elif profile == "pseudo-voigt":
        eta, deta_ds, deta_dg = _eta_and_derivatives(s, g) if eta is None else (x.detach() for x in eta)
    else:
        raise ValueError(f"profile must be 'pseudo-voigt' or 'voigt', got {profile!r}")
    return eta, deta_ds, deta_dg, (b.detach() if isinstance(b, Tensor) else float(b))


#: Positions of λc, a, σ, γ, c_j, e_j among the inputs of the compiled kernels' autograd functions.
_GRAD_POSITIONS = (3, 4, 5, 6, 10, 11)


def compiled_kernel_gradients(needs: tuple, grads: list[Tensor], dtypes: tuple) -> tuple:
    """The backward's return value of a compiled kernel's autograd function: the six per-line
    gradients (λc, a, σ, γ, c_j, e_j) at their input positions, as (L, 1) in the dtype of λc
    (the first) or of a (the others), None where not needed."""
    out = [None] * len(needs)
    for k, (pos, grad) in enumerate(zip(_GRAD_POSITIONS, grads)):
        if needs[pos]:
            out[pos] = grad.to(dtype=dtypes[0] if k == 0 else dtypes[1]).reshape(-1, 1)
    return tuple(out)


class _PseudoVoigtTerm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wl: Tensor, c: Tensor, a: Tensor, s: Tensor, g: Tensor, kc, ke, b, linear: bool, sign: float):
        eta = pseudo_voigt_eta(s, g)
        v = _forward_block(wl, c, a, s, g, eta, kc, ke, b, linear, sign)
        ctx.save_for_backward(wl, c, a, s, g, kc, ke)
        ctx.linear = linear
        ctx.sign = sign
        ctx.b = b
        return v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_t: Tensor):
        wl, c, a, s, g, kc, ke = ctx.saved_tensors
        eta, deta_ds, deta_dg = _eta_and_derivatives(s, g)
        grads = _backward_block(grad_t, wl, c, a, s, g, eta, deta_ds, deta_dg, kc, ke, ctx.b, ctx.linear, ctx.sign,
                                tuple(ctx.needs_input_grad[1:7]))
        return (None, *grads, None, None, None)


def _rows(b, r: slice):
    """The far-field kernel width of a block of rows: one float, or each line's own (L, 1)."""
    return b[r] if isinstance(b, Tensor) else b


class _WindowedSum(torch.autograd.Function):
    """Σ_j t_j scattered onto the grid for lines with equal-length windows, block by block: neither
    the (lines × window) terms nor their gradients are ever held in memory at once."""

    @staticmethod
    def forward(ctx, wavelength, start, m: int, c, a, s, g, kc, ke, b, linear: bool, sign: float,
                block_rows: int):
        out = torch.zeros(wavelength.shape[0], dtype=a.dtype, device=a.device)
        offs = torch.arange(m, device=wavelength.device)
        eta = pseudo_voigt_eta(s, g)
        n = start.shape[0]
        for r0 in range(0, n, block_rows):
            r = slice(r0, min(n, r0 + block_rows))
            idx = start[r, None] + offs
            v = _forward_block(wavelength[idx], c[r], a[r], s[r], g[r], eta[r],
                               None if kc is None else kc[r], None if ke is None else ke[r], _rows(b, r), linear, sign)
            out.index_add_(0, idx.reshape(-1), v.reshape(-1))
        ctx.save_for_backward(wavelength, start, c, a, s, g, kc, ke)
        ctx.m, ctx.b, ctx.linear, ctx.sign, ctx.block_rows = m, b, linear, sign, block_rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        wavelength, start, c, a, s, g, kc, ke = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[3:9])
        eta, deta_ds, deta_dg = _eta_and_derivatives(s, g)
        offs = torch.arange(ctx.m, device=wavelength.device)
        n = start.shape[0]
        parts = []
        for r0 in range(0, n, ctx.block_rows):
            r = slice(r0, min(n, r0 + ctx.block_rows))
            idx = start[r, None] + offs
            parts.append(_backward_block(grad_out[idx], wavelength[idx], c[r], a[r], s[r], g[r], eta[r],
                                         deta_ds[r], deta_dg[r], None if kc is None else kc[r],
                                         None if ke is None else ke[r], _rows(ctx.b, r), ctx.linear, ctx.sign, needs))
        grads = [None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(6)]
        return (None, None, None, *grads, None, None, None, None)


def windowed_pseudo_voigt_sum(
    wavelength: Tensor,
    start: Tensor,
    m: int,
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
    block_elements: int,
) -> Tensor:
    """Sum over lines of their fused terms, each on its own window of ``m`` grid pixels.

    Equivalent to scattering :func:`pseudo_voigt_term` of the windows ``wavelength[start_j :
    start_j + m]`` onto the grid, but computed in blocks of lines, so that the temporaries stay in
    cache on CPUs and no (lines × m) array is kept for the backward pass.

    Parameters
    ----------
    wavelength : Tensor
        The grid (Å), shape (N,); no gradient.
    start : Tensor of int64
        First grid index of each line's window, shape (L,); ``start + m <= N``.
    m : int
        Window length in pixels (equal for all lines of one call).
    c, a, s, g, kc, ke, mode, sign, b
        As in :func:`pseudo_voigt_term`, shape (L, 1).
    block_elements : int
        Lines × pixels per block (:meth:`.EngineOptions.block_elements`): on CPUs small enough that
        the temporaries of one block stay in the core's cache (2^15, about 2 MB in float64), on GPUs
        a bound on the temporaries' memory (2^24; one block per bucket in practice).

    Returns
    -------
    Tensor
        Shape (N,).
    """
    check_term_arguments(mode, kc, ke)
    block_rows = max(1, int(block_elements) // max(int(m), 1))
    b = b.detach() if isinstance(b, Tensor) else float(b)
    return _WindowedSum.apply(wavelength, start, int(m), c, a, s, g, kc, ke, b, mode == "linear",
                              float(sign), block_rows)


def pseudo_voigt_term(
    wl: Tensor,
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
    """Fused line term for a (lines × pixels) block.

    Parameters
    ----------
    wl : Tensor
        Pixel wavelengths of each line's window, shape (L, m); no gradient.
    c, a, s, g : Tensor
        λc, a, σ, γ of the L lines, shape (L, 1).
    mode : {"linear", "log"}
    sign : float
        +1 absorption, -1 emission.
    kc, ke : Tensor, optional
        Far-field coefficients :math:`c_j`, :math:`e_j`, shape (L, 1): the term returned is then
        the near-field residual :math:`t + c_j h + e_j h^2` (see :mod:`.farfield`).
    b : float or Tensor
        Far-field kernel width (Å): one for all lines, or each line's own, shape (L, 1).
    """
    check_term_arguments(mode, kc, ke)
    b = b.detach() if isinstance(b, Tensor) else float(b)
    return _PseudoVoigtTerm.apply(wl, c, a, s, g, kc, ke, b, mode == "linear", float(sign))
