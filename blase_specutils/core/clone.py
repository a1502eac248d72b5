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

import numpy as np
import torch
from torch import Tensor, nn

from .engine import dense_log_flux, window_half_widths, windowed_log_flux
from .farfield import FarFieldSettings
from .options import EngineOptions
from .plan import BroadLinePlan, ClonePlan, WindowPlan
from .profiles import PROFILES, pseudo_voigt_fwhm, wing_factor

__all__ = ["LineCloneModel", "SPEED_OF_LIGHT_KMS", "TUNABLE"]

#: Speed of light in km/s.
SPEED_OF_LIGHT_KMS = 299792.458

#: Names of the per-line parameters that can be tuned.
TUNABLE = ("center", "amplitude", "sigma", "gamma", "wing")


def _as_tensor(x, dtype, device) -> Tensor:
    """A private copy: the caller's arrays and tensors are never changed by training."""
    return torch.as_tensor(np.asarray(x, dtype=np.float64) if not torch.is_tensor(x) else x.detach()).to(
        dtype=dtype, device=device
    ).clone()


class LineCloneModel(nn.Module):
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

    def subset(self, lines) -> "LineCloneModel":
        """A new model holding only ``lines`` (indices or a boolean mask), with the same settings.

        Parameters are copied (detached); broad-line wing corrections follow their lines.
        """
        idx = torch.as_tensor(lines, device=self.lam_centers.device)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        idx = idx.long()
        old_to_new = torch.full((self.n_lines,), -1, dtype=torch.long, device=idx.device)
        old_to_new[idx] = torch.arange(idx.numel(), device=idx.device)
        keep_broad = old_to_new[self.broad_lines] >= 0
        new = LineCloneModel(
            self.lam_centers.detach()[idx], self.log_amplitudes.detach()[idx], self.log_sigmas.detach()[idx],
            self.log_gammas.detach()[idx], mode=self.mode, profile=self.profile, emission=self.emission,
            tune=self.tuned, wing_tolerance=self.wing_tolerance, far_field=self.far_field,
            broad_lines=old_to_new[self.broad_lines][keep_broad].tolist(), dtype=self.dtype,
            device=self.lam_centers.device, engine=self.engine,
        )
        with torch.no_grad():
            for name in ("wing_alpha", "wing_log_lt", "wing_log_b"):
                getattr(new, name).copy_(getattr(self, name).detach()[keep_broad])
        return new

    def with_lines(self, lam_centers, log_amplitudes, log_sigmas, log_gammas) -> tuple["LineCloneModel", Tensor]:
        """A new model with the given lines added, all lines sorted by centre, the same settings.

        Parameters are copied (detached); the broad lines keep their wing corrections.

        Returns
        -------
        model : LineCloneModel
        order : Tensor
            For each line of the new model, its index in the old lines followed by the added
            ones (``order[k] >= self.n_lines`` marks an added line).
        """
        dev = self.lam_centers.device
        extra = [_as_tensor(x, t.dtype, dev) for x, t in zip(
            (lam_centers, log_amplitudes, log_sigmas, log_gammas),
            (self.lam_centers, self.log_amplitudes, self.log_sigmas, self.log_gammas))]
        if any(x.ndim != 1 or x.shape != extra[0].shape for x in extra):
            raise ValueError("the added lines' parameters must be 1-D arrays of one length")
        if not all(bool(torch.isfinite(x).all()) for x in extra):
            raise ValueError("the added lines' parameters must be finite")
        joined = [torch.cat([old.detach(), x]) for old, x in zip(
            (self.lam_centers, self.log_amplitudes, self.log_sigmas, self.log_gammas), extra)]
        order = torch.argsort(joined[0], stable=True)
        old_to_new = torch.empty_like(order)
        old_to_new[order] = torch.arange(order.numel(), device=dev)
        new = LineCloneModel(
            *(x[order] for x in joined), mode=self.mode, profile=self.profile, emission=self.emission,
            tune=self.tuned, wing_tolerance=self.wing_tolerance, far_field=self.far_field,
            broad_lines=old_to_new[self.broad_lines].tolist(), dtype=self.dtype, device=dev, engine=self.engine,
        )
        with torch.no_grad():
            for name in ("wing_alpha", "wing_log_lt", "wing_log_b"):
                getattr(new, name).copy_(getattr(self, name).detach())
        return new, order

    @staticmethod
    def concatenate(models: Sequence["LineCloneModel"]) -> tuple["LineCloneModel", Tensor]:
        """One model holding the lines of several (e.g. one clone per molecule), sorted by centre.

        The models must share mode, profile and emission; the first one's wing tolerance, far-field
        setting, engine options and tuned groups are kept. Parameters are copied (detached); broad lines keep their
        wing corrections.

        Returns
        -------
        model : LineCloneModel
        component : Tensor of int
            For each line of the new model, the index of the model it came from.
        """
        models = list(models)
        if not models:
            raise ValueError("concatenate needs at least one model")
        first = models[0]
        for m in models[1:]:
            if (m.mode, m.profile, m.emission) != (first.mode, first.profile, first.emission):
                raise ValueError("models to concatenate must share mode, profile and emission; got "
                                 f"{(first.mode, first.profile, first.emission)} and {(m.mode, m.profile, m.emission)}")
        dev = first.lam_centers.device
        cat = lambda name: torch.cat([getattr(m, name).detach().to(dev, first.dtype if name != "lam_centers"  # noqa: E731
                                                                       else torch.float64) for m in models])
        centers, amps, sigmas, gammas = (cat(n) for n in ("lam_centers", "log_amplitudes", "log_sigmas", "log_gammas"))
        component = torch.cat([torch.full((m.n_lines,), k, dtype=torch.long, device=dev) for k, m in enumerate(models)])
        offsets = np.cumsum([0] + [m.n_lines for m in models[:-1]])
        broad = torch.cat([m.broad_lines.to(dev) + int(o) for m, o in zip(models, offsets)])
        order = torch.argsort(centers, stable=True)
        old_to_new = torch.empty_like(order)
        old_to_new[order] = torch.arange(order.numel(), device=dev)
        new = LineCloneModel(centers[order], amps[order], sigmas[order], gammas[order], mode=first.mode,
                             profile=first.profile, emission=first.emission, tune=first.tuned,
                             wing_tolerance=first.wing_tolerance, far_field=first.far_field,
                             broad_lines=old_to_new[broad].tolist(), dtype=first.dtype, device=dev,
                             engine=first.engine)
        with torch.no_grad():
            for name in ("wing_alpha", "wing_log_lt", "wing_log_b"):
                getattr(new, name).copy_(torch.cat([getattr(m, name).detach().to(dev) for m in models]))
        return new, component[order]

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
            if not (torch.is_tensor(wavelength) and wavelength.data_ptr() == plan.wavelength.data_ptr()
                    and wavelength.shape == plan.wavelength.shape):
                raise ValueError("this plan was made for another wavelength grid; make one with make_plan(wavelength)")
            if getattr(plan, "model_id", None) != id(self):
                raise ValueError("this plan was made by another model; make one with this model's make_plan")
            rv_plan = getattr(plan, "radial_velocity", None)
            same = radial_velocity is rv_plan or (not torch.is_tensor(radial_velocity) and not torch.is_tensor(rv_plan)
                                                  and radial_velocity == rv_plan)
            if plan.frozen and not same:
                # a frozen plan's windows were computed for the RV it follows (GraphedEpoch)
                raise ValueError("this frozen plan follows another radial_velocity; evaluate it with the RV given "
                                 "to make_plan, or make a plan for this one")
            lines = (self.shifted_centers(radial_velocity), self.log_amplitudes.exp(), self.log_sigmas.exp(),
                     self.log_gammas.exp())
            if isinstance(plan, ClonePlan):
                plan.check_lines(self.broad_lines)
                return plan.log_flux(*lines, *self._wing_parameters())
            return plan.log_flux(*lines)
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
        kw = dict(profile=PROFILES[self.profile], mode=self.mode, sign=self.sign, engine=self.engine)
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

    def make_plan(
        self, wavelength: Tensor, radial_velocity: Tensor | float | None = None, *, headroom: float = 1.25,
        kernel: str | None = None,
    ) -> WindowPlan | ClonePlan:
        r"""A :class:`~blase_specutils.core.plan.WindowPlan` of this model on ``wavelength`` (a
        :class:`~blase_specutils.core.plan.ClonePlan` when some lines have the Appendix C.4 wing
        correction: those take fixed-size windows of a
        :class:`~blase_specutils.core.plan.BroadLinePlan`).

        Pass it to :meth:`forward` / :meth:`log_flux` (``plan=``): the sums are those of the
        unplanned engine, computed without reading anything back from the device but one flag,
        which is what lets :class:`~blase_specutils.core.graphs.GraphedEpoch` record a whole epoch
        as a CUDA graph. The plan follows the model's parameters (and ``radial_velocity``, which may
        be a tensor that is being tuned).

        Parameters
        ----------
        wavelength : Tensor
            The pixel grid (Å, float64 tensor on the model's device) that will be evaluated.
        radial_velocity : Tensor or float, optional
            The RV (km/s) the model will be evaluated at.
        headroom : float
            Spare capacity of the GPU kernel's chunk table (see ``WindowPlan``).
        kernel : {"auto", "numba", "triton"}, optional
            The compiled kernel; default the model's ``engine.backend``. The plan takes its other
            kernel settings from the model's :attr:`engine`.
        """
        if not torch.is_tensor(wavelength) or wavelength.dtype != torch.float64 or \
                wavelength.device != self.lam_centers.device:
            raise TypeError("wavelength must be a float64 tensor on the model's device (a plan keeps this grid)")

        def source():
            return (self.shifted_centers(radial_velocity), self.log_amplitudes.exp(), self.log_sigmas.exp(),
                    self.log_gammas.exp())

        settings = dict(profile=self.profile, mode=self.mode, sign=self.sign, tolerance=self.wing_tolerance)
        if not self.broad_lines.numel():
            plan = WindowPlan(wavelength, source, far_field=self._far_field_settings(wavelength), half_widths=None,
                              kernel=kernel, headroom=headroom, engine=self.engine, **settings)
        else:
            plain, broad = self._line_split()

            def broad_source():
                return (*(t[broad] for t in source()), *self._wing_parameters())

            def plain_source():
                return tuple(t[plain] for t in source())

            part = None
            if plain.numel():
                part = WindowPlan(wavelength, plain_source, far_field=self._far_field_settings(wavelength),
                                  half_widths=None, kernel=kernel, headroom=headroom, engine=self.engine, **settings)
            plan = ClonePlan(wavelength, part, BroadLinePlan(wavelength, broad_source, headroom=headroom, **settings),
                             plain, broad)
        plan.radial_velocity = radial_velocity  # what a frozen plan must be evaluated at
        plan.model_id = id(self)
        return plan

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
