"""Every backend that runs on a CPU against the untruncated dense sum, values and gradients.

Each test passes the backend as a value (``EngineOptions(backend=...)`` or a backend object):
nothing here assigns a module attribute.
"""

import pytest
import torch

from blase_specutils.core import EngineOptions, LineCloneModel
from blase_specutils.core.backends import (BACKEND_CLASSES, Backend, LineSet, Windows, get_backend,
                                           select_backend)
from blase_specutils.core.cpu_kernel import HAVE_NUMBA
from blase_specutils.core.engine import window_half_widths
from blase_specutils.core.profiles import pseudo_voigt, voigt

F64 = torch.float64
GRID = torch.arange(5000.0, 5020.0, 0.01, dtype=F64)
#: The backends a CPU runs in this process (Triton's, interpreted, are in test_gpu_kernel.py).
CPU_BACKENDS = ["autograd", "torch"] + (["numba"] if HAVE_NUMBA else [])


def _model(**kw) -> LineCloneModel:
    gen = torch.Generator().manual_seed(11)
    n = 40
    c = 4999 + 22 * torch.rand(n, generator=gen, dtype=F64)  # some lines beyond the grid's ends
    a = torch.log(10 ** (-3 + 1.5 * torch.rand(n, generator=gen, dtype=F64)))
    s = torch.log(0.02 + 0.05 * torch.rand(n, generator=gen, dtype=F64))
    g = torch.log(0.01 + 0.05 * torch.rand(n, generator=gen, dtype=F64))
    g[7] = torch.log(torch.tensor(4.0, dtype=F64))  # one line broader than the far field's first level
    return LineCloneModel(c, a, s, g, tune=("center", "amplitude", "sigma", "gamma"), wing_tolerance=1e-9, **kw)


def _value_and_grads(model: LineCloneModel, dense: bool, grid: torch.Tensor = GRID) -> list[torch.Tensor]:
    weights = torch.linspace(-1.0, 1.0, grid.numel(), dtype=F64, device=grid.device)
    model.zero_grad()
    y = model.log_flux(grid, 20.0, dense=dense)
    (weights * y).sum().backward()
    return [y.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("profile", ["pseudo-voigt", "voigt"])
@pytest.mark.parametrize("mode, emission", [("linear", False), ("log", False), ("linear", True)])
@pytest.mark.parametrize("far_field", [True, False])
def test_every_cpu_backend_matches_the_dense_sum(backend, profile, mode, emission, far_field):
    """Values within 1e-5 of every line at every pixel, and the gradients of a weighted sum of them
    (λc, ln a, ln σ, ln γ; the largest about 0.1) within 1e-5 too."""
    engine = EngineOptions(backend=backend)
    model = _model(profile=profile, mode=mode, emission=emission, far_field=far_field, engine=engine)
    assert model.backend.name == backend and isinstance(model.backend, Backend)
    got, ref = _value_and_grads(model, False), _value_and_grads(model, True)
    assert float((got[0] - ref[0]).abs().max()) < 1e-5
    assert len(got) == len(ref) == 5
    for g, r in zip(got[1:], ref[1:]):
        assert float((g - r).abs().max()) < 1e-5


@pytest.mark.parametrize("name", CPU_BACKENDS + ["dense"])
def test_add_lines_of_each_backend_against_the_dense_backend(name):
    """The protocol itself: ``add_lines`` of a backend with windows out to 1e-9 adds the lines it
    takes onto ``out``, as the dense backend does, in values and in gradients."""
    model = _model()
    params = [t.detach().clone().requires_grad_() for t in (model.lam_centers, model.log_amplitudes.exp(),
                                                             model.log_sigmas.exp(), model.log_gammas.exp())]
    lines = LineSet(*params, profile=pseudo_voigt)
    with torch.no_grad():
        hw = window_half_widths(*params[1:], 1e-9)
        lo = torch.searchsorted(GRID, params[0] - hw)
        hi = torch.searchsorted(GRID, params[0] + hw, right=True)
    take = torch.arange(params[0].numel()) % 3 != 0
    windows = Windows(lo, hi, hi - lo, take)
    base = torch.full_like(GRID, 0.5)
    results = {}
    for backend in (get_backend(name), get_backend("dense")):
        for p in params:
            p.grad = None
        out = backend.add_lines(base, GRID, lines, windows, mode="linear", sign=1.0, near=None,
                                engine=EngineOptions())
        out.square().sum().backward()
        results[backend.name] = [out.detach()] + [p.grad.clone() for p in params]
    got, ref = results[name], results["dense"]
    assert float((got[0] - ref[0]).abs().max()) < 1e-7
    for g, r in zip(got[1:], ref[1:]):
        assert float((g - r).abs().max()) <= 1e-6 * float(r.abs().max())


def test_the_rule_picks_once_per_model():
    """``"auto"`` is numba on a CPU where it is installed; a model keeps the backend it picked until
    it moves or gets other options; a named backend that has no kernels for the device falls back
    to torch, except Triton, which says so."""
    auto = select_backend(EngineOptions(), "cpu", F64, 100, 1000)
    assert auto.name == ("numba" if HAVE_NUMBA else "torch")
    assert select_backend(EngineOptions(), "cpu", torch.float32, 10, 10**7).name == auto.name  # size and dtype
    model = _model()
    assert model.backend is model.backend is auto
    assert model.engine_info()["backend"] == auto.name
    assert _model(engine=EngineOptions(backend="autograd")).backend.name == "autograd"
    with pytest.raises(ValueError, match="triton"):
        select_backend(EngineOptions(backend="triton"), "cpu")
    assert set(BACKEND_CLASSES) == {"dense", "autograd", "torch", "numba", "triton"}
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("cuda")


def test_a_profile_without_a_kernel_goes_through_autograd():
    """The torch backend has no exact-Voigt kernel: those lines are summed by the autograd backend,
    bit for bit what ``fused=False`` gives."""
    from blase_specutils.core.engine import windowed_log_flux

    model = _model(profile="voigt")
    args = (GRID, model.lam_centers, model.log_amplitudes.exp(), model.log_sigmas.exp(), model.log_gammas.exp())
    with torch.no_grad():
        on_torch = windowed_log_flux(*args, profile=voigt, tolerance=1e-8, backend="torch")
        plain = windowed_log_flux(*args, profile=voigt, tolerance=1e-8, fused=False)
    torch.testing.assert_close(on_torch, plain, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["autograd", "torch", "triton"])
@pytest.mark.parametrize("profile", ["pseudo-voigt", "voigt"])
def test_every_cuda_backend_matches_the_dense_sum(backend, profile):
    """The CUDA backends against the dense sum on the GPU, values and gradients within 1e-5."""
    if backend == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs triton")
    model = _model(profile=profile, engine=EngineOptions(backend=backend)).to("cuda")
    assert model.backend.name == backend
    grid = GRID.cuda()
    got, ref = _value_and_grads(model, False, grid), _value_and_grads(model, True, grid)
    for g, r in zip(got, ref):
        assert float((g - r).abs().max()) < 1e-5
