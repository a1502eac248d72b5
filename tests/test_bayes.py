"""Posterior sampling with Pyro guides: MAP = Adam, calibration on simulated data, results, I/O."""

from __future__ import annotations

import copy
import subprocess
import sys

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.nddata import StdDevUncertainty
from conftest import SHARED_DATA, _need
from specutils import Spectrum

from blase_specutils.cloning import SpectralClone, load_blase03
from blase_specutils.core.transfer import TransferModel, transfer_loss
from blase_specutils.fitting import fit_spectrum

try:
    from blase_specutils import bayes
    from blase_specutils.bayes import (
        GUIDES,
        Measurement,
        PosteriorFit,
        PosteriorSettings,
        make_guide,
        run_posterior,
        sample_posterior,
    )
except ImportError:  # the [pyro] extra is not installed: only the import test below runs
    bayes = None

needs_pyro = pytest.mark.skipif(bayes is None, reason='needs the [pyro] extra (pip install "blase_specutils[pyro]")')

LAMBDA = 0.15  # Λ of the simulation: truth ln a = ln â + Laplace(0, 2Λ), the prior of the fit


@pytest.fixture(scope="module")
def sim(blase03_clone_path):
    """HPF-like data (8700-8735 Å, 0.064 Å pixels, R = 55,000, S/N 100) from the 4700 K clone with
    amplitudes drawn from the Laplace prior, plus the Adam fit of the same model."""
    clone = load_blase03(blase03_clone_path)
    gen = np.random.default_rng(11)
    lo, hi = 8700.0, 8735.0
    c = clone.model.lam_centers
    window = clone.model.subset((c > lo - 5) & (c < hi + 5))
    truth = window.subset(torch.arange(window.n_lines))
    with torch.no_grad():
        truth.log_amplitudes += torch.as_tensor(gen.laplace(0.0, 2 * LAMBDA, window.n_lines))
    wl = np.arange(lo, hi, 0.064)
    rv, vsini = 7.3, 2.6
    model = TransferModel(truth, wl, rv=rv, vsini=vsini, continuum_degree=2, max_vsini=23.0)
    with torch.no_grad():
        model.continuum_coeffs[0] = torch.tensor([1.01, 0.008, -0.004], dtype=torch.float64)
        flux = model().numpy()
    sigma = np.full(wl.size, 0.01)
    spec = Spectrum(spectral_axis=wl * u.AA, flux=(flux + gen.normal(0.0, sigma)) * u.dimensionless_unscaled,
                    uncertainty=StdDevUncertainty(sigma))
    result = fit_spectrum(spec, SpectralClone(window), rv=8.0, vsini=3.0, rv_range=20.0, buffer=10 * u.AA,
                          tune_lines=("amplitude",), regularization=LAMBDA, line_epochs=3000, progress=False)
    assert result.model.stellar.n_lines == window.n_lines  # the fit holds exactly the simulated lines
    inside = ((window.lam_centers > lo) & (window.lam_centers < hi)).numpy()
    return {"result": result, "truth": truth.log_amplitudes.detach().numpy(), "rv": rv, "vsini": vsini, "inside": inside}


@pytest.fixture(scope="module")
def posterior(sim):
    if bayes is None:
        pytest.skip("needs the [pyro] extra")
    return sample_posterior(sim["result"], "normal", num_steps=300, lr=0.03, num_samples=500, num_predictive=100,
                            progress=False, seed=3)


# ---------------------------------------------------------------------- without Pyro


def test_import_without_pyro_names_the_extra():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pyro' or name.startswith('pyro.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import blase_specutils\n"
        "from blase_specutils.fitting import fit_spectrum\n"
        "assert callable(blase_specutils.fit_spectrum)\n"
        "try:\n"
        "    import blase_specutils.bayes\n"
        "except ImportError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'pip install "blase_specutils[pyro]"' in out.stdout


# ---------------------------------------------------------------------- guides and errors


