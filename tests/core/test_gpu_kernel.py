"""The Triton kernels (GPU; pseudo-Voigt and exact Voigt) against the compiled CPU kernel: run on the
CPU by Triton's interpreter everywhere, and compiled for the GPU where there is one (``-m gpu``).

The interpreter has to be switched on before triton is first imported, so each comparison runs in
a fresh interpreter process. Speed is measured by ``benchmarks/engine_speed.py --device cuda``.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton", reason="the GPU kernel needs triton (pip install '.[gpu]')")

SCRIPT = textwrap.dedent("""
    import json
    import os
    import torch
    from blase_specutils.core.cpu_kernel import windowed_pseudo_voigt_sum_cpu
    from blase_specutils.core.engine import windowed_log_flux
    from blase_specutils.core.farfield import FarFieldSettings
    from blase_specutils.core.gpu_kernel import windowed_pseudo_voigt_sum_triton
    from blase_specutils.core.options import EngineOptions
    from blase_specutils.core.profiles import pseudo_voigt, voigt

    F64 = torch.float64
    DEV = os.environ.get("BLASE_TRITON_DEVICE", "cpu")  # where the Triton kernel runs
    gen = torch.Generator().manual_seed(3)
    grid = torch.arange(5000.0, 5030.0, 0.01, dtype=F64)
    L = 24
    c = 5001 + 28 * torch.rand(L, generator=gen, dtype=F64)
    a = 10 ** (-3 + 2 * torch.rand(L, generator=gen, dtype=F64))
    a[::5] *= 30.0
    s = 0.02 + 0.05 * torch.rand(L, generator=gen, dtype=F64)
    g = 0.01 + 0.05 * torch.rand(L, generator=gen, dtype=F64)
    # windows from 100 to 1400 px: several chunks for the long ones, some cut by the grid's ends
    hw = 0.5 + 6.5 * torch.rand(L, generator=gen, dtype=F64)
    lo = torch.searchsorted(grid, c - hw)
    cnt = torch.searchsorted(grid, c + hw) - lo
    kc = 1e-3 * torch.rand(L, 1, generator=gen, dtype=F64)
    ke = 1e-4 * torch.rand(L, 1, generator=gen, dtype=F64)
    b = 0.3 + 0.2 * torch.rand(L, 1, generator=gen, dtype=F64)
    weights = torch.randn(grid.numel(), generator=gen, dtype=F64)
    chunk_px = EngineOptions().chunk  # the kernel's default chunk length
    chunks = (cnt + chunk_px - 1) // chunk_px
    # the exact Voigt, slow in the interpreter, on 6 of the lines (18 of the 76 chunks): the two
    # strongest, windows cut by either end of the grid, the longest window, a one-chunk window
    V = torch.tensor([0, 5, 13, 14, 15, 17])
    out = {"max_chunks": int(chunks.max()), "voigt_chunks": sorted(chunks[V].tolist()),
           "voigt_cut": [bool((lo[V] == 0).any()), bool((lo[V] + cnt[V] == grid.numel()).any())], "cases": []}
    # every combination for the pseudo-Voigt; two for the exact Voigt
    combos = [("pseudo-voigt", m, sg, f) for m in ("linear", "log") for sg in (1.0, -1.0) for f in (False, True)]
    combos += [("voigt", "linear", 1.0, True), ("voigt", "log", -1.0, False)]
    for profile, mode, sign, far in combos:
        sel = V if profile == "voigt" else torch.arange(L)
        res = []
        for fn, dev in ((windowed_pseudo_voigt_sum_cpu, "cpu"), (windowed_pseudo_voigt_sum_triton, DEV)):
            ps = [t[sel, None].to(dev).requires_grad_(True) for t in (c, a, s, g)]
            extra = [kc[sel].to(dev).requires_grad_(True), ke[sel].to(dev).requires_grad_(True)] if far else []
            kw = dict(kc=extra[0], ke=extra[1], b=b[sel].to(dev)) if far else {}
            val = fn(grid.to(dev), lo[sel].to(dev), cnt[sel].to(dev), *ps, mode=mode, sign=sign, profile=profile, **kw)
            grads = torch.autograd.grad((val * weights.to(dev)).sum(), ps + extra)
            res.append((val.detach().cpu(), [x.cpu() for x in grads]))
        out["cases"].append(dict(
            profile=profile, mode=mode, sign=sign, far=far,
            value=float((res[0][0] - res[1][0]).abs().max()),
            grad=max(float((x - y).abs().max() / (x.abs().max() + 1e-300)) for x, y in zip(res[0][1], res[1][1]))))
    # through the engine, far field included
    ff = FarFieldSettings.for_grid(grid)
    out["engine"] = []
    for prof, sel in ((pseudo_voigt, torch.arange(L)), (voigt, V)):
        flux = [windowed_log_flux(grid.to(dev), *(t[sel].to(dev) for t in (c, a, s, g)), profile=prof, tolerance=1e-7,
                                  far_field=ff, kernel=k).cpu() for k, dev in (("numba", "cpu"), ("triton", DEV))]
        out["engine"].append(float((flux[0] - flux[1]).abs().max()))
    print(json.dumps(out))
