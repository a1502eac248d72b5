r"""What every backend provides: the sum of a set of lines over their windows, added onto pixels.

A backend puts lines onto pixels. It receives the lines (:class:`LineSet`: centres, areas and
widths, each of shape (L,)), each line's window on the grid (:class:`Windows`) and, when the far
field takes the Lorentzian wings, each line's far-field coefficients (:class:`NearField`), and
adds the lines' log-flux terms onto a running sum,

.. math::
    \mathrm{out}_i \mathrel{+}= \sum_j t_j(\lambda_i), \qquad
    t_j = \ln(1 - s\,a_j V_j) \ \text{(linear mode)} \quad\text{or}\quad t_j = -s\,a_j V_j
    \ \text{(log mode)},

(minus the far field's kernels :math:`c_j h + e_j h^2` when given), differentiably: the
gradients reach λc, a, σ, γ and the coefficients :math:`c_j`, :math:`e_j` through autograd.
Everything else (the windows, the far field, plans) is the engine's and is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..profiles import pseudo_voigt, voigt

__all__ = ["Backend", "LineSet", "Windows", "NearField", "line_terms", "profile_name"]

#: Floor of the argument of log1p in linear mode (1 - aV >= 1e-12).
MIN_LOG1P_ARG = -1.0 + 1e-12

ProfileFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def line_terms(v: Tensor, amplitude: Tensor, mode: str, sign: float) -> Tensor:
    """Per-pixel log-flux contribution :math:`t_j` of lines with profile values ``v``."""
    if mode == "linear":
        # a line cannot remove more than all the flux: transmission is floored at 1e-12
        return torch.log1p(torch.clamp(-sign * amplitude * v, min=MIN_LOG1P_ARG))
    if mode == "log":
        return -sign * amplitude * v
    raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")


def profile_name(profile: ProfileFn) -> str | None:
    """``"pseudo-voigt"`` or ``"voigt"`` for the package's two profiles, None for any other callable."""
    return {pseudo_voigt: "pseudo-voigt", voigt: "voigt"}.get(profile)


@dataclass(frozen=True)
class LineSet:
    """The lines to sum, each parameter of shape (L,).

    Attributes
    ----------
    centers, amplitude, sigma, gamma : Tensor
        λc (Å, possibly shifted), areas a (Å), σ and γ (Å).
    profile : callable
        ``profile(x, sigma, gamma)``, a unit-area line shape.
    eta : tuple of Tensor, optional
        η (detached), ∂η/∂σ and ∂η/∂γ of the pseudo-Voigt, if the engine computed them already.
    wing : callable, optional
        ``wing(x, line_index)``: a multiplicative correction of the profiles of the lines in
        ``wing_mask`` (the Appendix C.4 wings; only the ``"autograd"`` backend takes such lines).
    wing_mask : Tensor of bool, optional
        Which lines carry the correction.
    """

    centers: Tensor
    amplitude: Tensor
    sigma: Tensor
    gamma: Tensor
    profile: ProfileFn
    eta: tuple | None = None
    wing: Callable[[Tensor, Tensor], Tensor] | None = None
    wing_mask: Tensor | None = None

    @property
    def profile_name(self) -> str | None:
        """``"pseudo-voigt"``, ``"voigt"`` or None (another callable)."""
        return profile_name(self.profile)


@dataclass(frozen=True)
class Windows:
    """Each line's window on the grid: pixels ``lo`` to ``hi`` (exclusive), ``npix = hi - lo``.

    ``lo`` may be negative and ``hi`` beyond the grid (a window partly or wholly off the grid);
    ``take`` (bool, shape (L,)) marks the lines the backend is to sum, None for all of them.
    """

    lo: Tensor
    hi: Tensor
    npix: Tensor
    take: Tensor | None = None


@dataclass(frozen=True)
class NearField:
    r"""The far-field coefficients :math:`c_j`, :math:`e_j` and kernel width :math:`b_j` (Å) of
    every line, shape (L,): the backend then sums the near-field residual
    :math:`t_j + c_j h + e_j h^2`, :math:`h = 1/(x^2 + b_j^2)` (see :mod:`..farfield`)."""

    kc: Tensor
    ke: Tensor
    b_line: Tensor


@runtime_checkable
class Backend(Protocol):
    """A way to put lines onto pixels (one module each in :mod:`blase_specutils.core.backends`).

    Attributes
    ----------
    name : str
        The name :class:`~blase_specutils.core.options.EngineOptions` gives it.
    """

    name: str

    def supports(self, profile: str | None) -> bool:
        """Whether the backend sums lines of this profile (``"pseudo-voigt"``, ``"voigt"``, or
        None for a profile given as another callable)."""
        ...

    def runs_on(self, device: torch.device) -> bool:
        """Whether the backend runs on tensors of ``device`` in this process."""
        ...

    def add_lines(self, out: Tensor, wavelength: Tensor, lines: LineSet, windows: Windows, *, mode: str,
                  sign: float, near: NearField | None, engine) -> Tensor:
        """``out`` (shape (N,)) plus the terms of the lines ``windows.take`` marks, each over its
        window of ``wavelength`` (Å, shape (N,)); differentiable in ``lines`` and ``near``."""
        ...
