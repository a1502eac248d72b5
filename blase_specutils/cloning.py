"""Clone a precomputed spectrum given as a specutils ``Spectrum``: the procedure of the user layer.

:func:`clone_spectrum` is a short composition of named steps: check the settings
(:class:`~blase_specutils.clone_settings.CloneSettings`), prepare the spectrum, find its lines,
tune them, add the lines still missing in the residual, and hand back a
:class:`~blase_specutils.SpectralClone` (:mod:`.clone_result`; saved and loaded by :mod:`.clone_file`).
The numbers that set its behaviour live in :mod:`blase_specutils.constants`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

import astropy.units as u
import numpy as np
import torch
from specutils import Spectrum

from .clone_file import FORMAT_NAME, FORMAT_VERSION, CloneFileError
from .clone_result import SpectralClone, _equivalent_widths  # noqa: F401 (fitting and bayes import it from here)
from .clone_settings import CloneSettings
from .constants import (BROAD_FWHM_FACTOR, CLONE_GP_NOISE, FIRST_STAGE_SHARE, MAX_AUTO_BROAD_LINES,
                        MIN_FIRST_STAGE_EPOCHS, MIN_PASS_EPOCHS, RESIDUAL_PASS_MIN_GAIN)
from .core.clone import LineCloneModel
from .core.detection import find_lines, residual_lines
from .core.options import EngineOptions
from .core.training import TrainingHistory, resolve_device, seed_everything, train, use_plans
from .io import LOG_PARAMETER_LIMIT, _checked_array
from .preprocessing import DEFAULT_BUFFER, divide_blackbody, flatten_continuum, trim
from .spectra import arrays_to_spectrum, spectrum_to_arrays, to_vacuum

__all__ = ["CloneFileError", "CloneSettings", "SpectralClone", "clone_spectrum", "load_blase03", "EdgeWingWarning",
           "FORMAT_NAME", "FORMAT_VERSION"]


class EdgeWingWarning(UserWarning):
    """The spectrum ends inside the wing of a line whose centre is outside it."""


def _warn_if_edge_in_wing(arr, prominence: float, emission: bool, guess) -> None:
    n = max(5, arr.wavelength.size // 200)
    for side, sl in (("blue", slice(0, n)), ("red", slice(-n, None))):
        f = arr.flux[sl][arr.good[sl]]
        if f.size == 0:
            continue
        level = float(np.median(f))
        deficit = (level - 1.0) if emission else (1.0 - level)
        edge = arr.wavelength[0] if side == "blue" else arr.wavelength[-1]
        # a detected line whose core reaches the edge explains the deficit: nothing to warn about
        explained = np.any(np.abs(guess.lam_centers - edge) < 2.0 * guess.fwhm)
        if deficit > 2 * prominence and not explained:
            warnings.warn(
                f"the {side} end of the spectrum ({edge:.2f} Å) sits {100 * deficit:.1f} % off the continuum: "
                "it probably cuts through the wing of a broad line whose centre lies outside. That line cannot "
                "be cloned and the continuum there is unreliable; widen the band or the buffer to include it.",
                EdgeWingWarning,
                stacklevel=5,  # the caller of clone_spectrum
            )


def _fill_gaps(wl: np.ndarray, flux: np.ndarray, good: np.ndarray) -> np.ndarray:
    if good.all():
        return flux
    return np.interp(wl, wl[good], flux[good])


def _lsf_kind(spectrum: Spectrum) -> str:
    """``"instrument"`` when the spectrum's ``meta["lsf"]`` says its lines carry an instrument's
    line-spread function, else ``"native"``; any other value is refused."""
    value = str((getattr(spectrum, "meta", None) or {}).get("lsf", "native")).strip().lower()
    if value not in ("native", "instrument"):
        raise ValueError(f"meta['lsf'] must be 'native' (lines at the model's own resolution) or 'instrument' "
                         f"(lines already broadened by an instrument's line-spread function), got {value!r}")
    return value


def clone_spectrum(
    spectrum: Spectrum,
    *,
    prominence: float = 0.01,
    band=None,
    buffer: u.Quantity = DEFAULT_BUFFER,
    teff: u.Quantity | float | None = None,
    flatten: bool = True,
    continuum_bins: int = 40,
    continuum_order: int = 3,
    mode: str = "linear",
    profile: str = "pseudo-voigt",
    emission: bool = False,
    tune: Iterable[str] = ("amplitude", "sigma", "gamma", "center"),
    n_broad: int | str = "auto",
    epochs: int = 800,
    lr: float = 0.05,
    patience: int | None = 50,
    wing_tolerance: float = 1e-7,
    train_tolerance: float = 1e-6,
    far_field: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    seed: int | None = 0,
    progress: bool = True,
    likelihood=None,
    plan: bool | str = "auto",
    residual_passes: int = 3,
    air: bool | None = None,
    powers: Sequence[float] | None = None,
    settings: CloneSettings | None = None,
    engine: EngineOptions | None = None,
) -> SpectralClone:
    """Clone a precomputed synthetic spectrum into tunable lines (paper Sections 2-3).

    Preprocess (Eq. 1: trim to ``band`` ± ``buffer``, divide by B(T_eff), flatten with a
    polynomial P), find lines by prominence, then tune ln a, ln σ, ln γ and λc with full-batch
    Adam to minimise Σ (S - S_clone)² over the usable pixels; then find the lines still missing
    in the residual, add them and tune again, while that pays (``residual_passes``).

    Parameters
    ----------
    spectrum : Spectrum
        Any 1-D spectrum (Å, nm, µm, wavenumber; ascending or descending; NaN/masked pixels are
        left out of the loss). Not modified.
    prominence : float
        Prom in (0, 1): lines shallower than this are not cloned.
    band : (Quantity, Quantity), optional
        Region of interest; the spectrum is trimmed to it ± ``buffer`` and lines are kept
        within it ± ``buffer``.
    buffer : Quantity
        Δλ_buffer (default 30 Å).
    teff : Quantity or float, optional
        Divide by a blackbody of this T_eff (K). Leave out for spectra that are not absolute
        fluxes (telluric transmission, already normalised spectra).
    flatten : bool
        Divide by a polynomial through the continuum peaks.
    continuum_bins, continuum_order : int
        Settings of that polynomial.
    mode : {"linear", "log"}
        Eq. 2 or Eq. A2 (log suits saturated telluric bands).
    profile : {"pseudo-voigt", "voigt"}
    emission : bool
        Clone emission lines instead of absorption lines.
    tune : iterable of str
        Parameters to tune (default ln a, ln σ, ln γ and λc; ``"wing"`` is added for broad lines).
        Centres are tuned by default: a detected minimum sits on the pixel grid and, in a blend,
        off the true centre of its strongest component; letting it move lowered the RMS residual
        of a line-rich 4250 K synthesis from 1.45 % to 1.26 % at equal epochs
        (``benchmarks/RESULTS.md``). Each centre moves at most lr/10 of a pixel per epoch.
    n_broad : int or "auto"
        Number of broadest lines that get the Appendix C.4 wing correction (auto: lines wider
        than 25× the median FWHM, at most 40). Their wing parameters are tuned.
    epochs, lr, patience : int, float, int
        Adam settings and early-stopping patience (epochs without 0.01 % improvement). ``epochs``
        is the budget of the whole run, residual passes included: the first stage gets a quarter
        of it but at least 100 epochs (all of it with ``residual_passes=0``), each pass an equal
        share of the rest but at least 50 (budgets under 150 run no pass), and epochs a stage
        leaves unused go to the next.
    wing_tolerance : float
        Truncation tolerance of the evaluated clone (per-line windows end where the line's
        windowed term falls below it).
    train_tolerance : float
        Looser tolerance used while training (speed); the result is evaluated with
        ``wing_tolerance``.
    far_field : bool
        Near-field/far-field split of the line wings (default; faster and more exact), or plain
        truncated windows.
    device : str
        'cpu', 'cuda', or 'auto' (applies with ``settings=`` too: where a clone runs is not one of its settings).
    dtype : torch.dtype
        torch.float64 (default) or torch.float32.
    seed : int or None
        Random seed (the method is deterministic given its inputs; the seed makes any randomness
        in torch reproducible).
    progress : bool
        Show a progress bar (applies with ``settings=`` too).
    likelihood : None, "gp" or dict
        None (default): minimise Σ (S − S_clone)². ``"gp"``: the Gaussian-process likelihood of
        Appendix C.2 (Eq. C4; needs ``pip install 'blase_specutils[gp]'``): the residual is a
        smooth GP over wavelength (the pseudo-continuum error left by the flattening) plus white
        noise, and the lines are tuned together with the GP's amplitude and length scale. A
        synthetic spectrum has no noise: the white-noise level ``noise`` = 0.005 (the typical
        clone residual) stands for what the lines cannot be asked to explain (lines below the
        prominence threshold, profile mismatch), so the GP takes only smooth structure above it.
        A dict sets options: ``"noise"`` and any keyword of
        :class:`blase_specutils.gp.GPContinuumLikelihood` (e.g. ``{"kernel": "rbf",
        "length_scale": 10.0}``; ``{"learn_noise_scale": True}`` tunes a factor on the noise,
        which then tends to hand line-scale residuals to the GP). The GP's conditional mean is
        returned as :attr:`SpectralClone.pseudo_continuum`.
    plan : bool or "auto"
        Train through a window plan of the clone (``LineCloneModel.make_plan``): on a GPU every
        epoch is then one replay of a CUDA graph (:func:`~blase_specutils.core.train` with
        ``plans``; not with a GP likelihood, whose epochs run eagerly). The result is that of
        training without a plan. ``"auto"``: on CUDA devices when the clone's
        ``EngineOptions.plans_on_cuda`` is set (off until this path has been timed on a GPU);
        never on CPUs, where a plan brings no speed.

    residual_passes : int
        Largest number of residual passes (paper Section 8.4, applied while cloning; default 3,
        0 turns them off). After each training stage, lines missing from the clone are found in
        the ratio S / S_clone at the same prominence Prom (blends merged by the first detection,
        shoulders, lines in the wings of others: :func:`~blase_specutils.core.detection.residual_lines`),
        added, and all lines are tuned again. Passes stop when the residual holds no line above
        Prom or after a pass that lowers the RMS residual by less than 5 % (a pass that does not
        lower it at all is undone). The line table's ``residual_pass`` column and
        :attr:`SpectralClone.passes` record what each pass added.
    air : bool or None
        Whether the spectrum's wavelengths are in air. None (default): as the spectrum says (a FITS
        WCS ``CTYPE1 = 'AWAV'``, ``AIRORVAC = 'air'`` in its header or ``meta``, ``meta['air']``;
        vacuum where nothing says air). True: in air, whatever it says; False: in vacuum. Air
        wavelengths are converted to vacuum first (:func:`~blase_specutils.spectra.to_vacuum`, the
        Morton 2000 refractive index of standard air), so the clone's centres are always vacuum
        wavelengths, like every template and clone of this package. A spectrum already converted
        by :func:`~blase_specutils.read_spectrum` is not converted twice.
    powers : sequence of float, optional
        Train the clone for :math:`S^X` at each of these powers X > 0 (Beer's law): the loss is
        :math:`\\sum_X \\sum_i (S_i^X - S_{\\mathrm{clone},i}^X)^2`. For telluric templates that a fit
        raises to a power (:func:`~blase_specutils.fit_spectrum` fits X): a clone trained on S alone
        is blind inside saturated bands, where S ≈ 0 whatever its depth, and the error shows when
        X ≪ 1 (a drier night than the template). On the PSG water column near 1.77 µm, the RMS error
        of :math:`S_\\mathrm{clone}^{0.04}` was 0.110 trained on S and 0.015 with
        ``powers=(0.02, 0.05, 0.15, 0.4, 1.0)``, at the same 0.0016 for X = 1. Log mode only (then
        :math:`S^X` of the clone is exactly a clone with X times the amplitudes). None (default):
        the loss on S alone. The line search and the residual passes still look at S.
    settings : CloneSettings, optional
        All of the settings above (every keyword but ``device`` and ``progress``) as one checked,
        immutable value (:class:`~blase_specutils.clone_settings.CloneSettings`), e.g. to reuse
        them across spectra; the keywords it replaces must then be left at their defaults
        (``settings.replace(epochs=...)`` changes one). The clone is the one the same keywords give.
    engine : EngineOptions, optional
        Which code computes the line sums (:class:`~blase_specutils.core.options.EngineOptions`:
        backend, planning, kernel settings), carried by the clone's model; default
        ``EngineOptions()``, whose backend rule picks the fastest measured backend for the device.
        The clone reports what ran in :attr:`SpectralClone.engine`.

    Returns
    -------
    SpectralClone

    Raises
    ------
    TypeError, ValueError, astropy.units.UnitsError
        A setting that :class:`~blase_specutils.clone_settings.CloneSettings` refuses (checked
        before any work; the message names the setting), ``settings=`` together with a keyword
        changed from its default, an input that is not a Spectrum or has no usable pixels, or a
        spectrum without lines above the prominence.
    """
    keywords = CloneSettings(
        prominence=prominence, band=band, buffer=buffer, teff=teff, flatten=flatten, continuum_bins=continuum_bins,
        continuum_order=continuum_order, mode=mode, profile=profile, emission=emission, tune=tune, n_broad=n_broad,
        epochs=epochs, lr=lr, patience=patience, wing_tolerance=wing_tolerance, train_tolerance=train_tolerance,
        far_field=far_field, dtype=dtype, seed=seed, likelihood=likelihood, plan=plan,
        residual_passes=residual_passes, air=air, powers=powers)
    return _clone(spectrum, _chosen_settings(settings, keywords), engine=_checked_engine(engine), device=device,
                  progress=progress)


def _chosen_settings(settings: CloneSettings | None, keywords: CloneSettings) -> CloneSettings:
    """``settings`` when given (then every keyword must be left at its default), else the keywords' settings."""
    if settings is None:
        return keywords
    if not isinstance(settings, CloneSettings):
        raise TypeError(f"settings must be a CloneSettings, got {type(settings).__name__}")
    changed = keywords.changed()
    if changed:
        raise TypeError(f"clone_spectrum got settings= and the keyword(s) {changed}: give one or the other; "
                        f"settings.replace({changed[0]}=...) changes a setting of a CloneSettings")
    return settings


def _checked_engine(engine: EngineOptions | None) -> EngineOptions:
    """The engine options of the clone (the defaults when None)."""
    if engine is None:
        return EngineOptions()
    if not isinstance(engine, EngineOptions):
        raise TypeError(f"engine must be an EngineOptions (blase_specutils.core.options), got {type(engine).__name__}")
    return engine


def _clone(spectrum, settings: CloneSettings, *, engine: EngineOptions, device, progress: bool) -> SpectralClone:
    """Clone ``spectrum`` with checked settings: prepare it, find lines, tune them with residual passes."""
    spectrum = _vacuum_spectrum(spectrum, settings.air)
    dev = resolve_device(device)
    want_plan = use_plans(settings.plan, dev, engine)
    seed_everything(settings.seed)
    arr, target = _prepare_spectrum(spectrum, settings)
    guess, broad, broad_fwhm = _first_lines(arr, settings)
    model = _initial_model(guess, broad, settings, dev, engine)
    stage = _make_stage(arr, settings, dev, want_plan, progress)
    model, hist, line_pass, passes = _train_with_residual_passes(
        model, stage, arr, epochs=settings.epochs, residual_passes=settings.residual_passes,
        prominence=settings.prominence, region=settings.band_angstrom, buffer=settings.buffer_angstrom,
        max_fwhm=broad_fwhm)
    model.wing_tolerance = settings.wing_tolerance
    pseudo, gp_meta = _pseudo_continuum(stage, model, arr)
    meta = _clone_meta(settings, spectrum, hist, passes, line_pass) | gp_meta
    return SpectralClone(model, target=target, band=settings.band_angstrom, history=hist, meta=meta,
                         pseudo_continuum=pseudo, line_pass=line_pass, passes=passes)


def _vacuum_spectrum(spectrum, air: bool | None) -> Spectrum:
    """The input as a Spectrum on vacuum wavelengths (air ones converted once, here; the input is not modified)."""
    if not isinstance(spectrum, Spectrum):
        raise TypeError(f"expected a specutils Spectrum, got {type(spectrum).__name__}")
    return to_vacuum(spectrum, air)


def _prepare_spectrum(spectrum: Spectrum, settings: CloneSettings):
    """Eq. 1: trim to the band ± buffer, divide by B(T_eff), flatten; the arrays and the target Spectrum S."""
    spectrum_to_arrays(spectrum)  # validates units, NaNs, duplicates before any work
    s = trim(spectrum, settings.band, settings.buffer) if settings.band is not None else spectrum
    if settings.teff is not None:
        s = divide_blackbody(s, settings.teff)
    if settings.flatten:
        s = flatten_continuum(s, n_bins=settings.continuum_bins, order=settings.continuum_order)
    arr = spectrum_to_arrays(s)
    if arr.good.sum() < 3:
        raise ValueError("fewer than 3 usable pixels after preprocessing")
    target = arrays_to_spectrum(arr.wavelength, arr.flux, mask=~arr.good, meta={"preprocessed": True})
    return arr, target


def _first_lines(arr, settings: CloneSettings):
    """The lines found by prominence, the broad ones among them (indices) and the FWHM above which a line is broad."""
    guess = find_lines(arr.wavelength, _fill_gaps(arr.wavelength, arr.flux, arr.good), settings.prominence,
                       region=settings.band_angstrom, buffer=settings.buffer_angstrom, mode=settings.mode,
                       emission=settings.emission)
    _warn_if_edge_in_wing(arr, settings.prominence, settings.emission, guess)
    broad_fwhm = BROAD_FWHM_FACTOR * float(np.median(guess.fwhm))
    if settings.n_broad == "auto":
        cand = np.flatnonzero(guess.fwhm > broad_fwhm)
        broad = cand[np.argsort(guess.fwhm[cand])[::-1][:MAX_AUTO_BROAD_LINES]]
    else:
        broad = np.argsort(guess.fwhm)[::-1][:settings.n_broad]
    return guess, broad, broad_fwhm


def _initial_model(guess, broad: np.ndarray, settings: CloneSettings, device: torch.device,
                   engine: EngineOptions) -> LineCloneModel:
    """The untrained clone: the lines found, the broad ones wing-corrected (then ``"wing"`` is tuned too)."""
    tune = settings.tune
    if len(broad) and "wing" not in tune:
        tune = tune + ("wing",)
    return LineCloneModel(
        guess.lam_centers, guess.log_amplitudes, guess.log_sigmas, guess.log_gammas,
        mode=settings.mode, profile=settings.profile, emission=settings.emission, tune=tune,
        wing_tolerance=settings.train_tolerance, far_field=settings.far_field, broad_lines=np.sort(broad).tolist(),
        dtype=settings.dtype, device=device, engine=engine,
    )


def _make_stage(arr, settings: CloneSettings, device: torch.device, want_plan: bool, progress: bool) -> "_Stage":
    """What every training stage shares: the data as tensors, the likelihood and the Adam settings."""
    dtype, lr = settings.dtype, settings.lr
    wl_t = torch.as_tensor(arr.wavelength, dtype=torch.float64, device=device)  # grids stay float64
    flux_t = torch.as_tensor(np.where(arr.good, arr.flux, 1.0), dtype=dtype, device=device)
    w_t = torch.as_tensor(arr.good, dtype=dtype, device=device)
    lik, gp_noise = _clone_likelihood(settings.likelihood, arr, device)
    # centres move in Å: a step of lr/10 of the median pixel size, not lr in log units
    dlam = float(np.median(np.diff(arr.wavelength)))
    train_kwargs = dict(lr=lr, patience=settings.patience, progress=progress, lr_overrides={"lam_centers": lr * dlam})
    return _Stage(wl_t, flux_t, w_t, lik, want_plan, train_kwargs, powers=settings.powers, gp_noise=gp_noise)


def _pseudo_continuum(stage: "_Stage", model: LineCloneModel, arr) -> tuple[Spectrum | None, dict]:
    """With a GP likelihood, its conditional mean of S − S_clone as a Spectrum and the GP's settings for ``meta``."""
    lik = stage.lik
    if lik is None:
        return None, {}
    with torch.no_grad():
        mean = lik.conditional_mean(stage.flux_t - model(stage.wl_t)).cpu().numpy()
        gp_meta = {"gpkernel": lik.kernel_name, "gpamp": float(lik.amplitude[0]),
                   "gplength": float(lik.length_scale[0]), "gpnoise": float(lik.noise_scale) * stage.gp_noise}
    return arrays_to_spectrum(arr.wavelength, mean, meta={"blase_specutils": "pseudo-continuum"}), gp_meta


def _clone_meta(settings: CloneSettings, spectrum: Spectrum, hist: TrainingHistory, passes: list,
                line_pass: np.ndarray) -> dict:
    """The settings used and how the training went, as saved in the clone file's header."""
    teff = settings.teff_kelvin
    return {
        "prom": settings.prominence,
        "teff": 0.0 if teff is None else teff,
        "buffer": settings.buffer_angstrom,
        "flatten": settings.flatten,
        "epochs": hist.epochs_run,
        "lr": settings.lr,
        "seconds": round(hist.seconds, 3),
        "stop": hist.stop_reason,
        "npasses": len(passes) - 1,
        "nadded": int(np.count_nonzero(line_pass)),
        "source": str(spectrum.meta.get("template", "")) if hasattr(spectrum, "meta") and spectrum.meta else "",
        "lsf": _lsf_kind(spectrum),
        # one molecule's column (load_template("psg-igrins", molecule=...)): names the telluric component
        **({"molecule": str(spectrum.meta["molecule"])} if getattr(spectrum, "meta", None) and
           spectrum.meta.get("molecule") else {}),
        **({"powers": ",".join(f"{x:g}" for x in settings.powers)} if settings.powers is not None else {}),
    }


class _Stage:
    """What every training stage of a cloning run shares: the data, the likelihood and the Adam settings."""

    def __init__(self, wl_t, flux_t, w_t, lik, want_plan: bool, train_kwargs: dict, powers=None,
                 gp_noise: float | None = None) -> None:
        self.wl_t, self.flux_t, self.w_t, self.lik = wl_t, flux_t, w_t, lik
        self.want_plan = want_plan
        self.gp_noise = gp_noise
        self.train_kwargs = train_kwargs
        self.powers = None if powers is None else tuple(float(x) for x in powers)
        if self.powers is not None:  # the targets S^X, from ln S (S = 0 counts as e^-690)
            log_s = torch.log(torch.clamp(flux_t, min=1e-300))
            self.power_targets = [torch.exp(x * log_s) for x in self.powers]

    def train(self, model: LineCloneModel, epochs: int, desc: str) -> TrainingHistory:
        """Tune ``model`` for at most ``epochs`` epochs (plateau rule as in :func:`clone_spectrum`)."""
        planned = model.make_plan(self.wl_t) if self.want_plan else None
        lik, wl_t, flux_t, w_t = self.lik, self.wl_t, self.flux_t, self.w_t

        def loss_fn():
            if lik is not None:
                return lik(flux_t - model(wl_t, plan=planned))
            if self.powers is not None:
                log_c = model.log_flux(wl_t, plan=planned)
                return sum((((torch.exp(x * log_c) - target) * w_t) ** 2).sum()
                           for x, target in zip(self.powers, self.power_targets))
            r = (model(wl_t, plan=planned) - flux_t) * w_t
            return (r * r).sum()

        return train(model, loss_fn, epochs=epochs, desc=desc, extra=lik, plans=planned,
                     graph=None if lik is None else False, **self.train_kwargs)

    def rms(self, model: LineCloneModel) -> tuple[float, np.ndarray]:
        """RMS of S − S_clone over the usable pixels, and the clone on the grid."""
        with torch.no_grad():
            m = model(self.wl_t).double().cpu().numpy()
        good = self.w_t.cpu().numpy() > 0
        r = (self.flux_t.double().cpu().numpy() - m)[good]
        return float(np.sqrt(np.mean(r * r))), m


def _train_with_residual_passes(model, stage: _Stage, arr, *, epochs: int, residual_passes: int, prominence: float,
                                region, buffer: float, max_fwhm: float):
    """Train, then repeat (find lines in the residual, add them, train) while it pays (paper Section 8.4).

    The epoch budget ``epochs`` is shared: the first stage gets :data:`FIRST_STAGE_SHARE` of it,
    but at least :data:`MIN_FIRST_STAGE_EPOCHS` (all of it without passes), each pass an equal part
    of the rest, at least :data:`MIN_PASS_EPOCHS` (fewer passes run if the budget is short), and
    epochs a stage leaves unused (plateau stop) go to the stages after it. Passes end early when
    the residual holds no line above Prom, or after a pass that lowers the RMS by less than
    :data:`RESIDUAL_PASS_MIN_GAIN` (a pass that does not lower it at all is undone).

    Returns
    -------
    model, history (all stages joined), line_pass (per line: 0 = first detection, k = added by
    pass k), passes (one dict per stage: lines added, lines, epochs, RMS after it)
    """
    first = max(int(round(FIRST_STAGE_SHARE * epochs)), min(epochs, MIN_FIRST_STAGE_EPOCHS))
    residual_passes = min(residual_passes, (epochs - first) // MIN_PASS_EPOCHS)
    if residual_passes == 0:
        first = epochs
    hist = stage.train(model, first, f"cloning {model.n_lines} lines")
    histories = [hist]
    rms, m = stage.rms(model)
    line_pass = np.zeros(model.n_lines, dtype=np.int64)
    passes = [dict(added=model.n_lines, lines=model.n_lines, epochs=hist.epochs_run, rms=rms)]
    used = hist.epochs_run
    for k in range(1, residual_passes + 1):
        if used >= epochs:
            break
        guess = residual_lines(arr.wavelength, arr.flux, m, prominence, good=arr.good, region=region, buffer=buffer,
                               mode=model.mode, emission=model.emission, max_fwhm=max_fwhm)
        if guess is None:
            break
        candidate, order = model.with_lines(guess.lam_centers, guess.log_amplitudes, guess.log_sigmas,
                                            guess.log_gammas)
        budget = (epochs - used) // (residual_passes - k + 1)
        h = stage.train(candidate, budget, f"pass {k}: {candidate.n_lines} lines (+{len(guess)})")
        new_rms, new_m = stage.rms(candidate)
        used += h.epochs_run
        if not new_rms < rms:  # the pass made the clone no better: undo it
            break
        paid = new_rms <= (1.0 - RESIDUAL_PASS_MIN_GAIN) * rms
        model, rms, m = candidate, new_rms, new_m
        line_pass = np.concatenate([line_pass, np.full(len(guess), k, dtype=np.int64)])[order.cpu().numpy()]
        histories.append(h)
        passes.append(dict(added=len(guess), lines=model.n_lines, epochs=h.epochs_run, rms=rms))
        if not paid:
            break
    return model, _join_histories(histories), line_pass, passes


def _join_histories(histories: list) -> TrainingHistory:
    """One history for consecutive training stages: losses joined, epochs and seconds added, the last
    stage's stop reason and best loss."""
    last = histories[-1]
    out = TrainingHistory(loss=[x for h in histories for x in h.loss], best_loss=last.best_loss,
                          epochs_run=sum(h.epochs_run for h in histories), stop_reason=last.stop_reason,
                          seconds=sum(h.seconds for h in histories))
    out.best_epoch = sum(h.epochs_run for h in histories[:-1]) + last.best_epoch
    return out



def _clone_likelihood(likelihood, arr, device):
    """The GP likelihood of a cloning run and its white-noise level (None for the plain sum of squares)."""
    if likelihood is None:
        return None, None
    from .gp import build_likelihood  # optional extra: a clear ImportError names it

    options = dict(likelihood) if isinstance(likelihood, dict) else likelihood
    noise = CLONE_GP_NOISE
    if isinstance(options, dict):
        noise = float(options.pop("noise", CLONE_GP_NOISE))  # checked by CloneSettings
    n = arr.wavelength.size
    lik = build_likelihood(options, arr.wavelength, np.full(n, noise), arr.good, np.zeros(n, dtype=np.int64),
                           device=device)
    return lik, noise


def load_blase03(
    path: str | Path,
    *,
    mode: str = "linear",
    profile: str = "pseudo-voigt",
    wing_tolerance: float = 1e-7,
    far_field: bool = True,
    device: str | torch.device = "cpu",
) -> SpectralClone:
    """Read a pre-trained clone of the original blasé 0.3 (a PyTorch state dict).

    The file is loaded with ``torch.load(..., weights_only=True)``: no arbitrary unpickling, so a
    ``.pt`` file carrying a pickle that would run code is refused and runs nothing. It must hold
    ``lam_centers`` (Å), ``amplitudes`` (ln a), ``sigma_widths`` (ln σ) and ``gamma_widths``
    (ln γ), each a floating-point tensor with one value per line (the same number for all four);
    centres must be finite and > 0, the logs finite and within ±45
    (:data:`blase_specutils.io.LOG_PARAMETER_LIMIT`). Other entries (``a_coeff``…,
    ``radial_velocity``) are ignored.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a readable blasé 0.3 state dict (corrupt, a refused pickle, missing keys, values that
        are not tensors, tensors of different lengths, or values out of range); the message names
        the file and the key.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no blasé 0.3 clone at {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt archives and refused pickles
        raise ValueError(f"could not read {path} as a PyTorch state dict (corrupt or not a blasé 0.3 clone): {err}") from err
    need = ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")
    if not isinstance(sd, dict) or any(k not in sd for k in need):
        raise ValueError(f"{path} is not a blasé 0.3 clone: it needs the keys {need}")
    for k in need:
        v = sd[k]
        if not torch.is_tensor(v):
            raise ValueError(f"{path}: {k} must be a tensor (one value per line), got a {type(v).__name__}; "
                             "the file is not a blasé 0.3 state dict")
        if not (v.dtype.is_floating_point and not v.is_complex()):
            raise ValueError(f"{path}: {k} must be a floating-point tensor, got {v.dtype}")
        if v.ndim != 1:
            raise ValueError(f"{path}: {k} must be a 1-D tensor (one value per line), got shape {tuple(v.shape)}")
    sizes = {k: int(sd[k].numel()) for k in need}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{path}: the line parameters have different lengths {sizes}; each needs one value per line")
    raw = [sd[k].detach().to(torch.float64).cpu().numpy() for k in need]
    arrays = [_checked_array(raw[0], path, "lam_centers", error=ValueError, positive=True)]
    arrays += [_checked_array(a, path, k, error=ValueError, log_limit=LOG_PARAMETER_LIMIT) for a, k in zip(raw[1:], need[1:])]
    order = np.argsort(arrays[0], kind="stable")
    arrays = [a[order] for a in arrays]
    model = LineCloneModel(*arrays, mode=mode, profile=profile, wing_tolerance=wing_tolerance, far_field=far_field,
                           device=resolve_device(device))
    return SpectralClone(model, meta={"source": f"blase03:{path.name}"})
