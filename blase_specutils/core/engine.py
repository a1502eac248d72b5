r"""The sparse (line × pixel) engine: per-line windows that follow the (shifted) line centres.

The clone is a sum over lines in log-flux space (paper Eq. 5),

.. math::
    \ln S_\mathrm{clone}(\lambda_i) = \sum_j t_j(\lambda_i), \qquad
    t_j = \ln(1 - s\,a_j V_j) \ \text{(linear mode)} \quad\text{or}\quad t_j = -s\,a_j V_j
    \ \text{(log mode)},

with :math:`s = +1` for absorption and :math:`-1` for emission. Each line is evaluated only
on the pixels inside its own window. Window half widths are chosen per line from its current
parameters so that the profile has fallen below a tolerance ε at the window edge, and the
window is located on the grid by a binary search around the line's *current* centre each
time the model is evaluated: a radial-velocity shift moves the window with the line.

This module finds the windows and the far-field split; a **backend**
(:mod:`blase_specutils.core.backends`, picked once per model by
:func:`~blase_specutils.core.backends.select_backend`) sums the lines over their windows.
Autograd flows through the values; the indices carry no gradient.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .backends import Backend, LineSet, NearField, Windows, get_backend, select_backend
# the bucket helpers, the log1p floor and the dense reference moved to .backends; these names stay importable here
from .backends.autograd import Bucket as _Bucket  # noqa: F401
from .backends.autograd import bucket_sizes as _bucket_sizes  # noqa: F401
from .backends.autograd import buckets as _buckets  # noqa: F401
from .backends.autograd import padded_lengths as _padded_lengths  # noqa: F401
from .backends.base import MIN_LOG1P_ARG as _MIN_LOG1P_ARG  # noqa: F401
from .backends.base import ProfileFn, line_terms, profile_name
from .backends.dense import dense_log_flux
from .farfield import FarFieldSettings, residual_half_widths
from .farfield import far_field as _far_field
from .fused import eta_and_derivatives
from .options import BACKENDS, EngineOptions
from .profiles import pseudo_voigt, pseudo_voigt_eta

__all__ = ["window_half_widths", "windowed_log_flux", "dense_log_flux", "line_terms"]


@torch.no_grad()
def window_half_widths(
    amplitude: Tensor, sigma: Tensor, gamma: Tensor, tolerance: float, min_half_width: float = 0.0,
    eta: Tensor | None = None,
) -> Tensor:
    r"""Half width (Å) beyond which a line's profile term is below ``tolerance``.

    The Lorentzian wing :math:`a\eta\gamma/\pi d^2` and the Gaussian core
    :math:`a(1-\eta)G(d;\sigma)` are each solved for the distance where they fall to ε, and
    the larger is used, bounded below by ``min_half_width`` and by 6σ + 6γ. ``eta``: the
    pseudo-Voigt's η(σ, γ), if already computed.
    """
    if eta is None:
        eta = pseudo_voigt_eta(sigma, gamma)
    d_lor = torch.sqrt(amplitude * eta * gamma / (math.pi * tolerance))
    peak_g = amplitude * (1.0 - eta) / (sigma * math.sqrt(2.0 * math.pi))
    ratio = torch.clamp(peak_g / tolerance, min=1.0)
    d_gau = sigma * torch.sqrt(2.0 * torch.log(ratio))
    core = 6.0 * sigma + 6.0 * gamma
    return torch.maximum(torch.maximum(d_lor, d_gau), torch.clamp(core, min=min_half_width))


def windowed_log_flux(
    wavelength: Tensor,
    centers: Tensor,
    amplitude: Tensor,
    sigma: Tensor,
    gamma: Tensor,
    *,
    profile: ProfileFn,
    mode: str = "linear",
    sign: float = 1.0,
    tolerance: float = 1e-6,
    min_half_width: float = 0.0,
    half_widths: Tensor | None = None,
    wing: Callable[[Tensor, Tensor], Tensor] | None = None,
    wing_mask: Tensor | None = None,
    far_field: FarFieldSettings | None = None,
    fused: bool = True,
    kernel: str | None = None,
    engine: EngineOptions | None = None,
    backend: Backend | str | None = None,
) -> Tensor:
    r"""Sum of line terms over per-line windows: the sparse :math:`\ln \hat F` contraction.

    Parameters
    ----------
    wavelength : Tensor
        Strictly increasing grid (Å), shape (N_S,).
    centers, amplitude, sigma, gamma : Tensor
        Per-line (possibly shifted) centres λc (Å), areas a (Å), σ and γ (Å), shape (N_lines,).
    profile : callable
        ``profile(x, sigma, gamma)`` unit-area line shape.
    mode : {"linear", "log"}
        Eq. 2 (product of 1 - aV) or Eq. A2 (sum of opacities).
    sign : float
        +1 for absorption, -1 for emission.
    tolerance : float
        Each line's windowed term (or near-field residual) is evaluated out to where it falls
        below this value.
    min_half_width : float
        Smallest window half width (Å).
    half_widths : Tensor, optional
        Explicit per-line half widths (Å); overrides ``tolerance``.
    wing : callable, optional
        ``wing(x, line_index)`` multiplicative correction to the profile of some lines.
    wing_mask : Tensor of bool, optional
        Which lines have a wing correction (the others take the fused path). These lines are
        always evaluated in full windows, never through the far field.
    far_field : FarFieldSettings, optional
        Split the Lorentzian wings into a near-field residual (short windows) and an FFT far field
        summed over all lines (:mod:`blase_specutils.core.farfield`).
    fused : bool
        Sum the lines with the chosen backend's fused kernel; ``False`` sums them through plain
        autograd (the ``"autograd"`` backend).
    kernel : {"auto", "numba", "triton", "torch"}, optional
        Where the fused path runs, overriding ``engine.backend``: ``"numba"``, the compiled CPU
        loops of :mod:`blase_specutils.core.cpu_kernel` (pseudo-Voigt and exact Voigt; CPU tensors
        only); ``"triton"``, the GPU kernel of :mod:`blase_specutils.core.gpu_kernel` (pseudo-Voigt
        and exact Voigt; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"torch"``,
        blocked torch operations; ``"autograd"``, bucketed torch operations through autograd;
        ``"auto"``: :meth:`.EngineOptions.backend_for`.
    engine : EngineOptions, optional
        The backend and kernel settings (default ``EngineOptions()``).
    backend : Backend or str, optional
        The backend already picked for these lines (a model picks its own once,
        :attr:`.LineCloneModel.backend`); default: :func:`.backends.select_backend` of ``engine``.
        Lines with a wing correction, and profiles the backend has no kernel for, are summed by
        the ``"autograd"`` backend.

    Returns
    -------
    Tensor
        :math:`\ln S_\mathrm{clone}` on ``wavelength``, shape (N_S,).
    """
    n = wavelength.shape[0]
    out = torch.zeros(n, dtype=amplitude.dtype, device=wavelength.device)
    if centers.numel() == 0:
        return out
    if wing is None:
        wing_mask = None
    elif wing_mask is None:
        wing_mask = torch.ones(centers.shape, dtype=torch.bool, device=centers.device)
    engine = _engine_with_kernel(engine, kernel)
    main = _plain_line_backend(profile, wavelength.device, fused=fused, engine=engine, backend=backend)
    voigt = profile is not pseudo_voigt
    split = None if far_field is None else _far_field_split(
        wavelength, amplitude, sigma, gamma, far_field, sign=sign, voigt=voigt, capped=half_widths is not None,
        wing_mask=wing_mask)
    windows = _line_windows(wavelength, centers, amplitude, sigma, gamma, split=split, tolerance=tolerance,
                            min_half_width=min_half_width, half_widths=half_widths, mode=mode, voigt=voigt)
    lines = LineSet(centers, amplitude, sigma, gamma, profile, eta=None if split is None else split.eta_parts,
                    wing=wing, wing_mask=wing_mask)
    near = None if split is None else split.near
    kw = dict(mode=mode, sign=sign, near=near, engine=engine)
    if main is _AUTOGRAD or wing_mask is None:
        out = main.add_lines(out, wavelength, lines, windows, **kw)
    else:
        # the plain lines through the chosen backend, the wing-corrected ones through autograd
        out = main.add_lines(out, wavelength, lines, dataclasses.replace(windows, take=~wing_mask), **kw)
        out = _AUTOGRAD.add_lines(out, wavelength, lines, dataclasses.replace(windows, take=wing_mask), **kw)
    if split is not None:
        out = out + _far_field(wavelength, centers, near.kc, near.ke, far_field, split.levels,
                               engine=engine).to(out.dtype)
    return out


_AUTOGRAD = get_backend("autograd")


def _engine_with_kernel(engine: EngineOptions | None, kernel: str | None) -> EngineOptions:
    """The engine options, with the backend ``kernel`` names if it names one."""
    if kernel is not None and kernel not in BACKENDS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, BACKENDS))}, got {kernel!r}")
    engine = EngineOptions() if engine is None else engine
    return engine if kernel is None else engine.replace(backend=kernel)


def _plain_line_backend(profile: ProfileFn, device: torch.device, *, fused: bool, engine: EngineOptions,
                        backend: Backend | str | None) -> Backend:
    """The backend that sums the lines without a wing correction: ``backend`` if given, else the
    rule of :func:`.backends.select_backend`; ``"autograd"`` for plain autograd (``fused=False``)
    or a profile the chosen backend has no kernel for."""
    if not fused:
        return _AUTOGRAD
    if backend is None:
        backend = select_backend(engine, device)
    elif isinstance(backend, str):
        backend = get_backend(backend)
    return backend if backend.supports(profile_name(profile)) else _AUTOGRAD


@dataclass
class _FarSplit:
    """The near-field / far-field split of a set of lines (see :func:`_far_field_split`)."""

    near: NearField  # c_j, e_j (zero for lines evaluated whole) and b_j
    levels: Tensor  # each line's far-field level (-1: evaluated whole)
    eta: Tensor  # the pseudo-Voigt's η (ones for other profiles), differentiable
    eta_parts: tuple | None  # η (detached), ∂η/∂σ, ∂η/∂γ of the pseudo-Voigt
    whole: Tensor | None  # the lines evaluated in full windows, outside the far field


def _far_field_split(wavelength: Tensor, amplitude: Tensor, sigma: Tensor, gamma: Tensor,
                     far_field: FarFieldSettings, *, sign: float, voigt: bool, capped: bool,
                     wing_mask: Tensor | None) -> _FarSplit:
    """Find each line's far-field level and kernel width b_j, and its coefficients c_j, e_j."""
    eta_parts = None
    if voigt:
        eta = torch.ones_like(gamma)
    else:
        eta, *rest = eta_and_derivatives(sigma, gamma)
        eta_parts = (eta.detach(), *rest)
    kc = sign * amplitude * eta * gamma / math.pi
    with torch.no_grad():
        # each line's far-field level: a kernel at least as wide as the line (γ <= b r^l), since
        # the residual of a line much broader than its kernel, c(b²−γ²)²/d⁶, cancels the far field
        # to far below the FFT's accuracy; lines broader than the pixel span are evaluated whole
        n = wavelength.shape[0]
        span = float(wavelength[-1] - wavelength[0]) if n > 1 else far_field.b
        levels = far_field.line_levels(gamma.detach(), span, cap=capped)
        if wing_mask is not None:
            levels = torch.where(wing_mask, torch.full_like(levels, -1), levels)
        whole = levels < 0 if bool((levels < 0).any()) else wing_mask
        b_line = far_field.b * torch.pow(float(far_field.level_ratio), levels.clamp(min=0).to(torch.float64))
        b_line = b_line.to(amplitude.dtype)
    ke = kc * (b_line * b_line - gamma * gamma + (3.0 * sigma * sigma if voigt else 0.0))
    if whole is not None:
        kc = torch.where(whole, torch.zeros_like(kc), kc)
        ke = torch.where(whole, torch.zeros_like(ke), ke)
    return _FarSplit(NearField(kc, ke, b_line), levels, eta, eta_parts, whole)


@torch.no_grad()
def _line_windows(wavelength: Tensor, centers: Tensor, amplitude: Tensor, sigma: Tensor, gamma: Tensor, *,
                  split: _FarSplit | None, tolerance: float, min_half_width: float, half_widths: Tensor | None,
                  mode: str, voigt: bool) -> Windows:
    """Find each line's window on the grid by binary search around its current centre."""
    if half_widths is None:
        half_widths = _half_widths(amplitude, sigma, gamma, split=split, tolerance=tolerance,
                                   min_half_width=min_half_width, mode=mode, voigt=voigt)
    c = centers.detach()
    lo = torch.searchsorted(wavelength, c - half_widths)
    hi = torch.searchsorted(wavelength, c + half_widths, right=True)
    return Windows(lo, hi, hi - lo)


def _half_widths(amplitude: Tensor, sigma: Tensor, gamma: Tensor, *, split: _FarSplit | None, tolerance: float,
                 min_half_width: float, mode: str, voigt: bool) -> Tensor:
    """Each line's window half width (Å): out to where its term, or its near-field residual, is below ``tolerance``."""
    if split is None or split.whole is not None:
        hw = window_half_widths(amplitude, sigma, gamma, tolerance, min_half_width,
                                eta=None if split is None or split.eta_parts is None else split.eta_parts[0])
        if split is None:
            return hw
    near = split.near
    hw_near = residual_half_widths(amplitude, sigma, gamma, split.eta.detach(), near.kc.detach(), near.b_line,
                                   tolerance, mode, voigt=voigt)
    hw_near = torch.clamp(hw_near, min=min_half_width)
    return hw_near if split.whole is None else torch.where(split.whole, hw, hw_near)
