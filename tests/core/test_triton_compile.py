"""Every Triton kernel compiled for the H100/H200 (sm_90) on the CPU, without a GPU.

The interpreted tests (test_gpu_kernel.py, test_plan.py) check what the kernels compute; they cannot
see whether the GPU compiler accepts them, nor whether its arithmetic is the float64 the
interpreter does. ``benchmarks/triton_compile.py`` records the launches of a workload on the GPU
code path (interpreted), compiles each for sm_90 with Triton's compiler and the ``ptxas`` inside
the triton wheel, and inspects the result; this test runs it.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton", reason="the GPU kernels need triton (pip install '.[gpu]')")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "triton_compile.py"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("triton")
    out = tmp / "kernels.json"
    # a fresh cache: every kernel really goes through the compiler
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    run = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--json", str(out)], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-5000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in run.stderr  # every launch says whether to fuse
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(compiled):
    """All 13 kernels of gpu_kernel.py, launched by the workload, compile for sm_90 (the script
    fails on any kernel the workload misses), in each variant the workload launches: pseudo-Voigt
    and exact Voigt, linear and log, absorption and emission, with and without far field, float32
    and float64 lines, the plan's update with and without the window kernels."""
    kernels = {r["kernel"] for r in compiled["compiled"]}
    assert len(kernels) == 13, sorted(kernels)
    assert len(compiled["compiled"]) == len(compiled["launches"]) >= 40
    signs = {r["constexprs"]["SIGN"] for r in compiled["compiled"] if "SIGN" in r["constexprs"]}
    assert signs == {1.0, -1.0}
    assert {"float32", "float64"} <= {t for r in compiled["compiled"] for t in r["float_tensors"]}


def test_compiled_kernels_do_no_float32_arithmetic(compiled):
    """The kernels compute in float64. In Triton a Python float argument is a float32 scalar and an
    int scalar argument combined with a float constant is converted to float32, which the
    interpreter does not reproduce: no such operation is left in any kernel's IR, and no launch
    passes a float scalar."""
    for r in compiled["compiled"]:
        assert r["f32_ops"] == [], (r["kernel"], r["constexprs"], r["f32_ops"])
        assert r["float_scalars"] == {}, (r["kernel"], r["float_scalars"])


#: The kernels that run once per pixel of a window or of the grid (the others run once per line).
PER_PIXEL = {"_forward_kernel", "_backward_kernel", "_voigt_forward_kernel", "_voigt_backward_kernel",
             "_interpolate_kernel", "_interpolate_backward_kernel"}


def test_per_pixel_kernels_fit_in_registers(compiled):
    """No kernel that runs per pixel spills registers to local memory on sm_90 (``ptxas -v`` with
    Triton's options): a spill there costs a trip to memory per pixel of every window, every epoch.
    (Of the per-line kernels, the plan update with fixed half widths spills 4 bytes with Triton
    3.9's ptxas options; it runs once per line.) And every launch fixes the fusion of multiply-adds,
    so that Triton's change of default (3.10) does not change the kernels."""
    hot = [r for r in compiled["compiled"] if r["kernel"] in PER_PIXEL]
    assert {r["kernel"] for r in hot} == PER_PIXEL
    for r in hot:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    for launch in compiled["launches"]:
        assert launch["options"].get("enable_fp_fusion") is True, launch


def _float_literal(node: ast.AST) -> float | None:
    """The value of a float literal, or of minus one; None for anything else."""
    sign = 1.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node, sign = node.operand, -1.0
    if isinstance(node, ast.Constant) and isinstance(node.value, float):
        return sign * node.value
    return None


def test_no_float_literal_that_triton_could_round_to_float32():
    """Triton 3.6 (the CUDA machines' version so far) compiles a float literal compared with a
    float64 tensor as float32: ``t < -0.999999999999`` became ``t < -1.0``, and 0.02 became
    0.019999999552965164 (found by compiling with it for sm_90; Triton 3.9 keeps float64, so the
    compile check above cannot see it). No comparison in a kernel has a literal that float32 does
    not hold exactly, nor do ``tl.maximum``, ``tl.minimum``, ``tl.where`` or ``tl.full``."""
    tree = ast.parse((ROOT / "blase_specutils" / "core" / "gpu_kernel.py").read_text())
    kernels = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
               and any(ast.unparse(d) == "triton.jit" for d in f.decorator_list)]
    assert len(kernels) >= 20
    risky = []
    for fn in kernels:
        for node in ast.walk(fn):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("tl.maximum", "tl.minimum", "tl.where",
                                                                            "tl.full"):
                operands = list(node.args)
            else:
                continue
            for op in operands:
                value = _float_literal(op)
                if value is not None and float(np.float32(value)) != value:
                    risky.append(f"{fn.name}, line {node.lineno}: {ast.unparse(node)}")
    assert risky == []
