r"""Preprocessing of a precomputed spectrum before cloning (paper Section 2.2, Eq. 1).

:math:`S = S_\mathrm{abs} / B / P`: trim to the band ± Δλ_buffer, divide by a blackbody
:math:`B(T_\mathrm{eff})`, and flatten with a smooth polynomial :math:`P` through continuum
peaks. Each step takes and returns a ``Spectrum`` and never modifies its input.

The blackbody is astropy's :class:`~astropy.modeling.physical_models.BlackBody` and the noise
estimate of spectra without uncertainties is specutils' DER_SNR
(:func:`specutils.analysis.snr_derived`): :func:`blackbody` and :func:`der_snr_noise`.
"""

from __future__ import annotations

import astropy.units as u
import numpy as np
from specutils import Spectrum

from .core.clone import SPEED_OF_LIGHT_KMS
from .core.continuum import continuum_polynomial
from .spectra import arrays_to_spectrum, region_to_band, spectrum_to_arrays, wavelength_to_angstrom

__all__ = ["trim", "divide_blackbody", "flatten_continuum", "preprocess", "blackbody", "der_snr_noise",
           "DEFAULT_BUFFER"]

#: Default Δλ_buffer: covers |RV| and v sin i up to 500 km/s in the near-infrared (paper Sect. 2.1).
DEFAULT_BUFFER = 30 * u.AA


def _as_band(band) -> tuple[float, float]:
    if band is None:
        return None
    band = region_to_band(band)  # a one-subregion SpectralRegion is its (lower, upper) pair
    if isinstance(band, u.Quantity):
        lo_hi = wavelength_to_angstrom(band, "band")
    elif isinstance(band, (tuple, list)) and len(band) == 2 and all(isinstance(b, u.Quantity) for b in band):
        lo_hi = np.array([wavelength_to_angstrom(b, "band") for b in band], dtype=np.float64).ravel()
    else:
        raise TypeError("band must be a pair of wavelengths with units, e.g. (8079, 12785) * u.AA, or a SpectralRegion "
                        "of one subregion")
    if lo_hi.size != 2 or not np.all(np.isfinite(lo_hi)):
        raise ValueError("band must hold exactly two finite wavelengths")
    lo, hi = np.sort(lo_hi)
    if lo == hi:
        raise ValueError("band must have a non-zero width")
    return float(lo), float(hi)


def _buffer_angstrom(buffer) -> float:
    if not isinstance(buffer, u.Quantity):
        raise TypeError("buffer must be a Quantity in wavelength units, e.g. 30 * u.AA")
    try:
        b = float(buffer.to_value(u.AA))
    except u.UnitConversionError as err:
        raise u.UnitsError(f"buffer must be a wavelength (e.g. 30 * u.AA), got unit {buffer.unit!r}") from err
    if not np.isfinite(b) or b < 0:
        raise ValueError(f"buffer must be finite and >= 0, got {buffer}")
    return b


def _velocity_kms(value, name: str, *, nonnegative: bool = False) -> float:
    """A velocity as a float in km/s: a Quantity in velocity units, or a plain number read as km/s.

    Raises TypeError (not a number), UnitsError (not a velocity) and ValueError (not finite, not
    slower than light, or negative where ``nonnegative``), each naming ``name``.
    """
    if isinstance(value, u.Quantity):
        try:
            v = value.to_value(u.km / u.s)
        except u.UnitConversionError as err:
            raise u.UnitsError(f"{name} must be a velocity (e.g. 30 * u.km / u.s), got unit {value.unit!r}") from err
    else:
        v = value
    if np.ndim(v) != 0:
        raise TypeError(f"{name} must be one number (km/s), got an array of shape {np.shape(v)}")
    try:
        v = float(v)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a velocity such as 30 * u.km / u.s or a number in km/s, "
                        f"got {value!r}") from err
    if not np.isfinite(v) or abs(v) >= SPEED_OF_LIGHT_KMS:
        raise ValueError(f"{name} must be finite and slower than light, got {v} km/s")
    if nonnegative and v < 0:
        raise ValueError(f"{name} must be >= 0 km/s, got {v} km/s")
    return v


