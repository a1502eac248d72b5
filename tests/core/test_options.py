"""Engine options: one validated value, carried by each model and passed down to the kernels."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import blase_specutils.core.backends.numba_cpu as numba_backend_module
import blase_specutils.core.engine as engine_module
from blase_specutils.core import EngineOptions, LineCloneModel, TransferModel
from blase_specutils.core.cpu_kernel import HAVE_NUMBA
from blase_specutils.core.engine import dense_log_flux
from blase_specutils.core.gpu_kernel import HAVE_TRITON
from blase_specutils.core.profiles import pseudo_voigt

F64 = torch.float64
GRID = torch.arange(5000.0, 5020.0, 0.01, dtype=F64)
CORE = Path(engine_module.__file__).parent

#: The module-level switches that chose a code path or a kernel setting before EngineOptions.
REMOVED = ("KERNEL_ON_CUDA", "TRITON_SPREAD", "TRITON_FAR", "TRITON_WINDOWS", "TRITON_COEFFICIENTS", "TRITON_LINES",
           "OVERLAP_STREAMS", "PLANS_ON_CUDA", "FP_FUSION", "CHUNK", "NUM_WARPS", "CPU_BLOCK_ELEMENTS",
           "GPU_BLOCK_ELEMENTS", "_MASK_LEVELS", "_PAD_COMPILED_WINDOWS")


def _model(**kw) -> LineCloneModel:
    gen = torch.Generator().manual_seed(4)
    n = 30
    c = 5001 + 18 * torch.rand(n, generator=gen, dtype=F64)
    a = torch.log(10 ** (-3 + 1.5 * torch.rand(n, generator=gen, dtype=F64)))
    s = torch.log(0.02 + 0.05 * torch.rand(n, generator=gen, dtype=F64))
    g = torch.log(0.01 + 0.05 * torch.rand(n, generator=gen, dtype=F64))
    return LineCloneModel(c, a, s, g, tune=("center", "amplitude", "sigma", "gamma"), **kw)


def test_defaults_and_validation():
    opts = EngineOptions()
    assert opts.backend == "auto" and not opts.plans_on_cuda and opts.compiled_cpu and opts.chunk == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.backend = "torch"
    with pytest.raises(ValueError, match="backend"):
        EngineOptions(backend="cuda")
    with pytest.raises(TypeError, match="plans_on_cuda"):
        EngineOptions(plans_on_cuda="yes")
    with pytest.raises(TypeError, match="mask_levels"):
        EngineOptions(mask_levels=1)
    with pytest.raises(ValueError, match="chunk"):
        EngineOptions(chunk=300)
    with pytest.raises(ValueError, match="num_warps"):
        EngineOptions(num_warps=0)
    with pytest.raises(ValueError, match="cpu_block_elements"):
        EngineOptions(cpu_block_elements=0)
    with pytest.raises(ValueError, match="chunk"):
        opts.replace(chunk=3)  # a copy is validated again
    assert opts.replace(backend="torch") == EngineOptions(backend="torch") != opts
    # removed by measurement (benchmarks/RESULTS.md): the second stream, and the torch update of Triton plans
    fields = {f.name for f in dataclasses.fields(EngineOptions)}
    assert not fields & {"overlap_streams", "triton_lines"}
    with pytest.raises(TypeError):
        EngineOptions(overlap_streams=True)
    with pytest.raises(TypeError, match="EngineOptions"):
        _model(engine="torch")


def test_backend_rule():
    """``"auto"``: numba on CPUs where it is installed, Triton on CUDA devices where it is installed,
    else blocked torch operations; a named backend is kept."""
    auto = EngineOptions()
    assert auto.backend_for("cpu") == ("numba" if HAVE_NUMBA else "torch")
    assert auto.backend_for("cuda") == ("triton" if HAVE_TRITON else "torch")
    assert EngineOptions(backend="torch").backend_for("cuda") == "torch"
    assert auto.block_elements("cpu") == 1 << 15 and auto.block_elements("cuda") == 1 << 24
    assert not auto.masks_levels("cpu") and auto.masks_levels("cuda")
    assert EngineOptions(mask_levels=True).masks_levels("cpu")
    assert not EngineOptions(compiled_cpu=False).numba_on("cpu")
    assert auto.describe("cpu", torch.float32) == {"backend": auto.backend_for("cpu"), "device": "cpu",
                                                   "dtype": "float32"}


@pytest.mark.skipif(not HAVE_NUMBA, reason="compares the numba backend with the torch one")
def test_two_models_in_one_process_hold_two_settings(monkeypatch):
    """A model on the torch backend and one on the numba backend, side by side: each runs its own
    code (a fault injected into the compiled kernel reaches the numba model only) and both give the
    untruncated sum."""
    on_torch = _model(engine=EngineOptions(backend="torch", compiled_cpu=False))
    on_numba = _model()
    assert on_torch.engine.backend == "torch" and on_numba.engine == EngineOptions()
    with torch.no_grad():
        ref = dense_log_flux(GRID, on_numba.lam_centers, on_numba.log_amplitudes.exp(), on_numba.log_sigmas.exp(),
                             on_numba.log_gammas.exp(), profile=pseudo_voigt)
        a, b = on_torch.log_flux(GRID), on_numba.log_flux(GRID)
    assert float((a - ref).abs().max()) < 1e-6 and float((b - ref).abs().max()) < 1e-6
    assert float((a - b).abs().max()) < 1e-6

    def broken(*args, **kw):
        raise RuntimeError("the compiled kernel ran")

    monkeypatch.setattr(numba_backend_module, "windowed_pseudo_voigt_sum_cpu", broken)
    with torch.no_grad():
        torch.testing.assert_close(on_torch.log_flux(GRID), a, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="compiled kernel ran"):
            on_numba.log_flux(GRID)


def test_options_follow_the_models_made_from_a_model():
    opts = EngineOptions(backend="torch", cpu_block_elements=1 << 12)
    m = _model(engine=opts)
    assert m.subset([0, 3]).engine is opts
    assert m.with_lines([5010.5], [-6.0], [-3.0], [-3.5])[0].engine is opts
    assert LineCloneModel.concatenate([m, _model()])[0].engine is opts
    assert m.engine_info() == {"backend": "torch", "device": "cpu", "dtype": "float64"}


def test_block_size_does_not_change_the_sums():
    """The torch backend's block size is a setting of the model: small blocks give the same sums."""
    big, small = (_model(engine=EngineOptions(backend="torch", cpu_block_elements=b)) for b in (1 << 15, 64))
    with torch.no_grad():
        torch.testing.assert_close(small.log_flux(GRID), big.log_flux(GRID), rtol=0, atol=1e-15)


def test_transfer_model_takes_its_clones_engine_or_its_own():
    clone = _model(engine=EngineOptions(compiled_cpu=False))
    wl = torch.arange(5005.0, 5015.0, 0.05, dtype=F64).numpy()
    model = TransferModel(clone, wl, vsini=5.0)
    assert model.engine is clone.engine and model.rot.engine is clone.engine and model.inst.engine is clone.engine
    own = EngineOptions(plans_on_cuda=True)
    model = TransferModel(clone, wl, vsini=5.0, engine=own)
    assert model.engine is own and model.rot.engine is own and clone.engine.compiled_cpu is False
    info = model.engine_info()
    assert info["device"] == "cpu" and info["dtype"] == "float64"
    with pytest.raises(TypeError, match="EngineOptions"):
        TransferModel(clone, wl, engine={"backend": "torch"})


def test_no_module_level_switch_is_left():
    """No module of the core defines one of the old switches or rebinds a module variable with
    ``global``: every choice of path goes through EngineOptions (read from the sources, so that a
    test or a page of the docs that sets a module attribute cannot hide one)."""
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        assert name.id not in REMOVED, (path.name, name.id)
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Global), f"{path.name}: a global statement rebinds {node.names}"
