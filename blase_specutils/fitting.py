"""Transfer-learn a clone against observed spectra given as specutils/muler objects (Sect. 5-6)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits
from astropy.table import QTable
from specutils import Spectrum, SpectrumList

from .cloning import SpectralClone, _equivalent_widths
from .core.clone import SPEED_OF_LIGHT_KMS, TUNABLE, LineCloneModel
from .core.training import check_integer, check_real, resolve_device
from .core.transfer import (TELLURIC_POWER_SCAN, FitBounds, FitFlag, TransferFit, TransferModel, check_fit,
                             chi2_curvature, fit_transfer)
from .frames import FitFrames, check_frame_settings, prepare_orders, telluric_frame_flags
from .preprocessing import _as_band, _buffer_angstrom, _velocity_kms
from .results_file import RESULT_FORMAT_VERSION  # noqa: F401 (the file layout's version, for users)
from .spectra import (FluxOutlierWarning, SpectrumArrays, arrays_to_spectrum, mask_flux_outliers,
                      refuse_extreme_pixels, spectrum_to_arrays, wavelength_to_angstrom)

__all__ = ["fit_spectrum", "TransferResult", "MissingUncertaintyWarning", "FitFlagWarning", "FitBounds", "FitFlag",
           "TELLURIC_POWER_SCAN"]


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


def _tunables(value, name: str) -> tuple[str, ...]:
    """Line parameters to tune: one name (``"amplitude"``) or an iterable of names from ``TUNABLE``."""
    names = (value,) if isinstance(value, str) else value
    try:
        names = tuple(names)
    except TypeError as err:
        raise TypeError(f"{name} must be a parameter name or a sequence of them, e.g. ('amplitude', 'sigma'), "
                        f"got {value!r}") from err
    bad = [t for t in names if not isinstance(t, str) or t not in TUNABLE]
    if bad:
        raise ValueError(f"{name}: unknown tunable parameter(s) {bad}; choose from {TUNABLE}")
    return names


#: Lowest resolving power a fit accepts: the cost of the LSF convolution grows as 1/R² and the
#: method needs resolved lines; R = 1000 is already a low-resolution spectrograph.
MIN_RESOLVING_POWER = 1000.0
#: Largest ``rv_range`` (km/s): the fastest stars known move at ~1,000 km/s; a larger known velocity
#: is tagged on the spectral axis (``radial_velocity``), around which the scan is centred.
MAX_RV_RANGE_KMS = 1000.0


def _resolving_power(value) -> float:
    """R, checked: finite, > 0 and >= :data:`MIN_RESOLVING_POWER`."""
    r = check_real(value, "resolving_power", positive=True)
    if r < MIN_RESOLVING_POWER:
        raise ValueError(f"resolving_power must be >= {MIN_RESOLVING_POWER:g} (the LSF kernel grows as 1/R, the cost as "
                         f"1/R²; the method needs resolved lines), got {r:g}")
    return r


def _fit_settings(*, resolving_power, rv, rv_range, vsini, continuum_degree, tune_lines, regularization,
                  width_regularization, template_epochs, line_epochs, lr, buffer, tune_telluric,
                  telluric_regularization, bounds=None, air=None, frame=None, barycentric_correction=None,
                  **_) -> dict:
    """The checked settings of :func:`fit_spectrum` (velocities in km/s, buffer in Å), from its keyword
    arguments (others are ignored); no data needed, so :func:`~blase_specutils.batch.fit_many` checks
    them before it starts any job. Raises TypeError, UnitsError or ValueError naming the argument."""
    if bounds is not None and not isinstance(bounds, FitBounds):
        raise TypeError(f"bounds must be a FitBounds or None, got {type(bounds).__name__}")
    b = FitBounds() if bounds is None else bounds
    check_frame_settings(air=air, frame=frame, barycentric_correction=barycentric_correction)
    rv_range_k = _velocity_kms(rv_range, "rv_range")
    if not 0 < rv_range_k <= MAX_RV_RANGE_KMS:
        raise ValueError(f"rv_range must be > 0 km/s and at most {MAX_RV_RANGE_KMS:g} km/s (the half width of the RV scan and "
                         f"of the line selection; stars move slower: tag a larger known velocity on the spectral axis "
                         f"with spectrum.set_radial_velocity_to), got {rv_range_k} km/s")
    rv_k = None if rv is None else _velocity_kms(rv, "rv")
    if rv_k is not None and abs(rv_k) > rv_range_k:
        raise ValueError(f"rv = {rv_k} km/s is outside the RV bound ±rv_range = ±{rv_range_k} km/s; widen rv_range")
    vsini_k = None if vsini is None else _velocity_kms(vsini, "vsini", nonnegative=True)
    if vsini_k is not None and vsini_k > b.max_vsini:
        raise ValueError(f"vsini = {vsini_k} km/s is above the bound max_vsini = {b.max_vsini} km/s (FitBounds)")
    return dict(
        resolving_power=_resolving_power(resolving_power),
        rv=rv_k,
        rv_range=rv_range_k,
        vsini=vsini_k,
        bounds=b,
        continuum_degree=check_integer(continuum_degree, "continuum_degree", minimum=0),
        tune_lines=_tunables(tune_lines, "tune_lines"),
        regularization=check_real(regularization, "regularization", optional=True),
        width_regularization=check_real(width_regularization, "width_regularization", optional=True),
        template_epochs=check_integer(template_epochs, "template_epochs", minimum=0),
        line_epochs=check_integer(line_epochs, "line_epochs", minimum=0),
        lr=check_real(lr, "lr", positive=True),
        buffer=_buffer_angstrom(buffer),
        tune_telluric=None if tune_telluric is None else _tunables(tune_telluric, "tune_telluric"),
        telluric_regularization=check_real(telluric_regularization, "telluric_regularization", optional=True),
    )


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
    calibration_degree: int | None = None,
    air: bool | None = None,
    frame: str | None = None,
    barycentric_correction: u.Quantity | float | None = None,
) -> "TransferResult":
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
        R (HPF ≈ 55,000; IGRINS ≈ 45,000), finite and >= 1,000 (:data:`MIN_RESOLVING_POWER`: the
        cost grows as 1/R² and the method needs resolved lines).
    rv : Quantity or float (km/s), optional
        Starting RV, within ± ``rv_range``; if None, the best of a χ² scan over ± ``rv_range``
        in 1 km/s steps (joint with the v sin i scan). Ignored by a telluric-only fit.
    rv_range : Quantity or float (km/s)
        Half width of the RV scan and the bound of the RV, 0 < ``rv_range`` <= 1,000 km/s
        (:data:`MAX_RV_RANGE_KMS`): |RV| ≤ ``rv_range`` (an RV that ends within 1 km/s of it is
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
        free.
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
        A clone that is not a :class:`~blase_specutils.SpectralClone`, data that are not spectra,
        or a setting of the wrong type (a non-integer epoch count or degree, a plain-number buffer).
    astropy.units.UnitsError
        A velocity or the buffer in the wrong units.
    """
    if stellar is None and telluric is None:
        raise ValueError("give a stellar clone, a telluric clone (stellar=None, telluric=...), or both")
    if stellar is not None and not isinstance(stellar, SpectralClone):
        raise TypeError("stellar must be a SpectralClone (clone_spectrum, SpectralClone.load or load_blase03) or None")
    if telluric is not None and not isinstance(telluric, (SpectralClone, Mapping, list, tuple)):
        raise TypeError("telluric must be a SpectralClone, a dict of named SpectralClones (one per molecule), or None")
    checked = _fit_settings(resolving_power=resolving_power, rv=rv, rv_range=rv_range, vsini=vsini,
                            continuum_degree=continuum_degree, tune_lines=tune_lines, regularization=regularization,
                            width_regularization=width_regularization, template_epochs=template_epochs,
                            line_epochs=line_epochs, lr=lr, buffer=buffer, tune_telluric=tune_telluric,
                            telluric_regularization=telluric_regularization, bounds=bounds, air=air, frame=frame,
                            barycentric_correction=barycentric_correction)
    rv_k, rv_range_k, vsini_k, buf = (checked[k] for k in ("rv", "rv_range", "vsini", "buffer"))
    if calibration_degree is not None:
        calibration_degree = check_integer(calibration_degree, "calibration_degree", minimum=0)
    bounds = checked["bounds"]
    resolving_power, continuum_degree, lr = checked["resolving_power"], checked["continuum_degree"], checked["lr"]
    template_epochs, line_epochs = checked["template_epochs"], checked["line_epochs"]
    tune_lines, tune_telluric = checked["tune_lines"], checked["tune_telluric"]
    regularization, width_regularization, telluric_regularization = (
        checked[k] for k in ("regularization", "width_regularization", "telluric_regularization"))
    user_orders = _orders(data)  # outputs come back on these (axis, class, meta, velocity tag)
    orders, frames = prepare_orders(user_orders, air=air, frame=frame, barycentric_correction=barycentric_correction)
    tag = frames.rv_tagged  # the RV scan, its bound and the line selection are centred on a tagged velocity
    wl, flux, sigma, good, oid, missing, order_ids, arrs = _gather(orders)
    outlier, outliers = mask_flux_outliers(flux, sigma, good, oid, arrs)  # single-pixel spikes, out of χ²
    good = good & ~outlier
    if outliers["count"]:
        warnings.warn(f"{outliers['count']} flux outlier pixel(s) left out of the fit (> {outliers['threshold_sigma']:g} "
                      "robust σ from the running median, alone, and half the local flux level away): "
                      + "; ".join(f"order {k}: index {', '.join(map(str, v[:10]))}" for k, v in outliers["pixels"].items())
                      + " (TransferResult.outliers)", FluxOutlierWarning, stacklevel=2)
    if missing:
        warnings.warn(
            "the data have no uncertainties: using a constant noise level per order from the DER_SNR "
            "estimator, which counts line structure as noise (an overestimate for line-rich spectra)",
            MissingUncertaintyWarning,
            stacklevel=2,
        )
    if tune_telluric is None:
        tune_telluric = ("amplitude",) if stellar is None else ()
    dev = resolve_device(device)
    st = None
    if stellar is not None:
        lo = wl[0] * (1 - (rv_range_k + tag) / SPEED_OF_LIGHT_KMS) - buf
        hi = wl[-1] * (1 + (rv_range_k - tag) / SPEED_OF_LIGHT_KMS) + buf
        centers = stellar.model.lam_centers.detach().cpu().numpy()
        sel = (centers > lo) & (centers < hi)
        if not sel.any():
            raise ValueError(
                f"the stellar clone has no lines within the data range {wl[0]:.1f}-{wl[-1]:.1f} Å (± buffer and RV "
                f"range); its lines span {centers.min():.1f}-{centers.max():.1f} Å. Use a clone of this band."
            )
        st = stellar.model.subset(torch.as_tensor(sel)).to(dev)
    tel = None
    components = None
    if telluric is not None:
        telluric, components, component_names = _merge_telluric(telluric)
        tc = telluric.model.lam_centers.detach().cpu().numpy()
        tsel = (tc > wl[0] - buf) & (tc < wl[-1] + buf)
        if stellar is None and not tsel.any():
            raise ValueError(
                f"the telluric clone has no lines within the data range {wl[0]:.1f}-{wl[-1]:.1f} Å (± buffer); its "
                f"lines span {tc.min():.1f}-{tc.max():.1f} Å. Use a telluric clone of this band."
            )
        tel = telluric.model.subset(torch.as_tensor(tsel)).to(dev)
        tel.set_tuned(())
        if components is not None:  # components without a line near the data get no power
            present, components = np.unique(components[tsel], return_inverse=True)
            component_names = tuple(component_names[k] for k in present)
            if not present.size:
                components = None
    vsini_scan = None if (vsini_k is not None or st is None) else bounds.vsini_scan
    vsini_start = bounds.vsini_scan[0] if vsini_k is None else max(vsini_k, 0.05)
    # the rotation kernel: room for the whole v sin i scan, else for the start (it grows when reached)
    kernel = max(vsini_scan) if vsini_scan is not None else _kernel_room(vsini_start if st is not None else 3.0,
                                                                         bounds.max_vsini)
    model = TransferModel(st, wl, order_index=oid, telluric=tel, rv=tag + (0.0 if rv_k is None or st is None else rv_k),
                          vsini=vsini_start, resolving_power=resolving_power,
                          limb_darkening=limb_darkening, continuum_degree=continuum_degree,
                          max_vsini=kernel, max_rv=rv_range_k + abs(tag),
                          telluric_instrumental=telluric is not None and telluric.instrument_resolution,
                          calibration_degree=calibration_degree, telluric_components=components,
                          telluric_names=None if components is None else component_names).to(dev)
    tune_power = bool(tune_telluric_power) and tel is not None
    model.log_telluric_power.requires_grad_(tune_power)
    ref = st if st is not None else tel
    data_t = torch.as_tensor(np.where(good, flux, 0.0), dtype=ref.dtype, device=dev)
    w_t = torch.as_tensor(np.where(good, 1.0 / np.where(good, sigma, 1.0) ** 2, 0.0), dtype=ref.dtype, device=dev)
    lik = None
    if likelihood is not None:
        from .gp import build_likelihood  # optional extra: a clear ImportError names it

        lik = build_likelihood(likelihood, wl, sigma, good, oid, device=dev)
    scan = None if (rv_k is not None or st is None) else tag + _rv_grid(rv_range_k, bounds.rv_step)
    prior = {} if st is None else {k: getattr(st, k).detach().clone() for k in _LOG_PARAMS}
    telluric_prior = None if tel is None else {k: getattr(tel, k).detach().clone() for k in _LOG_PARAMS}
    prior_centers = {k: m.lam_centers.detach().cpu().numpy().copy() for k, m in (("stellar", st), ("telluric", tel))
                     if m is not None}
    common = dict(tune_resolving_power=tune_resolving_power, lr=lr, progress=progress, likelihood=lik,
                  tune_telluric_power=tune_power, plan=plan, tune_calibration=calibration_degree is not None)
    power_scan = TELLURIC_POWER_SCAN if tune_power else None
    if vsini_scan is None:
        fit = fit_transfer(model, data_t, w_t, rv_scan=scan, template_epochs=template_epochs, line_epochs=0,
                           telluric_power_scan=power_scan, **common)
    else:  # scans with room for 400 km/s, then a kernel sized to the v sin i found
        fit = fit_transfer(model, data_t, w_t, rv_scan=scan, vsini_scan=vsini_scan, template_epochs=0, line_epochs=0,
                           telluric_power_scan=power_scan, **common)
        model.set_max_vsini(_kernel_room(float(model.vsini.detach()), bounds.max_vsini))
        _merge_fits(fit, fit_transfer(model, data_t, w_t, template_epochs=template_epochs, line_epochs=0, **common))
    _grow_rotation_kernel(model, bounds, lambda: _merge_fits(fit, fit_transfer(
        model, data_t, w_t, template_epochs=template_epochs, line_epochs=0, **common)))
    n_good = int(good.sum())
    template = dict(chi2=fit.chi2["template"], chi2_reduced=fit.chi2["template"] / max(n_good - 3, 1),
                    rv=None if st is None else float(model.rv.detach()) - tag,
                    vsini=None if st is None else float(model.vsini.detach()),
                    resolving_power=float(model.resolving_power.detach()),
                    telluric_power=None if tel is None else _power_value(model))
    if line_epochs and ((st is not None and tune_lines) or (tel is not None and tune_telluric)):
        def line_stage() -> None:
            fit2 = fit_transfer(model, data_t, w_t, rv_scan=None, template_epochs=0, line_epochs=line_epochs,
                                tune_lines=tune_lines, regularization=regularization,
                                width_regularization=width_regularization, tune_telluric=tune_telluric,
                                telluric_regularization=telluric_regularization, **common)
            fit.stages.update(fit2.stages)
            fit.chi2["lines"] = fit2.chi2["lines"]

        line_stage()
        _grow_rotation_kernel(model, bounds, line_stage)
    pseudo = None
    with torch.no_grad():
        model_flux = model().cpu().numpy()
        if lik is not None:
            pseudo = lik.conditional_mean(data_t - model()).cpu().numpy()
    settings = dict(regularization=regularization, width_regularization=width_regularization,
                    tune_lines=",".join(tune_lines) if st is not None else "", line_epochs=line_epochs,
                    template_epochs=template_epochs, tune_telluric=",".join(tune_telluric) if tel is not None else "",
                    tune_telluric_power=tune_power, telluric_regularization=telluric_regularization)
    sigmas = chi2_curvature(model, data_t, w_t)
    tuned = (("rv", "vsini") if st is not None else ()) + (("resolving_power",) if tune_resolving_power else ()) + \
        (("telluric_power",) if tune_power else ())
    flags = check_fit(model, fit, bounds=bounds, sigmas=sigmas, tuned=tuned,
                      start={"resolving_power": resolving_power},
                      template=dict(template, rv=tag + template["rv"]) if "lines" in fit.chi2 and st is not None else None)
    flags += _clone_flags(stellar, telluric, wl, good, float(model.rv.detach()) if st is not None else 0.0, bounds)
    flags += telluric_frame_flags(model, wl, flux, sigma, good, model_flux, frames)  # tellurics vs the stated frame
    result = TransferResult(
        model=model, orders=user_orders, order_ids=order_ids, arrays=arrs, wavelength=wl, flux=flux, sigma=sigma,
        good=good, order_of_pixel=oid, model_flux=model_flux, prior=prior, template=template, fit=fit,
        settings=settings, stellar_clone=stellar, telluric_clone=telluric, likelihood=lik,
        pseudo_continuum_flux=pseudo, telluric_prior=telluric_prior, prior_centers=prior_centers,
        flags=flags, uncertainties=sigmas, frames=frames, outlier_mask=outlier, outliers=outliers,
        list_class=type(data) if isinstance(data, (SpectrumList, list, tuple)) else None,
    )
    if flags:
        warnings.warn(f"fit_spectrum: {len(flags)} flag(s) (TransferResult.flags): "
                      + " ".join(f"[{f.code}] {f.message}." for f in flags), FitFlagWarning, stacklevel=2)
    return result


