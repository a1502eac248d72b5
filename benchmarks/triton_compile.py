"""Every Triton kernel of the package compiled for an NVIDIA GPU, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``), which the test suite uses to check the GPU kernels
on a CPU, runs the kernels' Python with numpy: it accepts code that the GPU compiler refuses, and
its arithmetic is not the compiled code's (a float constant that the compiler makes float32 is a
float64 in the interpreter). This script closes part of that gap without a GPU:

1. **Capture.** A child process runs a small workload on the GPU code path under the
   interpreter: the windowed line sums (pseudo-Voigt and exact Voigt, linear and log, with and
   without the far-field residual, float64 and float32, forward and backward), the far field's
   spreading, and a frozen plan with every Triton switch on (line kernel, windows, far field,
   coefficients). Every kernel launch is recorded: the kernel, the type of each argument (a
   tensor's dtype, a Python scalar's type and value) and the launch options.
2. **Compile.** This process, with the interpreter off, compiles each distinct launch for the
   target architecture (default ``sm_90``, the H100/H200) with Triton's own compiler and the
   ``ptxas`` that ships in the triton wheel, exactly as a launch on that GPU would (same argument
   specialisation), but without loading the result onto a device.
3. **Inspect.** For each compiled kernel: registers per thread and spills (``ptxas -v``), shared
   memory, and the float32 arithmetic in Triton's IR. The kernels compute in float64 whatever the
   working dtype, so any float32 operation is a precision hazard that the interpreter cannot show:
   Triton passes a Python float argument as a float32 scalar, and an int scalar argument combined
   with a float constant is converted to float32.

It needs triton (``pip install '.[gpu]'``) and nothing else: no GPU, no CUDA driver. A kernel
that the workload never launches is an error (the coverage is checked against the kernels that
:mod:`blase_specutils.core.gpu_kernel` defines).

Usage::

    python benchmarks/triton_compile.py [--arch 90] [--json FILE]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: Float32 arithmetic in Triton's IR of a kernel (before lowering: what the kernel's own code asks
#: for, not the range checks inside libdevice's float64 functions): an arithmetic operation, a
#: comparison or a math function on float32 values, or an integer converted to float32.
F32_OP = re.compile(r"= (?:arith\.(?:addf|subf|mulf|divf|negf|remf|maximumf|minimumf|maxnumf|minnumf|cmpf"
                    r"|sitofp|uitofp)|math\.\w+)\b[^\n]*?(?:: |to )(?:tensor<[^>]*xf32>|f32)\b")
#: A float32 constant in Triton's IR, and its value: a literal made float32 (``tl.maximum(t, c)``
#: with a float64 ``t``, a constant folded from two literals) is rounded to 24 bits.
F32_CONSTANT = re.compile(r"arith\.constant (?:dense<)?([-+0-9.eEinfa]+)>? : (?:tensor<[^>]*x)?f32\b")
#: A float64 constant in Triton's IR, and its value.
F64_CONSTANT = re.compile(r"arith\.constant (?:dense<)?([-+0-9.eEinfa]+)>? : (?:tensor<[^>]*x)?f64\b")
#: A conversion from float32 to float64 (of a loaded float32 tensor, or of a float32 value).
F32_TO_F64 = re.compile(r"= arith\.extf [^\n]*f32[^\n]* to [^\n]*f64")
#: What ``ptxas -v`` reports of a function: its stack frame and spills, then its registers.
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def _describe(value, constexpr: bool) -> list:
    """A launch argument as JSON: a tensor by its dtype, a scalar by its type and value."""
    import torch

    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch.")]
    if value is None or isinstance(value, (bool, int, float, str)):
        return ["constexpr" if constexpr else type(value).__name__, value]
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


def _workload() -> None:
    """Launch every Triton kernel of the package at least once (on the CPU, interpreted)."""
    import torch

    from blase_specutils.core import EngineOptions, LineCloneModel
    from blase_specutils.core.gpu_kernel import (line_coefficients_triton, spread_triton,
                                                 windowed_pseudo_voigt_sum_triton)

    f64 = torch.float64
    gen = torch.Generator().manual_seed(1)
    grid = torch.arange(8640.0, 8650.0, 0.0125, dtype=f64)
    n = 8
    c = 8641.0 + 8.0 * torch.rand(n, generator=gen, dtype=f64)
    a = 10 ** (-4 + torch.rand(n, generator=gen, dtype=f64))
    s = 0.02 + 0.05 * torch.rand(n, generator=gen, dtype=f64)
    g = 0.01 + 0.05 * torch.rand(n, generator=gen, dtype=f64)
    a[0], g[0] = 2.0, 1.5  # a strong, broad line: more than one far-field level
    lo = torch.searchsorted(grid, c - 0.2)
    cnt = torch.searchsorted(grid, c + 0.2) - lo
    # the windowed sums (their kernels take float64 whatever the working dtype: float32 is left to
    # the plans below) and the far field's spreading, every stencil; three lines are enough for the
    # sums' launches (one program each: the interpreter's time goes by programs)
    k = 3
    for profile in ("pseudo-voigt", "voigt"):
        for mode in ("linear", "log"):
            for far in (False, True):
                ps = [t[:k, None].clone().requires_grad_(True) for t in (c, a, s, g)]
                kw = {}
                if far:
                    kw = dict(kc=torch.full((k, 1), 1e-4, dtype=f64, requires_grad=True),
                              ke=torch.full((k, 1), 1e-5, dtype=f64, requires_grad=True),
                              b=torch.full((k, 1), 0.4, dtype=f64))
                val = windowed_pseudo_voigt_sum_triton(grid, lo[:k], cnt[:k], *ps, mode=mode, sign=1.0,
                                                       profile=profile, **kw)
                val.sum().backward()
    pos = (3.0 + 30.0 * torch.rand(8, generator=gen, dtype=f64)).requires_grad_(True)
    for m in (1, 2, 3, 4):
        gc, ge = spread_triton(pos, torch.ones(8, dtype=f64, requires_grad=True),
                               torch.ones(8, dtype=f64, requires_grad=True), 40, m)
        (gc.sum() + ge.sum()).backward()
    # plans with the Triton paths on: the line kernel alone (the default) and with the windows and
    # chunk table; the far field and the coefficients in Triton; each kind of line set and plan
    from blase_specutils.core.plan import WindowPlan

    wide = g.clone()
    wide[1] = 40.0  # a line wider than the grid: on no far-field level (summed whole)
    cases = [dict(), dict(mode="log"), dict(profile="voigt"), dict(profile="voigt", mode="log"),
             dict(emission=True), dict(far_field=False), dict(dtype=torch.float32), "fixed", "whole"]
    for windows in (False, True):
        engine = EngineOptions(triton_far=True, triton_coefficients=True, triton_windows=windows)
        for case in cases:
            kw = case if isinstance(case, dict) else {}
            model = LineCloneModel(c, a, s, wide if case == "whole" else g, wing_tolerance=1e-7, engine=engine, **kw)
            rv = torch.tensor(30.0, dtype=f64, requires_grad=True)
            if case == "fixed":
                plan = WindowPlan(grid, lambda: (model.lam_centers, model.log_amplitudes.exp(),
                                                 model.log_sigmas.exp(), model.log_gammas.exp()),
                                  half_widths=torch.full((n,), 0.3, dtype=f64), kernel="triton", engine=engine)
                plan.update()
                continue
            plan = model.make_plan(grid, rv, kernel="triton")  # (a plan's grid is float64)
            plan.frozen = True
            # an evaluation launches the same kernels with either update: once each (the exact
            # Voigt's, slow when interpreted, adds only its coefficients: below)
            if not windows and kw.get("profile") != "voigt":
                model(grid, rv, plan=plan).sum().backward()
            plan.update()
    # the exact Voigt's far-field coefficients (float64 and float32 lines)
    sign = torch.ones(1, dtype=f64)
    for dtype in (f64, torch.float32):
        xs = [t.to(dtype).requires_grad_(True) for t in (a, s, g)]
        kc, ke = line_coefficients_triton(*xs, torch.ones(3, n, dtype=dtype), torch.full((n,), 0.4, dtype=dtype),
                                          sign, voigt=True)
        (kc.sum() + ke.sum()).backward()


def capture() -> list[dict]:
    """Run :func:`_workload` under Triton's interpreter and return its distinct kernel launches."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("capture() runs under TRITON_INTERPRET=1 (set before triton is imported)")
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        is_const = {k: "constexpr" in str(p.annotation) for k, p in params.items()}
        bound = dict(zip(names, args))
        options = {k: v for k, v in kwargs.items() if k not in params}
        bound.update({k: v for k, v in kwargs.items() if k in params})
        record = dict(kernel=self.fn.__name__, module=self.fn.__module__,
                      args={k: _describe(v, is_const[k]) for k, v in bound.items()}, options=options)
        # one compile per kernel, argument types, constexpr values and options (the scalars'
        # values only as far as Triton specialises on them)
        key = json.dumps([record["kernel"], options] + [
            d if d[0] in ("tensor", "constexpr", "bool", "float", "NoneType")
            else [d[0], d[1] == 1, d[1] % 16 == 0] for d in record["args"].values()])
        launches.setdefault(key, record)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        _workload()
    finally:
        InterpretedFunction.run = original
    return list(launches.values())


