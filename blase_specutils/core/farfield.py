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
O((Δ/b)⁶) with the default 6-point stencils). Lines too far outside the pixels to be spread onto
that grid (beyond its margin) are summed directly, :math:`-\sum_j [c_j h + e_j h_2]` at every pixel.
Each line then only needs its *near-field residual*
:math:`t_j + c_j h + e_j h_2`, which decays like :math:`d^{-6}`, inside a short window. The
split is exact in the sense that nothing is neglected but that fast-decaying residual beyond
the window and the discretisation of the far field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .cpu_kernel import HAVE_NUMBA, interpolate_cpu

__all__ = ["FarFieldSettings", "far_field", "residual_half_widths"]


@dataclass(frozen=True)
class FarFieldSettings:
    """Kernel width *b*, grid spacing Δ and grid margin (Å) of the far field, and the number of
    points of the Lagrange stencils used to spread the lines onto the grid and to interpolate the
    result back to the pixels (errors of O((Δ/b)^order))."""

    b: float
    spacing: float
    margin: float = 50.0
    order: int = 6

    def __post_init__(self):
        if not (self.b > 0 and self.spacing > 0 and self.margin >= 0):
            raise ValueError("far-field b and spacing must be > 0 and margin >= 0")
        if self.order not in (2, 4, 6, 8):
            raise ValueError("far-field order must be 2, 4, 6 or 8 (points of the Lagrange stencil)")

    @classmethod
    def for_grid(
        cls, wavelength: Tensor, b_pixels: float = 50.0, spacing_pixels: float = 2.0, order: int = 6
    ) -> "FarFieldSettings":
        """Settings scaled to the median pixel size of ``wavelength``: b = 50 px, Δ = 2 px."""
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


def far_field(wavelength: Tensor, centers: Tensor, c: Tensor, e: Tensor, settings: FarFieldSettings) -> Tensor:
    r"""The far field :math:`T(\lambda) = -\sum_j [c_j h(\lambda-\lambda_{c,j}) + e_j h_2(\lambda-\lambda_{c,j})]`.

    Parameters
    ----------
    wavelength : Tensor
        Increasing pixel wavelengths (Å), shape (N,).
    centers, c, e : Tensor
        Line centres (Å) and the coefficients :math:`c_j`, :math:`e_j`, shape (L,). Autograd flows
        to all three (to the centres through the spreading weights).
    settings : FarFieldSettings

    Returns
    -------
    Tensor
        T on ``wavelength``, shape (N,).
    """
    if centers.numel() == 0:
        return torch.zeros_like(wavelength)
    c_all, e_all = c, e
    dx, b = settings.spacing, settings.b
    lo = float(wavelength[0]) - settings.margin
    hi = float(wavelength[-1]) + settings.margin
    n = int(math.ceil((hi - lo) / dx)) + 2
    nfft = _next_fast_len(2 * n - 1)
    # spread the coefficients onto the grid with Lagrange weights (moments exact to order 2m-1)
    m = settings.order // 2
    p = (centers - lo) / dx
    # lines beyond the grid's margin cannot be spread onto it (clamping would move them to its edge)
    inside = (p.detach() >= m - 1) & (p.detach() <= n - m)
    outside = None
    if not bool(inside.all()):
        outside = torch.nonzero(~inside).flatten()
        c = torch.where(inside, c, torch.zeros_like(c))
        e = torch.where(inside, e, torch.zeros_like(e))
    k0 = torch.clamp(torch.floor(p.detach()), m - 1, n - m - 1)
    f = torch.clamp(p - k0, -float(m - 1), float(m))
    k0 = k0.long()
    offsets = list(range(-(m - 1), m + 1))
    wts = _lagrange_weights(f, offsets)
    grid_c = torch.zeros(n, dtype=torch.promote_types(c.dtype, f.dtype), device=wavelength.device)
    grid_e = torch.zeros_like(grid_c)
    for off, wk in zip(offsets, wts):
        grid_c = grid_c.index_add(0, k0 + off, c * wk)
        grid_e = grid_e.index_add(0, k0 + off, e * wk)
    hk, h2k = _kernel_ffts(n, nfft, dx, b, grid_c.dtype, wavelength.device)
    spec = torch.fft.rfft(grid_c, nfft) * hk + torch.fft.rfft(grid_e, nfft) * h2k
    conv = torch.fft.irfft(spec, nfft)[n - 1 : 2 * n - 1]
    # Lagrange interpolation of the same order to the pixels (fixed weights, cached per grid)
    idx, iw = _interpolation_plan(wavelength, lo, dx, n, m, grid_c.dtype)
    if conv.device.type == "cpu" and HAVE_NUMBA:
        val = interpolate_cpu(conv, idx[:, 0], iw)
    else:
        val = (conv[idx] * iw).sum(1)
    if outside is not None:
        val = val + _direct_sum(wavelength, centers[outside], c_all[outside], e_all[outside], b).to(val.dtype)
    return -val


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