def _power_value(model: TransferModel) -> float | dict[str, float]:
    """The fitted Beer's-law power X, or a dict of the powers X_k by component name."""
    x = model.telluric_power.detach().cpu()
    if x.ndim == 0:
        return float(x)
    return {n: float(v) for n, v in zip(model.telluric_names, x)}


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
    """Half width (km/s) of the rotation kernel for a fit at ``vsini``: max(2 v sin i, v sin i + 20 km/s),
    at most the v sin i bound. Not a bound: :func:`_grow_rotation_kernel` enlarges it when reached."""
    return min(float(bound), max(2.0 * vsini, vsini + 20.0))


def _grow_rotation_kernel(model: TransferModel, bounds: FitBounds, rerun, max_rounds: int = 8) -> None:
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


#: Names of the per-line log parameters kept as the clone's starting values (the L1 pull's centre).
_LOG_PARAMS = ("log_amplitudes", "log_sigmas", "log_gammas")


def _line_table(clone: LineCloneModel, prior: dict) -> QTable:
    """Clone (``prior``) and fitted values of each line of ``clone``, with equivalent widths and the change."""
    with torch.no_grad():
        c = clone.lam_centers.detach().cpu().numpy()
        fit = {k: getattr(clone, k).detach().exp().cpu().numpy() for k in _LOG_PARAMS}
        clo = {k: prior[k].detach().exp().cpu().numpy() for k in _LOG_PARAMS}
    m = clone
    ew_fit = _equivalent_widths(fit["log_amplitudes"], fit["log_sigmas"], fit["log_gammas"], m.mode, m.sign, m.profile)
    ew_clo = _equivalent_widths(clo["log_amplitudes"], clo["log_sigmas"], clo["log_gammas"], m.mode, m.sign, m.profile)
    t = QTable()
    t["center"] = c * u.AA
    t["amplitude_clone"] = clo["log_amplitudes"] * u.AA
    t["amplitude_fit"] = fit["log_amplitudes"] * u.AA
    t["sigma_clone"] = clo["log_sigmas"] * u.AA
    t["sigma_fit"] = fit["log_sigmas"] * u.AA
    t["gamma_clone"] = clo["log_gammas"] * u.AA
    t["gamma_fit"] = fit["log_gammas"] * u.AA
    t["equivalent_width_clone"] = ew_clo * u.AA
    t["equivalent_width_fit"] = ew_fit * u.AA
    t["delta_ln_amplitude"] = np.log(fit["log_amplitudes"] / clo["log_amplitudes"])
    t["changed"] = np.abs(t["delta_ln_amplitude"]) > 0.01
    return t


