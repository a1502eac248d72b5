import numpy as np
import pytest
import scipy.special as sp
import torch

from blase_specutils.core.profiles import faddeeva, pseudo_voigt, pseudo_voigt_eta, pseudo_voigt_fwhm, voigt

F64 = torch.float64


@pytest.mark.parametrize("sigma,gamma", [(0.03, 0.04), (0.01, 1.0), (1.0, 0.001), (0.02, 3.0), (3.0, 0.01)])
def test_exact_voigt_matches_scipy(sigma, gamma):
    x = torch.linspace(-60, 60, 40001, dtype=F64)
    ours = voigt(x, torch.tensor(sigma, dtype=F64), torch.tensor(gamma, dtype=F64)).numpy()
    ref = sp.voigt_profile(x.numpy(), sigma, gamma)
    assert np.max(np.abs(ours - ref)) < 1e-12 * ref.max()
    assert np.max(np.abs(ours - ref) / ref) < 1e-9


def test_faddeeva_matches_scipy_wofz_upper_half_plane():
    gen = torch.Generator().manual_seed(1)
    z = torch.complex(torch.randn(20000, generator=gen, dtype=F64) * 30,
                      torch.rand(20000, generator=gen, dtype=F64) ** 3 * 30)
    ours = faddeeva(z).numpy()
    ref = sp.wofz(z.numpy())
    assert np.max(np.abs(ours - ref) / np.abs(ref)) < 1e-12


def test_pseudo_voigt_unit_area_and_limits():
    x = torch.linspace(-2000, 2000, 4_000_001, dtype=F64)
    s, g = torch.tensor(0.05, dtype=F64), torch.tensor(0.04, dtype=F64)
    area = torch.trapezoid(pseudo_voigt(x, s, g), x).item()
    assert area == pytest.approx(1.0, abs=2e-5)  # Lorentzian tails beyond ±2000 Å hold ~1e-5
    # pure Gaussian and pure Lorentzian limits of the mixing fraction
    assert pseudo_voigt_eta(s, torch.tensor(1e-12, dtype=F64)).item() == pytest.approx(0.0, abs=1e-9)
    assert pseudo_voigt_eta(torch.tensor(1e-12, dtype=F64), g).item() == pytest.approx(1.0, abs=1e-4)
    assert pseudo_voigt_fwhm(s, torch.tensor(0.0, dtype=F64)).item() == pytest.approx(2.3548 * 0.05)


@pytest.mark.parametrize("sigma,gamma", [(0.05, 0.0), (0.0, 0.04)])
def test_pseudo_voigt_matches_scipy_voigt_in_its_pure_limits(sigma, gamma):
    x = np.linspace(-1, 1, 2001)
    x = x[np.abs(x) > 0.01]  # away from the vanishing component's spike at x = 0
    tiny = 1e-15
    ours = pseudo_voigt(torch.from_numpy(x), torch.tensor(max(sigma, tiny), dtype=F64),
                        torch.tensor(max(gamma, tiny), dtype=F64)).numpy()
    ref = sp.voigt_profile(x, sigma, gamma)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-12)


def test_pseudo_voigt_limits_are_gaussian_and_lorentzian():
    # blasé's pseudo-Voigt keeps each component's own width: it is not the Ida et al. approximation
    # of V(σ, γ), but it reduces to G(σ) and L(γ) exactly in the limits
    from blase_specutils.core.profiles import gaussian, lorentzian

    x = torch.linspace(-1, 1, 2001, dtype=F64)
    s = torch.tensor(0.05, dtype=F64)
    tiny = torch.tensor(1e-15, dtype=F64)
    far = x.abs() > 0.01  # away from the vanishing component's spike at x = 0
    assert torch.allclose(pseudo_voigt(x, s, tiny)[far], gaussian(x, s)[far], rtol=1e-9, atol=1e-12)
    assert torch.allclose(pseudo_voigt(x, tiny, s)[far], lorentzian(x, s)[far], rtol=1e-4)


@pytest.mark.parametrize("fn", [pseudo_voigt, voigt])
def test_profiles_gradcheck(fn):
    x = torch.linspace(-0.5, 0.7, 13, dtype=F64)
    s = torch.tensor(0.07, dtype=F64, requires_grad=True)
    g = torch.tensor(0.04, dtype=F64, requires_grad=True)
    xx = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (xx, s, g))
