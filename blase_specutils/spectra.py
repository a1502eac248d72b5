"""The specutils boundary: Spectrum in, plain arrays (Å, ascending) for the core, Spectrum out."""

from __future__ import annotations

from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty
from specutils import Spectrum

__all__ = ["SpectrumArrays", "spectrum_to_arrays", "arrays_to_spectrum", "wavelength_to_angstrom"]


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
        Not 1-D, no usable pixels, or duplicated wavelengths.
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
    kwargs["meta"] = dict(meta or {})
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

