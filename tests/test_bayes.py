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


def test_telluric_only_fit_is_rejected_clearly(telfit_window_clone, hr4829_water_window):
    fit = fit_spectrum(hr4829_water_window, telluric=telfit_window_clone, template_epochs=20, line_epochs=0,
                       progress=False)
    with pytest.raises(ValueError, match="stellar clone"):
        sample_posterior(fit, num_steps=5, progress=False)