@torch.no_grad()
def _interpolation_plan(wavelength: Tensor, lo: float, dx: float, n: int, m: int, dtype):
    """Grid indices (N, 2m) and Lagrange weights (N, 2m) that interpolate the far-field grid to
    the pixels; they depend on the pixels and the grid only, so they are kept for the next call."""
    key = (wavelength.data_ptr(), wavelength.numel(), wavelength._version, float(wavelength.sum()), lo, dx, n, m, dtype,
           str(wavelength.device))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit
    offsets = list(range(-(m - 1), m + 1))
    q = (wavelength - lo) / dx
    i0 = torch.clamp(torch.floor(q), m - 1, n - m - 1).long()
    iw = torch.stack(_lagrange_weights((q - i0).to(dtype), offsets), dim=1)
    idx = i0[:, None] + torch.tensor(offsets, device=wavelength.device)
    if len(_PLAN_CACHE) > 8:
        _PLAN_CACHE.clear()
    _PLAN_CACHE[key] = (idx, iw)
    return idx, iw


def _lagrange_weights(f: Tensor, offsets: list[int]) -> list[Tensor]:
    """Lagrange basis weights of the grid points at ``offsets`` for a position ``f`` (in grid units)."""
    out = []
    for j in offsets:
        w = torch.ones_like(f)
        for k in offsets:
            if k != j:
                w = w * (f - k) / (j - k)
        out.append(w)
    return out


@torch.no_grad()
def residual_half_widths(
    amplitude: Tensor,
    sigma: Tensor,
    gamma: Tensor,
    eta: Tensor,
    c: Tensor,
    b: float,
    tolerance: float,
    mode: str,
    voigt: bool = False,
) -> Tensor:
    r"""Half widths (Å) beyond which a line's near-field residual is below ``tolerance``.

    The larger of: the :math:`d^{-6}` residual :math:`|c|(b^2+\gamma^2+3\sigma^2)^2/d^6`, the
    Gaussian core :math:`a(1-\eta)G(d)`, the second-order term of linear mode
    :math:`c^2/2d^4`, and 3b + 6σ + 6γ (the expansion holds only well beyond b).
    """
    ca = c.abs()
    k = (b * b + gamma * gamma + (3.0 * sigma * sigma if voigt else 0.0)) ** 2
    d6 = (ca * k / tolerance) ** (1.0 / 6.0)
    peak_g = amplitude * (1.0 - eta) / (sigma * math.sqrt(2.0 * math.pi))
    d_g = sigma * torch.sqrt(2.0 * torch.log(torch.clamp(peak_g / tolerance, min=1.0)))
    w = torch.maximum(d6, d_g)
    if mode == "linear":
        w = torch.maximum(w, (ca * ca / (2.0 * tolerance)) ** 0.25)
    return torch.maximum(w, 3.0 * b + 6.0 * sigma + 6.0 * gamma)
