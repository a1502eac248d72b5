r"""The blasé clone: a differentiable sea of pseudo-Voigt (or Voigt) lines.

Linear mode (paper Eq. 2) and log mode (Eq. A2):

.. math::
    S_\mathrm{clone} = \prod_j (1 - a_j V_j) \qquad
    \ln S_\mathrm{clone} = -\sum_j a_j V_j .

Amplitudes and widths are tuned in log space (:math:`\ln a`, :math:`\ln\sigma`,
:math:`\ln\gamma`) so they stay positive; emission lines flip the sign. The line centres
:math:`\lambda_c` are fixed unless asked for. A radial velocity shifts every centre by
:math:`\lambda_c (1 + v/c)`, so the windows of the sparse engine follow the shifted lines.

The few broadest lines can carry the wing correction of Appendix C.4,

.. math::
    \tilde V = V\,\left[1 + (e^{\alpha_j} - 1)\,
    \mathcal{S}\!\left(\frac{|\lambda - \lambda_{c,j}| - \lambda_{t,j}}{b_j}\right)\right],

with the sigmoid :math:`\mathcal{S}`, letting their far wings become sub- or super-Lorentzian.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .backends import Backend, select_backend
from .clone_editing import LineEditing, _as_tensor
from .clone_planning import Planning
from .engine import dense_log_flux, window_half_widths, windowed_log_flux
from .farfield import FarFieldSettings
from .options import EngineOptions
from .plan import ClonePlan, WindowPlan
from .profiles import PROFILES, pseudo_voigt_fwhm, wing_factor

__all__ = ["LineCloneModel", "SPEED_OF_LIGHT_KMS", "TUNABLE"]

#: Speed of light in km/s.
SPEED_OF_LIGHT_KMS = 299792.458

#: Names of the per-line parameters that can be tuned.
TUNABLE = ("center", "amplitude", "sigma", "gamma", "wing")


class LineCloneModel(LineEditing, Planning, nn.Module):
    r"""A clone of a spectrum as N_lines tunable line profiles.

    Parameters
    ----------
    lam_centers : array_like
        Line centres :math:`\lambda_c` (Å, vacuum), shape (N_lines,).
    log_amplitudes, log_sigmas, log_gammas : array_like
        :math:`\ln a` (a: line area, Å), :math:`\ln\sigma` and :math:`\ln\gamma` (Å).
    mode : {"linear", "log"}
        Eq. 2 or Eq. A2.
    profile : {"pseudo-voigt", "voigt"}
        Pseudo-Voigt (fast, the blasé 0.3 shape) or exact Voigt (Faddeeva).
    emission : bool
        Emission lines (sign flip) instead of absorption.
    tune : iterable of str
        Which of ``"center"``, ``"amplitude"``, ``"sigma"``, ``"gamma"``, ``"wing"`` are tuned.
    wing_tolerance : float
        Each line is evaluated out to where its windowed term falls below this value (see
        :func:`~blase_specutils.core.engine.window_half_widths` and
        :func:`~blase_specutils.core.farfield.residual_half_widths`).
    far_field : bool or FarFieldSettings
        Sum the Lorentzian wings of all lines with FFTs and evaluate each line only in a short
        near-field window (:mod:`blase_specutils.core.farfield`); ``True`` scales the settings
        to each wavelength grid. ``False``: plain truncated windows.
    broad_lines : sequence of int, optional
        Indices of lines that get the Appendix C.4 wing correction.
    dtype, device
        Torch dtype (float64 or float32) and device of the parameters. Line centres and the
        wavelength grid are always float64; offsets λ - λc are formed in float64 and only then
        rounded to ``dtype``.
    engine : EngineOptions
        Which code computes the line sums (backend and kernel settings), carried by this model and
        by the models made from it (:meth:`subset`, :meth:`with_lines`, :meth:`concatenate`).
    """

    def __init__(
        self,
        lam_centers,
        log_amplitudes,
        log_sigmas,
        log_gammas,
        *,
        mode: str = "linear",
        profile: str = "pseudo-voigt",
        emission: bool = False,
        tune: Iterable[str] = ("amplitude", "sigma", "gamma"),
        wing_tolerance: float = 1e-7,
        far_field: bool | FarFieldSettings = True,
        broad_lines: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        engine: EngineOptions = EngineOptions(),
    ) -> None:
        super().__init__()
        if not isinstance(engine, EngineOptions):
            raise TypeError(f"engine must be an EngineOptions, got {type(engine).__name__}")
        if mode not in ("linear", "log"):
            raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
        tune = tuple(tune)
        bad = [t for t in tune if t not in TUNABLE]
        if bad:
            raise ValueError(f"unknown tunable parameter(s) {bad}; choose from {TUNABLE}")
        if not (0.0 < wing_tolerance < 1.0):
            raise ValueError(f"wing_tolerance must be in (0, 1), got {wing_tolerance}")
        # centres stay float64 whatever the working dtype: float32 cannot resolve 0.001 Å at 10^4 Å
        c = _as_tensor(lam_centers, torch.float64, device)
        n = c.shape[0] if c.ndim == 1 else -1
        arrays = [_as_tensor(x, dtype, device) for x in (log_amplitudes, log_sigmas, log_gammas)]
        if c.ndim != 1 or any(x.shape != (n,) for x in arrays):
            raise ValueError("lam_centers and the log parameters must be 1-D arrays of one length")
        if not all(bool(torch.isfinite(x).all()) for x in [c, *arrays]):
            raise ValueError("line parameters must be finite")
        self.mode = mode
        self.profile = profile
        self.emission = bool(emission)
        self.wing_tolerance = float(wing_tolerance)
        if not isinstance(far_field, (bool, FarFieldSettings)):
            raise TypeError("far_field must be True, False or a FarFieldSettings")
        self.far_field = far_field
        self.engine = engine
        self._ff_cache: tuple | None = None
        self.lam_centers = nn.Parameter(c, requires_grad="center" in tune)
        self.log_amplitudes = nn.Parameter(arrays[0], requires_grad="amplitude" in tune)
        self.log_sigmas = nn.Parameter(arrays[1], requires_grad="sigma" in tune)
        self.log_gammas = nn.Parameter(arrays[2], requires_grad="gamma" in tune)
        broad = torch.as_tensor(list(broad_lines or []), dtype=torch.long, device=device)
        self.register_buffer("broad_lines", broad)
        nb = broad.numel()
        with torch.no_grad():
            fwhm = pseudo_voigt_fwhm(arrays[1].exp(), arrays[2].exp())[broad] if nb else c[:0]
        # Appendix C.4: alpha (stretch), lambda_t (transition distance), b (transition scale)
        self.wing_alpha = nn.Parameter(torch.zeros(nb, dtype=dtype, device=device), requires_grad="wing" in tune)
        self.wing_log_lt = nn.Parameter(torch.log(3.0 * fwhm + 1e-3), requires_grad="wing" in tune)
        self.wing_log_b = nn.Parameter(torch.log(fwhm + 1e-3), requires_grad="wing" in tune)
        self._broad_map = None
        self._backend: tuple | None = None  # (device, engine options, the backend picked for them)

    # ------------------------------------------------------------------ properties
    @property
    def n_lines(self) -> int:
        """Number of lines N_lines."""
        return int(self.lam_centers.shape[0])

    @property
    def sign(self) -> float:
        """+1 for absorption, -1 for emission."""
        return -1.0 if self.emission else 1.0

    @property
    def tuned(self) -> tuple[str, ...]:
        """Names of the tuned parameter groups."""
        names = {"center": self.lam_centers, "amplitude": self.log_amplitudes,
                 "sigma": self.log_sigmas, "gamma": self.log_gammas, "wing": self.wing_alpha}
        return tuple(k for k, p in names.items() if p.requires_grad)

    def set_tuned(self, tune: Iterable[str]) -> None:
        """Choose which parameter groups are tuned (the others are frozen)."""
        tune = tuple(tune)
        bad = [t for t in tune if t not in TUNABLE]
        if bad:
            raise ValueError(f"unknown tunable parameter(s) {bad}; choose from {TUNABLE}")
        self.lam_centers.requires_grad_("center" in tune)
        self.log_amplitudes.requires_grad_("amplitude" in tune)
        self.log_sigmas.requires_grad_("sigma" in tune)
        self.log_gammas.requires_grad_("gamma" in tune)
        for p in (self.wing_alpha, self.wing_log_lt, self.wing_log_b):
            p.requires_grad_("wing" in tune)

    # ------------------------------------------------------------------ evaluation
    def _wing(self):
        if self.broad_lines.numel() == 0:
            return None
        if self._broad_map is None or self._broad_map.device != self.broad_lines.device:
            m = torch.full((self.n_lines,), -1, dtype=torch.long, device=self.broad_lines.device)
            m[self.broad_lines] = torch.arange(self.broad_lines.numel(), device=m.device)
            self._broad_map = m
        alpha = self.wing_alpha
        lt = self.wing_log_lt.exp()
        b = self.wing_log_b.exp()
        bmap = self._broad_map

        def wing(x: Tensor, lines: Tensor) -> Tensor:
            k = bmap[lines]
            has = k >= 0
            if not bool(has.any()):
                return torch.ones_like(x)
            kk = k.clamp(min=0)
            g = wing_factor(x, alpha[kk], lt[kk], b[kk])
            return torch.where(has[:, None], g, torch.ones_like(g))

        return wing

    @property
    def dtype(self) -> torch.dtype:
        """Working dtype of the amplitudes, widths and the evaluated flux."""
        return self.log_amplitudes.dtype

    def shifted_centers(self, radial_velocity: Tensor | float | None = None) -> Tensor:
        r"""Line centres Doppler shifted by ``radial_velocity`` (km/s): :math:`\lambda_c(1+v/c)`."""
        if radial_velocity is None:
            return self.lam_centers
        return self.lam_centers * (1.0 + radial_velocity / SPEED_OF_LIGHT_KMS)

    def log_flux(
        self, wavelength: Tensor, radial_velocity: Tensor | float | None = None, *, dense: bool = False,
        plan: WindowPlan | ClonePlan | None = None, lines: Tensor | None = None,
    ) -> Tensor:
        r""":math:`\ln S_\mathrm{clone}` on ``wavelength`` (Å, strictly increasing).

        ``plan``: a plan of this model on this grid (:meth:`make_plan`): the same sums without
        synchronising with the device. ``lines``: a boolean mask of the lines to sum (the others
        are left out; gradients still reach this model's parameters), e.g. one molecule of a
        telluric clone made of several; not with a plan or ``dense``.
        """
        if lines is not None:
            if plan is not None or dense:
                raise ValueError("lines= selects lines of the windowed engine: it takes no plan and no dense=True")
            return self._log_flux_of(torch.as_tensor(wavelength, dtype=torch.float64, device=self.lam_centers.device),
                                     radial_velocity, lines)
        if plan is not None:
            if dense:
                raise ValueError("dense=True evaluates every line at every pixel: it takes no plan")
            return self._planned_log_flux(wavelength, radial_velocity, plan)
        wavelength = torch.as_tensor(wavelength, dtype=torch.float64, device=self.lam_centers.device)
        if dense:
            args = (wavelength, self.shifted_centers(radial_velocity), self.log_amplitudes.exp(),
                    self.log_sigmas.exp(), self.log_gammas.exp())
            return dense_log_flux(*args, wing=self._wing(), profile=PROFILES[self.profile], mode=self.mode,
                                  sign=self.sign)
        return self._log_flux_of(wavelength, radial_velocity)

    def _log_flux_of(self, wavelength: Tensor, radial_velocity, lines: Tensor | None = None,
                     amplitude_scale: Tensor | None = None) -> Tensor:
        """The windowed sum over every line, or over the lines of the boolean mask ``lines`` only;
        with ``amplitude_scale`` (one factor per line) each amplitude multiplied by its factor (in
        log mode, ln S = −Σ a V: the factor of a line is a Beer's-law power on it).

        The lines with the Appendix C.4 correction are summed whole, in windows that allow for the
        stretched wings (area scaled by max(e^alpha, 1)); the others as usual, with the far field."""
        if lines is not None:
            lines = torch.as_tensor(lines, device=self.lam_centers.device)
            if lines.dtype != torch.bool or lines.shape != (self.n_lines,):
                raise ValueError(f"lines must be a boolean mask of the {self.n_lines} lines")
        amps = self.log_amplitudes.exp() if amplitude_scale is None else self.log_amplitudes.exp() * amplitude_scale
        params = (self.shifted_centers(radial_velocity), amps, self.log_sigmas.exp(), self.log_gammas.exp())
        kw = dict(profile=PROFILES[self.profile], mode=self.mode, sign=self.sign, engine=self.engine,
                  backend=self.backend)
        ff = self._far_field_settings(wavelength)
        if lines is None and not self.broad_lines.numel():
            hw = self.window_half_widths() if ff is None else None
            return windowed_log_flux(wavelength, *params, half_widths=hw, tolerance=self.wing_tolerance, far_field=ff,
                                     **kw)
        plain, broad = self._line_split()
        alpha, lt, b = self._wing_parameters()
        if lines is not None:
            plain = plain[lines[plain]]
            keep = lines[broad]
            broad, alpha, lt, b = broad[keep], alpha[keep], lt[keep], b[keep]
        out = None
        if broad.numel():
            c, a, s, g = (t[broad] for t in params)
            out = windowed_log_flux(
                wavelength, c, a, s, g, half_widths=self._broad_half_widths(a, s, g, alpha), far_field=None,
                wing=lambda x, k: wing_factor(x, alpha[k], lt[k], b[k]), **kw)
        if plain.numel():
            part = windowed_log_flux(wavelength, *(t[plain] for t in params), tolerance=self.wing_tolerance,
                                     far_field=ff, half_widths=None if ff is not None else
                                     self.window_half_widths()[plain], **kw)
            out = part if out is None else out + part
        return torch.zeros_like(wavelength, dtype=self.dtype) if out is None else out

    def _line_split(self) -> tuple[Tensor, Tensor]:
        """Indices of the plain lines and of the broad lines (in the order of ``broad_lines``)."""
        broad = self.broad_lines
        cached = getattr(self, "_split", None)
        # made again when .to(device) replaced the buffer or load_state_dict wrote into it
        if cached is None or cached[1] is not broad or cached[2] != broad._version:
            mask = torch.ones(self.n_lines, dtype=torch.bool, device=broad.device)
            mask[broad] = False
            self._split = (torch.nonzero(mask).flatten(), broad, broad._version)
        return self._split[:2]

    def _wing_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        r"""α, λ_t and b (Å) of the broad lines' wing corrections."""
        return self.wing_alpha, self.wing_log_lt.exp(), self.wing_log_b.exp()

    def _broad_half_widths(self, a: Tensor, s: Tensor, g: Tensor, alpha: Tensor) -> Tensor:
        """Window half widths (Å) of broad lines: their stretched wings may be up to e^α stronger."""
        with torch.no_grad():
            return window_half_widths(a * torch.clamp(alpha.exp(), min=1.0), s, g, self.wing_tolerance)

    def _far_field_settings(self, wavelength: Tensor) -> FarFieldSettings | None:
        if self.far_field is False:
            return None
        if isinstance(self.far_field, FarFieldSettings):
            return self.far_field
        if wavelength.numel() < 2:
            return None
        key = (wavelength.data_ptr(), wavelength.numel(), float(wavelength[0]), float(wavelength[-1]))
        if self._ff_cache is None or self._ff_cache[0] != key:
            self._ff_cache = (key, FarFieldSettings.for_grid(wavelength))
        return self._ff_cache[1]

    @property
    def backend(self) -> Backend:
        """The backend that sums this model's lines, picked once by :func:`.backends.select_backend`
        from the model's options, device, dtype and size (again after ``.to(device)``)."""
        dev = self.lam_centers.device
        if self._backend is None or self._backend[:2] != (dev, self.engine):
            self._backend = (dev, self.engine, select_backend(self.engine, dev, self.dtype, self.n_lines))
        return self._backend[2]

    def engine_info(self) -> dict:
        """What computes this model's sums: ``{"backend", "device", "dtype"}`` (JSON-ready), the
        backend as :meth:`.EngineOptions.backend_for` resolves it on the model's device."""
        return self.engine.describe(self.lam_centers.device, self.dtype)

    @torch.no_grad()
    def window_half_widths(self) -> Tensor:
        """Current per-line window half widths (Å) of the sparse engine."""
        amp = self.log_amplitudes.exp()
        if self.broad_lines.numel():
            amp = amp.clone()
            amp[self.broad_lines] = amp[self.broad_lines] * torch.clamp(self.wing_alpha.exp(), min=1.0)
        return window_half_widths(amp, self.log_sigmas.exp(), self.log_gammas.exp(), self.wing_tolerance)

    def forward(
        self, wavelength: Tensor, radial_velocity: Tensor | float | None = None, *, dense: bool = False,
        plan: WindowPlan | ClonePlan | None = None,
    ) -> Tensor:
        r"""The clone :math:`S_\mathrm{clone}(\lambda)` (continuum-normalised flux)."""
        return torch.exp(self.log_flux(wavelength, radial_velocity, dense=dense, plan=plan))

    def extra_repr(self) -> str:
        return (f"n_lines={self.n_lines}, mode={self.mode!r}, profile={self.profile!r}, "
                f"emission={self.emission}, tuned={self.tuned}, broad_lines={self.broad_lines.numel()}, "
                f"backend={self.engine.backend!r}")
