"""The specutils boundary: Spectrum in, plain arrays (Å, ascending) for the core, Spectrum out."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty
from specutils import Spectrum

from .constants import (AIR_MINIMUM_ANGSTROM, OUTLIER_SIGMA, OUTLIER_WINDOW, SIGMA_FLOOR_FRACTION,  # noqa: F401
                        SIGMA_LIMITS)

__all__ = ["SpectrumArrays", "spectrum_to_arrays", "arrays_to_spectrum", "wavelength_to_angstrom", "to_vacuum",
           "wavelength_frame", "air_to_vacuum_angstrom", "WAVELENGTH_FRAME_KEY", "rebuild_like", "flux_outliers",
           "refuse_extreme_pixels", "mask_flux_outliers", "FluxOutlierWarning", "region_to_band"]


@dataclass
class SpectrumArrays:
    """A spectrum as plain float64 arrays on an ascending wavelength grid in Å.

    Attributes
    ----------
    wavelength : ndarray
        Wavelengths (Å), strictly increasing.
    flux : ndarray
        Flux values in ``flux_unit`` (NaN where bad).
    uncertainty : ndarray or None
        1-σ uncertainties in ``flux_unit``.
    good : ndarray of bool
        True where the pixel is usable (finite, unmasked).
    flux_unit : astropy.units.Unit
        Unit of ``flux``.
    reversed : bool
        True if the input's spectral axis ran the other way (descending wavelength).
    spectral_unit : astropy.units.Unit
        Unit of the input's spectral axis.
    """

    wavelength: np.ndarray
    flux: np.ndarray
    uncertainty: np.ndarray | None
    good: np.ndarray
    flux_unit: u.UnitBase
    reversed: bool
    spectral_unit: u.UnitBase


def region_to_band(band):
    """A band given as a specutils ``SpectralRegion`` as its ``(lower, upper)`` Quantity pair;
    anything else unchanged.

    A region of one subregion is that band. A region of several subregions is refused (a fit or
    a clone has one band of interest): pass one subregion (``region[k]``), or fit or clone each
    subregion on its own.

    Raises
    ------
    ValueError
        A region of more than one subregion (the message lists them).
    """
    from specutils import SpectralRegion

    if not isinstance(band, SpectralRegion):
        return band
    subs = list(band.subregions)
    if len(subs) != 1:
        listed = ", ".join(f"{lo:.6g}-{hi:.6g}" for lo, hi in subs[:6]) + (", ..." if len(subs) > 6 else "")
        raise ValueError(f"the SpectralRegion has {len(subs)} subregions ({listed}); a band is one range: pass one "
                         "subregion (region[k]) or fit or clone each subregion on its own")
    lo, hi = subs[0]
    return (lo, hi)


def wavelength_to_angstrom(axis: u.Quantity, what: str = "spectral axis") -> np.ndarray:
    """Convert wavelengths, wavenumbers, frequencies or energies to wavelength in Å.

    Raises
    ------
    TypeError
        If ``axis`` is not a Quantity.
    astropy.units.UnitsError
        If its unit is not spectral.
    """
    if not isinstance(axis, u.Quantity):
        raise TypeError(f"{what} must be an astropy Quantity with spectral units (e.g. Å, nm, µm, 1/cm), got {type(axis).__name__}")
    try:
        plain = u.Quantity(axis.value, axis.unit)  # not a SpectralAxis: no Doppler conversions
        return np.asarray(plain.to_value(u.AA, equivalencies=u.spectral()), dtype=np.float64)
    except u.UnitConversionError as err:
        raise u.UnitsError(
            f"{what} has unit {axis.unit!r}, which is not a wavelength, wavenumber, frequency or energy; "
            "give it spectral units such as u.AA, u.nm, u.um or 1/u.cm"
        ) from err


def _sigma_from(uncertainty, flux_unit) -> np.ndarray | None:
    """1-σ uncertainties in ``flux_unit`` (an uncertainty may carry its own unit: mJy for a Jy flux)."""
    if uncertainty is None:
        return None
    kinds = {StdDevUncertainty: 1, VarianceUncertainty: 2, InverseVariance: -2}
    power = next((p for cls, p in kinds.items() if isinstance(uncertainty, cls)), None)
    if power is None:
        raise TypeError(
            f"unsupported uncertainty type {type(uncertainty).__name__}; use StdDevUncertainty, "
            "VarianceUncertainty or InverseVariance"
        )
    arr = np.asarray(uncertainty.array, dtype=np.float64)
    unit = uncertainty.unit  # None, or the parent's unit to the power, when none was given
    if unit is not None:
        try:
            arr = arr * float(u.Unit(unit).to(flux_unit**power))
        except u.UnitConversionError as err:
            raise u.UnitsError(
                f"the uncertainty has unit {unit!r}, which does not convert to the flux's unit {flux_unit!r} "
                f"to the power {power} as a {type(uncertainty).__name__} must; give the uncertainty in flux units"
            ) from err
    if power == 1:
        return arr
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(arr) if power == 2 else 1.0 / np.sqrt(arr)


def _pixel_list(idx: np.ndarray, limit: int = 10) -> str:
    """``"3, 17, 18"`` (and ``"... (42 in all)"`` beyond ``limit``)."""
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return shown + (f", ... ({idx.size} in all)" if idx.size > limit else "")


# OUTLIER_SIGMA, OUTLIER_WINDOW, SIGMA_FLOOR_FRACTION and SIGMA_LIMITS: blase_specutils.constants


def flux_outliers(flux: np.ndarray, sigma: np.ndarray, good: np.ndarray) -> np.ndarray:
    r"""Single-pixel flux outliers (cosmic rays, hot or dead pixels) of one order.

    The robust local fit is a running median over 2 × :data:`OUTLIER_WINDOW` + 1 = 7 usable
    pixels; r is the flux minus it, and the robust σ of the order is 1.4826 × median |r| (the
    normal-equivalent median absolute deviation). A usable pixel is an outlier when all three hold:

    * |r| > 10 × max(σ_pixel, robust σ) (:data:`OUTLIER_SIGMA`);
    * |r| > 3 × |r| of each usable neighbour: it stands alone. The instrument's line-spread
      function spreads every real feature over 2 or more pixels, so a resolved line core is never
      more than ~2× away from its neighbours' residuals;
    * |r| > 0.5 × |local fit|: an excursion of at least half the local flux level.

    On the real HPF (WASP 69, HR 4829: 59,000 px) and IGRINS target spectra of the project's
    data this marks no pixel of the HPF data and ten single-pixel excursions of the IGRINS
    target (values of -7,000 to 98,000 among tens to thousands). Two adjacent bad pixels are
    not caught. Pixels whose σ is below :data:`SIGMA_FLOOR_FRACTION` of the order's median σ
    are outliers too.

    Parameters
    ----------
    flux, sigma : ndarray
        The order's flux and 1-σ uncertainties (same unit), on an ascending wavelength grid.
    good : ndarray of bool
        Usable pixels (finite, unmasked); others are never outliers and do not count as neighbours.

    Returns
    -------
    ndarray of bool
        True at the outliers.
    """
    from scipy.ndimage import median_filter

    flux = np.asarray(flux, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    out = np.zeros(flux.size, dtype=bool)
    idx = np.flatnonzero(good)
    if idx.size < 2 * OUTLIER_WINDOW + 3:
        return out
    x, s = flux[idx], sigma[idx]
    with np.errstate(over="ignore", invalid="ignore"):
        local = median_filter(x, size=2 * OUTLIER_WINDOW + 1, mode="nearest")
        r = np.abs(x - local)
        robust = 1.4826 * float(np.median(r))
        neighbour = np.maximum(np.r_[0.0, r[:-1]], np.r_[r[1:], 0.0])
        spike = (r > OUTLIER_SIGMA * np.maximum(s, robust)) & (r > 3.0 * neighbour) & (r > 0.5 * np.abs(local))
    finite_s = s[np.isfinite(s)]
    tiny = s < SIGMA_FLOOR_FRACTION * float(np.median(finite_s)) if finite_s.size else np.zeros(s.size, bool)
    out[idx] = spike | tiny
    return out


class FluxOutlierWarning(UserWarning):
    """Single-pixel flux outliers were left out of a fit (:func:`flux_outliers`); the result's
    ``outliers`` lists them."""


def mask_flux_outliers(flux: np.ndarray, sigma: np.ndarray, good: np.ndarray, order_of_pixel: np.ndarray,
                       arrays: list) -> tuple[np.ndarray, dict]:
    """The outliers of concatenated orders (:func:`flux_outliers`, order by order) and a report.

    Parameters
    ----------
    flux, sigma, good, order_of_pixel : ndarray
        Concatenated orders on their ascending wavelength grids, and each pixel's (user's) order.
    arrays : list of SpectrumArrays
        The orders' arrays in the concatenated sequence (their ``reversed`` says how to count
        pixels along the user's own axis).

    Returns
    -------
    (ndarray of bool, dict)
        The outlier mask, and ``{"count", "threshold_sigma", "pixels"}`` where ``pixels`` maps
        each order with outliers (its index, as a string) to the positions along that order's
        own spectral axis.
    """
    mask = np.zeros(np.asarray(flux).size, dtype=bool)
    pixels: dict[str, list[int]] = {}
    start = 0
    for arr in arrays:
        n = arr.wavelength.size
        sl = slice(start, start + n)
        start += n
        out = flux_outliers(flux[sl], sigma[sl], good[sl])
        mask[sl] = out
        if out.any():
            j = np.flatnonzero(out)
            k = int(order_of_pixel[sl][0])
            pixels[str(k)] = sorted(int(i) for i in ((n - 1 - j) if arr.reversed else j))
    return mask, {"count": int(mask.sum()), "threshold_sigma": OUTLIER_SIGMA, "pixels": pixels}


def refuse_extreme_pixels(spectrum: Spectrum, order: int = 0) -> None:
    """ValueError naming the pixels of one order that no fit can use.

    Refused: ±inf flux at an unmasked pixel (NaN marks a missing pixel and is left out, as
    specutils and muler do), and at unmasked pixels with finite flux a σ <= 0 or outside
    :data:`SIGMA_LIMITS` (1e-150 to 1e150: its inverse square, the χ² weight, must be a finite,
    nonzero float64). Indices are positions along the spectrum's own spectral axis.

    Parameters
    ----------
    spectrum : Spectrum
        One order.
    order : int
        Its index, for the message.
    """
    f = np.asarray(spectrum.flux.value, dtype=np.float64)
    unmasked = np.ones(f.size, bool) if spectrum.mask is None else ~np.asarray(spectrum.mask, dtype=bool).ravel()
    inf = np.flatnonzero(np.isinf(f) & unmasked)
    if inf.size:
        raise ValueError(f"order {order} has infinite flux at {inf.size} unmasked pixel(s): index {_pixel_list(inf)} "
                         "(positions along its spectral axis); mask them (spectrum.mask True) or set them to NaN")
    s = _sigma_from(spectrum.uncertainty, spectrum.flux.unit)
    if s is None:
        return
    s = np.asarray(s, dtype=np.float64)
    usable = unmasked & np.isfinite(f)
    bad = np.flatnonzero(np.isfinite(s) & (s <= 0) & usable)
    if bad.size:
        raise ValueError(f"order {order} has {bad.size} pixel(s) with zero or negative uncertainty: index "
                         f"{_pixel_list(bad)} (positions along its spectral axis); mask them or give positive "
                         "1-sigma uncertainties")
    lo, hi = SIGMA_LIMITS
    bad = np.flatnonzero(np.isfinite(s) & ((s < lo) | (s > hi)) & usable)
    if bad.size:
        raise ValueError(f"order {order} has {bad.size} uncertainty value(s) outside {lo:g}-{hi:g} (their inverse "
                         f"square, the χ² weight, is not a finite nonzero number): index {_pixel_list(bad)}, e.g. "
                         f"σ = {s[bad[0]]:.3g}; mask them, or rescale the flux and its uncertainties")


def _refuse_negative_variance(uncertainty, good: np.ndarray) -> None:
    """ValueError naming the usable pixels whose variance or inverse variance is negative.

    A negative σ is refused where the fit reads it; a negative variance or inverse variance would
    otherwise become a NaN σ here and silently drop its pixel.
    """
    if not isinstance(uncertainty, (VarianceUncertainty, InverseVariance)):
        return
    raw = np.asarray(uncertainty.array, dtype=np.float64)
    if raw.shape != good.shape:
        return  # the shape error is reported where the arrays meet
    bad = np.flatnonzero(np.isfinite(raw) & (raw < 0) & good)
    if bad.size:
        kind = "variance" if isinstance(uncertainty, VarianceUncertainty) else "inverse variance"
        raise ValueError(
            f"the uncertainty ({type(uncertainty).__name__}) has a negative {kind} at {bad.size} usable pixel(s): "
            f"index {_pixel_list(bad)} (positions along the input's spectral axis); a {kind} cannot be negative. "
            "Mask those pixels (spectrum.mask True) or give non-negative values"
        )


def spectrum_to_arrays(spectrum: Spectrum, *, require_finite: bool = True) -> SpectrumArrays:
    """Read a 1-D ``Spectrum`` (or ``Spectrum1D``, muler spectra) into plain arrays.

    The spectral axis is converted to wavelength in Å (from nm, µm, wavenumber, frequency…)
    and sorted ascending; masked (specutils: True = bad) and non-finite pixels are marked bad.
    The input is not modified.

    Raises
    ------
    TypeError
        Not a ``Spectrum``.
    ValueError
        Not 1-D, no usable pixels, duplicated wavelengths, or a negative variance or inverse
        variance at a usable pixel (the message names the pixels).
    astropy.units.UnitsError
        Non-spectral axis.
    """
    if not isinstance(spectrum, Spectrum):
        raise TypeError(
            f"expected a specutils Spectrum (or Spectrum1D / muler spectrum), got {type(spectrum).__name__}"
        )
    if spectrum.flux.ndim != 1:
        raise ValueError(
            f"expected a 1-D spectrum, got flux of shape {spectrum.flux.shape}; pass one order at a time "
            "or a SpectrumList"
        )
    wl = wavelength_to_angstrom(spectrum.spectral_axis)
    flux_q = spectrum.flux
    flux = np.array(flux_q.value, dtype=np.float64)
    sigma = _sigma_from(spectrum.uncertainty, flux_q.unit)
    good = np.isfinite(flux) & np.isfinite(wl)
    if spectrum.mask is not None:
        good &= ~np.asarray(spectrum.mask, dtype=bool)
    if sigma is not None:
        sigma = np.array(sigma, dtype=np.float64)
        _refuse_negative_variance(spectrum.uncertainty, good)
    rev = wl.size > 1 and wl[0] > wl[-1]
    if rev:
        wl, flux, good = wl[::-1].copy(), flux[::-1].copy(), good[::-1].copy()
        sigma = None if sigma is None else sigma[::-1].copy()
    d = np.diff(wl)
    if np.any(d == 0):
        raise ValueError(
            "the spectral axis has duplicated values; remove the duplicates (e.g. where orders overlap) first"
        )
    if np.any(d < 0):
        raise ValueError("the spectral axis must be monotonic (strictly increasing or decreasing)")
    if require_finite and not good.any():
        raise ValueError("the spectrum has no usable pixels: every flux value is NaN, infinite or masked")
    flux = np.where(good, flux, np.nan)
    return SpectrumArrays(wl, flux, sigma, good, flux_q.unit, bool(rev), spectrum.spectral_axis.unit)


def arrays_to_spectrum(
    wavelength: np.ndarray,
    flux: np.ndarray,
    *,
    flux_unit: u.UnitBase = u.dimensionless_unscaled,
    uncertainty: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    like: Spectrum | None = None,
    meta: dict | None = None,
) -> Spectrum:
    """Build a Spectrum from arrays in Å, as the class of ``like`` where that works.

    Where ``wavelength`` is the grid of ``like`` (what :func:`spectrum_to_arrays` made of it), the
    result has a copy of ``like``'s own spectral axis, in its unit and order, so that arithmetic
    with ``like`` works and pixels line up; the arrays are reversed to match where that axis
    descends in wavelength. Otherwise the axis is ``wavelength`` in the unit of ``like`` (if given
    and convertible), so a µm input gives a µm output.

    ``meta``: the result's metadata (a shallow copy). Left out, it is a shallow copy of ``like``'s
    ``meta`` (so a muler spectrum keeps its FITS header and methods such as ``.astropy_time``
    keep working), or empty without ``like``. A velocity tagged on ``like``'s spectral axis
    (``radial_velocity``/``redshift``) is kept on the result's (:func:`rebuild_like`).
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    arrays = dict(flux=np.asarray(flux, dtype=np.float64),
                  uncertainty=None if uncertainty is None else np.asarray(uncertainty, dtype=np.float64),
                  mask=None if mask is None else np.asarray(mask, dtype=bool))
    spectral_axis = wavelength * u.AA
    own = _own_axis(wavelength, like) if like is not None else None
    if own is not None:
        spectral_axis, descending = own
        if descending:
            arrays = {k: None if v is None else v[::-1].copy() for k, v in arrays.items()}
    elif like is not None:
        unit = like.spectral_axis.unit
        try:
            spectral_axis = spectral_axis.to(unit, equivalencies=u.spectral())
        except u.UnitConversionError:
            pass
    kwargs = dict(spectral_axis=spectral_axis, flux=arrays["flux"] * flux_unit)
    if arrays["uncertainty"] is not None:
        kwargs["uncertainty"] = StdDevUncertainty(arrays["uncertainty"])
    if arrays["mask"] is not None:
        kwargs["mask"] = arrays["mask"]
    if meta is None and like is not None:
        meta = getattr(like, "meta", None)
    kwargs["meta"] = dict(meta or {})
    return rebuild_like(like, **kwargs)


