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

Lines are grouped into buckets of similar window length so that each bucket is one dense
(n_lines × n_pixels) block, gathered from the grid, evaluated, and scatter-added into the
per-pixel sum. Autograd flows through the values; the indices carry no gradient.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .farfield import FarFieldSettings, residual_half_widths
from .farfield import far_field as _far_field
from .cpu_kernel import windowed_pseudo_voigt_sum_cpu
from .gpu_kernel import windowed_pseudo_voigt_sum_triton
from .options import BACKENDS, EngineOptions
from .fused import eta_and_derivatives, windowed_pseudo_voigt_sum
from .profiles import pseudo_voigt, pseudo_voigt_eta, voigt

__all__ = ["window_half_widths", "windowed_log_flux", "dense_log_flux", "line_terms"]

#: Floor of the argument of log1p in linear mode (1 - aV >= 1e-12).
_MIN_LOG1P_ARG = -1.0 + 1e-12

ProfileFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def line_terms(v: Tensor, amplitude: Tensor, mode: str, sign: float) -> Tensor:
    """Per-pixel log-flux contribution :math:`t_j` of lines with profile values ``v``."""
    if mode == "linear":
        # a line cannot remove more than all the flux: transmission is floored at 1e-12
        return torch.log1p(torch.clamp(-sign * amplitude * v, min=_MIN_LOG1P_ARG))
    if mode == "log":
        return -sign * amplitude * v
    raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")


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


@dataclass
class _Bucket:
    lines: Tensor  # indices of the lines in this bucket
    npix: int  # window length in pixels


def _bucket_sizes(n_grid: int, growth: float = 1.25, quantum: int = 8) -> list[int]:
    sizes = []
    s = quantum
    while s < n_grid:
        sizes.append(s)
        s = int(math.ceil(s * growth / quantum) * quantum)
    sizes.append(n_grid)
    return sizes


def _padded_lengths(npix: Tensor, n_grid: int, quantum: int = 8) -> Tensor:
    """Each line's window length padded up to its bucket's length (see :func:`_buckets`)."""
    sizes_t = torch.tensor(_bucket_sizes(n_grid, quantum=quantum), device=npix.device)
    return sizes_t[torch.searchsorted(sizes_t, torch.clamp(npix, min=quantum, max=n_grid))]