def _clone_at(fitted: LineCloneModel, prior: dict, centers: np.ndarray | None = None) -> LineCloneModel:
    """A copy of ``fitted`` holding the starting values ``prior`` (and ``centers``, if given)."""
    m = fitted.subset(torch.arange(fitted.n_lines, device=fitted.lam_centers.device))
    with torch.no_grad():
        for k in _LOG_PARAMS:
            getattr(m, k).copy_(prior[k])
        if centers is not None:
            m.lam_centers.copy_(torch.as_tensor(centers, dtype=torch.float64))
    return m


def _lines_hdus(model: LineCloneModel, prefix: str) -> list:
    """``{prefix}LINES`` and ``{prefix}WING`` tables of a line model (the clone file's layout)."""
    cpu = lambda t: t.detach().cpu().numpy().astype(np.float64)  # noqa: E731
    lines = fits.BinTableHDU.from_columns(
        [fits.Column("lam_center", "D", unit="Angstrom", array=cpu(model.lam_centers)),
         fits.Column("log_amp", "D", array=cpu(model.log_amplitudes)),
         fits.Column("log_sigma", "D", array=cpu(model.log_sigmas)),
         fits.Column("log_gamma", "D", array=cpu(model.log_gammas))],
        name=f"{prefix}LINES",
    )
    h = lines.header
    h["MODE"], h["PROFILE"], h["EMISSION"] = model.mode, model.profile, model.emission
    h["WINGTOL"], h["FARFIELD"] = model.wing_tolerance, bool(model.far_field)
    h["TUNE"], h["NLINES"] = ",".join(model.tuned), model.n_lines
    wing = fits.BinTableHDU.from_columns(
        [fits.Column("line", "K", array=model.broad_lines.cpu().numpy().astype(np.int64)),
         fits.Column("alpha", "D", array=cpu(model.wing_alpha)),
         fits.Column("log_lt", "D", array=cpu(model.wing_log_lt)),
         fits.Column("log_b", "D", array=cpu(model.wing_log_b))],
        name=f"{prefix}WING",
    )
    return [lines, wing]


