"""Line profiles: the pseudo-Voigt of blasé and an exact Voigt via the Faddeeva function.

All functions take offsets from the line centre, ``x = λ - λc`` (Å), and widths in Å, as
broadcastable torch tensors, and return a unit-area profile (Å⁻¹). They are differentiable
with respect to every argument and run on any device and floating dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FWHM_GAUSSIAN_PER_SIGMA",
    "gaussian",
    "lorentzian",
    "pseudo_voigt_eta",
    "pseudo_voigt_fwhm",
    "pseudo_voigt",
    "faddeeva",
    "voigt",
    "profile_fwhm",
    "wing_factor",
    "PROFILES",
]

#: Ratio of the Gaussian FWHM to its standard deviation as used by blasé 0.3 (f_G = 2.3548 σ).
FWHM_GAUSSIAN_PER_SIGMA = 2.3548

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SQRT_PI = math.sqrt(math.pi)


def gaussian(x: Tensor, sigma: Tensor) -> Tensor:
    r"""Unit-area Gaussian :math:`G(x;\sigma) = e^{-x^2/2\sigma^2}/(\sigma\sqrt{2\pi})`."""
    return torch.exp(-0.5 * (x / sigma) ** 2) / (sigma * _SQRT_2PI)


def lorentzian(x: Tensor, gamma: Tensor) -> Tensor:
    r"""Unit-area Lorentzian :math:`L(x;\gamma) = \gamma / \pi(x^2+\gamma^2)` (γ: half width)."""
    return gamma / (math.pi * (x * x + gamma * gamma))


def pseudo_voigt_fwhm(sigma: Tensor, gamma: Tensor) -> Tensor:
    r"""Combined FWHM :math:`f` of the pseudo-Voigt (Ida et al. 2000 polynomial).

    .. math::
        f = (f_G^5 + 2.69269 f_G^4 f_L + 2.42843 f_G^3 f_L^2 + 4.47163 f_G^2 f_L^3
             + 0.07842 f_G f_L^4 + f_L^5)^{1/5},

    with :math:`f_G = 2.3548\,\sigma` and :math:`f_L = 2\gamma`.
    """
    fg = FWHM_GAUSSIAN_PER_SIGMA * sigma
    fl = 2.0 * gamma
    fg2 = fg * fg
    # Horner form in f_L (one power, not ten: this runs for every line at every model evaluation)
    poly = fg2 * fg2 * fg + fl * (2.69269 * fg2 * fg2 + fl * (2.42843 * fg2 * fg + fl * (
        4.47163 * fg2 + fl * (0.07842 * fg + fl))))
    return poly**0.2


def pseudo_voigt_eta(sigma: Tensor, gamma: Tensor) -> Tensor:
    r"""Lorentzian fraction :math:`\eta = 1.36603 r - 0.47719 r^2 + 0.11116 r^3`, :math:`r = f_L/f`."""
    r = 2.0 * gamma / pseudo_voigt_fwhm(sigma, gamma)
    return r * (1.36603 + r * (-0.47719 + 0.11116 * r))


def pseudo_voigt(x: Tensor, sigma: Tensor, gamma: Tensor) -> Tensor:
    r"""The pseudo-Voigt profile used by blasé (and assumed by its saved clones).

    .. math::
        V(x) = \eta\, L(x; \gamma) + (1 - \eta)\, G(x; \sigma)

    where the Lorentzian and the Gaussian keep their *own* widths γ and σ and only the
    mixing fraction η depends on the combined FWHM. This is therefore not the Ida et al.
    approximation of the Voigt V(σ, γ) (which gives both components the combined width), but a
    shape of its own; it reduces to G(σ) as γ → 0 and to L(γ) as σ → 0.

    Parameters
    ----------
    x : Tensor
        Offset from the line centre, λ - λc (Å).
    sigma, gamma : Tensor
        Gaussian standard deviation σ and Lorentzian half width γ (Å), broadcastable with ``x``.

    Returns
    -------
    Tensor
        Unit-area profile values (Å⁻¹).
    """
    eta = pseudo_voigt_eta(sigma, gamma)
    return eta * lorentzian(x, gamma) + (1.0 - eta) * gaussian(x, sigma)


def _weideman_coefficients(n: int) -> np.ndarray:
    """Coefficients of Weideman's (1994) rational expansion of w(z), highest power first."""
    m = 2 * n
    k = np.arange(-m + 1, m)
    ell = math.sqrt(n / math.sqrt(2.0))
    theta = k * math.pi / m
    t = ell * np.tan(theta / 2.0)
    f = np.concatenate([[0.0], np.exp(-t * t) * (ell * ell + t * t)])
    a = np.real(np.fft.fft(np.fft.fftshift(f))) / (2 * m)
    return a[1 : n + 1][::-1].copy(), ell