def _buckets(npix: Tensor, n_grid: int, growth: float = 1.25, quantum: int = 8) -> list[_Bucket]:
    """Group lines by window length; every line is padded up to its bucket's length."""
    npix = torch.clamp(npix, min=quantum, max=n_grid)
    sizes = _bucket_sizes(n_grid, growth, quantum)
    sizes_t = torch.tensor(sizes, device=npix.device)
    which = torch.searchsorted(sizes_t, npix)
    out = []
    for b in torch.unique(which).tolist():
        lines = torch.nonzero(which == b).flatten()
        out.append(_Bucket(lines=lines, npix=int(sizes[b])))
    return out


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
        Use the fused pseudo-Voigt kernel with its hand-written backward
        (:mod:`blase_specutils.core.fused`) where it applies; ``False`` uses plain autograd.
    kernel : {"auto", "numba", "triton", "torch"}, optional
        Where the fused path runs, overriding ``engine.backend``: ``"numba"``, the compiled CPU
        loops of :mod:`blase_specutils.core.cpu_kernel` (pseudo-Voigt and exact Voigt; CPU tensors
        only); ``"triton"``, the GPU kernel of :mod:`blase_specutils.core.gpu_kernel` (pseudo-Voigt
        and exact Voigt; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"torch"``,
        blocked torch operations; ``"auto"``: :meth:`.EngineOptions.backend_for`.
    engine : EngineOptions, optional
        The backend and kernel settings (default ``EngineOptions()``).

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
    is_voigt = profile is not pseudo_voigt
    kc = ke = levels = b_line = None
    whole = wing_mask  # lines evaluated in full windows, outside the far field
    eta_parts = None  # η, ∂η/∂σ, ∂η/∂γ of the pseudo-Voigt, computed once for all the steps below
    if far_field is not None:
        if is_voigt:
            eta = torch.ones_like(gamma)
        else:
            eta, *rest = eta_and_derivatives(sigma, gamma)
            eta_parts = (eta.detach(), *rest)
        kc = sign * amplitude * eta * gamma / math.pi
        with torch.no_grad():
            # each line's far-field level: a kernel at least as wide as the line (γ <= b r^l), since
            # the residual of a line much broader than its kernel, c(b²−γ²)²/d⁶, cancels the far field
            # to far below the FFT's accuracy; lines broader than the pixel span are evaluated whole
            span = float(wavelength[-1] - wavelength[0]) if n > 1 else far_field.b
            levels = far_field.line_levels(gamma.detach(), span, cap=half_widths is not None)
            if wing_mask is not None:
                levels = torch.where(wing_mask, torch.full_like(levels, -1), levels)
            if bool((levels < 0).any()):
                whole = levels < 0
            b_line = far_field.b * torch.pow(float(far_field.level_ratio), levels.clamp(min=0).to(torch.float64))
            b_line = b_line.to(amplitude.dtype)
        ke = kc * (b_line * b_line - gamma * gamma + (3.0 * sigma * sigma if is_voigt else 0.0))
        if whole is not None:
            kc = torch.where(whole, torch.zeros_like(kc), kc)
            ke = torch.where(whole, torch.zeros_like(ke), ke)
    with torch.no_grad():
        if half_widths is None:
            if far_field is None or whole is not None:
                half_widths = window_half_widths(amplitude, sigma, gamma, tolerance, min_half_width,
                                                 eta=None if eta_parts is None else eta_parts[0])
            if far_field is not None:
                hw_near = residual_half_widths(amplitude, sigma, gamma, eta.detach(), kc.detach(), b_line,
                                               tolerance, mode, voigt=is_voigt)
                hw_near = torch.clamp(hw_near, min=min_half_width)
                half_widths = hw_near if whole is None else torch.where(whole, half_widths, hw_near)
        c = centers.detach()
        lo = torch.searchsorted(wavelength, c - half_widths)
        hi = torch.searchsorted(wavelength, c + half_widths, right=True)
        npix = hi - lo
    terms = []
    idxs = []
    if kernel is not None and kernel not in BACKENDS:
        raise ValueError(f"kernel must be 'auto', 'numba', 'triton' or 'torch', got {kernel!r}")
    engine = EngineOptions() if engine is None else engine
    if kernel is not None:
        engine = engine.replace(backend=kernel)
    on_cpu = wavelength.device.type == "cpu"
    choice = engine.backend_for(wavelength.device)
    compiled = None  # the compiled kernel that takes every plain line, if any
    name = {pseudo_voigt: "pseudo-voigt", voigt: "voigt"}.get(profile)
    if fused and name is not None and choice == "numba" and on_cpu:
        compiled = functools.partial(windowed_pseudo_voigt_sum_cpu, profile=name)
    elif fused and name is not None and choice == "triton":
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernel='triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); "
                             "use kernel='numba' or 'auto' on a CPU")
        compiled = functools.partial(windowed_pseudo_voigt_sum_triton, profile=name, chunk=engine.chunk,
                                     num_warps=engine.num_warps)
    if compiled is not None:
        # every plain line in one compiled pass over its window
        with torch.no_grad():
            rows = (hi > 0) & (lo < n) & (npix > 0)
            if wing_mask is not None:
                rows &= ~wing_mask
        if bool(rows.any()):
            if bool(rows.all()):
                s_ = None  # every line: views, no gathers

                def pick(t: Tensor) -> Tensor:
                    return t[:, None]
            else:
                s_ = torch.nonzero(rows).flatten()

                def pick(t: Tensor) -> Tensor:
                    return t[s_, None]
            with torch.no_grad():
                lo_, hi_, np_ = (lo, hi, npix) if s_ is None else (lo[s_], hi[s_], npix[s_])
                if engine.pad_windows:
                    # the padded windows of the bucketed torch path, so that both give the same sums
                    count = _padded_lengths(np_, n)
                    start = torch.clamp(lo_ - (count - np_.clamp(max=count)) // 2, min=0)
                    start = torch.minimum(start, n - count)
                else:
                    start = lo_.clamp(min=0)
                    count = hi_.clamp(max=n) - start
            out = out + compiled(
                wavelength, start, count, pick(centers), pick(amplitude), pick(sigma), pick(gamma),
                mode=mode, sign=sign, kc=None if kc is None else pick(kc), ke=None if ke is None else pick(ke),
                b=0.0 if b_line is None else pick(b_line),
                eta=None if eta_parts is None else tuple(pick(t) for t in eta_parts))
        if wing_mask is None:
            npix = npix[:0]  # nothing left for the bucket loop
    for bucket in _buckets(npix, n):
        sel = bucket.lines
        m = bucket.npix
        with torch.no_grad():
            # centre each padded window on its line's own window, then keep it on the grid
            start = lo[sel] - (m - npix[sel].clamp(max=m)) // 2
            start = torch.clamp(start, min=0, max=n - m)
            # windows of lines far outside the grid: no pixels at all
            offgrid = (hi[sel] <= 0) | (lo[sel] >= n)
        if bool(offgrid.all()):
            continue
        has = None if wing_mask is None else wing_mask[sel]
        if compiled is not None:
            if not bool((has & ~offgrid).any()):
                continue
            rows = has & ~offgrid
        elif fused and not is_voigt:
            # the plain pseudo-Voigt lines: blocked, fused kernel straight onto the grid
            rows = ~offgrid if has is None else (~offgrid & ~has)
            if bool(rows.any()):
                s_ = sel[rows]
                out = out + windowed_pseudo_voigt_sum(
                    wavelength, start[rows], m, centers[s_, None], amplitude[s_, None], sigma[s_, None],
                    gamma[s_, None], mode=mode, sign=sign, kc=None if kc is None else kc[s_, None],
                    ke=None if ke is None else ke[s_, None], b=0.0 if b_line is None else b_line[s_, None],
                    block_elements=engine.block_elements(wavelength.device))
            if has is None or not bool((has & ~offgrid).any()):
                continue
            rows = has & ~offgrid
        else:
            rows = ~offgrid
        # lines with a wing correction, the exact Voigt, or the plain-autograd reference path
        s_ = sel[rows]
        with torch.no_grad():
            idx = start[rows, None] + torch.arange(m, device=wavelength.device)[None, :]
        x = (wavelength[idx] - centers[s_, None]).to(amplitude.dtype)
        v = profile(x, sigma[s_, None], gamma[s_, None])
        wrows = None if has is None else has[rows]
        if wrows is not None and bool(wrows.any()):
            corr = wing(x[wrows], s_[wrows])
            v = torch.cat([v[~wrows], v[wrows] * corr]) if not bool(wrows.all()) else v * corr
            if not bool(wrows.all()):
                order = torch.cat([torch.nonzero(~wrows).flatten(), torch.nonzero(wrows).flatten()])
                idx, x, s_ = idx[order], x[order], s_[order]
                wrows = wrows[order]
        t = line_terms(v, amplitude[s_, None], mode, sign)
        if kc is not None:
            # near-field residual for lines without a wing correction (those have kc = ke = 0)
            hb = 1.0 / (x * x + b_line[s_, None] ** 2)
            t = t + hb * (kc[s_, None] + ke[s_, None] * hb)
        terms.append(t.reshape(-1))
        idxs.append(idx.reshape(-1))
    if terms:
        out = out.index_add(0, torch.cat(idxs), torch.cat(terms))
    if far_field is not None:
        out = out + _far_field(wavelength, centers, kc, ke, far_field, levels, engine=engine).to(out.dtype)
    return out


def dense_log_flux(
    wavelength: Tensor,
    centers: Tensor,
    amplitude: Tensor,
    sigma: Tensor,
    gamma: Tensor,
    *,
    profile: ProfileFn,
    mode: str = "linear",
    sign: float = 1.0,
    chunk_elements: int = 2**24,
    wing: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Every line at every pixel, in chunks of pixels: the untruncated reference (slow)."""
    n_lines = max(int(centers.numel()), 1)
    step = max(1, chunk_elements // n_lines)
    pieces = []
    all_lines = torch.arange(centers.numel(), device=wavelength.device)
    for i in range(0, wavelength.shape[0], step):
        w = wavelength[i : i + step]
        x = (w[None, :] - centers[:, None]).to(amplitude.dtype)
        v = profile(x, sigma[:, None], gamma[:, None])
        if wing is not None:
            v = v * wing(x, all_lines)
        pieces.append(line_terms(v, amplitude[:, None], mode, sign).sum(0))
    if not pieces:
        return torch.zeros(0, dtype=amplitude.dtype, device=wavelength.device)
    return torch.cat(pieces)