def rebuild_like(like: Spectrum | None, **kwargs) -> Spectrum:
    """A new spectrum of ``like``'s class from ``Spectrum`` keywords, tagged with ``like``'s velocity.

    ``like``'s class (e.g. muler's ``HPFSpectrum``) is used where its constructor takes the
    keywords, else a plain ``Spectrum``. A radial velocity (or redshift) tagged on ``like``'s
    spectral axis is set on the result's axis too, unless ``kwargs`` set one: outputs carry the
    input's tag (specutils: the velocity of the target relative to the observer for the axis as
    given). The keywords are passed as they are (not copied).
    """
    if like is not None and "radial_velocity" not in kwargs and "redshift" not in kwargs:
        rv = getattr(like.spectral_axis, "radial_velocity", None)
        if rv is not None and np.any(u.Quantity(rv).value != 0):
            kwargs["radial_velocity"] = rv
    cls = type(like) if like is not None else Spectrum
    if cls is not Spectrum:
        try:
            return cls(**kwargs)
        except Exception:  # muler subclasses may need extra keywords; fall back to Spectrum
            pass
    return Spectrum(**kwargs)


def _own_axis(wavelength: np.ndarray, like: Spectrum) -> tuple[u.Quantity, bool] | None:
    """A copy of ``like``'s spectral axis, and whether it descends in wavelength, if ``wavelength``
    (Å, ascending) is exactly that axis converted and sorted; else None."""
    axis = like.spectral_axis
    if axis.ndim != 1 or axis.size != wavelength.size:
        return None
    try:
        wl = wavelength_to_angstrom(axis)
    except (TypeError, u.UnitsError):
        return None
    descending = wl.size > 1 and wl[0] > wl[-1]
    if not np.array_equal(wl[::-1] if descending else wl, wavelength):
        return None
    return u.Quantity(axis, copy=True), bool(descending)