@needs_pyro
def test_guide_names(sim):
    r = sim["result"]
    pm = bayes.TransferPosteriorModel(r.model, r.flux, r.sigma, r.good, prior=r.prior, regularization=LAMBDA,
                                      n_probes=4)
    expected = {"delta": "AutoDelta", "normal": "AutoNormal", "lowrank": "AutoLowRankMultivariateNormal"}
    for name, kind in GUIDES.items():
        assert type(make_guide(pm, name)).__name__ == expected[kind]
    assert make_guide(pm, "lowrank", rank=3).rank == 3
    # every guide starts at the fit: u = 0 for every site
    g = make_guide(pm, "map")
    with torch.no_grad():
        assert all(float(v.abs().max()) == 0.0 for v in g().values())
    with pytest.raises(ValueError, match=r"unknown guide 'nuts'.*delta.*lowrank.*map.*normal"):
        make_guide(pm, "nuts")
    with pytest.raises(ValueError, match="rank applies only"):
        make_guide(pm, "normal", rank=2)
    with pytest.raises(ValueError, match="positive integer"):
        make_guide(pm, "lowrank", rank=0)


@needs_pyro
def test_bad_inputs(sim):
    r = sim["result"]
    with pytest.raises(ValueError, match="unknown guide 'hmc'; choose from"):
        sample_posterior(r, "hmc")
    with pytest.raises(TypeError, match="guide must be a name"):
        sample_posterior(r, 3)
    with pytest.raises(TypeError, match="TransferResult"):
        sample_posterior(r.model)
    with pytest.raises(ValueError, match="num_steps must be > 0"):
        sample_posterior(r, num_steps=0)
    with pytest.raises(ValueError, match="num_samples must be > 0"):
        sample_posterior(r, num_samples=-5)
    with pytest.raises(ValueError, match="num_steps must be an integer"):
        sample_posterior(r, num_steps=2.5)
    with pytest.raises(ValueError, match="lr must be > 0"):
        sample_posterior(r, lr=0.0)
    with pytest.raises(ValueError, match="unknown tune_lines"):
        sample_posterior(r, tune_lines=("center",))
    with pytest.raises(ValueError, match="width_regularization"):
        sample_posterior(r, tune_lines=("amplitude", "sigma"))
    with pytest.raises(ValueError, match="noise_scale"):
        sample_posterior(r, noise_scale="auto")
    unregularised = copy.copy(r)
    unregularised.settings = {**r.settings, "regularization": None}
    with pytest.raises(ValueError, match="improper"):
        sample_posterior(unregularised)


