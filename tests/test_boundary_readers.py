"""Readers and frames at the boundary (issue 21): spectral WCS, uncertainty units, negative
variances, air vs vacuum, and metadata that survives so muler methods keep working.

Each test failed on the code before issue 21 (pixel numbers read as Å, an mJy uncertainty column
dropped, negative variances silently masked, AWAV files read as vacuum, ``meta`` dropped)."""

from __future__ import annotations

import copy

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty
from astropy.table import QTable
from conftest import SHARED_DATA, _need
from specutils import Spectrum

from blase_specutils import read_spectrum
from blase_specutils.io import read_orders
from blase_specutils.spectra import arrays_to_spectrum, spectrum_to_arrays

WASP69 = SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"
GOLDILOCKS = SHARED_DATA / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits"


def _morton_n(vac_angstrom):
    """Refractive index of standard air, Morton (2000) Eq. 8, written out here independently of the package."""
    s2 = (1e4 / np.asarray(vac_angstrom, dtype=np.float64)) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def _vac_to_air(vac):
    return vac / _morton_n(vac)


def _air_to_vac(air):
    vac = np.array(air, dtype=np.float64)
    for _ in range(50):  # λ_vac = λ_air n(λ_vac): a contraction by ~1e-6 per step
        vac = air * _morton_n(vac)
    return vac


@pytest.fixture(scope="module")
def wasp69():
    return read_spectrum(_need(WASP69))


# ------------------------------------------------------------------------------ C. readers
def test_fits_image_without_spectral_wcs_is_refused(wasp69, tmp_path):
    path = tmp_path / "image.fits"
    fits.PrimaryHDU(np.asarray(wasp69.flux.value)).writeto(path)
    with pytest.raises(ValueError, match="no spectral WCS") as err:
        read_spectrum(path)
    assert "image.fits" in str(err.value) and "CRVAL1" in str(err.value)


def test_fits_image_with_a_linear_wcs_still_reads(wasp69, tmp_path):
    path = tmp_path / "image_wcs.fits"
    hdr = fits.Header({"CTYPE1": "WAVE", "CUNIT1": "Angstrom", "CRVAL1": 8660.0, "CDELT1": 0.05, "CRPIX1": 1.0})
    fits.PrimaryHDU(np.asarray(wasp69.flux.value), header=hdr).writeto(path)
    s = read_spectrum(path)
    np.testing.assert_allclose(s.spectral_axis.to_value(u.AA)[:3], [8660.0, 8660.05, 8660.1])
    assert s.meta["blase_specutils_wavelength_frame"] == "vacuum (the file says vacuum)"


@pytest.mark.parametrize("suffix", [".ecsv", ".fits"])
def test_uncertainty_in_another_unit_is_converted_to_the_flux_unit(wasp69, tmp_path, suffix):
    wl = wasp69.spectral_axis.to_value(u.AA) * u.AA
    flux = wasp69.flux.value * u.Jy
    sigma = wasp69.uncertainty.array
    path = tmp_path / f"mjy{suffix}"
    QTable({"wavelength": wl, "flux": flux, "uncertainty": sigma * 1000.0 * u.mJy}).write(path)
    s = read_spectrum(path)
    assert s.uncertainty is not None, "the mJy uncertainty column was dropped"
    arr = spectrum_to_arrays(s)
    np.testing.assert_allclose(arr.uncertainty, sigma, rtol=1e-12)
    assert arr.flux_unit == u.Jy


def test_variance_and_inverse_variance_columns_in_other_units(wasp69, tmp_path):
    wl = wasp69.spectral_axis.to_value(u.AA) * u.AA
    sigma = wasp69.uncertainty.array
    QTable({"wavelength": wl, "flux": wasp69.flux.value * u.Jy, "variance": (sigma * 1e3) ** 2 * u.mJy**2}).write(
        tmp_path / "var.ecsv")
    QTable({"wavelength": wl, "flux": wasp69.flux.value * u.Jy, "ivar": sigma**-2 * 1e-6 / u.mJy**2}).write(
        tmp_path / "ivar.ecsv")
    for name in ("var.ecsv", "ivar.ecsv"):
        np.testing.assert_allclose(spectrum_to_arrays(read_spectrum(tmp_path / name)).uncertainty, sigma, rtol=1e-10)