def _rebuild(spectrum: Spectrum, arrays, flux, flux_unit=None, keep_unc_scale=None) -> Spectrum:
    unc = None
    if arrays.uncertainty is not None and keep_unc_scale is not None:
        unc = arrays.uncertainty / keep_unc_scale
    return arrays_to_spectrum(
        arrays.wavelength,
        flux,
        flux_unit=arrays.flux_unit if flux_unit is None else flux_unit,
        uncertainty=unc,
        mask=~arrays.good,
        like=spectrum,
        meta=getattr(spectrum, "meta", None),
    )


def trim(spectrum: Spectrum, band, buffer: u.Quantity = DEFAULT_BUFFER) -> Spectrum:
    """Keep the pixels within ``band`` ± ``buffer``.

    Parameters
    ----------
    spectrum : Spectrum
        Any 1-D spectrum (wavelength, wavenumber or frequency axis).
    band : (Quantity, Quantity) or Quantity of length 2
        Region of interest, e.g. ``(8079, 12785) * u.AA``.
    buffer : Quantity
        Δλ_buffer added on both sides (default 30 Å).

    Returns
    -------
    Spectrum
        The trimmed spectrum, ascending in wavelength, in the input's spectral unit.
    """
    lo, hi = _as_band(band)
    b = _buffer_angstrom(buffer)
    arr = spectrum_to_arrays(spectrum)
    sel = (arr.wavelength >= lo - b) & (arr.wavelength <= hi + b)
    if sel.sum() < 3:
        raise ValueError(
            f"the band {lo:.6g}-{hi:.6g} Å ± {b:g} Å leaves {int(sel.sum())} pixels of a spectrum that covers "
            f"{arr.wavelength[0]:.6g}-{arr.wavelength[-1]:.6g} Å; choose a band that overlaps the spectrum"
        )
    unc = None if arr.uncertainty is None else arr.uncertainty[sel]
    return arrays_to_spectrum(
        arr.wavelength[sel], arr.flux[sel], flux_unit=arr.flux_unit, uncertainty=unc,
        mask=~arr.good[sel], like=spectrum, meta=spectrum.meta,
    )


def divide_blackbody(spectrum: Spectrum, teff: u.Quantity | float) -> Spectrum:
    """Divide by a blackbody B(T_eff), normalised to unit median over the spectrum.

    The result keeps the input's flux unit; only the spectral shape of B is removed.

    Parameters
    ----------
    spectrum : Spectrum
    teff : Quantity or float
        Effective temperature (K if a plain number), > 0.
    """
    t = _teff_kelvin(teff)
    arr = spectrum_to_arrays(spectrum)
    bb = blackbody(arr.wavelength, t)
    bb = bb / np.median(bb)
    return _rebuild(spectrum, arr, arr.flux / bb, keep_unc_scale=bb)


#: Unit of :func:`blackbody`: spectral radiance per unit wavelength.
_B_LAMBDA_UNIT = u.W / (u.m**2 * u.m * u.sr)


def blackbody(wavelength: np.ndarray, teff: float) -> np.ndarray:
    r"""Blackbody spectral radiance :math:`B_\lambda(T)` in W m⁻² m⁻¹ sr⁻¹ at vacuum wavelengths in Å.

    Astropy's :class:`~astropy.modeling.physical_models.BlackBody` with a per-wavelength scale,
    :math:`B_\lambda = 2hc^2 \lambda^{-5} / (e^{hc/\lambda k T} - 1)`.

    Parameters
    ----------
    wavelength : ndarray
        Wavelengths in Å.
    teff : float
        Temperature in K, finite and > 0.

    Returns
    -------
    ndarray
        :math:`B_\lambda` (float64), same shape as ``wavelength``.
    """
    from astropy.modeling.physical_models import BlackBody

    t = _teff_kelvin(teff)
    model = BlackBody(temperature=t * u.K, scale=1.0 * _B_LAMBDA_UNIT)
    values = model(np.asarray(wavelength, dtype=np.float64) * u.AA)
    return np.asarray(values.to_value(_B_LAMBDA_UNIT), dtype=np.float64)