@needs_pyro
def test_settings_are_checked_once_and_filled_from_the_fit(sim):
    """PosteriorSettings checks every option where it is made; what is left to the fit is filled in by
    for_result; sample_posterior is a front over run_posterior and gives the same draws."""
    r = sim["result"]
    s = PosteriorSettings(guide="map", num_samples=50, num_predictive=500, tune_lines=["amplitude"], seed=4)
    assert s.guide == "delta" and s.num_predictive == 50 and s.tune_lines == ("amplitude",)
    with pytest.raises(AttributeError):
        s.lr = 1.0  # frozen
    with pytest.raises(ValueError, match="rank applies only to guide='lowrank', not 'map'"):
        PosteriorSettings(guide="map", rank=2)
    with pytest.raises(ValueError, match="num_steps must be an integer"):
        PosteriorSettings(num_steps=2.5)
    with pytest.raises(ValueError, match="continuum_scale must be > 0"):
        PosteriorSettings(continuum_scale=0.0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        PosteriorSettings(seed=-1)
    filled = PosteriorSettings(noise_scale="chi2").for_result(r)
    assert filled.regularization == LAMBDA and filled.noise_scale == pytest.approx(np.sqrt(r.chi2_reduced))
    assert filled.tune_resolving_power is bool(r.model.inst.log_resolving_power.requires_grad)
    with pytest.raises(TypeError, match="PosteriorSettings"):
        run_posterior(r, {"guide": "normal"})
    kw = dict(num_steps=8, num_samples=12, num_predictive=4, lr=0.03, progress=False, seed=5)
    a = sample_posterior(r, "normal", **kw)
    b = run_posterior(r, PosteriorSettings(guide="normal", **kw))
    for key, value in a.samples.items():
        np.testing.assert_array_equal(b.samples[key], value)
    np.testing.assert_array_equal(a.predictive, b.predictive)
    assert {k: v for k, v in a.settings.items() if k != "seconds"} == {
        k: v for k, v in b.settings.items() if k != "seconds"}


# ---------------------------------------------------------------------- MAP = Adam


@needs_pyro
def test_log_posterior_is_minus_half_the_eq11_loss(sim):
    """−2 ln p(θ|D) and χ² + Σ|ln a − ln â|/Λ differ by a constant: the Laplace scale is 2Λ."""
    r = sim["result"]
    pm = bayes.TransferPosteriorModel(r.model, r.flux, r.sigma, r.good, prior=r.prior, regularization=LAMBDA,
                                      n_probes=4)
    data = torch.as_tensor(np.where(r.good, r.flux, 0.0))
    w = torch.as_tensor(np.where(r.good, 1.0 / r.sigma**2, 0.0))
    gen = np.random.default_rng(0)
    base = r.model.stellar.log_amplitudes.detach()
    losses, logps = [], []
    for k in range(3):
        lna = base + (0.0 if k == 0 else torch.as_tensor(gen.normal(0.0, 0.2, base.numel())))
        m = copy.deepcopy(r.model)
        with torch.no_grad():
            m.stellar.log_amplitudes.copy_(lna)
            m.stellar.log_amplitudes.requires_grad_(True)
            losses.append(float(transfer_loss(m, data, w, log_amp_prior=r.prior["log_amplitudes"],
                                              regularization=LAMBDA)))
        logps.append(pm.log_posterior({"stellar.log_amplitudes": lna}))
    for k in (1, 2):
        assert -2.0 * (logps[k] - logps[0]) == pytest.approx(losses[k] - losses[0], rel=1e-9, abs=1e-6)


@needs_pyro
def test_map_agrees_with_adam(sim, posterior):
    r = sim["result"]
    pm = sample_posterior(r, "map", num_steps=100, lr=0.01, num_samples=2, num_predictive=1, progress=False, seed=0)
    assert pm.guide == "delta"
    assert np.all(pm.samples["rv"] == pm.samples["rv"][0])  # a point mass
    adam_lna = r.model.stellar.log_amplitudes.detach().numpy()
    d = pm.samples["ln_amplitude"][0] - adam_lna
    constrained = np.asarray(posterior.lines["data_constrained"])
    assert constrained.sum() >= 10
    # the MAP stays at the Adam optimum: constrained lines to < 0.03 in ln a (Adam's step ~ lr),
    # RV to a small fraction of its posterior width, v sin i to 1 %
    assert np.max(np.abs(d[constrained])) < 0.03
    sig_rv = posterior.measurement("rv").error.to_value(u.km / u.s)
    assert abs(pm.samples["rv"][0] - r.rv.to_value(u.km / u.s)) < 0.2 * sig_rv
    assert pm.samples["vsini"][0] == pytest.approx(r.vsini.to_value(u.km / u.s), rel=0.01)
    # both are the same optimum of Eq. 11: the log-posteriors agree to the optimiser's tolerance
    lp_adam = pm.posterior_model.log_posterior()
    lp_map = pm.posterior_model.log_posterior({
        "stellar.log_amplitudes": torch.as_tensor(pm.samples["ln_amplitude"][0]),
        "rv": torch.as_tensor(pm.samples["rv"][0]),
        "rot.log_vsini": torch.as_tensor(np.log(pm.samples["vsini"][0])),
        "continuum_coeffs": torch.as_tensor(pm.samples["continuum"][0]),
    })
    assert abs(lp_map - lp_adam) < 1e-3 * abs(lp_adam) + 1.0


# ---------------------------------------------------------------------- calibration


@needs_pyro
def test_amplitude_intervals_are_calibrated(sim, posterior):
    """Truth drawn from the prior: the 68 % intervals of ln a must hold it for ≈ 68 % of the lines
    (binomial SD ≈ 5 % for these ~90 lines; a guide a factor 2 too narrow or too wide fails)."""
    lo, hi = np.percentile(posterior.samples["ln_amplitude"], [16, 84], axis=0)
    t = sim["truth"]
    hit = ((t >= lo) & (t <= hi))[sim["inside"]]
    assert hit.size >= 80
    print(f"coverage of {hit.size} amplitudes: {hit.mean():.3f}")
    assert 0.55 <= hit.mean() <= 0.81, hit.mean()
    # RV and v sin i: the truth within 3 posterior widths
    for name in ("rv", "vsini"):
        m = posterior.measurement(name)
        assert abs(m.value.value - sim[name]) < 3 * m.error.value, (name, str(m), sim[name])


# ---------------------------------------------------------------------- results


@needs_pyro
def test_result_products(sim, posterior):
    p = posterior
    t = p.lines
    n = sim["result"].model.stellar.n_lines
    assert len(t) == n
    for col in ("amplitude_median", "amplitude_p16", "amplitude_p84", "equivalent_width_median",
                "equivalent_width_p16", "equivalent_width_p84", "amplitude_fit", "amplitude_clone"):
        assert t[col].unit == u.AA
    assert np.all(t["amplitude_p16"] <= t["amplitude_median"]) and np.all(t["amplitude_median"] <= t["amplitude_p84"])
    # linear mode, unit-area profiles: EW = a, draw by draw
    np.testing.assert_allclose(t["equivalent_width_median"].value, t["amplitude_median"].value, rtol=1e-12)
    assert "sigma_median" not in t.colnames  # widths were held at the fit
    assert p.rv.unit == u.km / u.s and p.vsini.unit == u.km / u.s
    assert p.resolving_power.value == pytest.approx(55000.0)  # R held fixed: no spread
    minus, plus = p.rv_err
    assert 0 < minus.to_value(u.km / u.s) < 0.5 and 0 < plus.to_value(u.km / u.s) < 0.5
    m = p.measurement("rv")
    assert isinstance(m, Measurement) and m.lower < m.value < m.upper
    assert "km / s" in str(m) and "+" in str(m)
    assert p.samples["continuum"].shape == (500, 1, 3)
    band = p.model_band()
    assert isinstance(band.median, Spectrum)
    assert band.median.flux.size == sim["result"].wavelength.size
    assert np.all(band.lower.flux <= band.median.flux) and np.all(band.median.flux <= band.upper.flux)
    noisy = p.model_band(noise=True)
    assert np.median(noisy.upper.flux - noisy.lower.flux) > np.median(band.upper.flux - band.lower.flux)
    with pytest.raises(ValueError, match="percentiles"):
        p.model_band(q=(84, 16))
    s = p.summary()
    assert s["guide"] == "normal" and s["rv"]["p16"] < s["rv"]["median"] < s["rv"]["p84"]
    assert len(p.elbo_history) == 300 and np.all(np.isfinite(p.elbo_history))
    assert "PosteriorFit" in repr(p)


@needs_pyro
def test_save_load_roundtrip(posterior, tmp_path):
    path = posterior.save(tmp_path / "post.fits")
    back = PosteriorFit.load(path)
    assert back.result is None and back.guide == "normal"
    for k, v in posterior.samples.items():
        np.testing.assert_allclose(back.samples[k], v)
    for name in ("rv", "vsini", "resolving_power"):
        assert back.measurement(name).value == posterior.measurement(name).value
    assert back.lines.colnames == posterior.lines.colnames
    np.testing.assert_allclose(back.lines["amplitude_p84"].value, posterior.lines["amplitude_p84"].value)
    assert back.lines["center"].unit == u.AA
    np.testing.assert_allclose(back.elbo_history, posterior.elbo_history)
    b0, b1 = posterior.model_band(), back.model_band()
    np.testing.assert_allclose(b1.upper.flux.value, b0.upper.flux.value, rtol=1e-6)
    assert back.settings["regularization"] == LAMBDA and back.settings["tuned"] == posterior.settings["tuned"]
    with pytest.raises(OSError):
        posterior.save(path)  # no silent overwrite
    posterior.save(path, overwrite=True)


@needs_pyro
def test_plot_and_corner(posterior, monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = posterior.plot(band=(8710 * u.AA, 8720 * u.AA), title="simulated")
    fig.savefig(tmp_path / "band.png")
    pytest.importorskip("corner")
    cfig = posterior.corner(lines=[5])
    assert len(cfig.axes) == 9  # RV, v sin i, one ln a
    with pytest.raises(ValueError, match="held fixed"):
        posterior.corner(params=["resolving_power"])
    plt.close("all")
    monkeypatch.setitem(sys.modules, "corner", None)  # as if the package were not installed
    with pytest.raises(ImportError, match=r'pip install "blase_specutils\[pyro\]" \(or pip install corner\)'):
        posterior.corner()


@needs_pyro
def test_lowrank_guide_runs(sim):
    p = sample_posterior(sim["result"], "lowrank", rank=4, num_steps=20, num_samples=20, num_predictive=5,
                         progress=False, seed=1)
    assert p.guide == "lowrank" and p.settings["rank"] == 4
    assert p.predictive.shape == (5, sim["result"].wavelength.size)
    assert np.std(p.samples["rv"]) > 0


@needs_pyro
def test_widths_and_resolving_power_latent(sim):
    p = sample_posterior(sim["result"], "normal", tune_lines=("amplitude", "sigma", "gamma"), width_regularization=0.5,
                         tune_resolving_power=True, num_steps=15, num_samples=30, num_predictive=3, progress=False)
    t = p.lines
    for col in ("sigma_median", "sigma_p16", "sigma_p84", "gamma_median"):
        assert t[col].unit == u.AA and np.all(np.isfinite(t[col].value))
    assert p.samples["ln_sigma"].shape == (30, len(t))
    assert np.std(p.samples["resolving_power"]) > 0
    assert p.settings["tuned"] == "amplitude,sigma,gamma,rv,vsini,resolving_power,continuum"


@needs_pyro
def test_amplitude_warp_is_a_smooth_bijection():
    x0 = torch.tensor([0.0, -3.0, 1.0], dtype=torch.float64)
    s = torch.tensor([0.1, 5.0, 14.0], dtype=torch.float64)
    warp = bayes.AmplitudeWarp(x0, s)
    x = torch.tensor([0.3, -5.0, 2.5], dtype=torch.float64, requires_grad=True)
    uu = warp(x)
    torch.testing.assert_close(warp.inv(uu), x)
    # log |du/dx| against autograd, on both branches
    for i in range(3):
        (g,) = torch.autograd.grad(uu[i], x, retain_graph=True)
        assert float(torch.log(g[i])) == pytest.approx(float(warp.log_abs_det_jacobian(x, uu)[i]), rel=1e-12)
    # continuous with its first derivative at u = 0; linear in a = exp(x) above the fit
    for eps in (1e-7, -1e-7):
        assert float(warp.inv(torch.full((3,), eps, dtype=torch.float64))[0]) == pytest.approx(0.1 * eps, rel=1e-6)
    up = warp.inv(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(torch.exp(up - x0), 1.0 + s)


# ---------------------------------------------------------------------- real data


@pytest.mark.slow
@needs_pyro
def test_wasp69_posterior(blase03_clone_path):
    """SVI end to end on the real WASP 69 HPF order (amplitudes, RV, v sin i, continuum latent)."""
    from blase_specutils import read_spectrum

    data = read_spectrum(_need(SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"))
    r = fit_spectrum(data, load_blase03(blase03_clone_path), rv_range=60, progress=False)
    p = sample_posterior(r, "normal", num_steps=600, progress=False)
    rv = p.measurement("rv")
    assert -10.5 < rv.value.to_value(u.km / u.s) < -8.5
    assert 0 < rv.error.to_value(u.km / u.s) < 0.2
    assert type(p.model_band().median) is type(data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_pyro
def test_posterior_on_gpu(sim):
    r = copy.copy(sim["result"])
    r.model = copy.deepcopy(r.model).to("cuda")
    p = sample_posterior(r, "normal", num_steps=50, num_samples=50, progress=False)
    assert p.settings["device"].startswith("cuda")
    assert np.isfinite(p.samples["ln_amplitude"]).all()


# ---------------------------------------------------------------------- telluric powers


@pytest.fixture(scope="module")
def water_posterior(telfit_window_clone, hr4829_water_window):
    """A telluric-only fit of real HR 4829 water lines (X tuned) and its posterior, the data
    uncertainties inflated by √χ²_red as the σ from the curvature of χ² are."""
    if bayes is None:
        pytest.skip("needs the [pyro] extra")
    fit = fit_spectrum(hr4829_water_window, telluric=telfit_window_clone, template_epochs=20, line_epochs=0,
                       progress=False)
    post = sample_posterior(fit, "normal", num_steps=200, num_samples=400, num_predictive=20, noise_scale="chi2",
                            progress=False, seed=1)
    return fit, post


@needs_pyro
def test_telluric_only_fit_gives_the_power_posterior(water_posterior, tmp_path):
    """The latents of a telluric-only fit are ln X and the continuum; X's posterior sits at the fit
    with a width like the σ from the curvature of χ²; RV, v sin i and lines answer None."""
    fit, p = water_posterior
    assert fit.model.stellar is None and fit.model.log_telluric_power.requires_grad
    assert not p.has_stellar and p.has_telluric and p.telluric_names == ()
    assert p.settings["tuned"] == "telluric_power,continuum" and p.settings["telluric_power_scale"] == 1.0
    assert "rv" not in p.samples and p.samples["ln_telluric_power"].shape == (400,)
    m = p.measurement("telluric_power")
    assert m.unit == u.dimensionless_unscaled and p.telluric_power == m
    x_fit, sigma_curv = fit.telluric_power, fit.uncertainties["telluric_power"]
    width = m.error.value
    print(f"X posterior {m} (σ {width:.2g}) vs fit {x_fit:.4f} ± {sigma_curv:.2g} (curvature of χ²)")
    assert np.isfinite(width) and width > 0
    assert abs(m.value.value - x_fit) < 3 * width
    assert sigma_curv / 3 < width < 3 * sigma_curv
    assert p.rv is None and p.vsini is None and p.rv_err is None and p.vsini_err is None and p.lines is None
    with pytest.raises(ValueError, match="telluric-only fit.*no rv"):
        p.measurement("rv")
    with pytest.raises(ValueError, match="one telluric power"):
        p.measurement("telluric_power:H2O")
    assert set(p.measurements) == {"resolving_power", "telluric_power"}
    s = p.summary()
    assert s["rv"] is None and s["n_lines"] == 0
    assert s["telluric_power"]["p16"] < s["telluric_power"]["median"] < s["telluric_power"]["p84"]
    assert "telluric-only" in repr(p) and "X=" in repr(p)
    assert p.model_band().median.flux.size == fit.wavelength.size
    back = PosteriorFit.load(p.save(tmp_path / "water.fits"))
    assert not back.has_stellar and back.lines is None and back.rv is None
    np.testing.assert_array_equal(back.samples["ln_telluric_power"], p.samples["ln_telluric_power"])
    assert back.measurement("telluric_power") == m
    assert back.settings["tuned"] == p.settings["tuned"] and back.settings["telluric_power_scale"] == 1.0
    with pytest.raises(ValueError, match="telluric_power_scale must be > 0"):
        PosteriorSettings(telluric_power_scale=0.0)


def _psg_pair(band, powers, snr=200.0, seed=2):
    """Cheap log-mode clones (30 epochs) of the PSG H2O and CO2 columns over ``band``, and data made
    from the PSG columns themselves: Π_k T_k^{X_k} convolved with a Gaussian LSF of R = 45,000 on a
    0.5 km/s log grid (numpy), sampled at λ/Δλ = 90,000 with Gaussian noise."""
    from blase_specutils import clone_spectrum, load_template

    c, dv = 299792.458, 0.5
    templates = {mol: load_template("psg-igrins", molecule=mol) for mol in powers}
    clones = {mol: clone_spectrum(t, band=band * u.AA, buffer=5 * u.AA, flatten=False, mode="log", epochs=30,
                                  progress=False) for mol, t in templates.items()}
    lo, hi = band[0] + 2.0, band[1] - 2.0
    grid = np.exp(np.arange(np.log(lo - 3.0), np.log(hi + 3.0), dv / c))
    log_t = sum(x * np.log(np.clip(np.interp(grid, templates[mol].spectral_axis.to_value(u.AA),
                                             templates[mol].flux.value), 1e-300, None))
                for mol, x in powers.items())
    width = c / 45000.0 / (2.0 * np.sqrt(2.0 * np.log(2.0))) / dv
    kernel = np.exp(-0.5 * (np.arange(-40, 41) / width) ** 2)
    observed = np.convolve(np.exp(log_t), kernel / kernel.sum(), mode="same")
    pix = np.exp(np.arange(np.log(lo), np.log(hi), 1.0 / 90000.0))
    flux = np.interp(pix, grid, observed) + np.random.default_rng(seed).normal(0.0, 1.0 / snr, pix.size)
    data = Spectrum(spectral_axis=pix * u.AA, flux=flux * u.one,
                    uncertainty=StdDevUncertainty(np.full(pix.size, 1.0 / snr)))
    return clones, data


@needs_pyro
@pytest.mark.filterwarnings("ignore::blase_specutils.cloning.EdgeWingWarning")  # the band starts in a wing
def test_one_power_per_molecule(tmp_path):
    """Two named telluric clones: one posterior power per molecule, by name, each near its fitted
    value; the file keeps them and their names."""
    clones, data = _psg_pair((16000.0, 16030.0), {"H2O": 0.6, "CO2": 1.4})
    fit = fit_spectrum(data, telluric=clones, resolving_power=45000, tune_telluric=(), line_epochs=0,
                       template_epochs=100, progress=False)
    p = sample_posterior(fit, "normal", num_steps=150, num_samples=300, num_predictive=10, noise_scale="chi2",
                         progress=False, seed=2)
    assert p.telluric_names == ("H2O", "CO2") and p.samples["ln_telluric_power"].shape == (300, 2)
    powers = p.telluric_power
    assert set(powers) == {"H2O", "CO2"}
    for mol in ("H2O", "CO2"):
        m = p.measurement(f"telluric_power:{mol}")
        assert powers[mol] == m and m.unit == u.dimensionless_unscaled
        x_fit, sigma_curv = fit.telluric_power[mol], fit.uncertainties[f"telluric_power_{mol}"]
        print(f"X({mol}) posterior {m} (σ {m.error.value:.2g}) vs fit {x_fit:.4f} ± {sigma_curv:.2g}")
        assert 0 < m.error.value and abs(m.value.value - x_fit) < 3 * m.error.value
        assert sigma_curv / 3 < m.error.value < 3 * sigma_curv
    with pytest.raises(ValueError, match=r"one power per telluric component \['H2O', 'CO2'\]"):
        p.measurement("telluric_power")
    assert set(p.measurements) == {"resolving_power", "telluric_power:H2O", "telluric_power:CO2"}
    assert "X(H2O)=" in repr(p) and "X(CO2)=" in repr(p) and "telluric_power:CO2" in p.summary()
    back = PosteriorFit.load(p.save(tmp_path / "molecules.fits"))
    assert back.telluric_names == ("H2O", "CO2")
    np.testing.assert_array_equal(back.samples["ln_telluric_power"], p.samples["ln_telluric_power"])
    assert back.telluric_power == powers


@needs_pyro
def test_posterior_files_of_version_1_still_load(sim, posterior, tmp_path):
    """A file of the first layout (no telluric keys, FMTVER 1) reads back; a stellar-only posterior
    has no telluric power, and cannot be asked for one."""
    from astropy.io import fits

    assert posterior.telluric_power is None and not posterior.has_telluric and posterior.has_stellar
    with pytest.raises(ValueError, match="no telluric clone"):
        posterior.measurement("telluric_power")
    with pytest.raises(ValueError, match="needs a fit with a telluric clone"):
        PosteriorSettings(tune_telluric_power=True).for_result(sim["result"])
    path = posterior.save(tmp_path / "new.fits")
    with fits.open(path) as hdul:
        hdr = hdul[0].header
        hdr["FMTVER"] = 1
        for key in ("STELLAR", "XSCALE"):
            del hdr[key]
        hdul.writeto(tmp_path / "v1.fits")
    back = PosteriorFit.load(tmp_path / "v1.fits")
    assert back.has_stellar and back.telluric_power is None and "telluric_power_scale" not in back.settings
    assert back.measurement("rv") == posterior.measurement("rv")
    np.testing.assert_allclose(back.lines["amplitude_p84"].value, posterior.lines["amplitude_p84"].value)
