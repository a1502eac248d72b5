"""The Gaussian-process pseudo-continuum likelihood (Appendix C.2, Eq. C4)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.linalg import cho_factor, cho_solve

pytest.importorskip("gpytorch")
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")

from blase_specutils.gp import GPContinuumLikelihood, GPSettings, build_likelihood

F64 = torch.float64


def _kernel(d, amplitude, ell, name):
    """Dense reference kernels, written from their textbook definitions."""
    if name == "matern12":
        return amplitude**2 * np.exp(-d / ell)
    if name == "matern32":
        t = np.sqrt(3.0) * d / ell
        return amplitude**2 * (1.0 + t) * np.exp(-t)
    if name == "matern52":
        t = np.sqrt(5.0) * d / ell
        return amplitude**2 * (1.0 + t + t * t / 3.0) * np.exp(-t)
    return amplitude**2 * np.exp(-0.5 * (d / ell) ** 2)


def _problem(n=120, seed=0):
    """Two orders with a gap, heteroscedastic σ, a few masked pixels, and a smooth residual."""
    gen = np.random.default_rng(seed)
    wl = np.concatenate([8700.0 + 0.07 * np.arange(n // 2), 8712.0 + 0.07 * np.arange(n - n // 2)])
    order = np.repeat([3, 4], [n // 2, n - n // 2])
    sigma = gen.uniform(0.005, 0.02, n)
    good = np.ones(n, bool)
    good[[5, 6, 7, n // 2 + 10]] = False
    r = 0.02 * np.sin(wl / 0.9) + gen.normal(0, sigma)
    return wl, sigma, good, order, r


def _dense_reference(wl, sigma, good, order, r, amplitude, ell, kernel, jitter=0.0):
    """-ln p(R) and E[f | R] from the dense formulas, one order at a time, with scipy."""
    nll = 0.0
    mean = np.zeros(wl.size)
    for k in np.unique(order):
        idx = np.flatnonzero(order == k)
        g = idx[good[idx]]
        d = np.abs(wl[g][:, None] - wl[g][None, :])
        kmat = _kernel(d, amplitude, ell, kernel)
        c = kmat + np.diag(sigma[g] ** 2) + jitter * amplitude**2 * np.eye(g.size)
        cf = cho_factor(c, lower=True)
        alpha = cho_solve(cf, r[g])
        nll += 0.5 * r[g] @ alpha + np.log(np.diag(cf[0])).sum() + 0.5 * g.size * np.log(2 * np.pi)
        mean[idx] = _kernel(np.abs(wl[idx][:, None] - wl[g][None, :]), amplitude, ell, kernel) @ alpha
    return nll, mean


@pytest.mark.parametrize("kernel", ["matern32", "matern52", "matern12", "rbf"])
def test_exact_likelihood_and_mean_match_dense_formulas(kernel):
    wl, sigma, good, order, r = _problem()
    lik = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, kernel=kernel, amplitude=0.015,
                                length_scale=2.5, jitter=0.0)
    assert lik.methods == ["exact", "exact"]
    nll_ref, mean_ref = _dense_reference(wl, sigma, good, order, r, 0.015, 2.5, kernel)
    rt = torch.as_tensor(r)
    assert float(lik.negative_log_likelihood(rt)) == pytest.approx(nll_ref, rel=1e-10)
    assert float(lik.log_marginal_likelihood(rt)) == pytest.approx(-nll_ref, rel=1e-10)
    # the loss is -2 ln p(R) - Σ ln 2πσ² over the good pixels
    expected = 2 * nll_ref - np.sum(np.log(2 * np.pi * sigma[good] ** 2))
    assert float(lik(rt)) == pytest.approx(expected, rel=1e-10)
    with torch.no_grad():
        mean = lik.conditional_mean(rt).numpy()
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-10)
    # predicted at the masked pixels too, from their neighbours
    assert np.all(np.abs(mean[~good]) > 0)


def test_loss_tends_to_chi2_as_amplitude_vanishes():
    wl, sigma, good, order, r = _problem()
    chi2 = float(np.sum((r[good] / sigma[good]) ** 2))
    rt = torch.as_tensor(r)
    for amp, tol in [(1e-4, 1e-2), (1e-9, 1e-10)]:
        lik = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, amplitude=amp)
        assert float(lik(rt)) == pytest.approx(chi2, rel=tol)
    # and -ln p(R) -> χ²/2 + Σ ln(2πσ²)/2
    lik = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, amplitude=1e-9)
    const = 0.5 * np.sum(np.log(2 * np.pi * sigma[good] ** 2))
    assert float(lik.negative_log_likelihood(rt)) == pytest.approx(0.5 * chi2 + const, rel=1e-10)
    # the GP explains a smooth residual better than white noise does
    big = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, amplitude=0.02, length_scale=2.0)
    assert float(big(rt)) < 0.5 * chi2


def test_masked_pixels_are_left_out():
    wl, sigma, good, order, r = _problem()
    lik = GPContinuumLikelihood(wl, sigma, good=good, order_index=order)
    r_bad = r.copy()
    r_bad[~good] = 1e6  # wild values (or NaN) at masked pixels change nothing
    r_nan = r.copy()
    r_nan[~good] = np.nan
    base = float(lik(torch.as_tensor(r)))
    assert float(lik(torch.as_tensor(r_bad))) == base
    assert float(lik(torch.as_tensor(r_nan))) == base
    # the same as a likelihood built on the good pixels alone
    sub = GPContinuumLikelihood(wl[good], sigma[good], order_index=order[good])
    assert float(sub(torch.as_tensor(r[good]))) == pytest.approx(base, rel=1e-12)
    # weight 0 marks masked pixels too
    w = np.where(good, 1 / sigma**2, 0.0)
    from_w = GPContinuumLikelihood.from_weight(wl, w, order_index=order)
    assert float(from_w(torch.as_tensor(r_bad))) == pytest.approx(base, rel=1e-12)
    # no gradient flows to masked pixels
    rt = torch.as_tensor(r).clone().requires_grad_()
    lik(rt).backward()
    assert torch.all(rt.grad[torch.as_tensor(~good)] == 0)


def test_gradients_are_exact():
    wl, sigma, good, order, r = _problem(n=40)
    lik = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, amplitude=0.01, length_scale=1.5)
    rt = torch.as_tensor(r).clone().requires_grad_()
    params = [lik.raw_amplitude, lik.base_kernels[0].raw_lengthscale]

    def f(res, raw_a, raw_l):
        with torch.no_grad():
            lik.raw_amplitude.copy_(raw_a)
            lik.base_kernels[0].raw_lengthscale.copy_(raw_l)
        return lik(res)

    # the analytic backward of the Cholesky terms against finite differences, for R and both hyperparameters
    assert torch.autograd.gradcheck(lambda res: lik(res), (rt,), eps=1e-7, atol=1e-5)
    loss = lik(rt)
    grads = torch.autograd.grad(loss, params)
    for p, g in zip(params, grads):
        with torch.no_grad():
            p += 1e-6
            up = float(lik(rt))
            p -= 2e-6
            down = float(lik(rt))
            p += 1e-6
        assert float(g.sum()) == pytest.approx((up - down) / 2e-6, rel=1e-4)


def test_scalable_agrees_with_exact():
    gen = np.random.default_rng(2)
    n = 1500
    wl = 8700.0 + 0.064 * np.arange(n)
    sigma = np.full(n, 0.01)
    t = np.sqrt(3.0) * np.abs(wl[:, None] - wl[None, :]) / 5.0
    e = np.linalg.cholesky(0.02**2 * (1 + t) * np.exp(-t) + 1e-10 * np.eye(n)) @ gen.normal(size=n)
    r = torch.as_tensor(e + gen.normal(0, 0.01, n))
    exact = GPContinuumLikelihood(wl, sigma, amplitude=0.02, method="exact")
    fast = GPContinuumLikelihood(wl, sigma, amplitude=0.02, method="scalable")
    assert fast.methods == ["scalable"]
    q_e, ld_e = exact.quad_logdet(r)
    q_s, ld_s = fast.quad_logdet(r)
    assert float(q_s) == pytest.approx(float(q_e), rel=1e-3)
    # stochastic Lanczos quadrature: a few units on ln det C ≈ -1.3e4, deterministic (fixed probes)
    assert abs(float(ld_s - ld_e)) < 5.0
    assert float(fast(r)) == float(fast(r))
    with torch.no_grad():
        m_e, m_s = exact.conditional_mean(r).numpy(), fast.conditional_mean(r).numpy()
    assert np.max(np.abs(m_s - m_e)) < 1e-4  # against an amplitude of 0.02
    # gradients with respect to R agree (they drive the line parameters)
    rg = r.clone().requires_grad_()
    (g_e,) = torch.autograd.grad(exact(rg), rg)
    (g_s,) = torch.autograd.grad(fast(rg), rg)
    assert float(torch.linalg.norm(g_s - g_e) / torch.linalg.norm(g_e)) < 1e-3
    # "auto" picks by size
    auto = GPContinuumLikelihood(wl, sigma, max_exact_size=1000)
    assert auto.methods == ["scalable"]
    assert GPContinuumLikelihood(wl, sigma).methods == ["exact"]


def test_hyperparameters_bounds_and_per_order():
    wl, sigma, good, order, r = _problem()
    lik = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, per_order=True, amplitude=0.03,
                                length_scale=4.0, amplitude_bounds=(0.001, 0.1), length_scale_bounds=(2.0, 20.0))
    assert lik.amplitude.shape == (2,) and lik.length_scale.shape == (2,)
    assert torch.allclose(lik.amplitude, torch.full((2,), 0.03, dtype=F64))
    assert torch.allclose(lik.length_scale, torch.full((2,), 4.0, dtype=F64))
    with torch.no_grad():
        lik.raw_amplitude.fill_(50.0)
        lik.base_kernels[1].raw_lengthscale.fill_(-50.0)
    assert float(lik.amplitude.max()) <= 0.1 and float(lik.length_scale[1]) >= 2.0
    fixed = GPContinuumLikelihood(wl, sigma, good=good, learn=False)
    assert not any(p.requires_grad for p in fixed.parameters())
    noisy = GPContinuumLikelihood(wl, sigma, good=good, learn_noise_scale=True, noise_scale=2.0)
    assert noisy.raw_log_noise_scale.requires_grad and float(noisy.noise_scale) == pytest.approx(2.0)
    # doubling σ through β and through σ itself give the same C (the loss differs by Σ ln 4)
    twice = GPContinuumLikelihood(wl, 2 * sigma, good=good)
    rt = torch.as_tensor(r)
    assert float(noisy.negative_log_likelihood(rt)) == pytest.approx(float(twice.negative_log_likelihood(rt)), rel=1e-12)
    assert "matern32" in repr(lik)


def test_bad_inputs():
    wl, sigma, good, order, r = _problem()
    with pytest.raises(ValueError, match="unknown kernel 'cosine'"):
        GPContinuumLikelihood(wl, sigma, kernel="cosine")
    with pytest.raises(ValueError, match="length_scale must be finite and > 0"):
        GPContinuumLikelihood(wl, sigma, length_scale=0.0)
    with pytest.raises(ValueError, match="length_scale must be finite and > 0"):
        GPContinuumLikelihood(wl, sigma, length_scale=-3.0)
    with pytest.raises(ValueError, match="amplitude must be finite and > 0"):
        GPContinuumLikelihood(wl, sigma, amplitude=np.nan)
    with pytest.raises(ValueError, match="sigma has 119 entries but wavelength has 120"):
        GPContinuumLikelihood(wl, sigma[:-1])
    with pytest.raises(ValueError, match="good has"):
        GPContinuumLikelihood(wl, sigma, good=good[:10])
    with pytest.raises(ValueError, match="sigma must be finite and > 0 at every good pixel"):
        GPContinuumLikelihood(wl, np.where(np.arange(wl.size) == 3, 0.0, sigma))
    with pytest.raises(ValueError, match="outside its bounds"):
        GPContinuumLikelihood(wl, sigma, length_scale=0.5)  # below the default lower bound of 1 Å
    with pytest.raises(ValueError, match="lower < upper"):
        GPContinuumLikelihood(wl, sigma, amplitude_bounds=(0.1, 0.01))
    with pytest.raises(ValueError, match="unknown method"):
        GPContinuumLikelihood(wl, sigma, method="fast")
    with pytest.raises(ValueError, match="no good pixel"):
        GPContinuumLikelihood(wl, sigma, good=np.zeros(wl.size, bool))
    lik = GPContinuumLikelihood(wl, sigma, good=good, order_index=order)
    with pytest.raises(ValueError, match=r"residual has shape \(119,\); expected \(120,\)"):
        lik(torch.as_tensor(r[:-1]))
    with pytest.raises(ValueError, match="unknown likelihood 'student-t'"):
        build_likelihood("student-t", wl, sigma, good, order)
    with pytest.raises(ValueError, match="set from the data"):
        build_likelihood({"sigma": 1.0}, wl, sigma, good, order)
    with pytest.raises(ValueError, match="built for 120 pixels but the data have 60"):
        build_likelihood(lik, wl[:60], sigma[:60], good[:60], order[:60])


def test_settings_are_one_checked_value_and_the_keywords_a_front():
    """GPSettings holds every option, checked once; the keywords, settings= and build_likelihood
    with a GPSettings give the same likelihood, value for value."""
    wl, sigma, good, order, r = _problem()
    s = GPSettings(kernel="RBF", amplitude=0.02, length_scale=3, per_order=True, method="exact")
    assert s.kernel == "rbf" and isinstance(s.length_scale, float) and s.length_scale_bounds == (1.0, None)
    with pytest.raises(AttributeError):
        s.amplitude = 1.0  # frozen
    by_keywords = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, kernel="rbf", amplitude=0.02,
                                        length_scale=3.0, per_order=True, method="exact")
    by_settings = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, settings=s)
    built = build_likelihood(s, wl, sigma, good, order)
    res = torch.as_tensor(r)
    for other in (by_settings, built):
        assert torch.equal(other(res), by_keywords(res))
        assert torch.equal(other.conditional_mean(res), by_keywords.conditional_mean(res))
    assert by_keywords.settings == s
    with pytest.raises(TypeError, match="either as settings= or as keywords"):
        GPContinuumLikelihood(wl, sigma, settings=s, kernel="rbf")
    with pytest.raises(TypeError, match="settings must be a GPSettings"):
        GPContinuumLikelihood(wl, sigma, settings={"kernel": "rbf"})
    with pytest.raises(ValueError, match="outside its bounds"):
        GPSettings(length_scale=0.5)
    with pytest.raises(ValueError, match="grid_spacing must be finite and > 0"):
        GPSettings(grid_spacing=0.0)
    # the default KISS-GP grid: an eighth of the lower bound of ℓ, or of ℓ without a positive one
    assert GPSettings(length_scale=5.0).kiss_grid_spacing == 1.0 / 8.0
    assert GPSettings(length_scale=4.0, length_scale_bounds=(None, None)).kiss_grid_spacing == 0.5
    assert GPSettings(method="auto", max_exact_size=10).method_for(11) == "scalable"


def test_clear_import_error_without_gpytorch():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('gpytorch', 'linear_operator'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Block())\n"
        "import blase_specutils, blase_specutils.core, blase_specutils.fitting, blase_specutils.cloning\n"
        "try:\n"
        "    import blase_specutils.gp\n"
        "except ImportError as err:\n"
        "    print('MESSAGE:', err)\n"
        "assert 'gpytorch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'pip install "blase_specutils[gp]"' in out.stdout


def test_fit_transfer_takes_a_likelihood_and_tunes_its_parameters():
    """Core integration without the shared data: two lines, a smooth continuum error, χ² vs GP."""
    from blase_specutils.core import LineCloneModel
    from blase_specutils.core.transfer import TransferModel, fit_transfer, transfer_loss

    wl = np.arange(5000.0, 5012.0, 0.05)
    lines = {"lam_centers": [5004.0, 5008.0], "log_amplitudes": np.log([0.02, 0.015]),
             "log_sigmas": np.log([0.05, 0.05]), "log_gammas": np.log([0.02, 0.02])}
    truth = LineCloneModel(**lines)
    sim = TransferModel(truth, wl, rv=0.0, vsini=2.0, continuum_degree=0)
    with torch.no_grad():
        flux = sim().numpy()
    data = torch.as_tensor(flux * (1 + 0.01 * np.sin(2 * np.pi * (wl - 5000.0) / 6.0)))
    w = torch.full_like(data, 1e4)
    model = TransferModel(LineCloneModel(**lines), wl, vsini=2.0, continuum_degree=0)
    lik = GPContinuumLikelihood.from_weight(wl, w)
    assert float(transfer_loss(model, data, w, likelihood=lik)) == pytest.approx(float(lik(data - model())))
    before = lik.length_scale.clone()
    fit = fit_transfer(model, data, w, template_epochs=20, line_epochs=20, progress=False, likelihood=lik)
    assert set(fit.stages) == {"template", "lines"}
    assert not torch.equal(lik.length_scale, before)  # tuned jointly with the model
    # the stored χ² stays plain χ²
    with torch.no_grad():
        assert fit.chi2["lines"] == pytest.approx(float((w * (data - model()) ** 2).sum()))


def test_gp_likelihood_removes_the_amplitude_bias_of_a_wrong_continuum():
    """A reduced injection-recovery (benchmarks/gp_continuum.py has the full one): 40 synthetic lines
    over 20 Å of HPF-like pixels, the flux multiplied by 1 + e(λ) with e a Matérn-3/2 GP draw
    (2 %, 5 Å), no noise, so that any error of ln a is bias. Fitting ln a from the truth with χ²
    lets the lines soak up e; the GP likelihood must cut the RMS bias of the deep lines by ≥ 3×."""
    from blase_specutils.core import LineCloneModel
    from blase_specutils.core.profiles import pseudo_voigt
    from blase_specutils.core.transfer import TransferModel, fit_transfer

    gen = np.random.default_rng(2)
    lo, hi = 8700.0, 8720.0
    centres = np.sort(gen.uniform(lo - 1, hi + 1, 40))
    ln_a = np.log(gen.uniform(0.005, 0.03, 40))
    ln_s, ln_g = np.log(gen.uniform(0.03, 0.06, 40)), np.log(gen.uniform(0.01, 0.03, 40))
    wl = np.arange(lo, hi, 0.064)

    def lines():
        return LineCloneModel(centres.copy(), ln_a.copy(), ln_s.copy(), ln_g.copy())

    with torch.no_grad():
        flux = TransferModel(lines(), wl, vsini=3.0, continuum_degree=0)().numpy()
        depth = np.exp(ln_a) * pseudo_voigt(torch.zeros(1, dtype=F64), torch.as_tensor(np.exp(ln_s)),
                                            torch.as_tensor(np.exp(ln_g))).numpy()
    t = np.sqrt(3.0) * np.abs(wl[:, None] - wl[None, :]) / 5.0
    e = np.linalg.cholesky(0.02**2 * (1 + t) * np.exp(-t) + 1e-12 * np.eye(wl.size)) @ gen.normal(size=wl.size)
    data = torch.as_tensor(flux * (1.0 + e))
    w = torch.full_like(data, 1e4)  # σ = 1 % (S/N 100)
    deep = (depth > 0.05) & (centres > lo + 1) & (centres < hi - 1)
    rms = {}
    for name in ("chi2", "gp"):
        model = TransferModel(lines(), wl, vsini=3.0, continuum_degree=0)
        lik = GPContinuumLikelihood.from_weight(wl, w) if name == "gp" else None
        fit_transfer(model, data, w, template_epochs=0, line_epochs=150, tune_lines=("amplitude",),
                     regularization=None, lr=0.03, patience=None, progress=False, likelihood=lik)
        err = model.stellar.log_amplitudes.detach().numpy() - ln_a
        rms[name] = float(np.sqrt(np.mean(err[deep] ** 2)))
    assert deep.sum() >= 20
    assert rms["chi2"] > 0.1  # the wrong continuum really biases the χ² fit (measured 0.31)
    assert rms["chi2"] / rms["gp"] >= 3.0  # measured 5.6


def test_frozen_hyperparameters_reuse_the_factorisation():
    wl, sigma, good, order, r = _problem()
    tuned = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, amplitude=0.02, length_scale=3.0)
    frozen = GPContinuumLikelihood(wl, sigma, good=good, order_index=order, amplitude=0.02, length_scale=3.0,
                                   learn=False)
    rt = torch.as_tensor(r).clone().requires_grad_()
    assert float(frozen(rt)) == pytest.approx(float(tuned(rt)), rel=1e-12)
    assert len(frozen._factor_cache) == 2  # one factor per order, reused from now on
    (g_frozen,) = torch.autograd.grad(frozen(rt), rt)
    (g_tuned,) = torch.autograd.grad(tuned(rt), rt)
    assert torch.allclose(g_frozen, g_tuned, rtol=1e-10, atol=0)
    np.testing.assert_allclose(frozen.conditional_mean(rt).detach().numpy(), tuned.conditional_mean(rt).detach().numpy(),
                               rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # new values of the hyperparameters: a new factor
        frozen.raw_amplitude += 0.1
    assert float(frozen(rt)) != pytest.approx(float(tuned(rt)), rel=1e-6)


def test_fit_spectrum_returns_the_pseudo_continuum_as_a_spectrum(tmp_path):
    import astropy.units as u
    from astropy.io import fits
    from conftest import BLASE03_CLONE, SHARED_DATA, _need
    from specutils import Spectrum, SpectrumList

    from blase_specutils import load_blase03, read_spectrum, trim
    from blase_specutils.fitting import fit_spectrum

    wasp = read_spectrum(_need(SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"))
    clone = load_blase03(_need(BLASE03_CLONE))
    pieces = []
    for band in [(8700, 8710), (8716, 8726)]:  # two "orders" in µm
        s = trim(wasp, band * u.AA, 0 * u.AA)
        pieces.append(Spectrum(spectral_axis=s.spectral_axis.to(u.um), flux=s.flux, uncertainty=s.uncertainty))
    data = SpectrumList(pieces)
    plain = fit_spectrum(data, clone, rv=-9.6, rv_range=20, template_epochs=2, line_epochs=0, progress=False)
    assert plain.pseudo_continuum is None and plain.gp_hyperparameters is None and "gp" not in plain.summary()
    r = fit_spectrum(data, clone, rv=-9.6, rv_range=20, template_epochs=15, line_epochs=15,
                     tune_lines=("amplitude",), likelihood={"kernel": "matern52"}, progress=False)
    assert r.likelihood.methods == ["exact", "exact"]  # one GP per order
    pc = r.pseudo_continuum
    assert isinstance(pc, SpectrumList) and len(pc) == 2
    for got, piece in zip(pc, pieces):
        assert isinstance(got, Spectrum)
        assert got.flux.unit == piece.flux.unit and got.spectral_axis.unit == u.um
        np.testing.assert_allclose(got.spectral_axis.value, piece.spectral_axis.value)
        assert np.all(np.isfinite(got.flux.value)) and np.any(got.flux.value != 0)
    hp = r.gp_hyperparameters
    assert hp["kernel"] == "matern52" and hp["length_scale"].unit == u.AA and hp["length_scale"] >= 1 * u.AA
    assert r.summary()["gp"]["kernel"] == "matern52"
    r.plot().savefig(tmp_path / "fit.png")
    path = r.save(tmp_path / "fit.fits")
    with fits.open(path) as hdul:
        assert hdul[0].header["GPKERNEL"] == "matern52"
        np.testing.assert_allclose(hdul["DATA"].data["pseudo_continuum"], r.pseudo_continuum_flux)


def test_clone_spectrum_with_the_gp_finds_an_injected_continuum_error():
    """A TelFit template (continuum exactly 1) times 1 + e(λ): the GP mean follows e."""
    import astropy.units as u
    from specutils import Spectrum

    from blase_specutils import clone_spectrum, load_template, trim

    clean = trim(load_template("telfit-hpf"), (8490, 8530) * u.AA, 0 * u.AA)
    wl = clean.spectral_axis.to_value(u.AA)
    t = np.sqrt(3.0) * np.abs(wl[:, None] - wl[None, :]) / 5.0
    e = np.linalg.cholesky(0.02**2 * (1 + t) * np.exp(-t) + 1e-12 * np.eye(wl.size)) @ np.random.default_rng(5).normal(
        size=wl.size)
    dirty = Spectrum(spectral_axis=clean.spectral_axis, flux=clean.flux * (1.0 + e))
    c = clone_spectrum(dirty, band=(8490, 8530) * u.AA, buffer=0 * u.AA, flatten=False, epochs=60, progress=False,
                       likelihood="gp")
    pc = c.pseudo_continuum
    assert isinstance(pc, Spectrum) and pc.flux.size == wl.size
    np.testing.assert_allclose(pc.spectral_axis.to_value(u.AA), wl)
    assert np.corrcoef(pc.flux.value, e)[0, 1] > 0.9  # measured 0.98
    assert {"gpkernel", "gpamp", "gplength", "gpnoise"} <= set(c.meta)
    assert clone_spectrum(clean, band=(8490, 8530) * u.AA, buffer=0 * u.AA, flatten=False, epochs=2,
                          progress=False).pseudo_continuum is None
    with pytest.raises(ValueError, match="noise"):
        clone_spectrum(dirty, band=(8490, 8530) * u.AA, buffer=0 * u.AA, flatten=False, epochs=1, progress=False,
                       likelihood={"noise": -1.0})
