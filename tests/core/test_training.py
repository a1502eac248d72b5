import subprocess
import sys

import pytest
import torch

from blase_specutils.core.clone import LineCloneModel
from blase_specutils.core.options import EngineOptions
from blase_specutils.core.training import NonFiniteLossWarning, resolve_device, train

F64 = torch.float64
GRID = torch.arange(5000.0, 5010.0, 0.01, dtype=F64)


def _model(**kw):
    return LineCloneModel([5003.0, 5006.0], torch.log(torch.tensor([0.02, 0.01])), torch.log(torch.tensor([0.04, 0.04])),
                          torch.log(torch.tensor([0.03, 0.03])), **kw)


def _target():
    m = LineCloneModel([5003.0, 5006.0], torch.log(torch.tensor([0.03, 0.008])), torch.log(torch.tensor([0.05, 0.03])),
                       torch.log(torch.tensor([0.02, 0.04])))
    with torch.no_grad():
        return m(GRID)


def test_training_reduces_loss_and_is_reproducible():
    target = _target()
    runs = []
    for _ in range(2):
        m = _model()
        h = train(m, lambda: ((m(GRID) - target) ** 2).sum(), epochs=200, lr=0.05, progress=False, patience=None)
        runs.append((h, m.log_amplitudes.detach().clone()))
    assert runs[0][0].best_loss < 0.01 * runs[0][0].loss[0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0].loss == runs[1][0].loss


def test_early_stopping_on_plateau():
    m = _model()
    h = train(m, lambda: (m.log_amplitudes * 0).sum() + 1.0, epochs=500, patience=20, progress=False)
    assert h.stop_reason == "plateau"
    assert h.epochs_run <= 25


def test_nan_guard_restores_best_parameters_and_warns():
    m = _model()
    target = _target()
    state = {}

    def loss_fn():
        loss = ((m(GRID) - target) ** 2).sum()
        state["n"] = state.get("n", 0) + 1
        if state["n"] == 30:
            return loss * float("nan")
        return loss

    with pytest.warns(NonFiniteLossWarning, match="restored the best parameters"):
        h = train(m, loss_fn, epochs=100, progress=False)
    assert h.stop_reason == "non-finite"
    assert all(torch.isfinite(p).all() for p in m.parameters())
    with torch.no_grad():
        final = float(((m(GRID) - target) ** 2).sum())
    assert final == pytest.approx(h.best_loss, rel=1e-12)
    assert h.best_loss == min(h.loss)