def test_unconvertible_uncertainty_unit_is_refused(wasp69, tmp_path):
    path = tmp_path / "seconds.ecsv"
    QTable({"wavelength": wasp69.spectral_axis.to_value(u.AA) * u.AA, "flux": wasp69.flux.value * u.Jy,
            "uncertainty": wasp69.uncertainty.array * u.s}).write(path)
    with pytest.raises(ValueError, match="does not convert") as err:
        read_spectrum(path)
    assert "'uncertainty'" in str(err.value) and "seconds.ecsv" in str(err.value)


@pytest.mark.parametrize("cls", [VarianceUncertainty, InverseVariance])
def test_negative_variance_or_inverse_variance_names_the_pixels(wasp69, cls):
    sigma = wasp69.uncertainty.array
    values = sigma**2 if cls is VarianceUncertainty else sigma**-2
    values = values.copy()
    values[[5, 17, 1200]] *= -1.0
    s = Spectrum(spectral_axis=wasp69.spectral_axis, flux=wasp69.flux, uncertainty=cls(values))
    with pytest.raises(ValueError, match="negative") as err:
        spectrum_to_arrays(s)
    assert "5, 17, 1200" in str(err.value)
    # masked pixels may hold anything
    mask = np.zeros(values.size, bool)
    mask[[5, 17, 1200]] = True
    masked = Spectrum(spectral_axis=wasp69.spectral_axis, flux=wasp69.flux, uncertainty=cls(values), mask=mask)
    assert not spectrum_to_arrays(masked).good[[5, 17, 1200]].any()


def test_negative_variance_in_a_file_is_refused_where_it_is_used(wasp69, tmp_path):
    var = wasp69.uncertainty.array ** 2
    var[40] = -var[40]
    path = tmp_path / "negvar.fits"
    QTable({"wavelength": wasp69.spectral_axis.to_value(u.AA) * u.AA, "flux": wasp69.flux.value, "variance": var}).write(path)
    with pytest.raises(ValueError, match="index 40"):
        spectrum_to_arrays(read_spectrum(path))


# ------------------------------------------------------------------------------ E. air and vacuum
def test_awav_fits_image_is_read_back_in_vacuum(wasp69, tmp_path):
    """A real spectrum (WASP 69, HPF) written as a FITS image with CTYPE1 = 'AWAV' on a linear air grid."""
    vac = wasp69.spectral_axis.to_value(u.AA)
    air_lo, air_hi = _vac_to_air(vac[[0, -1]])
    n = vac.size
    step = (air_hi - air_lo) / (n - 1)
    hdr = fits.Header({"CTYPE1": "AWAV", "CUNIT1": "Angstrom", "CRVAL1": air_lo, "CDELT1": step, "CRPIX1": 1.0})
    path = tmp_path / "awav.fits"
    fits.PrimaryHDU(np.asarray(wasp69.flux.value), header=hdr).writeto(path)
    expected = _air_to_vac(air_lo + step * np.arange(n))
    s = read_spectrum(path)
    got = s.spectral_axis.to_value(u.AA)
    assert np.max(np.abs(got - expected)) < 1e-6, f"off by {np.max(np.abs(got - expected)):.3g} Å"
    assert s.meta["blase_specutils_wavelength_frame"] == "vacuum (converted from air)"
    # the user's word wins, with a warning that the file says otherwise
    with pytest.warns(UserWarning, match="says air"):
        as_vac = read_spectrum(path, air=False)
    np.testing.assert_allclose(as_vac.spectral_axis.to_value(u.AA), air_lo + step * np.arange(n), rtol=0, atol=1e-6)


def test_air_table_with_airorvac_keyword_reads_back_the_original_vacuum_wavelengths(wasp69, tmp_path):
    vac = wasp69.spectral_axis.to_value(u.AA)
    t = QTable({"wavelength": _vac_to_air(vac) * u.AA, "flux": wasp69.flux, "uncertainty": wasp69.uncertainty.array})
    t.meta["AIRORVAC"] = "air"
    path = tmp_path / "air_table.fits"
    t.write(path)
    s = read_spectrum(path)
    assert np.max(np.abs(s.spectral_axis.to_value(u.AA) - vac)) < 1e-6
    np.testing.assert_array_equal(s.flux.value, wasp69.flux.value)