def der_snr_noise(flux: np.ndarray) -> float:
    r"""A constant noise level of a spectrum without uncertainties: the DER_SNR estimate.

    Specutils' :func:`~specutils.analysis.snr_derived` (Stoehr et al. 2008) gives S/N =
    median(f) / N with :math:`N = 1.482602/\sqrt{6}\;\mathrm{median}|2f_i - f_{i-2} - f_{i+2}|`;
    this returns N. N does not change when a constant is added to the flux, so a flux whose
    median is 0 (where the S/N is undefined) is offset by 1 first.

    Parameters
    ----------
    flux : ndarray
        The flux of one order, pixels in wavelength order; non-finite values are left out.

    Returns
    -------
    float
        The noise level, in the unit of ``flux``.

    Raises
    ------
    ValueError
        Fewer than 5 finite pixels.
    """
    from specutils.analysis import snr_derived

    f = np.asarray(flux, dtype=np.float64)
    f = f[np.isfinite(f)]
    if f.size < 5:
        raise ValueError("too few finite pixels to estimate the noise; give uncertainties")
    signal = float(np.median(f))
    if signal == 0.0:
        f, signal = f + 1.0, float(np.median(f + 1.0))
    spectrum = Spectrum(spectral_axis=np.arange(1.0, f.size + 1.0) * u.AA, flux=f * u.dimensionless_unscaled)
    snr = float(u.Quantity(snr_derived(spectrum)).value)
    return 0.0 if not np.isfinite(snr) else abs(signal / snr)


def _teff_kelvin(teff) -> float:
    if isinstance(teff, u.Quantity):
        try:
            t = float(teff.to_value(u.K, equivalencies=u.temperature()))
        except u.UnitConversionError as err:
            raise u.UnitsError(f"teff must be a temperature, got unit {teff.unit!r}") from err
    else:
        try:
            t = float(teff)
        except (TypeError, ValueError) as err:
            raise TypeError(f"teff must be a temperature such as 4700 * u.K, got {teff!r}") from err
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"teff must be a positive temperature, got {teff}")
    return t


def flatten_continuum(
    spectrum: Spectrum, *, n_bins: int = 40, order: int = 3, return_continuum: bool = False
):
    """Divide by a smooth polynomial P through the continuum peaks (see
    :func:`blase_specutils.core.continuum.continuum_polynomial`).

    Parameters
    ----------
    spectrum : Spectrum
    n_bins : int
        Number of equal-width bins whose highest point is a continuum candidate.
    order : int
        Polynomial degree.
    return_continuum : bool
        Also return P as a Spectrum.

    Returns
    -------
    Spectrum or (Spectrum, Spectrum)
        The continuum-normalised (dimensionless) spectrum, and P if asked for.
    """
    if int(n_bins) < 2 or int(order) < 0:
        raise ValueError("n_bins must be >= 2 and order >= 0")
    arr = spectrum_to_arrays(spectrum)
    p = continuum_polynomial(arr.wavelength, arr.flux, n_bins=int(n_bins), order=int(order))
    if not np.all(p[arr.good] > 0):
        raise ValueError("the continuum polynomial is not positive everywhere; is the flux positive?")
    out = _rebuild(spectrum, arr, arr.flux / p, flux_unit=u.dimensionless_unscaled, keep_unc_scale=p)
    if return_continuum:
        cont = _rebuild(spectrum, arr, p)
        return out, cont
    return out


def preprocess(
    spectrum: Spectrum,
    *,
    band=None,
    buffer: u.Quantity = DEFAULT_BUFFER,
    teff: u.Quantity | float | None = None,
    flatten: bool = True,
    n_bins: int = 40,
    order: int = 3,
) -> Spectrum:
    """Eq. 1 in one call: trim (if ``band``), divide by B(T_eff) (if ``teff``), flatten (if asked)."""
    out = spectrum
    if band is not None:
        out = trim(out, band, buffer)
    if teff is not None:
        out = divide_blackbody(out, teff)
    if flatten:
        out = flatten_continuum(out, n_bins=n_bins, order=order)
    return out