def _model_from_hdus(lines, wing, device) -> LineCloneModel:
    """The inverse of :func:`_lines_hdus`."""
    h, ld, wd = lines.header, lines.data, wing.data
    cols = [np.array(ld[c], dtype=np.float64) for c in ("lam_center", "log_amp", "log_sigma", "log_gamma")]
    broad = np.array(wd["line"], dtype=np.int64) if wd is not None else np.zeros(0, np.int64)
    model = LineCloneModel(*cols, mode=h["MODE"], profile=h["PROFILE"], emission=bool(h["EMISSION"]),
                           tune=[t for t in str(h.get("TUNE", "")).split(",") if t],
                           wing_tolerance=float(h["WINGTOL"]), far_field=bool(h.get("FARFIELD", True)),
                           broad_lines=broad.tolist(), device=device)
    if wd is not None and len(wd):
        with torch.no_grad():
            model.wing_alpha.copy_(torch.as_tensor(np.array(wd["alpha"], dtype=np.float64)))
            model.wing_log_lt.copy_(torch.as_tensor(np.array(wd["log_lt"], dtype=np.float64)))
            model.wing_log_b.copy_(torch.as_tensor(np.array(wd["log_b"], dtype=np.float64)))
    return model


def _prior_hdu(prior: dict, centers: np.ndarray, name: str):
    cols = [fits.Column("lam_center", "D", unit="Angstrom", array=np.asarray(centers, dtype=np.float64))]
    cols += [fits.Column(k, "D", array=prior[k].detach().cpu().numpy()) for k in _LOG_PARAMS]
    return fits.BinTableHDU.from_columns(cols, name=name)


def _prior_from_hdu(hdu, device) -> tuple[dict, np.ndarray | None]:
    d = hdu.data
    prior = {k: torch.as_tensor(np.array(d[k], dtype=np.float64), device=device) for k in _LOG_PARAMS}
    centers = np.array(d["lam_center"], dtype=np.float64) if "lam_center" in d.columns.names else None
    return prior, centers


