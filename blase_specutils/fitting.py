"""Transfer-learn a clone against observed spectra given as specutils/muler objects (Sect. 5-6)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Iterable

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits
from astropy.table import QTable
from specutils import Spectrum, SpectrumList

from .cloning import SpectralClone, _equivalent_widths
from .core.clone import SPEED_OF_LIGHT_KMS, TUNABLE, LineCloneModel
from .core.training import check_integer, check_real, resolve_device
from .core.transfer import (
    TELLURIC_POWER_SCAN,
    FitBounds,
    FitFlag,
    TransferFit,
    TransferModel,
    check_fit,
    chi2_curvature,
    fit_transfer,
)
from .preprocessing import _as_band, _buffer_angstrom, _velocity_kms
from .spectra import SpectrumArrays, arrays_to_spectrum, spectrum_to_arrays

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
    """DER_SNR noise estimate (Stoehr et al. 2008): 1.482602/√6 · median|2f_i − f_(i−2) − f_(i+2)|."""
    f = flux[np.isfinite(flux)]
    if f.size < 5:
        raise ValueError("too few finite pixels to estimate the noise; give uncertainties")
    return float(1.482602 / math.sqrt(6.0) * np.median(np.abs(2.0 * f[2:-2] - f[:-4] - f[4:])))


def _gather(orders: list[Spectrum]):
    """Concatenate orders (sorted by wavelength) into arrays; returns arrays and bookkeeping."""
    pieces = []
    for k, spec in enumerate(orders):
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


def _fit_settings(*, resolving_power, rv, rv_range, vsini, continuum_degree, tune_lines, regularization,
                  width_regularization, template_epochs, line_epochs, lr, buffer, tune_telluric,
                  telluric_regularization, bounds=None, **_) -> dict:
    """The checked settings of :func:`fit_spectrum` (velocities in km/s, buffer in Å), from its keyword
    arguments (others are ignored); no data needed, so :func:`~blase_specutils.batch.fit_many` checks
    them before it starts any job. Raises TypeError, UnitsError or ValueError naming the argument."""
    if bounds is not None and not isinstance(bounds, FitBounds):
        raise TypeError(f"bounds must be a FitBounds or None, got {type(bounds).__name__}")
    b = FitBounds() if bounds is None else bounds
    rv_range_k = _velocity_kms(rv_range, "rv_range")
    if rv_range_k <= 0:
        raise ValueError(f"rv_range must be > 0 km/s (the half width of the RV scan and of the line selection), "
                         f"got {rv_range_k} km/s")
    rv_k = None if rv is None else _velocity_kms(rv, "rv")
    if rv_k is not None and abs(rv_k) > rv_range_k:
        raise ValueError(f"rv = {rv_k} km/s is outside the RV bound ±rv_range = ±{rv_range_k} km/s; widen rv_range")
    vsini_k = None if vsini is None else _velocity_kms(vsini, "vsini", nonnegative=True)
    if vsini_k is not None and vsini_k > b.max_vsini:
        raise ValueError(f"vsini = {vsini_k} km/s is above the bound max_vsini = {b.max_vsini} km/s (FitBounds)")
    return dict(
        resolving_power=check_real(resolving_power, "resolving_power", positive=True),
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
    i: the top, 400 km/s; X: 0.1 or 10), a telluric power that runs away (ends outside 0.1-10 or
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
        R (HPF ≈ 55,000; IGRINS ≈ 45,000), finite and > 0.
    rv : Quantity or float (km/s), optional
        Starting RV, within ± ``rv_range``; if None, the best of a χ² scan over ± ``rv_range``
        in 1 km/s steps (joint with the v sin i scan). Ignored by a telluric-only fit.
    rv_range : Quantity or float (km/s)
        Half width (> 0) of the RV scan and the bound of the RV: |RV| ≤ ``rv_range`` (an RV that
        ends within 1 km/s of it is flagged); stellar lines within it (and ``buffer``) of the data
        are used.
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
        at the best of a χ² scan over 0.1-10 and stays free in the line stage). False: X = 1.
    telluric_regularization : float or None
        Λ (finite, >= 0) of the L1 pull of the telluric ln a towards the telluric clone (None: no
        pull).
    plan : bool or "auto"
        Train through window plans (see :func:`~blase_specutils.core.transfer.fit_transfer`): the
        same fit, with every epoch one CUDA-graph replay on a GPU. ``"auto"``: on CUDA devices when
        :data:`blase_specutils.core.training.PLANS_ON_CUDA` is set; never on CPUs.
    bounds : FitBounds, optional
        The v sin i bound and scan, the RV scan step and the flag rules (default ``FitBounds()``:
        the numbers above).

    Returns
    -------
    TransferResult
        With :attr:`~TransferResult.flags` and the σ of RV, v sin i and X from the curvature of χ²
        (:attr:`~TransferResult.uncertainties`).

    Warns
    -----
    FitFlagWarning
        When the result has flags.

    Raises
    ------
    ValueError
        Neither clone given, no overlap between a clone and the data, bad data, or a setting out of
        range (e.g. ``rv_range <= 0``, negative ``vsini`` or Λ, an unknown parameter to tune).
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
    if telluric is not None and not isinstance(telluric, SpectralClone):
        raise TypeError("telluric must be a SpectralClone or None")
    checked = _fit_settings(resolving_power=resolving_power, rv=rv, rv_range=rv_range, vsini=vsini,
                            continuum_degree=continuum_degree, tune_lines=tune_lines, regularization=regularization,
                            width_regularization=width_regularization, template_epochs=template_epochs,
                            line_epochs=line_epochs, lr=lr, buffer=buffer, tune_telluric=tune_telluric,
                            telluric_regularization=telluric_regularization, bounds=bounds)
    rv_k, rv_range_k, vsini_k, buf = (checked[k] for k in ("rv", "rv_range", "vsini", "buffer"))
    bounds = checked["bounds"]
    resolving_power, continuum_degree, lr = checked["resolving_power"], checked["continuum_degree"], checked["lr"]
    template_epochs, line_epochs = checked["template_epochs"], checked["line_epochs"]
    tune_lines, tune_telluric = checked["tune_lines"], checked["tune_telluric"]
    regularization, width_regularization, telluric_regularization = (
        checked[k] for k in ("regularization", "width_regularization", "telluric_regularization"))
    orders = _orders(data)
    wl, flux, sigma, good, oid, missing, order_ids, arrs = _gather(orders)
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
        lo = wl[0] * (1 - rv_range_k / SPEED_OF_LIGHT_KMS) - buf
        hi = wl[-1] * (1 + rv_range_k / SPEED_OF_LIGHT_KMS) + buf
        centers = stellar.model.lam_centers.detach().cpu().numpy()
        sel = (centers > lo) & (centers < hi)
        if not sel.any():
            raise ValueError(
                f"the stellar clone has no lines within the data range {wl[0]:.1f}-{wl[-1]:.1f} Å (± buffer and RV "
                f"range); its lines span {centers.min():.1f}-{centers.max():.1f} Å. Use a clone of this band."
            )
        st = stellar.model.subset(torch.as_tensor(sel)).to(dev)
    tel = None
    if telluric is not None:
        tc = telluric.model.lam_centers.detach().cpu().numpy()
        tsel = (tc > wl[0] - buf) & (tc < wl[-1] + buf)
        if stellar is None and not tsel.any():
            raise ValueError(
                f"the telluric clone has no lines within the data range {wl[0]:.1f}-{wl[-1]:.1f} Å (± buffer); its "
                f"lines span {tc.min():.1f}-{tc.max():.1f} Å. Use a telluric clone of this band."
            )
        tel = telluric.model.subset(torch.as_tensor(tsel)).to(dev)
        tel.set_tuned(())
    vsini_scan = None if (vsini_k is not None or st is None) else bounds.vsini_scan
    vsini_start = bounds.vsini_scan[0] if vsini_k is None else max(vsini_k, 0.05)
    # the rotation kernel: room for the whole v sin i scan, else for the start (it grows when reached)
    kernel = max(vsini_scan) if vsini_scan is not None else _kernel_room(vsini_start if st is not None else 3.0,
                                                                         bounds.max_vsini)
    model = TransferModel(st, wl, order_index=oid, telluric=tel, rv=0.0 if rv_k is None or st is None else rv_k,
                          vsini=vsini_start, resolving_power=resolving_power,
                          limb_darkening=limb_darkening, continuum_degree=continuum_degree,
                          max_vsini=kernel, max_rv=rv_range_k).to(dev)
    tune_power = bool(tune_telluric_power) and tel is not None
    model.log_telluric_power.requires_grad_(tune_power)
    ref = st if st is not None else tel
    data_t = torch.as_tensor(np.where(good, flux, 0.0), dtype=ref.dtype, device=dev)
    w_t = torch.as_tensor(np.where(good, 1.0 / np.where(good, sigma, 1.0) ** 2, 0.0), dtype=ref.dtype, device=dev)
    lik = None
    if likelihood is not None:
        from .gp import build_likelihood  # optional extra: a clear ImportError names it

        lik = build_likelihood(likelihood, wl, sigma, good, oid, device=dev)
    scan = None if (rv_k is not None or st is None) else _rv_grid(rv_range_k, bounds.rv_step)
    prior = {} if st is None else {k: getattr(st, k).detach().clone() for k in _LOG_PARAMS}
    telluric_prior = None if tel is None else {k: getattr(tel, k).detach().clone() for k in _LOG_PARAMS}
    prior_centers = {k: m.lam_centers.detach().cpu().numpy().copy() for k, m in (("stellar", st), ("telluric", tel))
                     if m is not None}
    common = dict(tune_resolving_power=tune_resolving_power, lr=lr, progress=progress, likelihood=lik,
                  tune_telluric_power=tune_power, plan=plan)
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
                    rv=None if st is None else float(model.rv.detach()),
                    vsini=None if st is None else float(model.vsini.detach()),
                    resolving_power=float(model.resolving_power.detach()),
                    telluric_power=None if tel is None else float(model.telluric_power.detach()))
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
                      template=template if "lines" in fit.chi2 and st is not None else None)
    flags += _clone_flags(stellar, telluric, wl, good, float(model.rv.detach()) if st is not None else 0.0, bounds)
    result = TransferResult(
        model=model, orders=orders, order_ids=order_ids, arrays=arrs, wavelength=wl, flux=flux, sigma=sigma,
        good=good, order_of_pixel=oid, model_flux=model_flux, prior=prior, template=template, fit=fit,
        settings=settings, stellar_clone=stellar, telluric_clone=telluric, likelihood=lik,
        pseudo_continuum_flux=pseudo, telluric_prior=telluric_prior, prior_centers=prior_centers,
        flags=flags, uncertainties=sigmas,
    )
    if flags:
        warnings.warn(f"fit_spectrum: {len(flags)} flag(s) (TransferResult.flags): "
                      + " ".join(f"[{f.code}] {f.message}." for f in flags), FitFlagWarning, stacklevel=2)
    return result


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


#: Layout version of the transfer-result file (``TRFMTVER``); 1 was the layout without ``TRANSFER``.
RESULT_FORMAT_VERSION = 2


def _nan_if_none(v) -> float:
    return float("nan") if v is None else float(v)


def _none_if_nan(v):
    v = float(v)
    return None if math.isnan(v) else v


def _finite_or_none(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


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
                 flags=None, uncertainties=None) -> None:
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

    def __repr__(self) -> str:
        kind = "+".join(k for k, has in (("stellar", self.has_stellar), ("telluric", self.has_telluric)) if has)
        parts = []
        if self.has_stellar:
            parts.append(f"RV {self.rv.value:.3f}{_pm(self.uncertainties.get('rv'))} km/s")
            parts.append(f"v sin i {self.vsini.value:.2f}{_pm(self.uncertainties.get('vsini'))} km/s")
        if self.has_telluric:
            parts.append(f"X {self.telluric_power:.4g}{_pm(self.uncertainties.get('telluric_power'))}")
        parts.append(f"R {self.resolving_power:.0f}")
        parts.append(f"chi2_red {self.chi2_reduced:.3f}")
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
        """Radial velocity (NaN km/s for a telluric-only fit, which fits none)."""
        if not self.has_stellar:
            return np.nan * u.km / u.s
        return float(self.model.rv.detach()) * u.km / u.s

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
    def telluric_power(self) -> float | None:
        """Beer's-law exponent X of the telluric transmission T^X (None without a telluric clone)."""
        if not self.has_telluric:
            return None
        return float(self.model.telluric_power.detach())

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
    def _per_order(self, values: np.ndarray):
        out = []
        start = 0
        for arr, spec in zip(self._arrays, [self._orders[i] for i in self._order_ids]):
            n = arr.wavelength.size
            v = values[start : start + n]
            start += n
            out.append(arrays_to_spectrum(arr.wavelength, v, flux_unit=arr.flux_unit, mask=~arr.good, like=spec))
        # back to the user's order sequence
        inv = np.argsort(self._order_ids)
        out = [out[i] for i in inv]
        return out[0] if len(out) == 1 else SpectrumList(out)

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
        return SpectralClone(m, meta={"source": "transfer-learned telluric", "telpower": self.telluric_power})

    def semi_empirical_template(self, spectral_axis: u.Quantity | None = None) -> Spectrum | None:
        """The transfer-learned clone at native resolution, without RV, v sin i or instrument (the
        paper's "super-resolution" product), on ``spectral_axis`` (default: the model grid λ_Z);
        None for a telluric-only fit (see :meth:`telluric_template`)."""
        if not self.has_stellar:
            return None
        axis = self.model.lam_z.cpu().numpy() * u.AA if spectral_axis is None else spectral_axis
        return self.stellar_clone().evaluate(axis)

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
        return Spectrum(spectral_axis=spec.spectral_axis, flux=np.power(spec.flux.value, self.telluric_power) * u.one,
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
        return t

    def summary(self) -> dict:
        """Numbers for reports and ``--json`` (RV and v sin i are None for a telluric-only fit).

        Keys include ``rv_kms``, ``vsini_kms`` and their σ ``rv_sigma_kms``, ``vsini_sigma_kms``
        (and ``telluric_power_sigma``; None where χ² has no minimum or the parameter is absent),
        ``flags`` (a list of ``{"code", "message", "parameter"}``) and ``flag_codes`` (the codes,
        comma-separated, "" when none)."""
        lines = self.lines
        out = {
            "components": "+".join(k for k, has in (("stellar", self.has_stellar), ("telluric", self.has_telluric)) if has),
            "template_matching": {k: None if v is None else float(v) for k, v in self.template.items()},
            "rv_kms": float(self.rv.value) if self.has_stellar else None,
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
        }
        if self.has_telluric:
            tl = lines if not self.has_stellar else self.telluric_lines
            out |= {"telluric_power": self.telluric_power,
                    "telluric_power_sigma": _finite_or_none(self.uncertainties.get("telluric_power")),
                    "n_telluric_lines": len(tl), "n_telluric_lines_changed": int(np.sum(tl["changed"]))}
        out |= {"flags": [f.to_dict() for f in self.flags], "flag_codes": ",".join(f.code for f in self.flags)}
        return out | self._gp_summary()

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
            text += f", telluric power X {self.telluric_power:.3f}"
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
                       label=f"transfer-learned, ^X = {self.telluric_power:.3f}")
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
        """
        path = Path(path)
        clone = self.stellar_clone() if self.has_stellar else self.telluric_clone()
        main_model = self.model.stellar if self.has_stellar else self.model.telluric
        main_prior = self.prior if self.has_stellar else self.telluric_prior
        meta = {"r": self.resolving_power, "chi2": self.chi2, "chi2red": self.chi2_reduced}
        if self.has_stellar:
            meta |= {"rv_kms": float(self.rv.value), "vsini": float(self.vsini.value)}
        if self.has_telluric:
            meta["telpower"] = self.telluric_power
        clone.meta.update(meta)
        tmp = clone.save(path, overwrite=overwrite, include_target=False)
        m = self.model
        with fits.open(tmp, mode="update") as hdul:
            hdr = hdul[0].header
            hdr["FITKIND"] = ("transfer", "blase_specutils transfer-learning result")
            hdr["TRFMTVER"] = (RESULT_FORMAT_VERSION, "layout version of the transfer result")
            hdr["HASSTEL"] = (self.has_stellar, "a stellar clone was fitted (LINES holds it)")
            hdr["HASTELL"] = (self.has_telluric, "a telluric clone was fitted (TLINES holds it)")
            hdul.append(_prior_hdu(main_prior, self._start_centers(main_model), "PRIOR"))
            columns = [
                fits.Column("wavelength", "D", unit="Angstrom", array=self.wavelength),
                fits.Column("flux", "D", array=self.flux),
                fits.Column("sigma", "D", array=self.sigma),
                fits.Column("good", "L", array=self.good),
                fits.Column("unmasked", "L", array=np.concatenate([a.good for a in self._arrays])),
                fits.Column("model", "D", array=self.model_flux),
                fits.Column("order", "K", array=self.order_of_pixel.astype(np.int64)),
            ]
            if self.pseudo_continuum_flux is not None:
                columns.append(fits.Column("pseudo_continuum", "D", array=self.pseudo_continuum_flux))
                hp = self.gp_hyperparameters
                if hp is not None:
                    hdr["GPKERNEL"] = (hp["kernel"], "GP pseudo-continuum likelihood kernel")
                    if np.ndim(hp["amplitude"]) == 0:
                        hdr["GPAMP"] = (float(hp["amplitude"].value), "GP amplitude, data flux units")
                        hdr["GPLENGTH"] = (float(hp["length_scale"].to_value(u.AA)), "GP length scale, Angstrom")
            hdul.append(fits.BinTableHDU.from_columns(columns, name="DATA"))
            if self.has_telluric:
                hdul.extend(_lines_hdus(m.telluric, "T"))
                hdul.append(_prior_hdu(self.telluric_prior, self._start_centers(m.telluric), "TPRIOR"))
            hdul.append(fits.ImageHDU(m.continuum_coeffs.detach().cpu().numpy().astype(np.float64), name="CONTINUUM"))
            tm = self.template
            row = {
                "rv": float(m.rv.detach()), "log_vsini": float(m.rot.log_vsini.detach()),
                "log_resolving_power": float(m.inst.log_resolving_power.detach()),
                "log_telluric_power": float(m.log_telluric_power.detach()),
                "limb_darkening": m.rot.limb_darkening, "dv": m.rot.dv, "max_vsini": m.rot.max_vsini,
                "lsf_half_width": m.inst.half_width, "max_rv": m.max_rv,
                **{f"sigma_{k}": _nan_if_none(self.uncertainties.get(k)) for k in _SIGMA_KEYS},
                **{f"template_{k}": _nan_if_none(tm.get(k)) for k in _TEMPLATE_KEYS},
                **{f"chi2_{k}": _nan_if_none(self.fit.chi2.get(k)) for k in ("start", "template", "lines")},
            }
            cols = [fits.Column(k, "D", array=np.array([v], dtype=np.float64)) for k, v in row.items()]
            cols.append(fits.Column("continuum_degree", "K", array=np.array([m._powers.shape[1] - 1])))
            tab = fits.BinTableHDU.from_columns(cols, name="TRANSFER")
            tab.header["SETTINGS"] = json.dumps(self.settings)
            tab.header["FLAGS"] = json.dumps([f.to_dict() for f in self.flags])
            hdul.append(tab)
            units = [(k, a.wavelength.size, a.spectral_unit.to_string(), a.flux_unit.to_string())
                     for k, a in zip(self._order_ids, self._arrays)]
            width = max(8, *(len(x[2]) for x in units), *(len(x[3]) for x in units))
            hdul.append(fits.BinTableHDU.from_columns([
                fits.Column("order", "K", array=np.array([x[0] for x in units], dtype=np.int64)),
                fits.Column("n_pixels", "K", array=np.array([x[1] for x in units], dtype=np.int64)),
                fits.Column("spectral_unit", f"{width}A", array=np.array([x[2] for x in units])),
                fits.Column("flux_unit", f"{width}A", array=np.array([x[3] for x in units])),
            ], name="ORDERS"))
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> "TransferResult":
        """Read a result written by :meth:`save` and rebuild its forward model.

        The lines, RV, v sin i, R, telluric power, continuum and the data come back exactly, so
        :attr:`rv`, :attr:`vsini`, :attr:`resolving_power`, :attr:`chi2`, :attr:`lines`,
        :attr:`telluric_lines`, :attr:`model_spectrum`, :attr:`residual`,
        :meth:`semi_empirical_template`, :meth:`telluric_template`, :meth:`plot` and
        :meth:`summary` work as before saving. Differences: each order comes back as a plain
        ``Spectrum`` (the input's class, e.g. muler's, is not stored), ``model_flux`` is the saved
        model (the rebuilt model is checked against it; a warning if they differ by more than
        1e-8), ``fit`` keeps only the χ² of the stages (no loss histories), and a GP likelihood
        is not restored (``likelihood`` and :attr:`gp_hyperparameters` are None; the
        pseudo-continuum is kept). The "clone" curves of :meth:`plot` use the saved starting
        values of the fitted lines.

        Raises
        ------
        FileNotFoundError
            No such file.
        ValueError
            Not a transfer-learning result, or one written without the ``TRANSFER`` table (by an
            older version: refit and save again).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no fit result at {path}")
        dev = resolve_device(device)
        main = SpectralClone.load(path, device=dev)
        with fits.open(path, memmap=False) as hdul:
            hdr = hdul[0].header
            if hdr.get("FITKIND") != "transfer":
                raise ValueError(f"{path} is a clone file, not a transfer-learning result (no FITKIND='transfer')")
            if "TRANSFER" not in hdul or int(hdr.get("TRFMTVER", 1)) < 2:
                raise ValueError(f"{path} was written by an older blase_specutils without the TRANSFER table; "
                                 "it cannot be rebuilt: fit again and save")
            try:
                has_st, has_tel = bool(hdr["HASSTEL"]), bool(hdr["HASTELL"])
                main_prior, main_centers = _prior_from_hdu(hdul["PRIOR"], dev)
                d = hdul["DATA"].data
                wl = np.array(d["wavelength"], dtype=np.float64)
                flux = np.array(d["flux"], dtype=np.float64)
                sigma = np.array(d["sigma"], dtype=np.float64)
                good = np.array(d["good"], dtype=bool)
                unmasked = np.array(d["unmasked"], dtype=bool)
                model_flux = np.array(d["model"], dtype=np.float64)
                oid = np.array(d["order"], dtype=np.int64)
                pseudo = np.array(d["pseudo_continuum"], dtype=np.float64) if "pseudo_continuum" in d.columns.names else None
                tel_model, tel_prior, tel_centers = None, None, None
                if has_tel:
                    tel_model = _model_from_hdus(hdul["TLINES"], hdul["TWING"], dev)
                    tel_prior, tel_centers = _prior_from_hdu(hdul["TPRIOR"], dev)
                coeffs = np.array(hdul["CONTINUUM"].data, dtype=np.float64)
                tr = hdul["TRANSFER"]
                row = {k: tr.data[k][0] for k in tr.columns.names}
                settings = json.loads(tr.header.get("SETTINGS", "{}"))
                flags = [FitFlag(**f) for f in json.loads(tr.header.get("FLAGS", "[]"))]
                sigmas = {k: float(row[f"sigma_{k}"]) for k in _SIGMA_KEYS
                          if f"sigma_{k}" in row and not math.isnan(float(row[f"sigma_{k}"]))}
                od = hdul["ORDERS"].data
                order_ids = [int(k) for k in od["order"]]
                npix = [int(n) for n in od["n_pixels"]]
                sunits = [u.Unit(str(s).strip() or "") for s in od["spectral_unit"]]
                funits = [u.Unit(str(s).strip() or "") for s in od["flux_unit"]]
            except KeyError as err:
                raise ValueError(f"{path} is not a complete transfer-learning result: {err}") from err
        st_model = main.model if has_st else None
        max_vsini = float(row["max_vsini"])
        model = TransferModel(
            st_model, wl, order_index=oid, telluric=tel_model, rv=float(row["rv"]),
            vsini=min(math.exp(float(row["log_vsini"])), max_vsini), resolving_power=math.exp(float(row["log_resolving_power"])),
            limb_darkening=float(row["limb_darkening"]), continuum_degree=int(row["continuum_degree"]),
            dv=float(row["dv"]), max_vsini=max_vsini, max_rv=max(float(row["max_rv"]), abs(float(row["rv"]))),
            lsf_half_width=float(row["lsf_half_width"]),
        ).to(dev)
        with torch.no_grad():
            model.rv.fill_(float(row["rv"]))
            model.rot.log_vsini.fill_(float(row["log_vsini"]))
            model.inst.log_resolving_power.fill_(float(row["log_resolving_power"]))
            model.log_telluric_power.fill_(float(row["log_telluric_power"]))
            model.continuum_coeffs.copy_(torch.as_tensor(coeffs))
            rebuilt = model().cpu().numpy()
        scale = max(1.0, float(np.nanmax(np.abs(model_flux))))
        if not np.allclose(rebuilt, model_flux, rtol=0.0, atol=1e-8 * scale):
            warnings.warn(
                f"the rebuilt model of {path.name} differs from the saved one by up to "
                f"{np.nanmax(np.abs(rebuilt - model_flux)):.3g} (a different blase_specutils version?); the saved "
                "model is used for model_spectrum and chi2",
                UserWarning, stacklevel=2,
            )
        arrays, orders, start = [], [None] * (max(order_ids) + 1), 0
        for k, n, su, fu in zip(order_ids, npix, sunits, funits):
            sl = slice(start, start + n)
            start += n
            arr = SpectrumArrays(wavelength=wl[sl], flux=flux[sl], uncertainty=sigma[sl], good=unmasked[sl],
                                 flux_unit=fu, reversed=False, spectral_unit=su)
            arrays.append(arr)
            orders[k] = arrays_to_spectrum(wl[sl], flux[sl], flux_unit=fu, uncertainty=sigma[sl], mask=~unmasked[sl],
                                           like=Spectrum(spectral_axis=[1.0, 2.0] * su, flux=[1.0, 1.0] * fu))
        template = {k: row[f"template_{k}"] for k in _TEMPLATE_KEYS}
        template = {k: _none_if_nan(v) for k, v in template.items()}
        fit = TransferFit()
        fit.chi2 = {k: float(row[f"chi2_{k}"]) for k in ("start", "template", "lines")
                    if not math.isnan(float(row[f"chi2_{k}"]))}
        prior = main_prior if has_st else {}
        if not has_tel:
            tel_prior = None
        stellar_clone = SpectralClone(_clone_at(st_model, main_prior, main_centers)) if has_st else None
        telluric_clone = SpectralClone(_clone_at(tel_model, tel_prior, tel_centers)) if has_tel else None
        return cls(model=model, orders=orders, order_ids=order_ids, arrays=arrays, wavelength=wl, flux=flux,
                   sigma=sigma, good=good, order_of_pixel=oid, model_flux=model_flux, prior=prior, template=template,
                   fit=fit, settings=settings, stellar_clone=stellar_clone, telluric_clone=telluric_clone,
                   likelihood=None, pseudo_continuum_flux=pseudo, telluric_prior=tel_prior, flags=flags,
                   uncertainties=sigmas,
                   prior_centers={k: c for k, c in (("stellar", main_centers if has_st else None),
                                                    ("telluric", tel_centers)) if c is not None})


#: Keys of :attr:`TransferResult.uncertainties` kept by :meth:`TransferResult.save`.
_SIGMA_KEYS = ("rv", "vsini", "telluric_power")

#: Keys of :attr:`TransferResult.template`.
_TEMPLATE_KEYS = ("chi2", "chi2_reduced", "rv", "vsini", "resolving_power", "telluric_power")