# ------------------------------------------------------------------------------ air and vacuum
#: Key of ``Spectrum.meta`` where :func:`to_vacuum` records the wavelength frame of its result.
WAVELENGTH_FRAME_KEY = "blase_specutils_wavelength_frame"
#: Values :func:`to_vacuum` records under :data:`WAVELENGTH_FRAME_KEY` (all start with "vacuum").
FRAME_CONVERTED = "vacuum (converted from air)"
FRAME_STATED = "vacuum (the file says vacuum)"
FRAME_USER = "vacuum (as the user said: air=False)"
FRAME_ASSUMED = "vacuum (assumed: nothing in the file says air or vacuum)"

# AIR_MINIMUM_ANGSTROM (air wavelengths exist only above it): blase_specutils.constants


def air_to_vacuum_angstrom(wavelength: np.ndarray) -> np.ndarray:
    r"""Vacuum wavelengths (Å) of air wavelengths (Å).

    Uses the refractive index of standard air of Morton (2000, ApJS 130, 403, Eq. 8; the IAU
    standard as used by VALD), as implemented in ``specutils.utils.wcs_utils.refraction_index``
    (``method="Morton2000"``):

    .. math::

        n - 1 = 8.34254\times10^{-5} + \frac{2.406147\times10^{-2}}{130 - s^2}
                + \frac{1.5998\times10^{-4}}{38.9 - s^2},\qquad s = 10^4 / \lambda_\mathrm{vac}\,[Å]

    with :math:`\lambda_\mathrm{air} = \lambda_\mathrm{vac} / n(\lambda_\mathrm{vac})`. Since
    :math:`n` is a function of the vacuum wavelength, :math:`\lambda_\mathrm{vac} = \lambda_\mathrm{air}\,
    n(\lambda_\mathrm{vac})` is solved by fixed-point iteration to 1e-10 Å: the exact inverse of
    ``specutils.utils.wcs_utils.vac_to_air(..., method="Morton2000")`` (its ``air_to_vac`` default,
    ``scheme="inversion"``, evaluates n at the air wavelength and is off by ~3e-5 Å at 1 µm).

    Parameters
    ----------
    wavelength : array_like
        Air wavelengths in Å, all >= 2000 Å.

    Returns
    -------
    ndarray
        Vacuum wavelengths in Å (float64), same shape.

    Raises
    ------
    ValueError
        Non-finite wavelengths, or wavelengths below 2000 Å (given in vacuum by convention).
    """
    from specutils.utils.wcs_utils import refraction_index

    air = np.array(wavelength, dtype=np.float64)
    if air.size == 0:
        return air
    if not np.all(np.isfinite(air)):
        raise ValueError("air wavelengths must be finite to convert them to vacuum")
    if float(air.min()) < AIR_MINIMUM_ANGSTROM:
        raise ValueError(
            f"air wavelengths start at {AIR_MINIMUM_ANGSTROM:g} Å, got {float(air.min()):.6g} Å: below it wavelengths "
            "are given in vacuum by convention; say air=False if these are vacuum wavelengths"
        )
    vac = air.copy()
    for _ in range(20):
        new = air * np.asarray(refraction_index(vac * u.AA, method="Morton2000"), dtype=np.float64)
        done = float(np.max(np.abs(new - vac))) < 1e-10
        vac = new
        if done:
            break
    return vac


