import astropy.units as u
import numpy as np
import pytest
from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty
from specutils import Spectrum

from blase_specutils.spectra import arrays_to_spectrum, spectrum_to_arrays


def _spec(axis, flux=None, **kw):
    flux = np.linspace(1.0, 2.0, len(axis)) if flux is None else flux
    return Spectrum(spectral_axis=axis, flux=flux * u.dimensionless_unscaled, **kw)


@pytest.mark.parametrize(
    "axis",
    [
        np.array([10000.0, 10001.0, 10002.0]) * u.AA,
        np.array([1000.0, 1000.1, 1000.2]) * u.nm,
        np.array([1.0, 1.0001, 1.0002]) * u.um,
    ],
)
def test_wavelength_units_convert_to_angstrom(axis):
    arr = spectrum_to_arrays(_spec(axis))
    np.testing.assert_allclose(arr.wavelength, axis.to_value(u.AA), rtol=1e-14)
    assert not arr.reversed


def test_wavenumber_axis_is_converted_and_sorted():
    wn = np.array([10000.0, 9999.0, 9998.0]) / u.cm  # ascending wavelength once converted
    arr = spectrum_to_arrays(_spec(wn[::-1]))  # ascending wavenumber = descending wavelength
    assert np.all(np.diff(arr.wavelength) > 0)
    assert arr.reversed
    np.testing.assert_allclose(arr.wavelength, 1e8 / np.array([10000.0, 9999.0, 9998.0]))
    np.testing.assert_allclose(arr.flux, [2.0, 1.5, 1.0])


def test_descending_wavelength_is_sorted_with_its_flux():
    arr = spectrum_to_arrays(_spec(np.array([3.0, 2.0, 1.0]) * u.um, flux=np.array([7.0, 8.0, 9.0])))
    np.testing.assert_allclose(arr.wavelength, [1e4, 2e4, 3e4])
    np.testing.assert_allclose(arr.flux, [9.0, 8.0, 7.0])


def test_masks_nans_and_uncertainty_types():
    axis = np.arange(5.0) * u.AA + 5000 * u.AA
    flux = np.array([1.0, np.nan, 1.0, 1.0, 1.0])
    mask = np.array([False, False, True, False, False])
    for unc, sigma in [
        (StdDevUncertainty(np.full(5, 0.1)), 0.1),
        (VarianceUncertainty(np.full(5, 0.04)), 0.2),
        (InverseVariance(np.full(5, 100.0)), 0.1),
    ]:
        arr = spectrum_to_arrays(_spec(axis, flux=flux, mask=mask, uncertainty=unc))
        np.testing.assert_array_equal(arr.good, [True, False, False, True, True])
        np.testing.assert_allclose(arr.uncertainty, sigma)


def test_input_is_not_mutated():
    axis = np.array([3.0, 2.0, 1.0]) * u.um
    flux = np.array([7.0, np.nan, 9.0])
    s = _spec(axis, flux=flux.copy())
    spectrum_to_arrays(s)
    np.testing.assert_array_equal(s.spectral_axis.value, [3.0, 2.0, 1.0])
    np.testing.assert_array_equal(s.flux.value, flux)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(TypeError, match="specutils Spectrum"):
        spectrum_to_arrays(np.ones(3))
    for unit in (u.pix, u.km / u.s):  # specutils accepts these axes; they carry no wavelength
        with pytest.raises(u.UnitsError, match="not a wavelength"):
            spectrum_to_arrays(Spectrum(spectral_axis=np.arange(1.0, 4.0) * unit, flux=np.ones(3) * u.Jy))
    with pytest.raises(ValueError, match="no usable pixels"):
        spectrum_to_arrays(_spec(np.arange(1.0, 4.0) * u.AA, flux=np.full(3, np.nan)))


def test_duplicated_axis_is_rejected():
    # specutils 2.x refuses non-monotonic axes but lets duplicates through: they must be caught here
    s = _spec(np.array([1.0, 2.0, 2.0, 3.0]) * u.AA)
    with pytest.raises(ValueError, match="duplicated"):
        spectrum_to_arrays(s)


def test_round_trip_to_spectrum_keeps_unit_and_class():
    from muler.hpf import HPFSpectrum

    like = HPFSpectrum(spectral_axis=np.array([1.0, 1.1, 1.2]) * u.um, flux=np.ones(3) * u.dimensionless_unscaled)
    out = arrays_to_spectrum(np.array([10000.0, 11000.0, 12000.0]), np.array([1.0, 2.0, 3.0]), like=like)
    assert isinstance(out, HPFSpectrum)
    assert out.spectral_axis.unit == u.um
    np.testing.assert_allclose(out.spectral_axis.value, [1.0, 1.1, 1.2])


def test_uncertainty_in_its_own_unit_is_converted_to_the_flux_unit():
    axis = np.arange(4.0) * u.AA + 8660 * u.AA
    for unc in (StdDevUncertainty(np.full(4, 10.0) * u.mJy), VarianceUncertainty(np.full(4, 100.0) * u.mJy**2),
                InverseVariance(np.full(4, 0.01) / u.mJy**2)):
        spec = Spectrum(spectral_axis=axis, flux=np.ones(4) * u.Jy, uncertainty=unc)
        np.testing.assert_allclose(spectrum_to_arrays(spec).uncertainty, 0.01, rtol=1e-12)  # Jy, as the flux


def test_arrays_to_spectrum_keeps_the_axis_of_like_exactly_and_in_its_order():
    # nm and wavenumber axes whose values do not survive a conversion to Å and back
    for axis in (np.linspace(1055.0, 1056.0, 2001) * u.nm,
                 (np.linspace(10550.0, 10560.0, 2001) * u.AA).to(1 / u.cm, equivalencies=u.spectral())[::-1]):
        like = _spec(axis, flux=np.arange(2001.0))
        arr = spectrum_to_arrays(like)
        out = arrays_to_spectrum(arr.wavelength, arr.flux, uncertainty=0.1 * arr.flux, mask=~arr.good, like=like)
        np.testing.assert_array_equal(out.spectral_axis.value, axis.value)
        assert out.spectral_axis.unit == axis.unit
        np.testing.assert_array_equal(out.flux.value, np.arange(2001.0))  # pixels line up with like's
        np.testing.assert_array_equal(out.uncertainty.array, 0.1 * np.arange(2001.0))
        assert (like - out).flux.value.max() == 0.0  # arithmetic with the input works
    # another grid: converted to like's unit
    out = arrays_to_spectrum(arr.wavelength[:10], arr.flux[:10], like=like)
    np.testing.assert_allclose(out.spectral_axis.to_value(u.AA, equivalencies=u.spectral()), arr.wavelength[:10],
                               rtol=1e-14)
