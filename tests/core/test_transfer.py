"""Transfer learning on simulated HPF-like data made from the paper's own clone."""

import numpy as np
import pytest
import torch

from blase_specutils.core import LineCloneModel
from blase_specutils.core.transfer import TransferModel, fit_transfer, transfer_loss

F64 = torch.float64


@pytest.fixture(scope="module")
def region_clone(blase03_clone_path):
    sd = torch.load(blase03_clone_path, map_location="cpu", weights_only=True)
    full = LineCloneModel(*[sd[k] for k in ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")])
    return full.subset((full.lam_centers > 8700.0) & (full.lam_centers < 8740.0))


def _simulate(clone, perturb, rv, vsini, snr, seed):
    """HPF-like pixels (≈0.064 Å) over 8705-8735 Å from a perturbed clone, warped and convolved."""
    truth = clone.subset(torch.arange(clone.n_lines))
    with torch.no_grad():
        truth.log_amplitudes += torch.as_tensor(perturb)
    wl = np.arange(8705.0, 8735.0, 0.064)
    sim = TransferModel(truth, wl, rv=rv, vsini=vsini, resolving_power=55000.0, continuum_degree=1)
    with torch.no_grad():
        sim.continuum_coeffs[0, 1] = 0.01  # a slight tilt of the continuum
        flux = sim()
    gen = np.random.default_rng(seed)
    sigma = np.full(wl.size, 1.0 / snr)
    data = flux.numpy() + gen.normal(0.0, sigma)
    return wl, torch.as_tensor(data), torch.as_tensor(1.0 / sigma**2)


def test_template_matching_recovers_rv_and_vsini(region_clone):
    wl, data, w = _simulate(region_clone, np.zeros(region_clone.n_lines), rv=-9.5, vsini=3.0, snr=300, seed=1)
    model = TransferModel(region_clone.subset(torch.arange(region_clone.n_lines)), wl, vsini=6.0, continuum_degree=1)
    fit = fit_transfer(model, data, w, rv_scan=np.arange(-40.0, 40.1, 1.0), template_epochs=150, line_epochs=0,
                       progress=False)
    assert abs(float(model.rv) + 9.5) < 0.05
    assert abs(float(model.vsini) - 3.0) < 0.3
    assert fit.chi2["template"] / data.numel() < 1.3  # the right template: χ²_red ≈ 1


def test_line_stage_recovers_injected_amplitudes(region_clone):
    gen = np.random.default_rng(5)
    perturb = np.log1p(gen.uniform(-0.3, 0.3, region_clone.n_lines))
    wl, data, w = _simulate(region_clone, perturb, rv=4.0, vsini=2.5, snr=400, seed=2)
    model = TransferModel(region_clone.subset(torch.arange(region_clone.n_lines)), wl, rv=0.0, vsini=4.0,
                          continuum_degree=1)
    fit = fit_transfer(model, data, w, rv_scan=np.arange(-20.0, 20.1, 1.0), template_epochs=100, line_epochs=400,
                       lr=0.02, progress=False)
    n = data.numel()
    assert fit.chi2["lines"] < 0.5 * fit.chi2["template"]
    assert fit.chi2["lines"] / n < 2.0
    # deep lines: the recovered ln a is closer to the truth than the clone was
    with torch.no_grad():
        deep = (region_clone.log_amplitudes.exp() > 0.02).numpy()
        inside = ((region_clone.lam_centers > 8707) & (region_clone.lam_centers < 8733)).numpy()
        sel = deep & inside
        err_fit = (model.stellar.log_amplitudes - region_clone.log_amplitudes).numpy() - perturb
    assert sel.sum() >= 5
    rms_fit = np.sqrt(np.mean(err_fit[sel] ** 2))
    rms_clone = np.sqrt(np.mean(perturb[sel] ** 2))
    assert rms_fit < 0.5 * rms_clone
    assert abs(float(model.rv) - 4.0) < 0.1


def test_regularisation_pulls_towards_the_clone(region_clone):
    model = TransferModel(region_clone.subset(torch.arange(region_clone.n_lines)), np.arange(8705.0, 8735.0, 0.064))
    prior = model.stellar.log_amplitudes.detach().clone()
    model.stellar.set_tuned(["amplitude"])
    with torch.no_grad():
        model.stellar.log_amplitudes += 0.5
    data = torch.ones(model.lam_d.numel(), dtype=F64)
    w = torch.zeros_like(data)  # no data weight: only the prior acts
    loss = transfer_loss(model, data, w, log_amp_prior=prior, regularization=5.0)
    assert float(loss) == pytest.approx(0.5 * model.stellar.n_lines / 5.0, rel=1e-12)
    loss.backward()
    assert torch.allclose(model.stellar.log_amplitudes.grad, torch.full_like(prior, 1 / 5.0))


def test_bad_inputs(region_clone):
    with pytest.raises(ValueError, match="strictly increasing"):
        TransferModel(region_clone, np.array([8710.0, 8709.0, 8711.0]))
    with pytest.raises(ValueError, match="outside"):
        # data far outside the model grid built from them is impossible; pixels must map inside it
        from blase_specutils.core.extrinsic import resample_to_pixels

        resample_to_pixels(torch.linspace(8700, 8710, 100, dtype=F64), torch.ones(100, dtype=F64),
                           torch.tensor([8709.0, 8711.0], dtype=F64), torch.tensor([8710.0, 8712.0], dtype=F64))


# ---------------------------------------------------------------- tellurics
def _copy(clone):
    return clone.subset(torch.arange(clone.n_lines))


def test_telluric_power_is_beers_law(region_clone):
    """T^X from the clone's log flux: X = 1 is the clone bit for bit, X = 2 its square; saturated
    lines stay finite with finite gradients."""
    wl = np.arange(8705.0, 8735.0, 0.064)
    tel = _copy(region_clone)
    model = TransferModel(None, wl, telluric=tel, continuum_degree=0)
    assert model.log_telluric_power.requires_grad and not model.rv.requires_grad
    assert not model.rot.log_vsini.requires_grad and model.extrinsic() is None
    with torch.no_grad():
        t1 = model.joint()
        assert torch.equal(t1, tel(model.lam_z))
        model.log_telluric_power.fill_(np.log(2.0))
        torch.testing.assert_close(model.joint(), t1**2, rtol=1e-12, atol=0)
    # saturate: every line 1000x deeper, so the transmission reaches the 1e-12 floor of each line
    with torch.no_grad():
        tel.log_amplitudes += np.log(1000.0)
    out = model()
    assert torch.isfinite(out).all() and float(model.joint().min()) < 1e-12
    out.sum().backward()
    assert torch.isfinite(model.log_telluric_power.grad)
    with pytest.raises(ValueError, match="no RV to scan"):
        model.scan_rv(out.detach(), torch.ones_like(out), [0.0])
    with pytest.raises(ValueError, match="telluric_power"):
        TransferModel(None, wl, telluric=tel, telluric_power=0.0)


def test_stellar_model_without_telluric_is_unchanged(region_clone):
    """No telluric clone: the power parameter exists, is frozen and changes nothing."""
    wl = np.arange(8705.0, 8735.0, 0.064)
    model = TransferModel(_copy(region_clone), wl, rv=3.0)
    assert not model.log_telluric_power.requires_grad and model.telluric_transmission() is None
    with torch.no_grad():
        ref = model.resampler(model.inst(model.rot(model.stellar(model.lam_z, model.rv)))) * model.continuum()
        assert torch.equal(model(), ref)


def test_telluric_line_pull_and_stage_control(region_clone):
    """The telluric lines get their own L1 pull; fit_transfer tunes X in both stages and the telluric
    lines only when asked, never shifts them by the RV, and restores the frozen/tuned state."""
    wl = np.arange(8705.0, 8735.0, 0.064)
    model = TransferModel(None, wl, telluric=_copy(region_clone), continuum_degree=0)
    tel = model.telluric
    prior = tel.log_amplitudes.detach().clone()
    tel.set_tuned(["amplitude"])
    with torch.no_grad():
        tel.log_amplitudes += 0.5
    data = torch.ones(model.lam_d.numel(), dtype=F64)
    w = torch.zeros_like(data)
    loss = transfer_loss(model, data, w, telluric_log_amp_prior=prior, telluric_regularization=4.0)
    assert float(loss) == pytest.approx(0.5 * tel.n_lines / 4.0, rel=1e-12)
    assert float(transfer_loss(model, data, w, telluric_log_amp_prior=prior, telluric_regularization=None)) == 0.0
    # simulate X = 1.5 and fit
    with torch.no_grad():
        tel.log_amplitudes.copy_(prior)
        model.log_telluric_power.fill_(np.log(1.5))
        sim = model().clone()
        model.log_telluric_power.fill_(0.0)
    tel.set_tuned(())
    centers = tel.lam_centers.detach().clone()
    fit = fit_transfer(model, sim, torch.full_like(sim, 1e4), template_epochs=80, line_epochs=20,
                       tune_telluric=("amplitude",), telluric_power_scan=[0.5, 1.0, 1.5, 2.0], progress=False)
    assert fit.telluric_power_scan[0][np.argmin(fit.telluric_power_scan[1])] == 1.5
    assert float(model.telluric_power) == pytest.approx(1.5, rel=0.01)
    assert tel.tuned == () and model.log_telluric_power.requires_grad
    assert torch.equal(tel.lam_centers, centers) and float(model.rv) == 0.0
    assert "lines" in fit.stages and fit.chi2["template"] < 1e-2 * fit.chi2["start"] + 1e-6


@pytest.mark.skipif(not __import__("blase_specutils.core.cpu_kernel", fromlist=["x"]).HAVE_NUMBA,
                    reason="plans on CPUs use the compiled numba kernel")
def test_fit_transfer_through_plans_gives_the_same_fit(region_clone):
    """Both stages trained through window plans of a stellar clone (two of its lines with the wing
    correction) and a telluric one: the same losses, χ² and parameters as without plans."""
    gen = np.random.default_rng(7)
    perturb = np.log1p(gen.uniform(-0.2, 0.2, region_clone.n_lines))
    wl, data, w = _simulate(region_clone, perturb, rv=3.0, vsini=2.5, snr=300, seed=3)
    results = []
    for plan in (False, True):
        st = region_clone.subset(torch.arange(region_clone.n_lines))
        st = LineCloneModel(st.lam_centers.detach(), st.log_amplitudes.detach(), st.log_sigmas.detach(),
                            st.log_gammas.detach(), broad_lines=[3, 20])
        tel = _copy(region_clone)
        with torch.no_grad():
            tel.log_amplitudes -= 3.0  # weak "telluric" lines
        model = TransferModel(st, wl, telluric=tel, rv=0.0, vsini=4.0, continuum_degree=1)
        fit = fit_transfer(model, data, w, rv_scan=np.arange(-10.0, 10.1, 1.0), template_epochs=15, line_epochs=15,
                           tune_lines=("amplitude", "sigma", "wing"), tune_telluric=("amplitude",), progress=False,
                           plan=plan)
        assert getattr(model, "_plans", {}) == {}  # cleared after the fit
        results.append((fit, [p.detach().clone() for p in model.parameters()]))
    (f0, p0), (f1, p1) = results
    assert f1.chi2["lines"] < 0.5 * f1.chi2["start"]
    for stage in ("template", "lines"):
        np.testing.assert_allclose(f1.stages[stage].loss, f0.stages[stage].loss, rtol=1e-10)
        assert f1.chi2[stage] == pytest.approx(f0.chi2[stage], rel=1e-10)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="plan must be"):
        fit_transfer(model, data, w, template_epochs=1, line_epochs=0, progress=False, plan="always")


TRANSFER_SYNC_FREE = """
import collections, json, sys
import numpy as np
import torch
from blase_specutils.core import EngineOptions, LineCloneModel
from blase_specutils.core.transfer import TransferModel, transfer_loss
from torch.profiler import ProfilerActivity, profile
gpu_path = EngineOptions(compiled_cpu=False)  # the GPU code paths of the far field and the convolutions
d = np.load(sys.argv[1])
lines = [torch.as_tensor(d[k]) for k in ("c", "a", "s", "g")]
stellar = LineCloneModel(*lines, broad_lines=[2], tune=("amplitude", "wing"), engine=gpu_path)
telluric = LineCloneModel(lines[0] + 0.3, lines[1] - 2.0, lines[2], lines[3], tune=("amplitude",), engine=gpu_path)
model = TransferModel(stellar, d["wl"], telluric=telluric, rv=5.0, vsini=4.0, continuum_degree=1)
model.rot.log_vsini.requires_grad_(True)
model.inst.log_resolving_power.requires_grad_(True)
with torch.no_grad():
    data = model() * 1.01
weight = torch.full_like(data, 1e4)
prior = stellar.log_amplitudes.detach().clone()
plans = model.make_plans(kernel="triton")
loss = lambda: transfer_loss(model, data, weight, log_amp_prior=prior)  # noqa: E731
loss().backward()  # a first epoch compiles kernels and caches constants (GraphedEpoch's warm-up)
for p in plans:
    p.frozen = True
with profile(activities=[ProfilerActivity.CPU]) as prof:
    loss().backward()
    for p in plans:
        p.update()
names = collections.Counter(e.name for e in prof.events())
syncs = {k: v for k, v in names.items() if any(s in k for s in ("local_scalar_dense", "nonzero", "aten::item",
                                                                  "is_nonzero", "unique", "lift_fresh"))}
print(json.dumps(dict(syncs=syncs, stale=any(p.stale for p in plans), convs=names.get("aten::_fft_r2c", 0)
                      + names.get("aten::convolution", 0))))
"""


@pytest.mark.skipif(not __import__("blase_specutils.core.cpu_kernel", fromlist=["x"]).HAVE_NUMBA,
                    reason="plans on CPUs use the compiled numba kernel")
def test_transfer_epoch_on_the_gpu_code_path_never_synchronises(region_clone, tmp_path):
    """A whole transfer-learning epoch (stellar clone with a wing-corrected line and its plan, telluric
    clone, rotation, instrument, resampling, continuum, L1 pull; forward, backward and the plans'
    update) on the GPU code path, on the CPU: nothing is read back from the device and no tensor is
    made from host memory, so that train() can record it as a CUDA graph."""
    pytest.importorskip("triton", reason="the GPU kernel needs triton")
    import json
    import os
    import subprocess
    import sys

    c = region_clone.lam_centers.detach()
    keep = (c > 8712) & (c < 8722)
    path = tmp_path / "lines.npz"
    np.savez(path, wl=np.arange(8714.0, 8720.0, 0.064), c=c[keep].numpy(),
             **{k: getattr(region_clone, n).detach()[keep].numpy()
                for k, n in (("a", "log_amplitudes"), ("s", "log_sigmas"), ("g", "log_gammas"))})
    out = subprocess.run([sys.executable, "-c", TRANSFER_SYNC_FREE, str(path)], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["syncs"] == {} and not res["stale"]
    assert res["convs"] >= 2  # both broadening kernels were applied


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_transfer_through_graphed_plans_gives_the_same_fit(region_clone):
    """Both stages replayed as CUDA graphs (plan=True) against the plain epochs on the same GPU."""
    gen = np.random.default_rng(7)
    perturb = np.log1p(gen.uniform(-0.2, 0.2, region_clone.n_lines))
    wl, data, w = _simulate(region_clone, perturb, rv=3.0, vsini=2.5, snr=300, seed=3)
    results = []
    for plan in (False, True):
        st = _copy(region_clone)
        st = LineCloneModel(st.lam_centers.detach(), st.log_amplitudes.detach(), st.log_sigmas.detach(),
                            st.log_gammas.detach(), broad_lines=[3, 20], device="cuda")
        model = TransferModel(st, wl, rv=0.0, vsini=4.0, continuum_degree=1)
        fit = fit_transfer(model, data.cuda(), w.cuda(), rv_scan=np.arange(-10.0, 10.1, 1.0), template_epochs=15,
                           line_epochs=15, tune_lines=("amplitude", "sigma", "wing"), progress=False, plan=plan)
        results.append((fit, [p.detach().cpu() for p in model.parameters()]))
    (f0, p0), (f1, p1) = results
    for stage in ("template", "lines"):
        np.testing.assert_allclose(f1.stages[stage].loss, f0.stages[stage].loss, rtol=1e-9)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
