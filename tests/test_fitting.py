"""Fitting real échelle data with a clone: the WASP 69 HPF order and bad inputs."""

import astropy.units as u
import numpy as np
import pytest
from astropy.nddata import StdDevUncertainty
from specutils import Spectrum, SpectrumList

from blase_specutils import load_blase03, read_spectrum
from blase_specutils.fitting import MissingUncertaintyWarning, TransferResult, fit_spectrum
from conftest import SHARED_DATA, _need


@pytest.fixture(scope="module")
def wasp69():
    return read_spectrum(_need(SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"))


@pytest.fixture(scope="module")
def clone4700(blase03_clone_path):
    return load_blase03(blase03_clone_path)


@pytest.fixture(scope="module")
def template_fit(wasp69, clone4700):
    return fit_spectrum(wasp69, clone4700, line_epochs=0, template_epochs=150, rv_range=60, progress=False)


def test_template_matching_on_wasp69(template_fit, wasp69):
    r = template_fit
    assert isinstance(r, TransferResult)
    # WASP 69's systemic velocity is about -9.6 km/s; the untuned clone leaves χ²_red of hundreds
    assert -11.0 < r.rv.to_value(u.km / u.s) < -8.0
    assert 100 < r.template["chi2_reduced"] < 1000
    assert r.rv.unit == u.km / u.s and r.vsini.unit == u.km / u.s
    m = r.model_spectrum
    assert isinstance(m, type(wasp69))
    np.testing.assert_allclose(m.spectral_axis.value, wasp69.spectral_axis.value)
    d = wasp69 - m  # data - model chains as specutils arithmetic
    assert np.nanstd(d.flux.value) == pytest.approx(np.nanstd(r.residual.flux.value), rel=1e-6)


def test_result_products(template_fit, tmp_path):
    r = template_fit
    t = r.lines
    assert len(t) == r.model.stellar.n_lines and t["center"].unit == u.AA
    assert np.all(t["delta_ln_amplitude"] == 0)  # template matching leaves the lines alone
    tmpl = r.semi_empirical_template()
    assert tmpl.flux.size == r.model.lam_z.numel()
    s = r.summary()
    assert s["n_lines_changed"] == 0 and s["chi2_reduced"] == pytest.approx(r.chi2_reduced)
    fig = r.plot()
    fig.savefig(tmp_path / "fit.png")
    path = r.save(tmp_path / "fit.fits")
    from blase_specutils import SpectralClone

    back = SpectralClone.load(path)
    assert back.n_lines == r.model.stellar.n_lines
    assert back.meta["rv_kms"] == pytest.approx(r.rv.value)


def test_bad_inputs(wasp69, clone4700):
    wl = wasp69.spectral_axis
    far = Spectrum(spectral_axis=wl + 20000 * u.AA, flux=wasp69.flux, uncertainty=wasp69.uncertainty)
    with pytest.raises(ValueError, match="no lines within the data range"):
        fit_spectrum(far, clone4700, line_epochs=0, template_epochs=1, progress=False)
    allnan = Spectrum(spectral_axis=wl, flux=np.full(wl.size, np.nan) * u.dimensionless_unscaled)
    with pytest.raises(ValueError, match="masked or non-finite"):
        fit_spectrum(allnan, clone4700, line_epochs=0, template_epochs=1, progress=False)
    zero = Spectrum(spectral_axis=wl, flux=wasp69.flux, uncertainty=StdDevUncertainty(np.zeros(wl.size)))
    with pytest.raises(ValueError, match="zero or negative uncertainty"):
        fit_spectrum(zero, clone4700, line_epochs=0, template_epochs=1, progress=False)
    with pytest.raises(ValueError, match="overlap"):
        fit_spectrum(SpectrumList([wasp69, wasp69]), clone4700, line_epochs=0, template_epochs=1, progress=False)
    with pytest.raises(TypeError, match="SpectralClone"):
        fit_spectrum(wasp69, "clone.fits", progress=False)


def test_missing_uncertainties_and_other_units(wasp69, clone4700):
    """No uncertainties: a documented noise estimate with a warning; a µm axis gives the same fit."""
    um = Spectrum(spectral_axis=wasp69.spectral_axis.to(u.um), flux=wasp69.flux)
    with pytest.warns(MissingUncertaintyWarning):
        r = fit_spectrum(um, clone4700, line_epochs=0, template_epochs=30, rv=-9.5, progress=False)
    assert r.model_spectrum.spectral_axis.unit == u.um
    # DER_SNR counts line structure as noise: an overestimate here (measured 3.8x), never an underestimate
    real = np.nanmedian(wasp69.uncertainty.array)
    assert 1.0 * real < np.median(r.sigma) < 5 * real


def test_der_snr_estimate_on_pure_noise():
    from blase_specutils.fitting import _noise_from_flux

    gen = np.random.default_rng(3)
    assert _noise_from_flux(1.0 + gen.normal(0, 0.004, 20000)) == pytest.approx(0.004, rel=0.03)