def defined_kernels() -> set[str]:
    """Names of the launchable kernels (``*_kernel``) that :mod:`blase_specutils.core.gpu_kernel` defines."""
    from blase_specutils.core import gpu_kernel

    return {name for name, obj in vars(gpu_kernel).items()
            if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")}


class _NoDeviceDriver:
    """What Triton's launcher asks of its driver, for a GPU of the given architecture that is not there."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def _placeholder(desc: list):
    """An argument of the described type for compiling (a small CPU tensor; scalars as they were)."""
    import torch

    if desc[0] == "tensor":
        return torch.empty(16, dtype=getattr(torch, desc[1]))
    return desc[1]


def float32_hazards(ttir: str, float32_inputs: bool) -> list[str]:
    """The operations of a kernel's IR that compute, or round a constant, in float32: arithmetic
    (:data:`F32_OP`), float32 constants that are not exact small dyadic numbers (0, ±1, 0.5, ...:
    the masked loads' fill values of float32 tensors), float64 constants whose value is a float32
    rounding, and, in a kernel without float32 inputs, any conversion from float32."""
    found = [m.group(0) for m in F32_OP.finditer(ttir)]
    for m in F32_CONSTANT.finditer(ttir):
        value = float(m.group(1))
        if not (abs(value) < 2.0 ** 20 and (value * 1024.0).is_integer()):
            found.append(m.group(0))
    for m in F64_CONSTANT.finditer(ttir):
        # a float64 constant that is a float32 value with more than 12 significant bits and not an
        # integer: a literal that went through float32 (Triton 3.6 compares 0.02 as
        # 0.019999999552965164). Integers cannot be told apart this way: see the source check
        # in tests/core/test_triton_compile.py.
        value = float(m.group(1))
        through_float32 = abs(value) < 3e38 and float(np.float32(value)) == value
        short = value.is_integer() or (math.frexp(value)[0] * 2.0 ** 12).is_integer()
        if through_float32 and not short:
            found.append(m.group(0))
    if not float32_inputs:
        found += [m.group(0) for m in F32_TO_F64.finditer(ttir)]
    return found


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spills of a kernel, as ``ptxas -v`` reports them: the ptxas and
    the options Triton assembles the kernel with (the numbers are not kept by Triton)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src.with_suffix(".o"))]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    stack, stores, loads = (int(x) for x in PTXAS_SPILLS.search(log).groups())
    return dict(registers=int(PTXAS_REGISTERS.search(log).group(1)), stack=stack, spill_stores=stores,
                spill_loads=loads)


def _compile_one(launch: dict, arch: int) -> dict:
    """Compile one captured launch for ``sm_<arch>`` and inspect the result."""
    import importlib

    from triton.runtime import driver

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    args = {k: _placeholder(d) for k, d in launch["args"].items()}
    previous = driver._active  # None until a real driver was asked for
    driver.set_active(_NoDeviceDriver(arch))
    try:
        t0 = time.perf_counter()
        compiled = kernel.warmup(grid=(1,), **args, **launch["options"])
        seconds = time.perf_counter() - t0
    finally:
        driver.set_active(previous)
    floats = {d[1] for d in launch["args"].values() if d[0] == "tensor" and d[1].startswith("float")}
    return dict(kernel=launch["kernel"], arch=f"sm_{arch}", seconds=round(seconds, 2),
                constexprs={k: d[1] for k, d in launch["args"].items() if d[0] == "constexpr"},
                float_tensors=sorted(floats),
                float_scalars={k: d[1] for k, d in launch["args"].items() if d[0] == "float"},
                f32_ops=float32_hazards(compiled.asm["ttir"], "float32" in floats),
                shared=compiled.metadata.shared, **_ptxas_report(compiled.asm["ptx"], arch))


def compile_launches(launches: list[dict], arch: int = 90, workers: int | None = None) -> list[dict]:
    """Compile each captured launch for ``sm_<arch>`` and inspect the result (see the module
    docstring), in ``workers`` processes (default: one per CPU core, at most 8)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling needs the interpreter off (unset TRITON_INTERPRET)")
    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1:
        return [_compile_one(launch, arch) for launch in launches]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_compile_one, launches, [arch] * len(launches)))