def _frame_code(value) -> str | None:
    """'air', 'vacuum' or None from a FITS CTYPE (``AWAV``/``WAVE``, with or without ``-ALG``)."""
    if not isinstance(value, str):
        return None
    code = value.strip().upper().split("-")[0]
    return {"AWAV": "air", "WAVE": "vacuum"}.get(code)


def _keyword_statements(mapping, where: str, *, skip_ctype: bool = False) -> list[tuple[str, str]]:
    """What the keywords of a header or a meta dict say: ``[(keyword, 'air' | 'vacuum'), ...]``."""
    out = []
    if mapping is None:
        return out
    try:
        items = list(mapping.items())
    except Exception:  # not a mapping
        return out
    for key, value in items:
        if not isinstance(key, str):
            continue
        k = key.strip().upper()
        said = None
        if k == "CTYPE1" and not skip_ctype:
            said = _frame_code(value)
        elif k == "AIRORVAC" and isinstance(value, str):
            v = value.strip().lower()
            said = "air" if v.startswith("air") else "vacuum" if v.startswith("vac") else None
        elif k in ("AIR", "VACUUM") and isinstance(value, (bool, np.bool_)):
            said = "air" if bool(value) == (k == "AIR") else "vacuum"
        if said is not None:
            out.append((f"{where}{key}={value!r}", said))
    return out


