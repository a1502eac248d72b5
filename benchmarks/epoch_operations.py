"""Operations per planned epoch on the GPU code path, counted on a CPU.

A planned epoch replayed as a CUDA graph (:class:`blase_specutils.core.graphs.GraphedEpoch`) costs
about one graph node per GPU kernel: each small kernel takes 1-4 µs plus the gap to the next one,
so on the paper's problem the number of kernels, not the arithmetic, sets most of the epoch's time
(benchmarks/RESULTS.md). This script counts the torch operations that launch work (views and
allocations left out) of one epoch on the GPU code path, run on the CPU: the Triton kernels under
Triton's interpreter (each counted as one kernel; the interpreter's own operations are left out),
the far field's GPU operations instead of numba's. The count is a proxy that needs no GPU: on a
GPU, cuFFT may launch more than one kernel per transform, and the fused Adam step of the GPU
benchmark is one kernel where the CPU's takes several (reported apart).

Usage::

    python benchmarks/epoch_operations.py [--band 8600 8800] [--json FILE]

Lines of the paper's HPF clone within ``band`` ± 40 Å (inside the far-field grids' margin, as in
the full problem), on the native PHOENIX grid of the band; the clone as it is, float64, χ² against
the clone with amplitudes 10 % larger.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import SHARED, _problem  # noqa: E402

#: Configurations: the module switches of the plan's Triton paths (see blase_specutils.core.plan
#: and .farfield).
CONFIGS = [
    dict(name="plan, Triton line kernel (default)", windows=False, far=False, coefficients=False),
    dict(name="+ Triton windows", windows=True, far=False, coefficients=False),
    dict(name="+ Triton far field", windows=False, far=True, coefficients=False),
    dict(name="+ Triton coefficients", windows=False, far=False, coefficients=True),
    dict(name="all Triton", windows=True, far=True, coefficients=True),
]

#: Operations that launch no work on a GPU (views, metadata, allocations without a fill).
NO_KERNEL = {"view", "_unsafe_view", "reshape", "as_strided", "expand", "slice", "select", "unsqueeze", "squeeze",
             "t", "transpose", "permute", "detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided",
             "new_empty", "unbind", "split", "split_with_sizes", "view_as_real", "view_as_complex", "_reshape_alias",
             "scalar_tensor", "promote_types", "_local_scalar_dense", "_record_function_enter_new",
             "_record_function_exit", "result_type"}


class _Count(TorchDispatchMode):
    """Counts operations by phase (set ``phase`` before each part of the epoch)."""

    def __init__(self):
        super().__init__()
        self.phase = "?"
        self.counts: dict = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            frames = traceback.extract_stack()
            if not any("triton" in f.filename and "interpreter" in f.filename for f in frames):
                self.counts[self.phase][name] += 1
        return func(*args, **(kwargs or {}))


def _count_triton_launches() -> None:
    """Count each Triton kernel launch as one operation of the current phase."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *a, **k):
        if _MODE is not None:
            _MODE.counts[_MODE.phase]["triton:" + self.fn.__name__] += 1
        return run(self, *a, **k)

    InterpretedFunction.run = counted


_MODE: _Count | None = None


def count(cfg: dict, band: tuple[float, float], data: Path) -> dict:
    from blase_specutils.core import EngineOptions, LineCloneModel

    # compiled_cpu=False: the far field's GPU operations
    engine = EngineOptions(compiled_cpu=False, triton_windows=cfg["windows"],
                           triton_far=cfg["far"], triton_coefficients=cfg["coefficients"])
    sd, wl_np, _ = _problem(data)
    order = torch.argsort(sd["lam_centers"])
    args = [sd[k][order] for k in ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")]
    keep = (args[0] > band[0] - 40) & (args[0] < band[1] + 40)
    args = [a[keep] for a in args]
    wl = torch.as_tensor(wl_np[(wl_np > band[0]) & (wl_np < band[1])])
    model = LineCloneModel(*args, wing_tolerance=1e-7, engine=engine)
    with torch.no_grad():
        target = LineCloneModel(args[0], args[1] + np.log(1.1), args[2], args[3], wing_tolerance=1e-7,
                                engine=engine)(wl)
    plan = model.make_plan(wl, kernel="triton")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01, foreach=True)
    plan.frozen = True  # as GraphedEpoch runs it: the update follows the step
    plan.update()
    global _MODE
    mode = _MODE = _Count()
    for epoch in range(2):
        with mode:
            mode.phase = "zero_grad"
            opt.zero_grad(set_to_none=True)
            mode.phase = "forward + loss"
            loss = ((model(wl, plan=plan) - target) ** 2).sum()
            mode.phase = "backward"
            loss.backward()
            mode.phase = "optimizer step (CPU Adam)"
            opt.step()
            mode.phase = "plan update"
            plan.update()
        if epoch == 0:
            mode.counts.clear()  # the second epoch is counted
    by_phase = {k: sum(v.values()) for k, v in mode.counts.items()}
    gpu = sum(n for k, n in by_phase.items() if not k.startswith("optimizer"))
    return dict(name=cfg["name"], operations=gpu + 1, by_phase=by_phase, stale=plan.stale,
                levels=list(plan.ff_plan.present), lines=int(keep.sum()), pixels=int(wl.numel()),
                detail={k: dict(v.most_common()) for k, v in mode.counts.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--band", type=float, nargs=2, default=(8600.0, 8800.0))
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--only", help="configurations whose name contains this text")
    ap.add_argument("--json", type=Path, help="write the counts here")
    args = ap.parse_args()
    if not (args.data / "clones").exists():
        sys.exit(f"needs {args.data} (the project's shared data; see --data)")
    _count_triton_launches()
    rows = []
    print("| configuration | operations per epoch | forward + loss | backward | plan update |")
    print("|---|---|---|---|---|")
    for cfg in CONFIGS:
        if args.only and args.only not in cfg["name"]:
            continue
        res = count(cfg, tuple(args.band), args.data)
        rows.append(res)
        ph = res["by_phase"]
        print(f"| {res['name']} | {res['operations']} | {ph.get('forward + loss', 0)} | {ph.get('backward', 0)} | "
              f"{ph.get('plan update', 0)} |", flush=True)
        if res["stale"]:
            print(f"  ({res['name']}: the plan went stale; the counts are not those of a replayed graph)")
    print("operations per epoch: forward, loss, backward and the plan's update, plus one for the fused Adam step "
          f"of a GPU; {rows[0]['lines'] if rows else 0} lines, {rows[0]['pixels'] if rows else 0} pixels, "
          f"far-field levels {rows[0]['levels'] if rows else []}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