_WEIDEMAN_N = 40
_W_COEFFS, _W_L = _weideman_coefficients(_WEIDEMAN_N)


_COEFFS_ON: dict = {}


def _coefficients_on(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The expansion's coefficients as a tensor, made once per dtype and device (a copy from host
    memory at every call would keep the exact Voigt out of CUDA graphs)."""
    key = (dtype, str(device))
    if key not in _COEFFS_ON:
        _COEFFS_ON[key] = torch.as_tensor(_W_COEFFS, dtype=dtype, device=device)
    return _COEFFS_ON[key]


def faddeeva(z: Tensor) -> Tensor:
    r"""The Faddeeva function :math:`w(z) = e^{-z^2}\operatorname{erfc}(-iz)` for Im z ≥ 0.

    Weideman's rational expansion with 40 terms, evaluated with complex torch operations so it is
    differentiable (w is analytic: :math:`w'(z) = -2 z w + 2i/\sqrt{\pi}`). Relative accuracy is
    better than 1e-12 over the upper half plane used by the Voigt profile.
    """
    ell = _W_L
    iz = 1j * z
    lmiz = ell - iz
    zz = (ell + iz) / lmiz
    coeffs = _coefficients_on(z.dtype, z.device)
    p = torch.zeros_like(zz) + coeffs[0]
    for c in coeffs[1:]:
        p = p * zz + c
    return 2.0 * p / (lmiz * lmiz) + (1.0 / _SQRT_PI) / lmiz


def voigt(x: Tensor, sigma: Tensor, gamma: Tensor) -> Tensor:
    r"""Exact Voigt profile :math:`V = \mathrm{Re}\,w(z)/(\sigma\sqrt{2\pi})`, :math:`z = (x + i\gamma)/(\sigma\sqrt2)`.

    Parameters
    ----------
    x : Tensor
        Offset from the line centre (Å).
    sigma, gamma : Tensor
        Gaussian standard deviation and Lorentzian half width (Å), both > 0.

    Returns
    -------
    Tensor
        Unit-area Voigt profile (Å⁻¹), real, with the dtype of ``x``.
    """
    ctype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    s2 = sigma * math.sqrt(2.0)
    z = torch.complex(x / s2, (gamma / s2).expand_as(x) if torch.is_tensor(gamma) else gamma / s2)
    w = faddeeva(z.to(ctype))
    return w.real / (sigma * _SQRT_2PI)


def profile_fwhm(sigma: Tensor, gamma: Tensor, profile: str = "pseudo-voigt", iterations: int = 60) -> Tensor:
    """True full width at half maximum (Å) of a line profile, by bisection.

    For the blasé pseudo-Voigt, whose Lorentzian and Gaussian keep their own widths, this differs
    from the Ida et al. combined width :func:`pseudo_voigt_fwhm` used only to set η.
    """
    fn = PROFILES[profile]
    sigma = torch.as_tensor(sigma)
    gamma = torch.as_tensor(gamma, dtype=sigma.dtype)
    sigma, gamma = torch.broadcast_tensors(sigma, gamma)
    with torch.no_grad():
        half = 0.5 * fn(torch.zeros_like(sigma), sigma, gamma)
        lo = torch.zeros_like(sigma)
        hi = 2.0 * (FWHM_GAUSSIAN_PER_SIGMA * sigma + 2.0 * gamma)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            above = fn(mid, sigma, gamma) > half
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
    return lo + hi


def wing_factor(x: Tensor, alpha: Tensor, transition: Tensor, scale: Tensor) -> Tensor:
    r"""The Appendix C.4 wing correction :math:`1 + (e^{lpha} - 1)\,\mathcal{S}((|x| - \lambda_t)/b)`
    that multiplies a broad line's profile.

    Parameters
    ----------
    x : Tensor
        Offsets λ − λc (Å), shape (L, M).
    alpha, transition, scale : Tensor
        α, λ_t and b (Å) of each row's line, shape (L,).
    """
    return 1.0 + torch.expm1(alpha)[:, None] * torch.sigmoid((x.abs() - transition[:, None]) / scale[:, None])


#: Profiles by name, as accepted by the clone model's ``profile=`` argument.
PROFILES = {"pseudo-voigt": pseudo_voigt, "voigt": voigt}