def _table(results: list[dict]) -> str:
    rows = ["| kernel | constexprs | tensors | registers | spill stores, loads (bytes) | shared (bytes) | f32 ops "
            "| compile s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        const = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        rows.append(f"| {r['kernel']} | {const} | {'/'.join(r['float_tensors'])} | {r['registers']} | "
                    f"{r['spill_stores']}, {r['spill_loads']} | {r['shared']} | {len(r['f32_ops'])} | {r['seconds']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200; 80: A100)")
    parser.add_argument("--workers", type=int, help="compiling processes (default: one per core, at most 8)")
    parser.add_argument("--json", type=Path, help="write the launches and the compiled kernels' figures here")
    parser.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)  # the child process
    opts = parser.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        parser.error("this needs triton (pip install '.[gpu]'; no GPU is needed)")
    if opts.arch < 70:
        parser.error(f"--arch {opts.arch}: give a compute capability times 10 from 70 on (90: H100/H200)")
    if opts.capture:
        print(json.dumps(dict(launches=capture(), defined=sorted(defined_kernels()))))
        return 0
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run([sys.executable, __file__, "--capture"], capture_output=True, text=True, env=env)
    if child.returncode != 0:
        sys.stderr.write(child.stderr[-5000:])
        return 1
    captured = json.loads(child.stdout.strip().splitlines()[-1])
    missing = set(captured["defined"]) - {launch["kernel"] for launch in captured["launches"]}
    if missing:
        print(f"kernels the workload never launched: {sorted(missing)}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    results = compile_launches(captured["launches"], opts.arch, opts.workers)
    print(_table(results))
    print(f"\n{len(results)} launches of {len(captured['defined'])} kernels compiled for sm_{opts.arch} "
          f"in {time.perf_counter() - t0:.0f} s")
    if opts.json:
        opts.json.write_text(json.dumps(dict(launches=captured["launches"], compiled=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