def _frame_statements(spectrum: Spectrum) -> list[tuple[str, str]]:
    """Every statement the spectrum carries about air or vacuum: its FITS WCS, header and meta."""
    out = []
    wcs = getattr(spectrum, "wcs", None)
    ctype = getattr(getattr(wcs, "wcs", None), "ctype", None)  # an astropy.wcs.WCS read from a file
    if ctype is not None:
        for c in list(ctype):
            said = _frame_code(c)
            if said is not None:
                out.append((f"the WCS CTYPE {c!r}", said))
    meta = getattr(spectrum, "meta", None) or {}
    header = meta.get("header") if hasattr(meta, "get") else None
    # a WCS read from the file already said what the header's CTYPE1 says
    out += _keyword_statements(header, "header ", skip_ctype=bool(out))
    out += _keyword_statements({k: v for k, v in meta.items() if k != "header"} if hasattr(meta, "items") else None,
                               "meta ")
    return out


def wavelength_frame(spectrum: Spectrum) -> str | None:
    """What a spectrum says about its wavelengths: air, vacuum, or nothing.

    Reads, in this order: the record left by :func:`to_vacuum` (``meta['blase_specutils_wavelength_frame']``,
    returned as it is, e.g. ``"vacuum (converted from air)"``); a FITS WCS read with the spectrum
    (``CTYPE1 = 'AWAV'``: air, ``'WAVE'``: vacuum); the FITS header in ``meta['header']`` (``CTYPE1``,
    ``AIRORVAC = 'air'`` / ``'vac'``, logical ``AIR`` or ``VACUUM``); and the same keywords in
    ``meta`` itself, in any case (``meta['air'] = True``, ``meta['AIRORVAC'] = 'vac'``).

    Parameters
    ----------
    spectrum : Spectrum

    Returns
    -------
    str or None
        The recorded frame, ``"air"``, ``"vacuum"``, or None when nothing says.

    Raises
    ------
    ValueError
        The spectrum says both (e.g. ``CTYPE1 = 'AWAV'`` and ``AIRORVAC = 'vac'``); the message
        names the keywords and asks for ``air=True`` or ``air=False``.
    """
    meta = getattr(spectrum, "meta", None) or {}
    recorded = meta.get(WAVELENGTH_FRAME_KEY) if hasattr(meta, "get") else None
    if isinstance(recorded, str) and recorded.startswith("vacuum"):
        return recorded
    statements = _frame_statements(spectrum)
    said = {s for _, s in statements}
    if len(said) > 1:
        raise ValueError(
            "the spectrum says both air and vacuum wavelengths ("
            + "; ".join(f"{w} says {s}" for w, s in statements)
            + "); say which with air=True (air wavelengths, converted to vacuum) or air=False (vacuum)"
        )
    return said.pop() if said else None


