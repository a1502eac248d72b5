"""The library functions that replaced hand-written ones give the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blase_specutils.preprocessing import blackbody, der_snr_noise

_H, _C, _K = 6.62607015e-34, 2.99792458e8, 1.380649e-23


def _planck_by_hand(wavelength_aa: np.ndarray, teff: float) -> np.ndarray:
    lam = wavelength_aa * 1e-10
    return 2.0 * _H * _C**2 / lam**5 / np.expm1(_H * _C / (lam * _K * teff))


def _der_snr_by_hand(flux: np.ndarray) -> float:
    return float(1.482602 / math.sqrt(6.0) * np.median(np.abs(2.0 * flux[2:-2] - flux[:-4] - flux[4:])))


@pytest.mark.parametrize("teff", [2500.0, 4700.0, 10000.0, 30000.0])
def test_astropy_blackbody_equals_the_planck_formula(teff):
    wl = np.linspace(3000.0, 25000.0, 2001)
    np.testing.assert_allclose(blackbody(wl, teff), _planck_by_hand(wl, teff), rtol=1e-10)


def test_blackbody_refuses_a_bad_temperature_and_follows_wien():
    with pytest.raises(ValueError, match="positive temperature"):
        blackbody(np.array([10000.0]), -5.0)
    # a 10,000 K blackbody peaks near 2898 µm K / T = 2898 Å, so B falls across the HPF band
    assert np.all(np.diff(blackbody(np.linspace(8000, 13000, 5000), 10000.0)) < 0)


def test_specutils_der_snr_equals_the_formula_on_real_data():
    import blase_specutils as bs

    for name in bs.EXAMPLES:
        s = bs.load_example(name)
        f = np.asarray(s.flux.value)[~s.mask]
        assert der_snr_noise(f) == pytest.approx(_der_snr_by_hand(f), rel=1e-6)


def test_der_snr_noise_on_pure_noise_and_a_zero_median():
    gen = np.random.default_rng(3)
    noise = gen.normal(0, 0.004, 20000)
    assert der_snr_noise(1.0 + noise) == pytest.approx(0.004, rel=0.03)
    assert der_snr_noise(noise - np.median(noise)) == pytest.approx(_der_snr_by_hand(noise), rel=1e-6)
    with pytest.raises(ValueError, match="too few"):
        der_snr_noise(np.array([1.0, np.nan, 2.0]))
