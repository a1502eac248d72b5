import numpy as np
import pytest
import torch

from blase_specutils.core.continuum import continuum_polynomial
from blase_specutils.core.detection import find_lines
from blase_specutils.core.engine import dense_log_flux
from blase_specutils.core.profiles import pseudo_voigt

F64 = torch.float64


def _synthetic(centers, depths_area, sigma=0.04, gamma=0.03):
    wl = np.arange(6000.0, 6020.0, 0.01)
    c = torch.tensor(centers, dtype=F64)
    a = torch.tensor(depths_area, dtype=F64)
    s = torch.full_like(c, sigma)
    g = torch.full_like(c, gamma)
    flux = dense_log_flux(torch.from_numpy(wl), c, a, s, g, profile=pseudo_voigt).exp().numpy()
    return wl, flux


def test_finds_lines_and_estimates_their_depth():
    centers = [6003.0, 6007.5, 6012.25, 6016.0]
    wl, flux = _synthetic(centers, [0.02, 0.005, 0.01, 0.003])
    g = find_lines(wl, flux, 0.01)
    assert len(g) == 4
    np.testing.assert_allclose(g.lam_centers, centers, atol=0.011)
    # a single isolated line reproduces its own depth with the initial guess
    v0 = pseudo_voigt(torch.zeros(1, dtype=F64), torch.from_numpy(np.exp(g.log_sigmas)), torch.from_numpy(np.exp(g.log_gammas))).numpy()
    np.testing.assert_allclose(np.exp(g.log_amplitudes) * v0, g.depth, rtol=1e-12)
    # the measured width is the true FWHM of the profile, to a pixel
    from blase_specutils.core.profiles import profile_fwhm
    true_fwhm = float(profile_fwhm(torch.tensor(0.04, dtype=F64), torch.tensor(0.03, dtype=F64)))
    np.testing.assert_allclose(g.fwhm, true_fwhm, atol=0.01)
    # and the initial σ, γ reproduce it
    init = profile_fwhm(torch.from_numpy(np.exp(g.log_sigmas)), torch.from_numpy(np.exp(g.log_gammas))).numpy()
    # (to 1e-5: blasé rounds 2√(2 ln 2) to 2.3548)
    np.testing.assert_allclose(init, g.fwhm, rtol=2e-5)


def test_prominence_threshold_and_region():
    wl, flux = _synthetic([6003.0, 6007.5, 6012.25, 6016.0], [0.02, 0.005, 0.01, 0.003])
    assert len(find_lines(wl, flux, 0.1)) == 2  # the two weak lines are below 0.1
    g = find_lines(wl, flux, 0.01, region=(6005.0, 6013.0), buffer=0.5)
    np.testing.assert_allclose(g.lam_centers, [6007.5, 6012.25], atol=0.011)


def test_emission_lines_are_found_as_maxima():
    wl, flux = _synthetic([6005.0, 6011.0], [0.01, 0.02])
    g = find_lines(wl, 2.0 - flux, 0.01, emission=True)
    np.testing.assert_allclose(g.lam_centers, [6005.0, 6011.0], atol=0.011)


@pytest.mark.parametrize("prom", [0.0, 1.0, -0.1, 1.5])
def test_bad_prominence(prom):
    wl, flux = _synthetic([6005.0], [0.01])
    with pytest.raises(ValueError, match="prominence"):
        find_lines(wl, flux, prom)


def test_flat_spectrum_has_no_lines():
    wl = np.linspace(6000, 6010, 1000)
    with pytest.raises(ValueError, match="no lines"):
        find_lines(wl, np.ones_like(wl), 0.01)


def test_duplicated_grid_rejected():
    wl = np.array([1.0, 2.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="duplicates"):
        find_lines(wl, np.ones(4), 0.01)


def test_continuum_polynomial():
    wl = np.linspace(8000, 13000, 5000)
    # the continuum polynomial rides on the upper envelope of a spectrum with absorption dips
    cont = 1.0 + 1e-5 * (wl - 10000)
    dips = np.ones_like(wl)
    dips[::50] = 0.5
    p = continuum_polynomial(wl, cont * dips)
    assert np.max(np.abs(p / cont - 1)) < 1e-3