def to_vacuum(spectrum: Spectrum, air: bool | None = None) -> Spectrum:
    """The spectrum with vacuum wavelengths: air wavelengths are converted once, at the boundary.

    Every clone and template of this package is in vacuum wavelengths (PHOENIX, the MOOG
    synthesis, TelFit, PSG, the HPF and IGRINS pipelines); a spectrum in air wavelengths fitted
    with them would be off by the air/vacuum offset (~2.7 Å, -82 km/s near 1 µm). Air wavelengths
    are converted with :func:`air_to_vacuum_angstrom` (the Morton 2000 refractive index of
    standard air, exactly inverted).

    Parameters
    ----------
    spectrum : Spectrum
        Any 1-D spectrum. Not modified.
    air : bool or None
        None (default): decide from what the spectrum says (:func:`wavelength_frame`: a FITS WCS
        ``CTYPE1 = 'AWAV'``, ``AIRORVAC``, ``meta['air']``, ...); vacuum when nothing says air.
        True: the wavelengths are in air, whatever the file says. False: they are in vacuum,
        whatever the file says. Where the user's word contradicts the file, a warning says so.

    Returns
    -------
    Spectrum
        A new spectrum of the input's class (its flux, uncertainty and mask, a shallow copy of its
        ``meta``), with ``meta['blase_specutils_wavelength_frame']`` saying which it was:
        ``"vacuum (converted from air)"``, ``"vacuum (the file says vacuum)"``,
        ``"vacuum (as the user said: air=False)"`` or ``"vacuum (assumed: nothing in the file says
        air or vacuum)"``. The axis keeps its unit and order. A spectrum that already carries that
        record is returned as it is (no second conversion).

    Raises
    ------
    TypeError
        Not a ``Spectrum``, or ``air`` is not True, False or None.
    ValueError
        ``air=True`` for a spectrum already converted from air; the spectrum says both air and
        vacuum and ``air`` is None; air wavelengths below 2000 Å; or air wavelengths on a
        spectral axis that is not a wavelength (frequency, wavenumber or energy do not change
        with the medium).
    """
    if not isinstance(spectrum, Spectrum):
        raise TypeError(f"expected a specutils Spectrum, got {type(spectrum).__name__}")
    if air is not None and not isinstance(air, (bool, np.bool_)):
        raise TypeError(f"air must be True (air wavelengths), False (vacuum) or None (as the file says), got {air!r}")
    meta = getattr(spectrum, "meta", None) or {}
    recorded = meta.get(WAVELENGTH_FRAME_KEY) if hasattr(meta, "get") else None
    if isinstance(recorded, str) and recorded.startswith("vacuum"):
        if air is None or not air:
            return spectrum
        if recorded == FRAME_CONVERTED:
            raise ValueError(
                "this spectrum was already converted from air to vacuum wavelengths (meta"
                f"[{WAVELENGTH_FRAME_KEY!r}] = {recorded!r}); converting again would shift it by the air/vacuum "
                "offset once more. Leave air out (or air=None) for spectra read with read_spectrum"
            )
        if recorded == FRAME_STATED:
            warnings.warn("the file says vacuum wavelengths but air=True was given: converting from air as told",
                          UserWarning, stacklevel=2)
        return _converted(spectrum)
    if air is None:
        said = wavelength_frame(spectrum)
        if said == "air":
            return _converted(spectrum)
        return _with_frame(spectrum, FRAME_STATED if said == "vacuum" else FRAME_ASSUMED)
    statements = _frame_statements(spectrum)
    against = [w for w, s in statements if (s == "air") != bool(air)]
    if against:
        warnings.warn(
            f"air={bool(air)} was given but {', '.join(against)} says {'vacuum' if air else 'air'}: "
            f"treating the wavelengths as {'air' if air else 'vacuum'}, as told", UserWarning, stacklevel=2)
    return _converted(spectrum) if air else _with_frame(spectrum, FRAME_USER)