def test_bad_arguments():
    m = _model()
    with pytest.raises(ValueError, match="lr"):
        train(m, lambda: m.log_amplitudes.sum(), lr=0.0, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(m, lambda: m.log_amplitudes.sum(), epochs=-1, progress=False)
    with pytest.raises(TypeError, match="epochs must be an integer"):  # not truncated to 2
        train(m, lambda: m.log_amplitudes.sum(), epochs=2.5, progress=False)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        train(m, lambda: m.log_amplitudes.sum(), patience=0, progress=False)
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        train(m, lambda: m.log_amplitudes.sum(), lr=float("inf"), progress=False)
    with pytest.raises(ValueError, match="mode"):
        LineCloneModel([1.0], [0.0], [0.0], [0.0], mode="cubic")
    with pytest.raises(ValueError, match="unknown tunable"):
        LineCloneModel([1.0], [0.0], [0.0], [0.0], tune=("depth",))
    with pytest.raises(ValueError, match="one length"):
        LineCloneModel([1.0, 2.0], [0.0], [0.0], [0.0])


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("quantum")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_which_parameters_are_tuned():
    m = _model()
    assert m.tuned == ("amplitude", "sigma", "gamma")
    before = m.lam_centers.detach().clone()
    target = _target()
    train(m, lambda: ((m(GRID) - target) ** 2).sum(), epochs=20, progress=False)
    assert torch.equal(m.lam_centers.detach(), before)  # λc fixed by default
    m.set_tuned(["center"])
    with torch.no_grad():
        shifted = m(GRID + 0.02)  # the same lines 0.02 Å bluer
    h = train(m, lambda: ((m(GRID) - shifted) ** 2).sum(), epochs=100, lr=0.002, progress=False)
    assert h.best_loss < 0.1 * h.loss[0]
    assert torch.allclose(m.lam_centers.detach(), before - 0.02, atol=0.005)


def test_core_imports_without_astropy_specutils_pyro_gpytorch():
    code = (
        "import sys\n"
        "for name in ['astropy', 'specutils', 'muler', 'pyro', 'gpytorch']:\n"
        "    sys.modules[name] = None\n"
        "import blase_specutils.core as c\n"
        "import torch\n"
        "m = c.LineCloneModel([5000.0], [-3.0], [-3.0], [-3.0])\n"
        "print(float(m(torch.linspace(4999, 5001, 11, dtype=torch.float64)).min()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_cuda_matches_cpu(kernel):
    if kernel == "triton":
        pytest.importorskip("triton", reason="the Triton kernel needs triton (pip install '.[gpu]')")
    with torch.no_grad():
        cpu = _model()(GRID)  # the default (numba) backend
        gpu = _model(engine=EngineOptions(backend=kernel)).to("cuda")(GRID.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-12)


def test_early_stopping_with_a_negative_loss():
    """Losses such as -2 ln p can be negative: the relative plateau test must still work."""
    m = _model()
    h = train(m, lambda: (m.log_amplitudes * 0).sum() - 100.0, epochs=500, patience=20, progress=False)
    assert h.stop_reason == "plateau" and h.epochs_run <= 25
    m = _model()
    target = _target()
    h = train(m, lambda: ((m(GRID) - target) ** 2).sum() - 1.0, epochs=60, patience=20, progress=False)
    assert h.stop_reason == "max_epochs"  # still improving: no early stop


def test_extra_module_is_tuned_and_restored():
    m = _model()
    extra = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        extra.weight.fill_(3.0)
    target = _target()
    h = train(m, lambda: ((m(GRID) - target) ** 2).sum() + (extra.weight - 1.0).pow(2).sum(), epochs=200, lr=0.05,
              progress=False, patience=None, extra=extra, lr_overrides={"lam_centers": 0.001})
    assert abs(float(extra.weight) - 1.0) < 0.1
    assert h.best_loss < 0.01 * h.loss[0]
    with pytest.raises(ValueError, match="unknown parameters"):
        train(m, lambda: m.log_amplitudes.sum(), epochs=1, progress=False, extra=extra, lr_overrides={"weight": 0.1})


def test_training_never_changes_the_callers_arrays():
    import numpy as np

    from blase_specutils.core import LineCloneModel

    centers = np.array([5000.0, 5001.0])
    ln_a = np.log([0.05, 0.02])
    ln_s = np.log([0.05, 0.05])
    ln_g = torch.log(torch.tensor([0.02, 0.02], dtype=torch.float64))
    kept = (centers.copy(), ln_a.copy(), ln_s.copy(), ln_g.clone())
    model = LineCloneModel(centers, ln_a, ln_s, ln_g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    np.testing.assert_array_equal(centers, kept[0])
    np.testing.assert_array_equal(ln_a, kept[1])
    np.testing.assert_array_equal(ln_s, kept[2])
    assert torch.equal(ln_g, kept[3])


def test_betas_reach_adam_and_a_shorter_memory_recovers_from_large_first_gradients():
    """The line stage starts where χ² is large: gradients 100 times larger in the first epochs than
    later. Adam's usual β2 = 0.999 remembers them and keeps later steps small; β2 = 0.99 (the line
    stage's) forgets them, so the parameter gets closer to its minimum in the same epochs."""

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros((), dtype=F64))

    distances = {}
    for beta2 in (0.999, 0.99):
        m, calls = One(), [0]

        def loss_fn(m=m, calls=calls):
            calls[0] += 1
            return (100.0 if calls[0] <= 20 else 1.0) * (m.p - 5.0) ** 2

        train(m, loss_fn, epochs=1000, lr=0.05, progress=False, patience=None, betas=(0.9, beta2))
        distances[beta2] = abs(float(m.p.detach()) - 5.0)
    assert distances[0.99] < 0.5 * distances[0.999]