def test_to_vacuum_converts_once_and_does_not_mutate_its_input(wasp69):
    from blase_specutils.spectra import to_vacuum, wavelength_frame

    vac = wasp69.spectral_axis.to_value(u.AA)
    air_spec = Spectrum(spectral_axis=(_vac_to_air(vac) * u.AA).to(u.um), flux=wasp69.flux,
                        uncertainty=StdDevUncertainty(wasp69.uncertainty.array), meta={"object": "WASP 69"})
    before_axis = air_spec.spectral_axis.copy()
    before_meta = copy.deepcopy(air_spec.meta)
    out = to_vacuum(air_spec, air=True)
    assert out is not air_spec and out.spectral_axis.unit == u.um
    assert np.max(np.abs(out.spectral_axis.to_value(u.AA) - vac)) < 1e-6
    assert np.array_equal(air_spec.spectral_axis, before_axis) and air_spec.meta == before_meta
    assert out.meta["object"] == "WASP 69" and wavelength_frame(out) == "vacuum (converted from air)"
    with pytest.raises(ValueError, match="already converted"):
        to_vacuum(out, air=True)
    assert to_vacuum(out) is out  # recorded: never a second conversion
    # meta keywords are read too
    tagged = Spectrum(spectral_axis=air_spec.spectral_axis, flux=air_spec.flux, meta={"air": True})
    assert np.max(np.abs(to_vacuum(tagged).spectral_axis.to_value(u.AA) - vac)) < 1e-6
    untagged = to_vacuum(Spectrum(spectral_axis=air_spec.spectral_axis, flux=air_spec.flux))
    assert untagged.meta["blase_specutils_wavelength_frame"].startswith("vacuum (assumed")
    np.testing.assert_array_equal(untagged.spectral_axis.value, air_spec.spectral_axis.value)


def test_contradicting_statements_and_bad_arguments():
    from blase_specutils.spectra import to_vacuum

    s = Spectrum(spectral_axis=np.linspace(8700, 8710, 20) * u.AA, flux=np.ones(20) * u.one,
                 meta={"header": fits.Header({"CTYPE1": "AWAV"}), "AIRORVAC": "vac"})
    with pytest.raises(ValueError, match="both air and vacuum"):
        to_vacuum(s)
    with pytest.raises(TypeError, match="air must be"):
        to_vacuum(s, air="yes")
    freq = Spectrum(spectral_axis=np.linspace(3.0e14, 3.1e14, 20) * u.Hz, flux=np.ones(20) * u.one)
    with pytest.raises(ValueError, match="not a wavelength"):
        to_vacuum(freq, air=True)


def test_clone_spectrum_converts_air_to_vacuum_first(wasp69):
    from blase_specutils import clone_spectrum

    vac = wasp69.spectral_axis.to_value(u.AA)
    air_spec = Spectrum(spectral_axis=_vac_to_air(vac) * u.AA, flux=wasp69.flux, meta={"AIRORVAC": "air"})
    kw = dict(band=(8700, 8720) * u.AA, buffer=2 * u.AA, epochs=0, residual_passes=0, progress=False)
    c = clone_spectrum(air_spec, **kw)
    target_wl = c.target.spectral_axis.to_value(u.AA)
    sel = (vac >= target_wl[0] - 1e-6) & (vac <= target_wl[-1] + 1e-6)
    assert np.max(np.abs(target_wl - vac[sel])) < 1e-6
    assert air_spec.meta == {"AIRORVAC": "air"}  # not mutated
    with pytest.raises(TypeError, match="air must be"):
        clone_spectrum(air_spec, air="air", **kw)


# ------------------------------------------------------------------------------ F. meta survives
@pytest.fixture(scope="module")
def hpf_order():
    """Order 8 of the HR 4829 Goldilocks file, a muler HPFSpectrum (its header in ``meta``)."""
    return read_orders(_need(GOLDILOCKS), [8])[0]


def test_spectra_built_like_a_muler_spectrum_keep_its_meta(hpf_order):
    from blase_specutils.preprocessing import flatten_continuum, trim

    arr = spectrum_to_arrays(hpf_order)
    model = arrays_to_spectrum(arr.wavelength, np.ones_like(arr.flux), like=hpf_order)
    assert type(model) is type(hpf_order)
    assert model.meta["header"] is hpf_order.meta["header"]
    assert model.astropy_time == hpf_order.astropy_time  # muler reads the header
    assert arrays_to_spectrum(arr.wavelength, arr.flux, like=hpf_order, meta={}).meta == {}
    for out in (trim(hpf_order, (9070, 9100) * u.AA, 1 * u.AA), flatten_continuum(hpf_order)):
        assert type(out) is type(hpf_order) and out.astropy_time == hpf_order.astropy_time


def test_read_orders_records_the_frame_and_keeps_the_muler_class(hpf_order):
    assert hpf_order.meta["blase_specutils_wavelength_frame"].startswith("vacuum")
    assert type(hpf_order).__name__ == "HPFSpectrum" and hpf_order.astropy_time is not None
