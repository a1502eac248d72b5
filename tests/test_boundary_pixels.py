"""Extreme pixels and unbounded settings at the boundary of a fit (issue 21).

Before issue 21 a single flux spike of 1e3 on a normalised spectrum biased the RV by 17 km/s with
no word, a spike of 1e160 or one σ of 1e-300 made χ² infinite (the fit ended at −rv_range and could
not be saved), ``resolving_power=5`` and ``rv_range=2000`` were accepted and ran for minutes. Each
test below failed then.
"""

from __future__ import annotations

import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.nddata import StdDevUncertainty
from conftest import SHARED_DATA, _need
from specutils import Spectrum

from blase_specutils import TransferResult, fit_spectrum, load_blase03, read_spectrum
from blase_specutils.fitting import MAX_RV_RANGE_KMS, MIN_RESOLVING_POWER, FitFlagWarning, _fit_settings
from blase_specutils.io import read_orders
from blase_specutils.spectra import FluxOutlierWarning, mask_flux_outliers, spectrum_to_arrays

#: Real fits, seconds each: outside the quick set (-m "not slow and not gpu and not medium").
pytestmark = pytest.mark.medium

WASP69 = SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"
GOLDILOCKS = SHARED_DATA / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits"
QUICK = dict(rv_range=40, template_epochs=20, line_epochs=0, progress=False)
SPIKE = 150  # the pixel that gets the spike (a continuum pixel between lines of the 20 Å cut)


@pytest.fixture(scope="module")
def cut():
    """20 Å of the WASP 69 HPF stack (8690-8710 Å, 348 px)."""
    s = read_spectrum(_need(WASP69))
    w = s.spectral_axis.to_value(u.AA)
    k = np.flatnonzero((w > 8690.0) & (w < 8710.0))
    return s[int(k[0]) : int(k[-1]) + 1]


@pytest.fixture(scope="module")
def clone(blase03_clone_path):
    return load_blase03(blase03_clone_path)


def _fit(data, clone, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitFlagWarning)
        return fit_spectrum(data, clone, **(QUICK | kw))


@pytest.fixture(scope="module")
def clean(cut, clone):
    return _fit(cut, clone)


def _with(cut, *, flux=None, sigma=None):
    f = np.array(cut.flux.value, dtype=np.float64)
    s = np.array(cut.uncertainty.array, dtype=np.float64)
    if flux is not None:
        f[SPIKE] = flux
    if sigma is not None:
        s[SPIKE] = sigma
    return Spectrum(spectral_axis=cut.spectral_axis.to_value(u.AA) * u.AA, flux=f * u.one,
                    uncertainty=StdDevUncertainty(s))


# ------------------------------------------------------------------------------ spikes
@pytest.mark.parametrize("value", [1e2, 1e3, 1e30, 1e160, 1e300, -1e300])
def test_one_flux_spike_of_any_magnitude_is_masked_counted_and_reported(cut, clone, clean, value, tmp_path):
    with pytest.warns(FluxOutlierWarning, match=f"index {SPIKE}"):
        r = _fit(_with(cut, flux=value), clone)
    assert r.outliers["count"] == 1 and r.outliers["pixels"] == {"0": [SPIKE]}
    assert r.summary()["n_outliers"] == 1 and "1 flux outlier" in repr(r)
    assert r.outlier_mask[SPIKE] and not r.good[SPIKE]
    # the spike is out of χ²: the same RV as without it (a 1e3 spike moved it by 17 km/s before)
    assert r.rv.to_value(u.km / u.s) == pytest.approx(clean.rv.to_value(u.km / u.s), abs=0.02)
    assert np.isfinite(r.chi2) and r.chi2 == pytest.approx(clean.chi2, rel=0.02)
    back = TransferResult.load(r.save(tmp_path / "spiked.fits"))  # a result is always saveable
    assert back.outliers == r.outliers and back.outlier_mask[SPIKE]


@pytest.mark.parametrize("sigma", [1e-30, 1e-140])
def test_one_tiny_uncertainty_is_masked_as_an_outlier(cut, clone, clean, sigma):
    with pytest.warns(FluxOutlierWarning):
        r = _fit(_with(cut, sigma=sigma), clone)
    assert r.outliers["pixels"] == {"0": [SPIKE]}
    assert r.rv.to_value(u.km / u.s) == pytest.approx(clean.rv.to_value(u.km / u.s), abs=0.02)


@pytest.mark.parametrize("kw, match", [
    (dict(sigma=1e-300), "outside 1e-150-1e\\+150"),
    (dict(sigma=1e200), "outside 1e-150-1e\\+150"),
    (dict(sigma=0.0), "zero or negative uncertainty"),
    (dict(sigma=-1e-3), "zero or negative uncertainty"),
    (dict(flux=np.inf), "infinite flux"),
    (dict(flux=-np.inf), "infinite flux"),
])
def test_pixels_no_fit_can_use_are_refused_with_their_index(cut, clone, kw, match):
    with pytest.raises(ValueError, match=match) as err:
        fit_spectrum(_with(cut, **kw), clone, progress=False)
    assert f"index {SPIKE}" in str(err.value)


def test_nan_flux_stays_a_missing_pixel(cut, clone, clean):
    r = _fit(_with(cut, flux=np.nan), clone)
    assert not r.good[SPIKE] and r.outliers["count"] == 0
    assert r.rv.to_value(u.km / u.s) == pytest.approx(clean.rv.to_value(u.km / u.s), abs=0.02)


def test_no_outliers_in_clean_real_spectra():
    """The rule leaves every pixel of the real HPF spectra alone (WASP 69: line-rich; HR 4829's 28
    Goldilocks orders: deep telluric bands), with their own uncertainties and with none."""
    orders = [read_spectrum(_need(WASP69))] + read_orders(_need(GOLDILOCKS))
    for k, spec in enumerate(orders):
        a = spectrum_to_arrays(spec, require_finite=False)
        good = a.good & np.isfinite(a.uncertainty)
        mask, report = mask_flux_outliers(a.flux, a.uncertainty, good, np.full(a.flux.size, k), [a])
        assert report["count"] == 0, (k, report)


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("kw, match", [
    (dict(resolving_power=5), "resolving_power must be >= 1000"),
    (dict(resolving_power=999.0), "resolving_power must be >= 1000"),
    (dict(rv_range=2000), "rv_range must be > 0 km/s and at most 1000 km/s"),
    (dict(rv_range=2.9e5), "rv_range must be > 0 km/s and at most 1000 km/s"),
])
def test_settings_outside_physical_bounds_are_refused_before_any_work(cut, clone, kw, match, monkeypatch):
    import blase_specutils.fitting as fitting

    def no_work(*a, **k):
        raise AssertionError("the data were read before the settings were checked")

    monkeypatch.setattr(fitting, "_gather", no_work)
    with pytest.raises(ValueError, match=match):
        fit_spectrum(cut, clone, progress=False, **kw)


def test_the_bounds_themselves_are_accepted():
    base = dict(rv=None, vsini=None, continuum_degree=2, tune_lines=(), regularization=None,
                width_regularization=None, template_epochs=1, line_epochs=0, lr=0.01, buffer=1 * u.AA,
                tune_telluric=None, telluric_regularization=None)
    s = _fit_settings(resolving_power=MIN_RESOLVING_POWER, rv_range=MAX_RV_RANGE_KMS, **base)
    assert s["resolving_power"] == 1000.0 and s["rv_range"] == 1000.0
