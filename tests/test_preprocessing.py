import astropy.units as u
import numpy as np
import pytest
from specutils import Spectrum

from blase_specutils import divide_blackbody, flatten_continuum, preprocess, trim


def test_trim_divide_flatten_each_return_spectra(phoenix_10k):
    band = (10500, 10650) * u.AA
    t = trim(phoenix_10k, band, 10 * u.AA)
    assert isinstance(t, Spectrum)
    wl = t.spectral_axis.to_value(u.AA)
    assert wl.min() >= 10490 and wl.max() <= 10660 and wl.size == 8501  # 0.02 Å sampling above 10,000 Å
    b = divide_blackbody(t, 10000 * u.K)
    assert isinstance(b, Spectrum) and b.flux.unit == t.flux.unit
    f, p = flatten_continuum(b, return_continuum=True)
    assert f.flux.unit == u.dimensionless_unscaled
    # continuum-normalised: the continuum sits at 1 and the lines dip below it
    assert np.percentile(f.flux.value, 99.5) == pytest.approx(1.0, abs=0.01)
    assert f.flux.value.min() < 0.9
    np.testing.assert_allclose(f.flux.value * p.flux.value, b.flux.value, rtol=1e-12)
    # the one-call version does the same
    np.testing.assert_allclose(preprocess(phoenix_10k, band=band, buffer=10 * u.AA, teff=10000 * u.K).flux.value,
                               f.flux.value, rtol=1e-12)


def test_blackbody_division_in_other_units(phoenix_10k):
    t = trim(phoenix_10k, (10500, 10650) * u.AA, 0 * u.AA)
    nm = Spectrum(spectral_axis=t.spectral_axis.to(u.nm), flux=t.flux)
    a = divide_blackbody(t, 10000 * u.K).flux.value
    b = divide_blackbody(nm, 10000).flux.value
    np.testing.assert_allclose(a, b, rtol=1e-12)
    c = divide_blackbody(t, (10000 * u.K).to(u.deg_C, equivalencies=u.temperature())).flux.value
    np.testing.assert_allclose(a, c, rtol=1e-9)


@pytest.mark.parametrize("teff", [0.0, -100.0, 0 * u.K, np.nan])
def test_non_positive_teff(phoenix_10k, teff):
    with pytest.raises(ValueError, match="positive temperature"):
        divide_blackbody(phoenix_10k[:100], teff)


def test_teff_with_wrong_units(phoenix_10k):
    with pytest.raises(u.UnitsError, match="temperature"):
        divide_blackbody(phoenix_10k[:100], 5 * u.m)


def test_band_outside_spectrum(phoenix_10k):
    with pytest.raises(ValueError, match="overlaps"):
        trim(phoenix_10k, (20000, 21000) * u.AA)
    with pytest.raises(TypeError, match="band"):
        trim(phoenix_10k, (20000, 21000))
    with pytest.raises(u.UnitsError):
        trim(phoenix_10k, (1, 2) * u.kg)
