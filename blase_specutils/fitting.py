"""Transfer-learn a clone against observed spectra given as specutils/muler objects (Sect. 5-6).

:func:`fit_spectrum` is a short composition of named steps: check the settings
(:class:`~blase_specutils.fit_settings.FitSettings`), read the data, select the clones' lines,
build the forward model, run the scans and the stages (:func:`~blase_specutils.core.stages.fit_transfer`),
compute the diagnostics (:mod:`blase_specutils.core.diagnostics`) and make the result
(:class:`~blase_specutils.transfer_result.TransferResult`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import astropy.units as u
import numpy as np
import torch
from specutils import Spectrum, SpectrumList
from torch import Tensor

from .cloning import SpectralClone
from .constants import KERNEL_GROWTH_ROUNDS, MAX_RV_RANGE_KMS, MIN_RESOLVING_POWER, TELLURIC_ONLY_VSINI_KMS  # noqa: F401
from .core.clone import SPEED_OF_LIGHT_KMS, LineCloneModel
from .core.diagnostics import TELLURIC_POWER_SCAN, FitBounds, FitFlag, check_fit, chi2_curvature
from .core.systematics import (rv_by_continuum_degree, rv_information_flags, rv_information_widths,
                               telluric_saturation_flags, value_spread, vsini_by_order_half, vsini_information_flags,
                               vsini_information_widths)
from .core.limits import check_resolving_power, kernel_room, starting_vsini
from .core.options import EngineOptions
from .core.stages import TransferFit, fit_transfer
from .core.training import resolve_device
from .core.transfer import TransferModel
from .fit_settings import FitSettings, _tunables  # noqa: F401
from .frames import FitFrames, prepare_orders, telluric_frame_flags
from .result_products import _LOG_PARAMS, _as_list_class, _line_table, _user_axis  # noqa: F401
from .results_file import RESULT_FORMAT_VERSION  # noqa: F401 (the file layout's version, for users)
from .spectra import FluxOutlierWarning, mask_flux_outliers, refuse_extreme_pixels, spectrum_to_arrays
from .transfer_result import TransferResult, _pm, _power_value  # noqa: F401
from .transfer_result_file import _clone_at, _lines_hdus, _model_from_hdus, _prior_from_hdu, _prior_hdu  # noqa: F401

__all__ = ["fit_spectrum", "FitSettings", "TransferResult", "MissingUncertaintyWarning", "FitFlagWarning", "FitBounds",
           "FitFlag", "TELLURIC_POWER_SCAN"]


class MissingUncertaintyWarning(UserWarning):
    """The data carry no uncertainties; a constant noise level was estimated from the flux."""


class FitFlagWarning(UserWarning):
    """A fit ended with flags (a parameter at a bound, a scan that peaks at its edge, a parameter the
    data do not constrain, an unsuitable clone): the result is returned, and its
    :attr:`TransferResult.flags` say what to doubt."""


def _orders(data) -> list[Spectrum]:
    if isinstance(data, Spectrum):
        if data.flux.ndim != 1:
            raise ValueError("pass a 1-D Spectrum per order (or a SpectrumList / list of orders)")
        return [data]
    if isinstance(data, (SpectrumList, list, tuple)):
        orders = list(data)
        if not orders or not all(isinstance(s, Spectrum) for s in orders):
            raise TypeError("data must be a Spectrum, a SpectrumList, or a list of Spectrum orders")
        return orders
    raise TypeError(f"data must be a specutils Spectrum or a list of them, got {type(data).__name__}")


def _noise_from_flux(flux: np.ndarray) -> float:
    """DER_SNR noise estimate (Stoehr et al. 2008), specutils' ``snr_derived``: see
    :func:`blase_specutils.preprocessing.der_snr_noise`."""
    from .preprocessing import der_snr_noise

    return der_snr_noise(flux)


def _gather(orders: list[Spectrum]):
    """Concatenate orders (sorted by wavelength) into arrays; returns arrays and bookkeeping."""
    pieces = []
    for k, spec in enumerate(orders):
        refuse_extreme_pixels(spec, k)
        arr = spectrum_to_arrays(spec, require_finite=False)
        pieces.append((arr.wavelength[0], k, arr))
    pieces.sort(key=lambda p: p[0])
    wl, flux, sigma, good, oid = [], [], [], [], []
    missing = False
    for _, k, arr in pieces:
        if wl and arr.wavelength[0] <= wl[-1][-1]:
            raise ValueError(
                "échelle orders overlap in wavelength; trim the overlapping ends (or fit the orders separately)"
            )
        s = arr.uncertainty
        if s is None:
            missing = True
            level = _noise_from_flux(arr.flux[arr.good]) if arr.good.sum() >= 5 else np.nan
            s = np.full(arr.flux.size, level)
        bad_sigma = np.isfinite(s) & (s <= 0) & arr.good
        if bad_sigma.any():
            raise ValueError(
                f"order {k} has {int(bad_sigma.sum())} pixels with zero or negative uncertainty; mask them "
                "or give positive 1-sigma uncertainties"
            )
        g = arr.good & np.isfinite(s)
        wl.append(arr.wavelength)
        flux.append(arr.flux)
        sigma.append(s)
        good.append(g)
        oid.append(np.full(arr.flux.size, k))
    out = [np.concatenate(x) for x in (wl, flux, sigma, good, oid)]
    if not out[3].any():
        raise ValueError("every pixel of the data is masked or non-finite: nothing to fit")
    return (*out, missing, [p[1] for p in pieces], [p[2] for p in pieces])



def _resolving_power(value) -> float:
    """R, checked: finite, > 0 and >= :data:`~blase_specutils.constants.MIN_RESOLVING_POWER`."""
    return check_resolving_power(value)


def _fit_settings(**keywords) -> dict:
    """The checked settings of :func:`fit_spectrum` (velocities in km/s, buffer in Å) from its keyword
    arguments (others are ignored), as a dict: :class:`FitSettings` checks them. No data needed, so
    :func:`~blase_specutils.batch.fit_many` checks them before it starts any job. Raises TypeError,
    UnitsError or ValueError naming the argument."""
    s = FitSettings(**{k: v for k, v in keywords.items() if k in FitSettings.field_names()})
    out = {name: getattr(s, name) for name in FitSettings.field_names()}
    out["buffer"] = s.buffer_angstrom
    return out


def fit_spectrum(
    data,
    stellar: SpectralClone | None = None,
    *,
    telluric: SpectralClone | None = None,
    resolving_power: float = 55000.0,
    rv: u.Quantity | float | None = None,
    rv_range: u.Quantity | float = 150.0,
    vsini: u.Quantity | float | None = None,
    limb_darkening: float = 0.6,
    continuum_degree: int = 2,
    tune_lines: Iterable[str] = ("amplitude", "sigma", "gamma", "center"),
    tune_resolving_power: bool = False,
    regularization: float | None = 5.0,
    width_regularization: float | None = None,
    template_epochs: int = 300,
    line_epochs: int = 4000,
    lr: float = 0.03,
    buffer: u.Quantity = 30 * u.AA,
    device: str = "cpu",
    progress: bool = True,
    likelihood=None,
    tune_telluric: Iterable[str] | None = None,
    tune_telluric_power: bool = True,
    telluric_regularization: float | None = 5.0,
    plan: bool | str = "auto",
    bounds: FitBounds | None = None,
    calibration_degree: int | str | None = "auto",
    air: bool | None = None,
    frame: str | None = None,
    barycentric_correction: u.Quantity | float | None = None,
    settings: FitSettings | None = None,
    engine: EngineOptions | None = None,
) -> TransferResult:
    r"""Fit an observed spectrum with a stellar clone, a telluric clone, or both.

    The forward model is Eq. 10: RV-shifted, rotationally broadened clone, times the telluric
    clone raised to a Beer's-law power, :math:`T^X`, convolved with a Gaussian LSF of resolving
    power R, averaged over each data pixel, times a per-order polynomial. Fitting proceeds as users
    need: a χ² scan over RV × v sin i (and then in X when a telluric clone is present), then
    template matching (RV, v sin i, continuum, X; R if asked), then the lines with the L1 pull of
    Eq. 11.

    Bounds and flags (numbers in :class:`~blase_specutils.core.transfer.FitBounds`):
    |RV| ≤ ``rv_range`` (the scan's half width; the RV is projected back after each step);
    0 < v sin i ≤ 600 km/s; R (when tuned) ≥ 0.375 × its start; X > 0, unbounded. A parameter
    within 1 % (RV: 1 km/s) of a bound, a scan whose best χ² is at its edge (RV: either end; v sin
    i: the top, 400 km/s; X: 0.01 or 10), a telluric power that runs away (ends outside 0.01-10 or
    more than a factor 3 from the scan's best), a parameter whose σ from the curvature of χ²
    exceeds 30 % of its value (RV: of max(|RV|, 10 km/s)) or that the line stage moved by as
    much from its template-matching value (the lines and the parameter are then degenerate), a
    stellar clone that is a telluric one
    (by its metadata: ``kind`` or ``source`` naming a telluric template) and a clone whose band
    covers less than 90 % of the good data pixels are listed in :attr:`TransferResult.flags`
    (also in ``repr``, :meth:`TransferResult.summary` and the command line's ``--json``), and
    one :class:`FitFlagWarning` names them. The result is returned all the same.

    Without a stellar clone (``stellar=None``) the model is
    :math:`P_\mathrm{data}\,\mathrm{resample}[T^X * g(R)]`: a telluric-only fit, for example of
    an A0V or hot telluric standard. There is no RV scan and neither RV nor v sin i is fitted:
    :attr:`TransferResult.rv` and :attr:`TransferResult.vsini` are NaN and the summary gives None.

    Parameters
    ----------
    data : Spectrum, SpectrumList or list of Spectrum
        One or more échelle orders (muler's ``HPFSpectrum``/``IGRINSSpectrum`` included), after the
        user's own reduction chain (e.g. ``.remove_nans().deblaze().normalize()``). NaN and masked
        pixels are left out of χ² (not out of the model). Missing uncertainties: a constant noise
        level per order is estimated with the DER_SNR estimator (Stoehr et al. 2008) and a
        :class:`MissingUncertaintyWarning` is issued. DER_SNR counts unresolved line structure as
        noise, so for sharp-lined, line-rich spectra it overestimates (3.8× on the WASP 69 HPF
        order) and χ² is then too small: give uncertainties when you have them.
    stellar : SpectralClone or None
        The stellar clone; only its lines within the data range (± buffer and the RV range) are
        used. None (default): a telluric-only fit (``telluric`` is then required).
    telluric : SpectralClone, optional
        Telluric clone (never Doppler shifted); its lines within the data range ± buffer are used.
    resolving_power : float
        R (HPF ≈ 55,000; IGRINS ≈ 45,000), finite and >= 1,000 (:data:`~blase_specutils.constants.MIN_RESOLVING_POWER`: the
        cost grows as 1/R² and the method needs resolved lines).
    rv : Quantity or float (km/s), optional
        Starting RV, within ± ``rv_range``; if None, the best of a χ² scan over ± ``rv_range``
        in 1 km/s steps (joint with the v sin i scan). Ignored by a telluric-only fit.
    rv_range : Quantity or float (km/s)
        Half width of the RV scan and the bound of the RV, 0 < ``rv_range`` <= 1,000 km/s
        (:data:`~blase_specutils.constants.MAX_RV_RANGE_KMS`): |RV| ≤ ``rv_range`` (an RV that ends within 1 km/s of it is
        flagged); stellar lines within it (and ``buffer``) of the data are used. A star known to
        move faster: tag its velocity on the spectral axis (see ``frame`` below).
    vsini : Quantity or float (km/s), optional
        Starting v sin i, 0-600 km/s. None (default): found, not assumed: the best of a χ² scan over
        14 values log-spaced from 2 to 400 km/s, jointly with the RV scan (the clone is evaluated
        once per RV), starts the optimiser; the bound is 600 km/s (``FitBounds.max_vsini``).
        Ignored by a telluric-only fit.
    limb_darkening : float
        ε of the rotation kernel.
    continuum_degree : int
        Degree (an integer >= 0) of the per-order polynomial.
    tune_lines : str or iterable of str
        Stellar line parameter(s) tuned in the line stage, from ``"amplitude"``, ``"sigma"``,
        ``"gamma"``, ``"center"``, ``"wing"`` (empty: template matching only, unless
        telluric lines are tuned). When widths are tuned, v sin i is held at its template-matching
        value during the line stage (widths and v sin i are nearly degenerate); otherwise it stays
        free. When centres are tuned, the RV is held likewise (a common shift of the centres is
        the RV).
    tune_resolving_power : bool
        Also tune R.
    regularization, width_regularization : float or None
        Λ (finite, >= 0) of the L1 pulls of ln a and of ln σ, ln γ towards the clone (None: no
        pull). The width pull acts on tuned telluric widths too.
    template_epochs, line_epochs : int
        Largest numbers (integers >= 0) of Adam epochs of the two stages (both stop early on a
        plateau; ``line_epochs=0``: pure template matching).
    lr : float
        Adam learning rate (> 0).
    buffer : Quantity
        Lines within this distance (a wavelength >= 0, e.g. ``30 * u.AA``; not a plain number)
        outside the data (plus the RV range) are kept.
    device : str
        'cpu', 'cuda' or 'auto'.
    progress : bool
        Progress bars.
    likelihood : None, "gp", dict or GPContinuumLikelihood
        The noise model of the loss. None (default): χ² with the data uncertainties. ``"gp"``:
        the Gaussian-process pseudo-continuum likelihood of Appendix C.2 (Eq. C4;
        :class:`blase_specutils.gp.GPContinuumLikelihood`, needs ``pip install
        'blase_specutils[gp]'``): a smooth per-order GP over wavelength (Matérn-3/2, initial
        amplitude 1 %, length scale 5 Å) on top of the per-pixel noise, its amplitude and length
        scale tuned with the model in both stages, in place of χ² (on the same scale, so Λ keeps
        its meaning). A dict gives keyword options of that class (e.g. ``{"kernel": "rbf",
        "length_scale": 10.0}``); a ready-made likelihood must cover the concatenated, wavelength-
        sorted pixels of the data. The result's :attr:`TransferResult.pseudo_continuum` is the
        GP's conditional mean, the inferred continuum error.
    tune_telluric : str, iterable of str or None
        Telluric line parameter(s) tuned in the line stage (e.g. ``"amplitude"``), each with its
        own L1 pull towards the telluric clone. None (default): ``()`` (telluric lines held as
        cloned) when a stellar clone is present, ``("amplitude",)`` for a telluric-only fit.
    tune_telluric_power : bool
        Tune the Beer's-law exponent X of the telluric transmission T^X (default True; X starts
        at the best of a χ² scan over 0.01-10 and stays free in the line stage). False: X = 1.
    telluric_regularization : float or None
        Λ (finite, >= 0) of the L1 pull of the telluric ln a towards the telluric clone (None: no
        pull).
    plan : bool or "auto"
        Train through window plans (see :func:`~blase_specutils.core.transfer.fit_transfer`): the
        same fit, with every epoch one CUDA-graph replay on a GPU. ``"auto"``: on CUDA devices when
        the model's ``EngineOptions.plans_on_cuda`` is set; never on CPUs.
    bounds : FitBounds, optional
        The v sin i bound and scan, the RV scan step and the flag rules (default ``FitBounds()``:
        the numbers above).
    air : bool or None
        Whether the data's wavelengths are in air. None (default): as the data say (a FITS WCS
        ``CTYPE1 = 'AWAV'``, ``AIRORVAC``, ``meta['air']``; see
        :func:`~blase_specutils.spectra.wavelength_frame`), vacuum where they say nothing. Air
        wavelengths are converted to vacuum (Morton 2000, :func:`~blase_specutils.spectra.to_vacuum`)
        before the fit: every clone and template is in vacuum, and air data fitted as vacuum are
        off by the air/vacuum offset (−82 km/s near 8700 Å). The result says which it was
        (:attr:`TransferResult.frames`, ``summary()["wavelength_frame"]``); its spectra come back
        on the user's own axis.
    frame : {"observatory", "barycentric"} or None
        The frame of the data's axis. The fit keeps telluric lines at rest in the observatory's
        frame, where the star moves by the measured RV; ``"barycentric"`` data (shifted by muler's
        ``barycentric_correct``/``rv_shift``) are shifted back first, which needs the barycentric
        correction. None (default): ``"observatory"`` for HPF and IGRINS pipeline spectra (muler's
        ``HPFSpectrum``/``IGRINSSpectrum``, :func:`~blase_specutils.io.read_igrins_plp`); for
        other data ``"unstated"``: fitted on the axis as given and no barycentric RV reported (a
        stack of exposures, such as the WASP 69 HPF stack, is usually barycentric already).
    barycentric_correction : Quantity or float (km/s), optional
        The barycentric correction (|v| <= 31 km/s). None: from the first order's FITS header
        (time, target, site; :func:`blase_specutils.frames.barycentric_correction`) where it has
        them. The result reports the measured (observatory) RV :attr:`TransferResult.rv_total`,
        the barycentric RV :attr:`TransferResult.rv_barycentric` and the correction used.

    A radial velocity (or redshift) tagged on the data's spectral axis has the specutils meaning:
    the velocity of the target relative to the observer for the axis as given. It is taken as the
    known part of the star's RV: the scan, the RV bound (|RV_total| <= |tag| + ``rv_range``) and
    the line selection are centred on it, ``rv`` is fitted relative to it, and the result reports
    both, :attr:`TransferResult.rv_tagged` + :attr:`TransferResult.rv` =
    :attr:`TransferResult.rv_total`; output spectra keep the tag.
    calibration_degree : int or None
        Degree of a smooth per-order wavelength correction δv(x) = Σ_k c_k x^k (paper Section 8.8;
        km/s, x from −1 to 1 across each order), shared by the star and the tellurics, tuned in
        both stages with a Gaussian pull of 1 km/s per coefficient towards 0, and reported in m/s
        (:attr:`TransferResult.wavelength_correction`). The telluric lines are its calibrators:
        with a stellar clone alone, a per-order shift and the RV are degenerate within one order.
        None (default): no correction.
    settings : FitSettings, optional
        All the settings above as one checked value (:class:`~blase_specutils.fit_settings.FitSettings`,
        whose fields are these keywords); then no setting keyword may be given. The fit is the same
        as with the keywords.
    engine : EngineOptions, optional
        Which code computes the model (:class:`~blase_specutils.core.options.EngineOptions`), given
        to the forward model and the clones' lines; default each clone's own.

    A telluric clone whose lines already carry the instrument's line-spread function
    (:attr:`SpectralClone.instrument_resolution`, e.g. a clone of muler's TelFit HPF template)
    multiplies *after* the instrumental kernel, so that it is not broadened twice (an
    approximation; see :class:`~blase_specutils.core.transfer.TransferModel`).

    Returns
    -------
    TransferResult
        With :attr:`~TransferResult.flags` and the σ of RV, v sin i and X from the curvature of χ²
        (:attr:`~TransferResult.uncertainties`).

    Warns
    -----
    FitFlagWarning
        When the result has flags.
    ~blase_specutils.spectra.FluxOutlierWarning
        When single-pixel flux outliers were left out of χ² (> 10 robust σ from a running median
        of 7 pixels, alone, and half the local flux level away; or a σ below 1e-3 of its order's
        median): their count and indices are in :attr:`TransferResult.outliers`.

    Raises
    ------
    ValueError
        Neither clone given, no overlap between a clone and the data, bad data, or a setting out of
        range (e.g. ``rv_range <= 0`` or above 1,000 km/s, ``resolving_power`` below 1,000,
        negative ``vsini`` or Λ, an unknown parameter to tune, an unknown ``frame``,
        ``frame="barycentric"`` with no correction); ±inf flux, σ <= 0 or σ outside 1e-150-1e150
        at an unmasked pixel (the message gives the pixel indices).
    TypeError
        ``settings`` together with setting keywords, an ``engine`` that is not an EngineOptions, a
        clone that is not a :class:`~blase_specutils.SpectralClone`, data that are not spectra,
        or a setting of the wrong type (a non-integer epoch count or degree, a plain-number buffer).
    astropy.units.UnitsError
        A velocity or the buffer in the wrong units.
    """
    keywords = {name: value for name, value in locals().items() if name in FitSettings.field_names()}
    if stellar is None and telluric is None:
        raise ValueError("give a stellar clone, a telluric clone (stellar=None, telluric=...), or both")
    if stellar is not None and not isinstance(stellar, SpectralClone):
        raise TypeError("stellar must be a SpectralClone (clone_spectrum, SpectralClone.load or load_blase03) or None")
    if telluric is not None and not isinstance(telluric, (SpectralClone, Mapping, list, tuple)):
        raise TypeError("telluric must be a SpectralClone, a dict of named SpectralClones (one per molecule), or None")
    s = _settings_of(settings, keywords)
    if engine is not None and not isinstance(engine, EngineOptions):
        raise TypeError(f"engine must be an EngineOptions or None, got {type(engine).__name__}")
    d = _read_data(data, s)
    dev = resolve_device(device)
    st = _stellar_lines(stellar, d, s, dev, engine)
    telluric, tel, components, component_names = _telluric_lines(telluric, stellar, d, s, dev, engine)
    model, vsini_scan = _build_model(st, tel, telluric, components, component_names, d, s, dev, engine)
    data_t, w_t = _data_tensors(d, model)
    lik = None
    if likelihood is not None:
        from .gp import build_likelihood  # optional extra: a clear ImportError names it

        lik = build_likelihood(likelihood, d.wl, d.sigma, d.good, d.oid, device=dev)
    starts = _starting_values(st, tel)
    run = _FitRun(model, data_t, w_t, s, common=dict(
        tune_resolving_power=s.tune_resolving_power, lr=s.lr, progress=progress, likelihood=lik,
        tune_telluric_power=model.log_telluric_power.requires_grad, plan=s.plan,
        tune_calibration=model.calibration_degree is not None))
    fit = run.match_template(_rv_scan(d, s, st), vsini_scan)
    template = _template_numbers(model, fit, d)
    tune_telluric = s.tune_telluric_for(st is not None)
    if s.line_epochs and ((st is not None and s.tune_lines) or (tel is not None and tune_telluric)):
        run.tune_lines(fit, tune_telluric)
    result = _make_result(run, fit, d, template, starts, lik, stellar=stellar, telluric=telluric,
                          tune_telluric=tune_telluric, list_class=type(data) if isinstance(data, (SpectrumList, list, tuple)) else None)
    if result.flags:
        warnings.warn(f"fit_spectrum: {len(result.flags)} flag(s) (TransferResult.flags): "
                      + " ".join(f"[{f.code}] {f.message}." for f in result.flags), FitFlagWarning, stacklevel=2)
    return result


def _settings_of(settings: FitSettings | None, keywords: dict) -> FitSettings:
    """The settings of a fit: ``settings``, or the keyword arguments of :func:`fit_spectrum` (not both)."""
    from_keywords = FitSettings(**keywords)
    if settings is None:
        return from_keywords
    if not isinstance(settings, FitSettings):
        raise TypeError(f"settings must be a FitSettings or None, got {type(settings).__name__}")
    if from_keywords != FitSettings():
        changed = [k for k in FitSettings.field_names() if getattr(from_keywords, k) != getattr(FitSettings(), k)]
        raise TypeError(f"fit_spectrum got settings= and the setting keyword(s) {changed}: give them in the "
                        "FitSettings (settings.replace(...)) or give no settings=")
    return settings


@dataclass
class _FitData:
    """The data of a fit as the fit sees them: the user's orders, their frames and the concatenated,
    wavelength-sorted pixels (vacuum, observatory frame) with their bookkeeping."""

    user_orders: list
    frames: FitFrames
    wl: np.ndarray
    flux: np.ndarray
    sigma: np.ndarray
    good: np.ndarray
    oid: np.ndarray
    order_ids: list
    arrs: list
    outlier: np.ndarray
    outliers: dict

    @property
    def tag(self) -> float:
        """The velocity tagged on the data's axis (km/s): the RV scan, its bound and the line
        selection are centred on it."""
        return self.frames.rv_tagged


def _read_data(data, s: FitSettings) -> _FitData:
    """Read the orders into pixels: frames and air wavelengths put right, flux outliers masked (with
    a warning), missing uncertainties estimated (with a warning)."""
    user_orders = _orders(data)  # outputs come back on these (axis, class, meta, velocity tag)
    orders, frames = prepare_orders(user_orders, air=s.air, frame=s.frame,
                                    barycentric_correction=s.barycentric_correction)
    wl, flux, sigma, good, oid, missing, order_ids, arrs = _gather(orders)
    outlier, outliers = mask_flux_outliers(flux, sigma, good, oid, arrs)  # single-pixel spikes, out of χ²
    good = good & ~outlier
    if outliers["count"]:
        warnings.warn(f"{outliers['count']} flux outlier pixel(s) left out of the fit (> {outliers['threshold_sigma']:g} "
                      "robust σ from the running median, alone, and half the local flux level away): "
                      + "; ".join(f"order {k}: index {', '.join(map(str, v[:10]))}" for k, v in outliers["pixels"].items())
                      + " (TransferResult.outliers)", FluxOutlierWarning, stacklevel=3)
    if missing:
        warnings.warn(
            "the data have no uncertainties: using a constant noise level per order from the DER_SNR "
            "estimator, which counts line structure as noise (an overestimate for line-rich spectra)",
            MissingUncertaintyWarning,
            stacklevel=3,
        )
    return _FitData(user_orders, frames, wl, flux, sigma, good, oid, order_ids, arrs, outlier, outliers)


def _stellar_lines(stellar, d: _FitData, s: FitSettings, dev, engine) -> LineCloneModel | None:
    """The stellar clone's lines within the data range (± buffer and the RV range around the tag), on
    ``dev`` (with ``engine``, if given)."""
    if stellar is None:
        return None
    lo = d.wl[0] * (1 - (s.rv_range + d.tag) / SPEED_OF_LIGHT_KMS) - s.buffer_angstrom
    hi = d.wl[-1] * (1 + (s.rv_range - d.tag) / SPEED_OF_LIGHT_KMS) + s.buffer_angstrom
    centers = stellar.model.lam_centers.detach().cpu().numpy()
    sel = (centers > lo) & (centers < hi)
    if not sel.any():
        raise ValueError(
            f"the stellar clone has no lines within the data range {d.wl[0]:.1f}-{d.wl[-1]:.1f} Å (± buffer and RV "
            f"range); its lines span {centers.min():.1f}-{centers.max():.1f} Å. Use a clone of this band."
        )
    return _with_engine(stellar.model.subset(torch.as_tensor(sel)).to(dev), engine)


def _telluric_lines(telluric, stellar, d: _FitData, s: FitSettings, dev, engine):
    """The telluric clone (merged from its components), its lines within the data range ± buffer on
    ``dev`` (frozen), and per line the index of its component with the components' names."""
    if telluric is None:
        return None, None, None, None
    telluric, components, component_names = _merge_telluric(telluric)
    buf = s.buffer_angstrom
    tc = telluric.model.lam_centers.detach().cpu().numpy()
    tsel = (tc > d.wl[0] - buf) & (tc < d.wl[-1] + buf)
    if stellar is None and not tsel.any():
        raise ValueError(
            f"the telluric clone has no lines within the data range {d.wl[0]:.1f}-{d.wl[-1]:.1f} Å (± buffer); its "
            f"lines span {tc.min():.1f}-{tc.max():.1f} Å. Use a telluric clone of this band."
        )
    tel = _with_engine(telluric.model.subset(torch.as_tensor(tsel)).to(dev), engine)
    tel.set_tuned(())
    if components is not None:  # components without a line near the data get no power
        present, components = np.unique(components[tsel], return_inverse=True)
        component_names = tuple(component_names[k] for k in present)
        if not present.size:
            components = None
    return telluric, tel, components, component_names


def _with_engine(clone: LineCloneModel, engine: EngineOptions | None) -> LineCloneModel:
    """``clone``, computing with ``engine`` when one is given (a fresh subset: nothing cached yet)."""
    if engine is not None:
        clone.engine = engine
    return clone


def _build_model(st, tel, telluric, components, component_names, d: _FitData, s: FitSettings, dev,
                 engine) -> tuple[TransferModel, tuple | None]:
    """The forward model at its starting values, and the v sin i scan to run (None: v sin i given or
    no star). The rotation kernel has room for the whole scan, else for the start (it grows when
    reached)."""
    bounds = s.bounds
    vsini_scan = None if (s.vsini is not None or st is None) else bounds.vsini_scan
    vsini_start = bounds.vsini_scan[0] if s.vsini is None else starting_vsini(s.vsini)
    kernel = max(vsini_scan) if vsini_scan is not None else _kernel_room(
        vsini_start if st is not None else TELLURIC_ONLY_VSINI_KMS, bounds.max_vsini)
    if st is None:  # the rotation is unused: the start only has to fit the small kernel
        vsini_start = min(vsini_start, kernel)
    model = TransferModel(st, d.wl, order_index=d.oid, telluric=tel,
                          rv=d.tag + (0.0 if s.rv is None or st is None else s.rv), vsini=vsini_start,
                          resolving_power=s.resolving_power, limb_darkening=s.limb_darkening,
                          continuum_degree=s.continuum_degree, max_vsini=kernel, max_rv=s.rv_range + abs(d.tag),
                          telluric_instrumental=telluric is not None and telluric.instrument_resolution,
                          calibration_degree=s.calibration_degree_for(st is not None, tel is not None),
                          telluric_components=components,
                          telluric_names=None if components is None else component_names, engine=engine).to(dev)
    model.log_telluric_power.requires_grad_(bool(s.tune_telluric_power) and tel is not None)
    return model, vsini_scan


def _data_tensors(d: _FitData, model: TransferModel) -> tuple[Tensor, Tensor]:
    """The data flux and the weights 1/σ² as tensors of the model's dtype and device (0 at masked pixels)."""
    ref = model.stellar if model.stellar is not None else model.telluric
    dev = model.lam_d.device
    data_t = torch.as_tensor(np.where(d.good, d.flux, 0.0), dtype=ref.dtype, device=dev)
    w_t = torch.as_tensor(np.where(d.good, 1.0 / np.where(d.good, d.sigma, 1.0) ** 2, 0.0), dtype=ref.dtype, device=dev)
    return data_t, w_t


def _rv_scan(d: _FitData, s: FitSettings, st) -> np.ndarray | None:
    """The RVs of the initial scan, around the tagged velocity (None: RV given, or no star)."""
    return None if (s.rv is not None or st is None) else d.tag + _rv_grid(s.rv_range, s.bounds.rv_step)


def _starting_values(st, tel) -> dict:
    """The clones' starting line values (the L1 pull's centres, kept for the result's tables)."""
    return dict(
        prior={} if st is None else {k: getattr(st, k).detach().clone() for k in _LOG_PARAMS},
        telluric_prior=None if tel is None else {k: getattr(tel, k).detach().clone() for k in _LOG_PARAMS},
        prior_centers={k: m.lam_centers.detach().cpu().numpy().copy() for k, m in (("stellar", st), ("telluric", tel))
                       if m is not None},
    )


class _FitRun:
    """The stages of one fit on its model and data tensors (:func:`~.core.stages.fit_transfer` calls
    with the settings they share), with the rotation kernel sized to the v sin i found."""

    def __init__(self, model: TransferModel, data_t: Tensor, w_t: Tensor, s: FitSettings, *, common: dict) -> None:
        self.model, self.data_t, self.w_t, self.s, self.common = model, data_t, w_t, s, common

    def match_template(self, scan, vsini_scan) -> TransferFit:
        """Scans, then template matching (lines frozen): with a v sin i scan, the scans run with room
        for its largest value and the kernel is then sized to the v sin i found."""
        model, s, common = self.model, self.s, self.common
        tune_power = common["tune_telluric_power"]
        power_scan = TELLURIC_POWER_SCAN if tune_power else None
        if vsini_scan is None:
            fit = fit_transfer(model, self.data_t, self.w_t, rv_scan=scan, template_epochs=s.template_epochs,
                               line_epochs=0, telluric_power_scan=power_scan, **common)
        else:  # scans with room for 400 km/s, then a kernel sized to the v sin i found
            fit = fit_transfer(model, self.data_t, self.w_t, rv_scan=scan, vsini_scan=vsini_scan, template_epochs=0,
                               line_epochs=0, telluric_power_scan=power_scan, **common)
            model.set_max_vsini(_kernel_room(float(model.vsini.detach()), s.bounds.max_vsini))
            self._template_stage(fit)
        _grow_rotation_kernel(model, s.bounds, lambda: self._template_stage(fit))
        if model.stellar is not None and model.rv.requires_grad:  # the RV's continuum test, lines as cloned
            fit.rv_continuum = rv_by_continuum_degree(model, self.data_t, self.w_t,
                                                      extra_degrees=s.bounds.continuum_test_degrees)
        if model.stellar is not None and model.rot.log_vsini.requires_grad:  # the halves test of v sin i
            fit.vsini_halves = vsini_by_order_half(model, self.data_t, self.w_t)
        if model.stellar is not None:  # how many lines hold RV and v sin i, the lines as cloned
            fit.information_widths = {"rv": rv_information_widths(model, self.w_t),
                                      "vsini": vsini_information_widths(model, self.w_t)}
        return fit

    def _template_stage(self, fit: TransferFit) -> None:
        """Template matching from where the model stands, added to ``fit``."""
        _merge_fits(fit, fit_transfer(self.model, self.data_t, self.w_t, template_epochs=self.s.template_epochs,
                                      line_epochs=0, **self.common))

    def tune_lines(self, fit: TransferFit, tune_telluric: tuple[str, ...]) -> None:
        """The line stage, run again with a larger rotation kernel while v sin i reaches it."""
        s = self.s

        def line_stage() -> None:
            fit2 = fit_transfer(self.model, self.data_t, self.w_t, rv_scan=None, template_epochs=0,
                                line_epochs=s.line_epochs, tune_lines=s.tune_lines, regularization=s.regularization,
                                width_regularization=s.width_regularization, tune_telluric=tune_telluric,
                                telluric_regularization=s.telluric_regularization, **self.common)
            fit.stages.update(fit2.stages)
            fit.chi2["lines"] = fit2.chi2["lines"]

        line_stage()
        _grow_rotation_kernel(self.model, s.bounds, line_stage)


def _template_numbers(model: TransferModel, fit: TransferFit, d: _FitData) -> dict:
    """χ², reduced χ², RV, v sin i, R and X after template matching (RV relative to the tag)."""
    st, tel = model.stellar, model.telluric
    n_good = int(d.good.sum())
    return dict(chi2=fit.chi2["template"], chi2_reduced=fit.chi2["template"] / max(n_good - 3, 1),
                rv=None if st is None else float(model.rv.detach()) - d.tag,
                vsini=None if st is None else float(model.vsini.detach()),
                resolving_power=float(model.resolving_power.detach()),
                telluric_power=None if tel is None else _power_value(model))


def _make_result(run: _FitRun, fit: TransferFit, d: _FitData, template: dict, starts: dict, lik, *, stellar,
                 telluric, tune_telluric: tuple[str, ...], list_class) -> TransferResult:
    """The result: the model at the pixels, the σ from the curvature of χ², the flags and the record."""
    model, s = run.model, run.s
    st, tel = model.stellar, model.telluric
    pseudo = None
    with torch.no_grad():
        model_flux = model().cpu().numpy()
        if lik is not None:
            pseudo = lik.conditional_mean(run.data_t - model()).cpu().numpy()
    tune_power = run.common["tune_telluric_power"]
    settings = dict(regularization=s.regularization, width_regularization=s.width_regularization,
                    tune_lines=",".join(s.tune_lines) if st is not None else "", line_epochs=s.line_epochs,
                    template_epochs=s.template_epochs, tune_telluric=",".join(tune_telluric) if tel is not None else "",
                    tune_telluric_power=tune_power, telluric_regularization=s.telluric_regularization)
    sigmas = chi2_curvature(model, run.data_t, run.w_t)
    for key, values in (("rv_continuum", fit.rv_continuum), ("vsini_halves", fit.vsini_halves)):
        spread = value_spread(values)
        if spread is not None:
            sigmas[key] = spread
    tuned = (("rv", "vsini") if st is not None else ()) + (("resolving_power",) if s.tune_resolving_power else ()) + \
        (("telluric_power",) if tune_power else ())
    moved = dict(template, rv=d.tag + template["rv"]) if "lines" in fit.chi2 and st is not None else None
    flags = check_fit(model, fit, bounds=s.bounds, sigmas=sigmas, tuned=tuned,
                      start={"resolving_power": s.resolving_power}, template=moved, weight=run.w_t)
    flags += _clone_flags(stellar, telluric, d.wl, d.good, float(model.rv.detach()) if st is not None else 0.0, s.bounds)
    # RV and v sin i held by one or two lines, counted by match_template (the lines as cloned)
    widths = fit.information_widths or {}
    if "rv" in tuned and widths.get("rv") is not None:
        flags += rv_information_flags(model, run.w_t, widths=widths["rv"])
    if "vsini" in tuned and widths.get("vsini") is not None:
        flags += vsini_information_flags(model, run.w_t, widths=widths["vsini"])
    flags += telluric_saturation_flags(model, run.w_t)  # T^X extrapolated from a saturated template
    flags += telluric_frame_flags(model, d.wl, d.flux, d.sigma, d.good, model_flux, d.frames)  # tellurics vs the frame
    return TransferResult(
        model=model, orders=d.user_orders, order_ids=d.order_ids, arrays=d.arrs, wavelength=d.wl, flux=d.flux,
        sigma=d.sigma, good=d.good, order_of_pixel=d.oid, model_flux=model_flux, template=template, fit=fit,
        settings=settings, stellar_clone=stellar, telluric_clone=telluric, likelihood=lik,
        pseudo_continuum_flux=pseudo, flags=flags, uncertainties=sigmas, frames=d.frames, outlier_mask=d.outlier,
        outliers=d.outliers, list_class=list_class, **starts,
    )


def _merge_telluric(telluric) -> tuple[SpectralClone, np.ndarray | None, tuple[str, ...]]:
    """One telluric clone, and per line the index of its component, from a clone or several.

    ``telluric``: a SpectralClone (one power: components None), a dict name → SpectralClone, or a
    list/tuple of clones (named by ``meta["molecule"]``, else their position). The merged clone
    carries all lines (:meth:`LineCloneModel.concatenate`), the union of the bands and
    ``meta["components"]``; the clones must agree on ``instrument_resolution``."""
    if isinstance(telluric, SpectralClone):
        return telluric, None, ("",)
    if isinstance(telluric, Mapping):
        names, clones = [str(k) for k in telluric], list(telluric.values())
    else:
        clones = list(telluric)
        names = [str((getattr(c, "meta", None) or {}).get("molecule", k)) for k, c in enumerate(clones)]
    if not clones:
        raise ValueError("telluric= got no clones: give a SpectralClone or a dict of them")
    for name, c in zip(names, clones):
        if not isinstance(c, SpectralClone):
            raise TypeError(f"telluric component {name!r} must be a SpectralClone, got {type(c).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"telluric components need distinct names, got {names}")
    if len({c.instrument_resolution for c in clones}) > 1:
        raise ValueError("the telluric components mix clones at the instrument's resolution and at native "
                         "resolution (meta['lsf']); clone them all from templates of one kind")
    if len(clones) == 1:
        return clones[0], None, tuple(names)
    model, comp = LineCloneModel.concatenate([c.model for c in clones])
    bands = [c.band for c in clones]
    band = None if any(b is None for b in bands) else (min(b[0] for b in bands), max(b[1] for b in bands))
    meta = {"kind": "telluric", "lsf": "instrument" if clones[0].instrument_resolution else "native",
            "components": ",".join(names),
            "source": "+".join(str(c.meta.get("source", "")) for c in clones)}
    return SpectralClone(model, band=band, meta=meta), comp.cpu().numpy(), tuple(names)



def _kernel_room(vsini: float, bound: float) -> float:
    """Half width (km/s) of the rotation kernel for a fit at ``vsini`` (:func:`~blase_specutils.core.limits.kernel_room`)."""
    return kernel_room(vsini, bound)


def _grow_rotation_kernel(model: TransferModel, bounds: FitBounds, rerun, max_rounds: int = KERNEL_GROWTH_ROUNDS) -> None:
    """While v sin i sits at the rotation kernel's half width below the v sin i bound, double the
    kernel (at most to the bound) and ``rerun()`` the stage from where it stopped: v sin i is found,
    not capped by the working kernel size (only ``bounds.max_vsini`` bounds it, and is flagged)."""
    if model.stellar is None or not model.rot.log_vsini.requires_grad:
        return
    for _ in range(max_rounds):
        room = model.rot.max_vsini
        if room >= bounds.max_vsini or float(model.vsini.detach()) < room * (1.0 - bounds.bound_tolerance):
            return
        model.set_max_vsini(min(bounds.max_vsini, 2.0 * room))
        rerun()


def _merge_fits(fit: TransferFit, more: TransferFit) -> None:
    """Add the stages, χ² and scans of a later :func:`fit_transfer` call to ``fit`` (its "start" χ² is kept)."""
    fit.stages.update(more.stages)
    fit.chi2.update({k: v for k, v in more.chi2.items() if k != "start"})
    for name in ("rv_scan", "vsini_scan", "rv_vsini_scan", "telluric_power_scan"):
        if getattr(more, name) is not None:
            setattr(fit, name, getattr(more, name))


def _rv_grid(rv_range: float, step: float) -> np.ndarray:
    """RVs of the scan: from −rv_range to +rv_range in ``step`` km/s, both ends included."""
    n = int(math.floor(2.0 * rv_range / step + 1e-9))
    grid = -rv_range + step * np.arange(n + 1)
    return grid if math.isclose(grid[-1], rv_range) else np.append(grid, rv_range)


def _clone_kind(clone: SpectralClone) -> str | None:
    """``"telluric"`` or ``"stellar"`` when the clone's metadata say so (``kind``, or a ``source``
    naming an embedded template of that kind or containing the word "telluric"), else None."""
    from .templates import TEMPLATES

    meta = {str(k).lower(): v for k, v in (clone.meta or {}).items()}
    kind = str(meta.get("kind", "")).strip().lower()
    if kind in ("telluric", "stellar"):
        return kind
    source = str(meta.get("source", "")).strip()
    if source in TEMPLATES:
        return TEMPLATES[source].get("kind")
    return "telluric" if "telluric" in source.lower() else None


def _clone_flags(stellar, telluric, wl: np.ndarray, good: np.ndarray, rv: float, bounds: FitBounds) -> list[FitFlag]:
    """Flags of the clones themselves: a telluric clone given as the stellar one, and clones whose
    band covers less than ``bounds.min_coverage`` of the good data pixels."""
    flags = []
    if stellar is not None and _clone_kind(stellar) == "telluric":
        flags.append(FitFlag("stellar_clone_is_telluric", "the stellar clone is a telluric one (its metadata name "
                             f"{stellar.meta.get('source') or stellar.meta.get('kind')!r}): telluric lines stay in "
                             "the observatory frame and take no RV or rotation; pass it as telluric=... (command "
                             "line: --telluric) and give a stellar clone as the stellar one", "stellar"))
    w = wl[good]
    for name, clone, shift in (("stellar", stellar, rv), ("telluric", telluric, 0.0)):
        if clone is None or w.size == 0:
            continue
        if clone.band is not None:
            lo, hi = (float(x) for x in clone.band)
        else:
            c = clone.model.lam_centers.detach().cpu().numpy()
            lo, hi = float(c.min()), float(c.max())
        doppler = 1.0 + shift / SPEED_OF_LIGHT_KMS
        frac = float(np.mean((w >= lo * doppler) & (w <= hi * doppler)))
        if frac < bounds.min_coverage:
            flags.append(FitFlag(f"{name}_clone_coverage", f"the {name} clone's band ({lo:.1f}-{hi:.1f} Å) covers "
                                 f"{100 * frac:.0f} % of the good data pixels ({w.min():.1f}-{w.max():.1f} Å), less "
                                 f"than {100 * bounds.min_coverage:.0f} %: the rest is fitted with no or untrained "
                                 "lines; clone a band that covers the data", name))
    return flags
