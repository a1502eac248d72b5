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

from .profiles import pseudo_voigt_eta

__all__ = ["pseudo_voigt_term"]

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


class _PseudoVoigtTerm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wl: Tensor, c: Tensor, a: Tensor, s: Tensor, g: Tensor, kc, ke, b: float, linear: bool, sign: float):
        eta = pseudo_voigt_eta(s, g)
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
        del x
        ctx.save_for_backward(wl, c, a, s, g, kc, ke)
        ctx.linear = linear
        ctx.sign = sign
        ctx.b = b
        return v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_t: Tensor):
        wl, c, a, s, g, kc, ke = ctx.saved_tensors
        sign, linear = ctx.sign, ctx.linear
        with torch.enable_grad():
            s_ = s.detach().requires_grad_(True)
            g_ = g.detach().requires_grad_(True)
            eta_ = pseudo_voigt_eta(s_, g_)
            deta_ds, deta_dg = torch.autograd.grad(eta_.sum(), (s_, g_))
        eta = eta_.detach()
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
        grad_a = (w * v).sum(1, keepdim=True).mul_(-sign) if ctx.needs_input_grad[2] else None
        w.mul_(-sign * a)  # now grad * dt/dV
        x2g2 = x * x + g * g
        grad_c = grad_s = grad_g = grad_kc = grad_ke = None
        hb = None
        if kc is not None:
            hb = (x * x + ctx.b * ctx.b).reciprocal_()
            if ctx.needs_input_grad[5]:
                grad_kc = (grad_t * hb).sum(1, keepdim=True)
            if ctx.needs_input_grad[6]:
                grad_ke = (grad_t * hb * hb).sum(1, keepdim=True)
        if ctx.needs_input_grad[1]:
            # dV/dx = -2 x eta L / (x^2+g^2) - (1-eta) G x / s^2 ; dx/dc = -1
            dvdx = (lor * eta * 2.0 / x2g2 + gau * (1.0 - eta) / (s * s)).mul_(-x)
            grad_c = -(w * dvdx).sum(1, keepdim=True)
            del dvdx
            if hb is not None:
                # d/dc of c h + e h^2 with h = 1/(x^2 + b^2): 2 x h^2 (kc + 2 ke h)
                grad_c = grad_c + (grad_t * (2.0 * x) * hb * hb * (kc + 2.0 * ke * hb)).sum(1, keepdim=True)
        lmg = lor - gau
        if ctx.needs_input_grad[3]:
            dvds = gau * (1.0 - eta) * (x * x / (s * s * s) - 1.0 / s) + deta_ds * lmg
            grad_s = (w * dvds).sum(1, keepdim=True)
            del dvds
        if ctx.needs_input_grad[4]:
            # dL/dg = L/g - 2 g L / (x^2+g^2)
            dvdg = eta * lor * (1.0 / g - 2.0 * g / x2g2) + deta_dg * lmg
            grad_g = (w * dvdg).sum(1, keepdim=True)
        if grad_c is not None:
            grad_c = grad_c.to(c.dtype)
        return None, grad_c, grad_a, grad_s, grad_g, grad_kc, grad_ke, None, None, None


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
    b: float = 0.0,
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
    b : float
        Far-field kernel width (Å).
    """
    if mode not in ("linear", "log"):
        raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
    if (kc is None) != (ke is None):
        raise ValueError("give both kc and ke, or neither")
    return _PseudoVoigtTerm.apply(wl, c, a, s, g, kc, ke, float(b), mode == "linear", float(sign))