def _finite_or_none(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _user_axis(arr: SpectrumArrays, spec: Spectrum) -> np.ndarray:
    """The wavelengths (Å, ascending) that ``spec``, the user's order, had before the boundary
    moved them (air to vacuum, barycentric to observatory), so that outputs come back on the
    user's own axis; ``arr.wavelength`` where ``spec`` is not that order's spectrum."""
    axis = spec.spectral_axis
    if axis.ndim != 1 or axis.size != arr.wavelength.size:
        return arr.wavelength
    try:
        wl = wavelength_to_angstrom(axis)
    except (TypeError, u.UnitsError):
        return arr.wavelength
    return wl[::-1] if wl.size > 1 and wl[0] > wl[-1] else wl


def _as_list_class(out: list, list_class: type | None):
    """The outputs of the orders as the input came: a ``SpectrumList`` of the user's class in, the
    same class out, whatever the number of orders (muler's ``HPFSpectrumList`` and
    ``EchelleSpectrumList`` keep ``.stitch()``; a plain ``SpectrumList`` where that class cannot be
    built from a list); a Spectrum, or a plain list or tuple of one order: that order's spectrum;
    a plain list or tuple of several: a ``SpectrumList``."""
    is_list_class = isinstance(list_class, type) and issubclass(list_class, SpectrumList)
    if not is_list_class and len(out) == 1:
        return out[0]
    if is_list_class and list_class is not SpectrumList:
        try:
            return list_class(out)
        except Exception:  # a list class that needs other arguments: the plain one
            pass
    return SpectrumList(out)


def _pm(sigma) -> str:
    """" ± σ" for the repr ("" without one, " ± inf" where χ² has no minimum)."""
    if sigma is None:
        return ""
    return f" ± {sigma:.2g}" if math.isfinite(sigma) else " ± inf"


class TransferResult:
    """The outcome of :func:`fit_spectrum` (or of :meth:`TransferResult.load`).

    Attributes
    ----------
    model : blase_specutils.core.TransferModel
        The fitted forward model (torch). ``model.stellar`` is None for a telluric-only fit.
    template : dict
        Template-matching stage: χ², reduced χ², RV, v sin i, R and the telluric power X (RV and
        v sin i are None for a telluric-only fit; X is None without a telluric clone).
    fit : blase_specutils.core.TransferFit
        Loss histories of the stages (after :meth:`load`: only the χ² values, no histories).
    prior : dict of Tensor
        ln a, ln σ, ln γ of the stellar clone's lines before the fit (empty for a telluric-only fit).
    telluric_prior : dict of Tensor or None
        The same for the telluric clone's lines (None without one).
    prior_centers : dict of ndarray or None
        Line centres (Å) before the fit, keys ``"stellar"`` and ``"telluric"`` (they differ from
        the fitted ones only when centres are tuned).
    likelihood : blase_specutils.gp.GPContinuumLikelihood or None
        The fitted GP likelihood (``likelihood="gp"``), or None for χ² (and always after
        :meth:`load`).
    pseudo_continuum_flux : ndarray or None
        The GP's conditional mean at the data pixels (see :attr:`pseudo_continuum`).
    flags : list of FitFlag
        What to doubt in this fit (empty: nothing flagged): each has a short ``code`` (e.g.
        ``"vsini_at_bound"``, ``"rv_scan_edge"``, ``"vsini_unconstrained"``; the list is in
        :class:`~blase_specutils.core.transfer.FitBounds`), a ``message`` with the numbers and the
        ``parameter`` concerned. Shown by ``repr``, :meth:`summary` and ``fit --json``.
    uncertainties : dict of float
        1σ of ``"rv"`` (km/s), ``"vsini"`` (km/s) and ``"telluric_power"`` from the curvature of χ²
        at the fit (:func:`~blase_specutils.core.transfer.chi2_curvature`: continuum profiled out,
        lines fixed, scaled by √χ²_red when that exceeds 1); ``inf`` where χ² has no minimum.
    frames : blase_specutils.frames.FitFrames
        The frames of the data (``"observatory"``, ``"barycentric"`` or ``"unstated"``), how
        their wavelengths became vacuum ones, the tagged velocity and the barycentric correction
        with its source: :attr:`rv_tagged`, :attr:`rv_total`, :attr:`rv_barycentric` and
        :attr:`barycentric_correction` read it. Spectra out come back on the user's own axis, in
        the user's class and list class, with its ``meta`` and velocity tag.
    outlier_mask : ndarray of bool
        Pixels (of :attr:`wavelength`) left out of χ² as flux outliers.
    outliers : dict or None
        ``{"count", "threshold_sigma", "pixels"}``: ``pixels`` maps each order with outliers to
        their positions along that order's own spectral axis.

    Notes
    -----
    A telluric-only fit (``stellar=None``) fits no RV and no v sin i: :attr:`rv` and
    :attr:`vsini` are NaN km/s, the summary's ``rv_kms`` and ``vsini_kms`` are None,
    :attr:`lines` is the telluric line table, and :meth:`stellar_clone` and
    :meth:`semi_empirical_template` return None.
    """

    def __init__(self, *, model, orders, order_ids, arrays, wavelength, flux, sigma, good, order_of_pixel,
                 model_flux, prior, template, fit, settings, stellar_clone, telluric_clone,
                 likelihood=None, pseudo_continuum_flux=None, telluric_prior=None, prior_centers=None,
                 flags=None, uncertainties=None, frames: FitFrames | None = None,
                 list_class: type | None = None, outlier_mask: np.ndarray | None = None,
                 outliers: dict | None = None) -> None:
        self.model = model
        self._orders = orders
        self._order_ids = order_ids
        self._arrays = arrays
        self.wavelength = wavelength
        self.flux = flux
        self.sigma = sigma
        self.good = good
        self.order_of_pixel = order_of_pixel
        self.model_flux = model_flux
        self.prior = prior
        self.telluric_prior = telluric_prior
        self.prior_centers = prior_centers
        self.template = template
        self.fit = fit
        self.settings = settings
        self._stellar_clone = stellar_clone
        self._telluric_clone = telluric_clone
        self.likelihood = likelihood
        self.pseudo_continuum_flux = pseudo_continuum_flux
        self.flags: list[FitFlag] = list(flags or [])
        self.uncertainties: dict[str, float] = dict(uncertainties or {})
        self.frames: FitFrames = frames if frames is not None else FitFrames()
        self._list_class = list_class
        #: Pixels left out of χ² as flux outliers (see fit_spectrum), and their record (None: no check ran).
        self.outlier_mask = np.zeros(np.asarray(good).size, dtype=bool) if outlier_mask is None else \
            np.asarray(outlier_mask, dtype=bool)
        self.outliers: dict | None = outliers

    def __repr__(self) -> str:
        kind = "+".join(k for k, has in (("stellar", self.has_stellar), ("telluric", self.has_telluric)) if has)
        parts = []
        if self.has_stellar:
            parts.append(f"RV {self.rv.value:.3f}{_pm(self.uncertainties.get('rv'))} km/s")
            if self.frames.rv_tagged:
                parts.append(f"+ tagged {self.rv_tagged.value:.3f} = total {self.rv_total.value:.3f} km/s")
            if self.rv_barycentric is not None:
                parts.append(f"barycentric RV {self.rv_barycentric.value:.3f} km/s "
                             f"(correction {self.frames.barycentric_correction:+.3f})")
            parts.append(f"v sin i {self.vsini.value:.2f}{_pm(self.uncertainties.get('vsini'))} km/s")
        if self.has_telluric:
            parts.append(self._power_text())
        parts.append(f"R {self.resolving_power:.0f}")
        parts.append(f"chi2_red {self.chi2_reduced:.3f}")
        parts.append(f"{self.frames.frame} frame, {self.frames.wavelength_frame}")
        if self.outliers and self.outliers.get("count"):
            parts.append(f"{self.outliers['count']} flux outlier(s) masked")
        head = f"<TransferResult ({kind}, {self.n_pixels} px): " + ", ".join(parts)
        if not self.flags:
            return head + "; no flags>"
        lines = "\n".join(f"  [{f.code}] {f.message}" for f in self.flags)
        return head + f"; {len(self.flags)} flag(s):\n{lines}>"

    @property
    def flagged(self) -> bool:
        """Whether the fit has any flag (see :attr:`flags`)."""
        return bool(self.flags)

    # -------------------------------------------------------------- scalars
    @property
    def has_stellar(self) -> bool:
        """Whether the fit has a stellar clone (False: telluric-only)."""
        return self.model.stellar is not None

    @property
    def has_telluric(self) -> bool:
        """Whether the fit has a telluric clone."""
        return self.model.telluric is not None

    @property
    def rv(self) -> u.Quantity:
        """The fitted radial velocity: the star's velocity relative to the observer of the data's
        axis, less a velocity tagged on that axis (:attr:`rv_tagged`; without a tag this is the
        whole measured RV, :attr:`rv_total`). NaN km/s for a telluric-only fit, which fits none."""
        if not self.has_stellar:
            return np.nan * u.km / u.s
        return (float(self.model.rv.detach()) - self.frames.rv_tagged) * u.km / u.s

    @property
    def rv_tagged(self) -> u.Quantity:
        """c z (km/s) of the velocity tagged on the input's spectral axis (specutils'
        ``radial_velocity``/``redshift``: the velocity of the target relative to the observer for
        the axis as given); 0 km/s without a tag. :attr:`rv` + this = :attr:`rv_total`."""
        return self.frames.rv_tagged * u.km / u.s

    @property
    def rv_total(self) -> u.Quantity:
        """The measured RV: :attr:`rv_tagged` + :attr:`rv`, the star's velocity relative to the
        observatory (the fit's frame; data given in the barycentric frame were shifted back to it).
        NaN km/s for a telluric-only fit."""
        if not self.has_stellar:
            return np.nan * u.km / u.s
        return self.frames.rv_total(self.rv.value) * u.km / u.s

    @property
    def rv_barycentric(self) -> u.Quantity | None:
        """The barycentric RV, :math:`v + v_\\mathrm{corr} + v\\,v_\\mathrm{corr}/c` of the measured RV v
        (:attr:`rv_total`) and :attr:`barycentric_correction`; None without a correction (a file
        without time, target or site, and none given) or for a telluric-only fit."""
        bary = self.frames.rv_barycentric(self.rv.value) if self.has_stellar else None
        return None if bary is None else bary * u.km / u.s

    @property
    def barycentric_correction(self) -> u.Quantity | None:
        """The barycentric correction used (km/s; add it to a measured RV), from the file's time,
        target and site (:func:`blase_specutils.frames.barycentric_correction`) or given by the
        user; None where neither was available (``frames.barycentric_source`` says why)."""
        bc = self.frames.barycentric_correction
        return None if bc is None else bc * u.km / u.s

    @property
    def vsini(self) -> u.Quantity:
        """Projected rotational velocity v sin i (NaN km/s for a telluric-only fit)."""
        if not self.has_stellar:
            return np.nan * u.km / u.s
        return float(self.model.vsini.detach()) * u.km / u.s

    @property
    def resolving_power(self) -> float:
        """Instrumental resolving power R."""
        return float(self.model.resolving_power.detach())

    @property
    def telluric_power(self) -> float | dict[str, float] | None:
        """Beer's-law exponent X of the telluric transmission T^X (None without a telluric clone);
        with several telluric components (``telluric={"H2O": ..., "CO2": ...}``) a dict of the
        powers X_k by component name."""
        if not self.has_telluric:
            return None
        return _power_value(self.model)

    def _power_text(self, spec: str = ".4g") -> str:
        """X, or "X(H2O) 0.81, X(CO2) 1.02" with components, with σ where known."""
        x = self.telluric_power
        if not isinstance(x, dict):
            return f"X {x:{spec}}{_pm(self.uncertainties.get('telluric_power'))}"
        return ", ".join(f"X({n}) {v:{spec}}{_pm(self.uncertainties.get(f'telluric_power_{n}'))}" for n, v in x.items())

    @property
    def n_pixels(self) -> int:
        """Number of pixels in χ²."""
        return int(self.good.sum())

    @property
    def chi2(self) -> float:
        """χ² of the final model."""
        r = (self.flux - self.model_flux)[self.good] / self.sigma[self.good]
        return float(np.sum(r * r))

    @property
    def chi2_reduced(self) -> float:
        """χ² per pixel (the free line parameters are regularised, so they are not subtracted)."""
        return self.chi2 / max(self.n_pixels - 3, 1)

    @property
    def rms_residual(self) -> float:
        """RMS of data − model over the good pixels (flux units of the data)."""
        r = (self.flux - self.model_flux)[self.good]
        return float(np.sqrt(np.mean(r * r)))

    # -------------------------------------------------------------- spectra
    def _per_order(self, values: np.ndarray, *, uncertainty: np.ndarray | None = None,
                   mask: np.ndarray | None = None):
        out = []
        start = 0
        for arr, spec in zip(self._arrays, [self._orders[i] for i in self._order_ids]):
            n = arr.wavelength.size
            sl = slice(start, start + n)
            start += n
            bad = ~arr.good if mask is None else (~arr.good | mask[sl])
            out.append(arrays_to_spectrum(_user_axis(arr, spec), values[sl], flux_unit=arr.flux_unit, mask=bad, like=spec,
                                          uncertainty=None if uncertainty is None else uncertainty[sl]))
        # back to the user's order sequence
        inv = np.argsort(self._order_ids)
        out = [out[i] for i in inv]
        return _as_list_class(out, self._list_class)

    @property
    def model_spectrum(self):
        """M(λ_D) at the data sampling, as the input's own class (or a SpectrumList of orders;
        a plain ``Spectrum`` per order after :meth:`load`)."""
        return self._per_order(self.model_flux)

    @property
    def residual(self):
        """Data − model, like :attr:`model_spectrum`."""
        return self._per_order(self.flux - self.model_flux)

    @property
    def wavelength_correction(self) -> QTable | None:
        """The fitted per-order wavelength correction (``calibration_degree``), or None without one.

        A table with one row per order: ``order`` (the user's order index), ``coefficients``
        c_0 … c_K of δv(x) = Σ_k c_k x^k in m/s (x from −1 at the order's blue end to 1 at its red
        end), ``mean`` and ``max_abs`` of δv over the order's pixels (m/s). The model at pixel λ
        is evaluated at λ (1 + δv/c): a positive δv means the pixel's true wavelength is redder
        than its label."""
        m = self.model
        if m.calibration_degree is None:
            return None
        coeffs = m.calibration_coeffs.detach().cpu().numpy() * 1000.0
        with torch.no_grad():
            dv = m.velocity_correction().cpu().numpy() * 1000.0
        oid = np.asarray(self.order_of_pixel)
        mean = np.array([dv[oid == k].mean() for k in range(coeffs.shape[0])])
        peak = np.array([np.abs(dv[oid == k]).max() for k in range(coeffs.shape[0])])
        return QTable({"order": np.arange(coeffs.shape[0], dtype=np.int64), "coefficients": coeffs * (u.m / u.s),
                       "mean": mean * (u.m / u.s), "max_abs": peak * (u.m / u.s)})

    def telluric_transmission(self) -> np.ndarray | None:
        """The fitted telluric transmission T^X at the data pixels and the data's resolution
        (resample[T^X * g(R)], or resample[T^X] for a clone at the instrument's resolution), with
        the wavelength correction; None without a telluric clone."""
        if not self.has_telluric:
            return None
        with torch.no_grad():
            return self.model.transmission_at_pixels().cpu().numpy()

    def telluric_corrected(self, *, min_transmission: float = 0.2):
        r"""The data divided by the fitted telluric transmission: the telluric-corrected spectrum.

        :math:`F / T_\mathrm{fit}`, with :math:`T_\mathrm{fit}` the transmission at the data's
        resolution (:meth:`telluric_transmission`) and uncertainties :math:`\sigma / T_\mathrm{fit}`
        (the transmission's own error is not propagated). Pixels where :math:`T_\mathrm{fit}` is
        below ``min_transmission`` are masked: division there amplifies the noise and any error of
        the telluric model. The continuum polynomial and the star stay in, so an A0V standard comes
        back as its own stellar spectrum and a science target as the star alone.

        Dividing by a transmission convolved with the LSF is exact only where the star is smooth
        across a telluric line (the usual assumption of telluric correction); the residual of a
        fit with a stellar clone shows where it is not.

        Parameters
        ----------
        min_transmission : float
            Pixels with a fitted transmission below this (0-1, default 0.2) are masked.

        Returns
        -------
        Spectrum or SpectrumList
            Like :attr:`model_spectrum`: the input's own class per order, with its ``meta``, units,
            the propagated uncertainty and the mask (the input's mask or'ed with the low-transmission
            pixels).

        Raises
        ------
        ValueError
            The fit has no telluric clone, or ``min_transmission`` is not within [0, 1).
        """
        if not self.has_telluric:
            raise ValueError("this fit has no telluric clone: there is no transmission to divide by "
                             "(fit with telluric=...)")
        t_min = check_real(min_transmission, "min_transmission")
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"min_transmission must be within [0, 1), got {min_transmission}")
        trans = self.telluric_transmission()
        low = ~(trans >= t_min)  # NaN counts as low
        safe = np.where(low, 1.0, trans)
        return self._per_order(self.flux / safe, uncertainty=self.sigma / safe, mask=low)

    def save_corrected(self, path: str | Path, *, min_transmission: float = 0.2, overwrite: bool = False) -> Path:
        """Write :meth:`telluric_corrected` to a FITS table (atomically): one row per data pixel,
        columns ``wavelength`` (the data's spectral unit), ``flux`` (the data's flux unit),
        ``uncertainty``, ``transmission`` (the fitted T at the data's resolution), ``mask`` (True:
        input mask or transmission below ``min_transmission``) and ``order`` (the user's order
        index), orders one after another in the input's sequence. Read it back with
        ``astropy.table.Table.read``."""
        from astropy.table import Table, vstack

        from .io import atomic_write

        corrected = self.telluric_corrected(min_transmission=min_transmission)
        transmission = self._per_order(self.telluric_transmission())  # in the same sequence and axis order
        pairs = zip(*(list(x) if isinstance(x, SpectrumList) else [x] for x in (corrected, transmission)))
        tables = []
        for k, (spec, trans) in enumerate(pairs):
            tables.append(Table({"wavelength": spec.spectral_axis, "flux": spec.flux,
                                 "uncertainty": spec.uncertainty.array * spec.flux.unit,
                                 "transmission": np.asarray(trans.flux.value, dtype=np.float64),
                                 "mask": np.asarray(spec.mask, dtype=bool),
                                 "order": np.full(spec.flux.size, k, dtype=np.int64)}))
        table = vstack(tables)
        table.meta["MINTRANS"] = float(min_transmission)
        return atomic_write(path, lambda tmp: table.write(tmp, format="fits"), overwrite=overwrite)

    @property
    def pseudo_continuum(self):
        r"""The inferred continuum error :math:`\mathrm{E}[f \mid R] = K_* C^{-1} R` of the GP
        likelihood (Eq. C4), in the data's flux and spectral units, like :attr:`model_spectrum`
        (predicted at masked pixels too); None when the fit used χ². Data − model − this is what
        the lines and the noise have to explain."""
        if self.pseudo_continuum_flux is None:
            return None
        return self._per_order(self.pseudo_continuum_flux)

    @property
    def gp_hyperparameters(self) -> dict | None:
        """Fitted GP amplitude (data flux units), length scale and noise scale, or None for χ²
        (and after :meth:`load`)."""
        if self.likelihood is None:
            return None
        with torch.no_grad():
            amp = self.likelihood.amplitude.cpu().numpy()
            ell = self.likelihood.length_scale.cpu().numpy()
            beta = float(self.likelihood.noise_scale)
        unit = self._arrays[0].flux_unit
        if amp.size == 1:  # hyperparameters shared by all orders
            amp, ell = amp[0], ell[0]
        return {"kernel": self.likelihood.kernel_name, "amplitude": amp * unit, "length_scale": ell * u.AA,
                "noise_scale": beta}

    def stellar_clone(self) -> SpectralClone | None:
        """The transfer-learned stellar clone (the fitted lines only), for evaluation anywhere;
        None for a telluric-only fit."""
        if not self.has_stellar:
            return None
        m = self.model.stellar.subset(torch.arange(self.model.stellar.n_lines))
        return SpectralClone(m, meta={"source": "transfer-learned"})

    def telluric_clone(self) -> SpectralClone | None:
        """The (transfer-learned) telluric clone, fitted lines only, *without* the power X (its
        ``meta["telpower"]`` holds X); None without a telluric clone."""
        if not self.has_telluric:
            return None
        m = self.model.telluric.subset(torch.arange(self.model.telluric.n_lines))
        meta = {"source": "transfer-learned telluric", "lsf": "instrument" if self.model.telluric_instrumental else "native"}
        x = self.telluric_power
        meta |= ({"telpower": x} if not isinstance(x, dict) else {"components": ",".join(x)})
        return SpectralClone(m, meta=meta)

    def semi_empirical_template(self, spectral_axis: u.Quantity | None = None) -> Spectrum | None:
        """The transfer-learned clone at native resolution, without RV, v sin i or instrument (the
        paper's "super-resolution" product), on ``spectral_axis`` (default: the model grid λ_Z);
        None for a telluric-only fit (see :meth:`telluric_template`).

        Its axis is the star's rest frame, so its specutils velocity tag is 0; its ``meta`` holds
        the velocities that take it to the data: ``rv_total_kms`` (the measured RV, observatory
        frame), ``rv_tagged_kms``, ``rv_kms`` and ``rv_barycentric_kms`` (None without a
        correction). ``template.shift_spectrum_to(radial_velocity=result.rv_total)`` moves it
        to the observatory's axis (relativistic Doppler; the fit's optical convention differs by
        v²/2c)."""
        if not self.has_stellar:
            return None
        axis = self.model.lam_z.cpu().numpy() * u.AA if spectral_axis is None else spectral_axis
        spec = self.stellar_clone().evaluate(axis)
        bary = self.rv_barycentric
        spec.meta.update({"rv_total_kms": float(self.rv_total.value), "rv_tagged_kms": self.frames.rv_tagged,
                          "rv_kms": float(self.rv.value), "frame": "stellar rest frame",
                          "rv_barycentric_kms": None if bary is None else float(bary.value)})
        return spec

    def telluric_template(self, spectral_axis: u.Quantity | None = None, *, power: bool = True) -> Spectrum | None:
        """The fitted telluric transmission T^X at native resolution on ``spectral_axis`` (default
        λ_Z), or None without a telluric clone.

        Parameters
        ----------
        spectral_axis : Quantity, optional
            Where to evaluate (any spectral unit).
        power : bool
            Raise the (tuned) telluric clone to the fitted power X (default); False: the clone alone.
        """
        if not self.has_telluric:
            return None
        axis = self.model.lam_z.cpu().numpy() * u.AA if spectral_axis is None else spectral_axis
        spec = SpectralClone(self.model.telluric).evaluate(axis)
        if not power:
            return spec
        m = self.model
        if m.telluric_masks is None:
            flux = np.power(spec.flux.value, self.telluric_power)
        else:  # exp(Σ_k X_k ln T_k), each component on the same axis
            lam = torch.as_tensor(wavelength_to_angstrom(spec.spectral_axis), dtype=torch.float64,
                                  device=m.lam_z.device)
            order = torch.argsort(lam)
            with torch.no_grad():
                log_t = sum(float(x) * m.telluric.log_flux(lam[order], lines=mask)
                            for x, mask in zip(m.telluric_power, m.telluric_masks))
            flux = np.empty(lam.numel())
            flux[order.cpu().numpy()] = torch.exp(log_t).cpu().numpy()
        return Spectrum(spectral_axis=spec.spectral_axis, flux=flux * u.one,
                        meta=dict(spec.meta, telluric_power=self.telluric_power))

    @property
    def lines(self) -> QTable:
        """Clone and fitted values per line: amplitude a, σ, γ, equivalent width, and the change.

        The stellar lines; for a telluric-only fit, the telluric lines (see also
        :attr:`telluric_lines`)."""
        if not self.has_stellar:
            return self.telluric_lines
        return _line_table(self.model.stellar, self.prior)

    @property
    def telluric_lines(self) -> QTable | None:
        """The line table (as :attr:`lines`) of the telluric clone; None without one."""
        if not self.has_telluric:
            return None
        t = _line_table(self.model.telluric, self.telluric_prior)
        t.meta["telluric_power"] = self.telluric_power
        masks = self.model.telluric_masks
        if masks is not None:
            comp = np.zeros(len(t), dtype=np.int64)
            for k, mask in enumerate(masks):
                comp[mask.cpu().numpy()] = k
            t["component"] = np.asarray(self.model.telluric_names)[comp]
        return t

    def summary(self) -> dict:
        """Numbers for reports and ``--json`` (RV and v sin i are None for a telluric-only fit).

        Keys include ``rv_kms``, ``vsini_kms`` and their σ ``rv_sigma_kms``, ``vsini_sigma_kms``
        (and ``telluric_power_sigma``; None where χ² has no minimum or the parameter is absent),
        ``flags`` (a list of ``{"code", "message", "parameter"}``) and ``flag_codes`` (the codes,
        comma-separated, "" when none). The frames: ``rv_kms`` is the fitted RV, ``rv_tagged_kms``
        the velocity tagged on the input's axis (0 without one) and ``rv_total_kms`` their sum, the
        measured RV, also given as ``rv_observatory_kms``; ``rv_barycentric_kms`` with
        ``barycentric_correction_kms`` and ``barycentric_source`` (None and the reason where no
        correction was found or given); ``frame`` (``"observatory"`` or ``"barycentric"``, as the
        data were given), ``wavelength_frame`` (e.g. ``"vacuum (converted from air)"``) and ``air``;
        ``engine``: what computed the fit (``{"backend", "device", "dtype"}``)."""
        lines = self.lines
        out = {
            "components": "+".join(k for k, has in (("stellar", self.has_stellar), ("telluric", self.has_telluric)) if has),
            "template_matching": {k: None if v is None else (v if isinstance(v, dict) else float(v))
                                  for k, v in self.template.items()},
            "rv_kms": float(self.rv.value) if self.has_stellar else None,
            **self._frames_summary(),
            "vsini_kms": float(self.vsini.value) if self.has_stellar else None,
            "rv_sigma_kms": _finite_or_none(self.uncertainties.get("rv")),
            "vsini_sigma_kms": _finite_or_none(self.uncertainties.get("vsini")),
            "resolving_power": self.resolving_power,
            "chi2": self.chi2,
            "chi2_reduced": self.chi2_reduced,
            "rms_residual": self.rms_residual,
            "n_pixels": self.n_pixels,
            "n_lines": len(lines),
            "n_lines_changed": int(np.sum(lines["changed"])),
            "engine": self.model.engine_info(),
        }
        if self.has_telluric:
            tl = lines if not self.has_stellar else self.telluric_lines
            x = self.telluric_power
            sigma = (_finite_or_none(self.uncertainties.get("telluric_power")) if not isinstance(x, dict) else
                     {n: _finite_or_none(self.uncertainties.get(f"telluric_power_{n}")) for n in x})
            out |= {"telluric_power": x, "telluric_power_sigma": sigma,
                    "n_telluric_lines": len(tl), "n_telluric_lines_changed": int(np.sum(tl["changed"])),
                    "telluric_lsf": "instrument" if self.model.telluric_instrumental else "native"}
        wc = self.wavelength_correction
        if wc is not None:
            out["wavelength_correction_ms"] = {str(k): [float(c) for c in row.value] for k, row in zip(wc["order"], wc["coefficients"])}
        out |= {"flags": [f.to_dict() for f in self.flags], "flag_codes": ",".join(f.code for f in self.flags)}
        return out | self._gp_summary()

    def _frames_summary(self) -> dict:
        """The frames of the fit for :meth:`summary`: the tagged, total (measured, observatory) and
        barycentric RV, the correction and where it came from, the data's frame and wavelengths."""
        st = self.has_stellar
        f = self.frames
        bary = self.rv_barycentric
        return {"rv_tagged_kms": f.rv_tagged, "rv_total_kms": float(self.rv_total.value) if st else None,
                "rv_observatory_kms": float(self.rv_total.value) if st else None,
                "rv_barycentric_kms": None if bary is None else float(bary.value),
                "barycentric_correction_kms": f.barycentric_correction, "barycentric_source": f.barycentric_source,
                "frame": f.frame, "wavelength_frame": f.wavelength_frame, "air": f.air,
                "n_outliers": 0 if self.outliers is None else int(self.outliers.get("count", 0)),
                "outliers": self.outliers}

    def _gp_summary(self) -> dict:
        hp = self.gp_hyperparameters
        if hp is None:
            return {}
        return {"gp": {"kernel": hp["kernel"], "amplitude": np.asarray(hp["amplitude"].value).tolist(),
                       "length_scale_angstrom": np.asarray(hp["length_scale"].to_value(u.AA)).tolist(),
                       "noise_scale": hp["noise_scale"]}}

    # -------------------------------------------------------------- plot
    def plot(self, *, band=None, title: str | None = None):
        """Data, model and residual (with the GP pseudo-continuum when fitted with one), and the
        stellar and/or telluric templates, clone and transfer-learned (cf. paper Fig. 9).

        Parameters
        ----------
        band : (Quantity, Quantity), optional
            Spectral range to show, in any spectral unit (e.g. ``(8670, 8680) * u.AA`` or a pair
            of wavenumbers); default: all the data.
        title : str, optional

        Returns
        -------
        matplotlib.figure.Figure

        Raises
        ------
        TypeError
            ``band`` is not a pair of Quantities (plain numbers have no unit).
        ValueError
            ``band`` holds fewer than two data pixels.
        """
        import matplotlib.pyplot as plt

        w = self.wavelength
        sel = np.ones(w.size, bool)
        if band is not None:
            lo, hi = _as_band(band)
            sel = (w >= lo) & (w <= hi)
            if sel.sum() < 2:
                raise ValueError(f"band {lo:.6g}-{hi:.6g} Å holds {int(sel.sum())} data pixel(s), too few to plot; "
                                 f"the data cover {w.min():.6g}-{w.max():.6g} Å: choose a band within that range")
        n = 2 + int(self.has_stellar) + int(self.has_telluric)
        fig, ax = plt.subplots(n, 1, figsize=(11, 2.2 * n), sharex=True)
        lz = self.model.lam_z.cpu().numpy()
        zsel = (lz >= w[sel].min()) & (lz <= w[sel].max())
        axis = lz[zsel] * u.AA
        ax[0].plot(w[sel], np.where(self.good, self.flux, np.nan)[sel], ".", ms=2, color="k", label="data")
        ax[0].plot(w[sel], self.model_flux[sel], lw=0.8, color="C1", label="model M(λ_D)")
        ax[0].legend(loc="lower left", fontsize=8)
        ax[0].set_ylabel("flux")
        res = np.where(self.good, self.flux - self.model_flux, np.nan)
        ax[1].plot(w[sel], res[sel], lw=0.6, color="C0")
        if self.pseudo_continuum_flux is not None:
            ax[1].plot(w[sel], self.pseudo_continuum_flux[sel], lw=1.0, color="C3", label="GP pseudo-continuum")
            ax[1].legend(loc="lower right", fontsize=8)
        ax[1].axhline(0, color="0.5", lw=0.5)
        ax[1].set_ylabel("data − model")
        text = f"χ²_red {self.chi2_reduced:.2f}"
        if self.has_stellar:
            text += f", RV {self.rv.value:.3f} km/s, v sin i {self.vsini.value:.2f} km/s"
        if self.has_telluric:
            text += f", telluric power {self._power_text('.3f')}"
        ax[1].text(0.01, 0.9, text, transform=ax[1].transAxes, fontsize=8, va="top")
        k = 2
        if self.has_stellar:
            ax[k].plot(lz[zsel], self._stellar_clone.evaluate(axis).flux.value, lw=0.6, color="0.6", label="clone")
            ax[k].plot(lz[zsel], self.semi_empirical_template(axis).flux.value, lw=0.7, color="C2",
                       label="transfer-learned")
            ax[k].set_ylabel("stellar")
            ax[k].legend(loc="lower left", fontsize=8)
            k += 1
        if self.has_telluric:
            ax[k].plot(lz[zsel], self._telluric_clone.evaluate(axis).flux.value, lw=0.6, color="0.6",
                       label="clone (X = 1)")
            ax[k].plot(lz[zsel], self.telluric_template(axis).flux.value, lw=0.7, color="C4",
                       label=f"transfer-learned, {self._power_text('.3f')}")
            ax[k].set_ylabel("telluric")
            ax[k].legend(loc="lower left", fontsize=8)
        ax[-1].set_xlabel("wavelength (Å)")
        if title:
            ax[0].set_title(title)
        fig.tight_layout()
        return fig

    # -------------------------------------------------------------- save / load
    def _start_centers(self, fitted: LineCloneModel) -> np.ndarray:
        """Line centres of ``fitted`` before the fit (they differ only if centres were tuned)."""
        key = "stellar" if fitted is self.model.stellar else "telluric"
        c = (self.prior_centers or {}).get(key)
        return fitted.lam_centers.detach().cpu().numpy() if c is None else np.asarray(c, dtype=np.float64)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fit to one FITS file that :meth:`load` reads back (no pickle).

        HDUs: the fitted lines in the clone layout (primary header, ``LINES``, ``WING``: the
        stellar clone, or the telluric clone for a telluric-only fit, so that
        :meth:`SpectralClone.load` reads them); ``PRIOR`` (those lines' starting centres, ln a,
        ln σ, ln γ); ``DATA`` (wavelength in Å, flux, sigma, good, unmasked, model, order, and
        ``pseudo_continuum`` with a GP likelihood); with a telluric clone ``TLINES``, ``TWING``
        and ``TPRIOR`` (the same for the tuned telluric lines); ``CONTINUUM`` (image: the
        per-order polynomial coefficients); ``TRANSFER`` (one row: RV, ln v sin i, ln R, ln X,
        the fixed settings of the forward model, the σ of RV, v sin i and X, the template-matching
        numbers and the stage χ²; the fit settings and the flags as JSON in its ``SETTINGS`` and
        ``FLAGS`` keywords); ``ORDERS`` (user order index,
        pixels, spectral and flux units per order). The primary header also carries RV (km/s),
        v sin i, R, X (``TELPOWER``) and χ², ``FITKIND = 'transfer'`` and ``TRFMTVER``. With a GP
        likelihood the header holds its kernel (``GPKERNEL``), amplitude (``GPAMP``) and length
        scale in Å (``GPLENGTH``) when shared by all orders. Float64 values round-trip exactly.

        Layout 3 (``TRFMTVER = 3``, see :mod:`blase_specutils.results_file`) adds the frames of the
        fit (``TRANSFER`` keyword ``FRAMES``), the masked flux outliers (``DATA`` column
        ``outlier``, keyword ``OUTLIERS``), ``TELINST`` and the wavelength correction (``CALIB``).
        The file is written under a temporary name in the same folder and moved onto ``path`` when
        complete (:func:`blase_specutils.io.atomic_write`): a failed save (disk full, Ctrl-C)
        leaves a previous file at ``path`` as it was.

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is False.
        """
        from .results_file import save_result

        return save_result(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> "TransferResult":
        """Read a result written by :meth:`save` (layout 3, or 2 from an earlier version) and
        rebuild its forward model, checking every field it reads.

        The lines, RV, v sin i, R, telluric power, continuum and the data come back exactly, so
        :attr:`rv`, :attr:`vsini`, :attr:`resolving_power`, :attr:`chi2`, :attr:`lines`,
        :attr:`telluric_lines`, :attr:`model_spectrum`, :attr:`residual`,
        :meth:`semi_empirical_template`, :meth:`telluric_template`, :meth:`plot` and
        :meth:`summary` work as before saving, and so do the frames (:attr:`frames`,
        :attr:`rv_total`, :attr:`rv_barycentric`; a layout-2 file's frame is ``"unstated"``).
        Differences: each order comes back as a plain ``Spectrum`` on the fit's axis (vacuum,
        observatory frame; the input's class, list class and axis are not stored),
        ``model_flux`` is the saved model (the rebuilt model is checked against it; a warning if
        they differ by more than 1e-8), ``fit`` keeps only the χ² of the stages (no loss
        histories), and a GP likelihood is not restored (``likelihood`` and
        :attr:`gp_hyperparameters` are None; the pseudo-continuum is kept). The "clone" curves of
        :meth:`plot` use the saved starting values of the fitted lines.

        Raises
        ------
        FileNotFoundError
            No such file.
        blase_specutils.io.SavedFileError
            (a ValueError) Not a transfer-learning result; a layout-1 result (no ``TRANSFER``
            table: refit and save); a newer layout; or a damaged file: a missing table or column,
            a value out of range (non-finite, a natural log beyond ±45), ``ORDERS.n_pixels`` that
            do not add up to the ``DATA`` rows, JSON that does not parse. The message names the
            file and the field (also in the error's ``path`` and ``field``).
        """
        from .results_file import load_result

        return load_result(cls, path, device=device)