""")


def _compare(env: dict) -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["max_chunks"] >= 3  # the long windows really are split over programs
    assert res["voigt_chunks"][0] == 1 and res["voigt_chunks"][-1] >= 3 and all(res["voigt_cut"])
    assert len(res["cases"]) == 10
    for case in res["cases"]:
        # the exact Voigt's wings use 15 terms of the asymptotic series here and 7 beyond |z| = 20
        # on the CPU: equal to about 1e-14
        assert case["value"] < 1e-13, case
        assert case["grad"] < 1e-12, case
    assert max(res["engine"]) < 1e-13


def test_triton_kernel_matches_the_compiled_cpu_kernel():
    _compare(dict(os.environ, TRITON_INTERPRET="1", BLASE_TRITON_DEVICE="cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_compiled_on_the_gpu_matches_the_compiled_cpu_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _compare(dict(env, BLASE_TRITON_DEVICE="cuda"))


def test_triton_kernel_on_a_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    from blase_specutils.core.engine import windowed_log_flux
    from blase_specutils.core.profiles import pseudo_voigt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    grid = torch.arange(5000.0, 5001.0, 0.01, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="CUDA tensors"):
        windowed_log_flux(grid, 5000.5 * one, 0.01 * one, 0.02 * one, 0.02 * one, profile=pseudo_voigt,
                          kernel="triton")


SPREAD = textwrap.dedent("""
    import json
    import os
    import torch
    from blase_specutils.core.cpu_kernel import spread_cpu
    from blase_specutils.core.gpu_kernel import spread_triton

    F64 = torch.float64
    DEV = os.environ.get("BLASE_TRITON_DEVICE", "cpu")
    gen = torch.Generator().manual_seed(6)
    # inside the grid, near both ends (clamped stencils), exactly on grid points, and beyond the ends
    pos = torch.cat([3 + 30 * torch.rand(20, generator=gen, dtype=F64),
                     torch.tensor([0.4, 2.0, 7.0, 36.5, 38.6, -3.0, 45.0], dtype=F64)])
    c = torch.randn(pos.numel(), generator=gen, dtype=F64)
    e = torch.randn(pos.numel(), generator=gen, dtype=F64)
    wc = torch.randn(40, generator=gen, dtype=F64)
    we = torch.randn(40, generator=gen, dtype=F64)
    out = []
    for m in (1, 2, 3, 4):
        res = []
        for fn, dev in ((spread_cpu, "cpu"), (spread_triton, DEV)):
            ps = [t.to(dev).requires_grad_(True) for t in (pos, c, e)]
            gc, ge = fn(*ps, 40, m)
            loss = (gc * wc.to(dev)).sum() + (ge * we.to(dev)).sum()
            grads = torch.autograd.grad(loss, ps)
            res.append([gc.detach().cpu(), ge.detach().cpu(), *(g.cpu() for g in grads)])
        out.append(max(float((a - b).abs().max()) for a, b in zip(*res)))
    # gradcheck on a short grid (every output is one backward pass in the interpreter)
    ps = [torch.tensor([3.3, 4.4, 5.7, 8.2], dtype=F64), c[:4].clone(), e[:4].clone()]
    ps = [p.to(DEV).requires_grad_(True) for p in ps]
    ok = torch.autograd.gradcheck(lambda *x: spread_triton(*x, 12, 4), ps, eps=1e-6, atol=1e-7)
    print(json.dumps(dict(diffs=out, gradcheck=bool(ok))))
""")


def _spread_case(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", SPREAD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the Triton spreading is opt-in (``EngineOptions.triton_spread``, off by default); interpreted
def test_triton_spreading_matches_the_compiled_cpu_spreading():
    """The far field's Triton spreading (interpreted on the CPU), values and gradients, against numba's,
    for 2- to 8-point stencils, with clamped positions and positions on grid points."""
    res = _spread_case(dict(os.environ, TRITON_INTERPRET="1"))
    assert max(res["diffs"]) < 1e-12, res
    assert res["gradcheck"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_spreading_compiled_on_the_gpu_matches_the_compiled_cpu_spreading():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = _spread_case(dict(env, BLASE_TRITON_DEVICE="cuda"))
    assert max(res["diffs"]) < 1e-12, res
    assert res["gradcheck"]