def _with_frame(spectrum: Spectrum, frame: str) -> Spectrum:
    """A shallow copy of ``spectrum`` (same arrays) whose own ``meta`` records ``frame``."""
    out = copy.copy(spectrum)
    out.meta = dict(getattr(spectrum, "meta", None) or {}, **{WAVELENGTH_FRAME_KEY: frame})
    return out


def _converted(spectrum: Spectrum) -> Spectrum:
    """The spectrum with its air wavelengths replaced by vacuum ones, in the axis' unit and order."""
    axis = spectrum.spectral_axis
    unit = u.Unit(axis.unit)
    if unit.physical_type != "length":
        raise ValueError(
            f"the spectral axis is in {unit} (not a wavelength): air and vacuum differ only in wavelength, "
            "a frequency, wavenumber or energy axis is the same in both. Leave air out or say air=False"
        )
    wl = u.Quantity(axis.value, unit).to_value(u.AA)
    vac = (air_to_vacuum_angstrom(wl) * u.AA).to(unit)
    return rebuild_like(spectrum, spectral_axis=vac, flux=spectrum.flux, uncertainty=spectrum.uncertainty,
                        mask=spectrum.mask,
                        meta=dict(getattr(spectrum, "meta", None) or {}, **{WAVELENGTH_FRAME_KEY: FRAME_CONVERTED}))
