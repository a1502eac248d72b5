"""Speed, memory and accuracy of the sparse engine on the paper's HPF cloning problem.

The problem (paper Section 2, DESIGN.md): the 9,028 lines of the blasé 0.3 clone
``../shared/data/clones/blase03_T4700g4p5_prom0p01_HPF.pt`` on the native PHOENIX grid
8049-12815 Å (335,851 px, the wavelength column of muler's ``PHOENIX_10kK_hpf_template.csv``),
tuning ln a, ln σ, ln γ with Adam against a target made from the same lines with amplitudes
perturbed by 10 %.

For each configuration, in a fresh subprocess: milliseconds per epoch (zero_grad, forward, χ²
loss, backward, Adam step; median over the timed epochs after warm-up; CUDA synchronised), peak
memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size growth over the
loaded problem), and the accuracy of the forward model against the untruncated float64 model
``flux_dense`` (max and RMS absolute difference).

Usage::

    python benchmarks/engine_speed.py                 # CPU configurations
    python benchmarks/engine_speed.py --device cuda   # GPU configurations (torch and Triton kernels)
    python benchmarks/engine_speed.py --quick         # fewer epochs
    python benchmarks/engine_speed.py --small         # every backend on a small problem (the selection rule)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

CONFIGS = [
    dict(name="far-field (default), float64", dtype="float64", far_field=True, tol=1e-7),
    dict(name="far-field, float64, tol 1e-6", dtype="float64", far_field=True, tol=1e-6),
    dict(name="far-field, float32", dtype="float32", far_field=True, tol=1e-7),
    dict(name="far-field, float64, log mode", dtype="float64", far_field=True, tol=1e-7, mode="log"),
    dict(name="far-field, float64, RV +500 km/s", dtype="float64", far_field=True, tol=1e-7, rv=500.0),
    dict(name="far-field, float64, RV -500 km/s", dtype="float64", far_field=True, tol=1e-7, rv=-500.0),
    dict(name="far-field, float64, exact Voigt", dtype="float64", far_field=True, tol=1e-7, profile="voigt", epochs=5),
    dict(name="far-field, float64, torch kernel", dtype="float64", far_field=True, tol=1e-7, kernel="torch"),
    dict(name="far-field, float64, plan, CUDA graph", dtype="float64", far_field=True, tol=1e-7, graph=True,
         devices=("cuda",)),
    dict(name="far-field, float32, plan, CUDA graph", dtype="float32", far_field=True, tol=1e-7, graph=True,
         devices=("cuda",)),
    dict(name="far-field, float64, log mode, plan, CUDA graph", dtype="float64", far_field=True, tol=1e-7,
         mode="log", graph=True, devices=("cuda",)),
    dict(name="far-field, float64, RV +500 km/s, plan, CUDA graph", dtype="float64", far_field=True, tol=1e-7,
         rv=500.0, graph=True, devices=("cuda",)),
    dict(name="far-field, float64, plan, no graph", dtype="float64", far_field=True, tol=1e-7, graph=False),
    dict(name="far-field, float64, plan, CUDA graph, Triton spreading", dtype="float64", far_field=True, tol=1e-7,
         graph=True, spread=True, devices=("cuda",)),
    dict(name="far-field, float64, plan, CUDA graph, Triton windows", dtype="float64", far_field=True, tol=1e-7,
         graph=True, windows=True, devices=("cuda",)),
    dict(name="far-field, float64, plan, CUDA graph, Triton far field", dtype="float64", far_field=True, tol=1e-7,
         graph=True, far=True, devices=("cuda",)),
    dict(name="far-field, float64, plan, CUDA graph, all Triton", dtype="float64", far_field=True, tol=1e-7,
         graph=True, windows=True, far=True, coefficients=True, devices=("cuda",)),
    dict(name="far-field, float32, plan, CUDA graph, all Triton", dtype="float32", far_field=True, tol=1e-7,
         graph=True, windows=True, far=True, coefficients=True, devices=("cuda",)),
    dict(name="far-field, float64, log mode, plan, CUDA graph, all Triton", dtype="float64", far_field=True,
         tol=1e-7, mode="log", graph=True, windows=True, far=True, coefficients=True, devices=("cuda",)),
    dict(name="far-field, float64, RV +500 km/s, plan, CUDA graph, all Triton", dtype="float64", far_field=True,
         tol=1e-7, rv=500.0, graph=True, windows=True, far=True, coefficients=True, devices=("cuda",)),
    dict(name="far-field, float64, train()", dtype="float64", far_field=True, tol=1e-7, train="plain"),
    dict(name="far-field, float64, train() through a plan (CUDA graph on GPUs)", dtype="float64", far_field=True,
         tol=1e-7, train="plan"),

    dict(name="far-field, float64, plan, CUDA graph, 512-px chunks", dtype="float64", far_field=True, tol=1e-7,
         graph=True, chunk=512, devices=("cuda",)),
    dict(name="far-field, float64, plan, CUDA graph, 1024-px chunks", dtype="float64", far_field=True, tol=1e-7,
         graph=True, chunk=1024, devices=("cuda",)),
    dict(name="far-field, float64, plan, CUDA graph, 8 warps", dtype="float64", far_field=True, tol=1e-7,
         graph=True, warps=8, devices=("cuda",)),
    dict(name="far-field, float64, plan, CUDA graph, 2 warps", dtype="float64", far_field=True, tol=1e-7,
         graph=True, warps=2, devices=("cuda",)),
    dict(name="truncated windows, tol 1e-6, float64", dtype="float64", far_field=False, tol=1e-6),
    dict(name="fixed 6000-px windows (paper), float64", dtype="float64", far_field=False, fixed_px=6000, epochs=3),
    dict(name="fixed 6000-px windows (paper), float64, plan, CUDA graph", dtype="float64", far_field=False,
         fixed_px=6000, graph=True, devices=("cuda",)),
]
#: ``--group triton``: the rows that time the Triton paths that are still off against the default
#: (the plain epoch, the planned and graphed default, each path alone, all of them in four settings)
for _cfg in CONFIGS:
    if _cfg["name"] in ("far-field (default), float64", "far-field, float64, plan, CUDA graph") or (
            _cfg.get("graph") and ("Triton windows" in _cfg["name"] or "Triton far field" in _cfg["name"]
                                   or "all Triton" in _cfg["name"])) or "train" in _cfg:
        _cfg["group"] = "triton"


def _problem(data: Path = SHARED):
    sd = torch.load(data / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt", map_location="cpu", weights_only=True)
    ref = np.load(data / "reference" / "blase03_T4700g4p5_HPF_forward.npz")
    try:
        path = files("muler.templates").joinpath("PHOENIX_10kK_hpf_template.csv")
    except ModuleNotFoundError:
        # a GPU machine without muler: the reference file stores the same native grid
        print("muler is not installed: the grid comes from the reference file", file=sys.stderr)
        wl = ref["wavelength"]
    else:
        wl = np.loadtxt(path, delimiter=",", skiprows=1, usecols=0)
        wl = wl[(wl >= 8049) & (wl <= 12815)]
        assert np.array_equal(wl, ref["wavelength"])
    assert wl.size == 335851
    return sd, wl, ref["flux_dense"]


def engine_options(cfg: dict):
    """The engine options of a configuration: ``kernel="torch"`` runs the blocked torch operations
    on either device (no compiled kernels); ``chunk``, ``warps`` and the Triton switches as named."""
    from blase_specutils.core.options import EngineOptions

    default = EngineOptions()
    torch_only = cfg.get("kernel") == "torch"
    return EngineOptions(
        backend="torch" if torch_only else "auto", compiled_cpu=not torch_only,
        chunk=cfg.get("chunk", default.chunk), num_warps=cfg.get("warps", default.num_warps),
        triton_spread=cfg.get("spread", default.triton_spread), triton_far=cfg.get("far", default.triton_far),
        triton_windows=cfg.get("windows", default.triton_windows),
        triton_coefficients=cfg.get("coefficients", default.triton_coefficients))


def run_one(cfg: dict, device: str, epochs: int, warmup: int, data: Path = SHARED,
            profile_dir: str | None = None) -> dict:
    from blase_specutils.core import LineCloneModel
    from blase_specutils.core.engine import windowed_log_flux

    engine = engine_options(cfg)
    sd, wl_np, dense = _problem(data)
    dtype = getattr(torch, cfg["dtype"])
    dev = torch.device(device)
    order = torch.argsort(sd["lam_centers"])
    args = [sd[k][order] for k in ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")]
    kw = dict(mode=cfg.get("mode", "linear"), profile=cfg.get("profile", "pseudo-voigt"),
              wing_tolerance=cfg["tol"] if "tol" in cfg else 1e-6, far_field=cfg["far_field"], dtype=dtype, device=dev,
              engine=engine)
    model = LineCloneModel(*args, **kw)
    truth = LineCloneModel(args[0], args[1] + np.log(1.1), args[2], args[3], **kw)
    wl = torch.as_tensor(wl_np, dtype=torch.float64, device=dev)  # grids and centres stay float64
    if cfg.get("fixed_px"):
        # the paper's layout: every line evaluated on a fixed number of native pixels around its centre
        spacing = torch.as_tensor(np.interp(args[0].numpy(), wl_np[1:], np.diff(wl_np)), dtype=dtype, device=dev)
        hw = spacing * (cfg["fixed_px"] / 2)

        def forward(m):
            from blase_specutils.core.profiles import pseudo_voigt

            return torch.exp(windowed_log_flux(wl, m.lam_centers, m.log_amplitudes.exp(), m.log_sigmas.exp(),
                                               m.log_gammas.exp(), profile=pseudo_voigt, half_widths=hw,
                                               engine=engine))
    else:
        rv = cfg.get("rv")

        def forward(m):
            return m(wl, rv)

    with torch.no_grad():
        target = forward(truth)
    del truth
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    planned = "graph" in cfg
    if "train" in cfg:
        # whole epochs of blase_specutils.core.train (best-parameter tracking, early-stopping checks, one
        # loss read back per epoch), plain or through a plan; each epoch timed between two callbacks
        from blase_specutils.core.training import train

        rv = cfg.get("rv")
        plan = model.make_plan(wl, rv) if cfg["train"] == "plan" else None
        stamps = [time.perf_counter()]
        hist = train(model, lambda: ((model(wl, rv, plan=plan) - target) ** 2).sum(), epochs=warmup + epochs,
                     lr=0.01, patience=None, progress=False, plans=plan,
                     callback=lambda i, v: stamps.append(time.perf_counter()))
        times = list(np.diff(stamps)[warmup:])
        extra = dict(epochs_run=hist.epochs_run) if plan is None else dict(
            epochs_run=hist.epochs_run, plan_rebuilds=plan.rebuilds)
        return _result(cfg, device, times, model, start_state, forward, dense, args, kw, wl_np, dev, rss0, None,
                       extra)
    if planned:
        # a window plan, and (on CUDA, graph=True) the whole epoch as one CUDA graph
        from blase_specutils.core.graphs import GraphedEpoch
        from blase_specutils.core.plan import WindowPlan

        opt = torch.optim.Adam(params, lr=0.01, capturable=dev.type == "cuda",
                               fused=dev.type == "cuda" or None)
        if cfg.get("fixed_px"):
            plan = WindowPlan(wl, lambda: (model.lam_centers, model.log_amplitudes.exp(), model.log_sigmas.exp(),
                                           model.log_gammas.exp()), half_widths=hw)
            plan_forward = lambda m: torch.exp(plan.log_flux(m.lam_centers, m.log_amplitudes.exp(),  # noqa: E731
                                                             m.log_sigmas.exp(), m.log_gammas.exp()))
        else:
            plan = model.make_plan(wl, cfg.get("rv"))
            plan_forward = lambda m: m(wl, cfg.get("rv"), plan=plan)  # noqa: E731
        epoch = GraphedEpoch(lambda: ((plan_forward(model) - target) ** 2).sum(), opt, plan,
                             graph=bool(cfg["graph"]) and dev.type == "cuda")
    else:
        opt = torch.optim.Adam(params, lr=0.01)
    times = []
    for i in range(warmup + epochs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if planned:
            epoch()
        else:
            opt.zero_grad(set_to_none=True)
            loss = ((forward(model) - target) ** 2).sum()
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    kernels = None
    extra = {}
    if planned:
        extra = dict(plan_rebuilds=plan.rebuilds, graph_recordings=epoch.recordings,
                     chunk_capacity=plan.capacity)
    if profile_dir:
        kernels = _profile(cfg["name"], epoch if planned else None, model, target, opt, dev, Path(profile_dir),
                           forward=forward)
    return _result(cfg, device, times, model, start_state, forward, dense, args, kw, wl_np, dev, rss0, kernels, extra)


def _result(cfg, device, times, model, start_state, forward, dense, args, kw, wl_np, dev, rss0, kernels,
            extra) -> dict:
    """One row: the epoch times, the peak memory and the accuracy of the starting model."""
    from blase_specutils.core import LineCloneModel

    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "GPU MiB"
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        peak_kind = "MiB RSS growth"
    # accuracy of the forward model with the starting parameters (the paper's clone)
    model.load_state_dict(start_state)
    with torch.no_grad():
        flux0 = forward(model).double().cpu().numpy()
        if kw["mode"] != "linear" or kw["profile"] != "pseudo-voigt" or cfg.get("rv"):
            # flux_dense is the unshifted linear pseudo-Voigt model: compare with this model's own
            # dense (untruncated) evaluation, Doppler shifted alike, on every 37th pixel instead
            sub = slice(0, None, 37)
            ref64 = LineCloneModel(*args, **{**kw, "dtype": torch.float64})
            dense = ref64(torch.as_tensor(wl_np[sub], device=dev), cfg.get("rv"), dense=True).cpu().numpy()
            flux0 = flux0[sub]
    err = np.abs(flux0 - dense)
    return dict(name=cfg["name"], device=device, ms_per_epoch=1e3 * float(np.median(times)),
                ms_min=1e3 * float(np.min(times)), epochs_timed=len(times), peak_memory=peak, memory_kind=peak_kind,
                max_abs_err=float(err.max()), rms_err=float(np.sqrt(np.mean(err**2))), kernels_per_epoch=kernels,
                **extra)


def _profile(name: str, epoch, model, target, opt, dev, folder: Path, epochs: int = 5, *,
             forward=None) -> float | None:
    """Profile a few more epochs: an operator table in ``folder``, kernel launches per epoch back.
    ``epoch``: a GraphedEpoch to call, or None for the plain epoch of ``forward``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(epochs):
            if epoch is not None:
                epoch()
                continue
            opt.zero_grad(set_to_none=True)
            ((forward(model) - target) ** 2).sum().backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in name)[:60]
    (folder / f"{slug}_{dev.type}.txt").write_text(
        f"{name} on {dev}, {epochs} epochs\n" + prof.key_averages().table(sort_by=key, row_limit=40))
    if dev.type != "cuda":
        return None
    kern = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = sum(float(getattr(e, "device_time_total", 0.0) or 0.0) for e in kern) / 1e3 / epochs
    print(f"{name}: {len(kern) / epochs:.0f} GPU kernels and {busy:.3f} ms of GPU time per epoch", file=sys.stderr)
    (folder / f"{slug}_{dev.type}.txt").write_text(
        f"{name} on {dev}, {epochs} epochs: {len(kern) / epochs:.0f} kernels, {busy:.3f} ms GPU busy per epoch\n"
        + prof.key_averages().table(sort_by=key, row_limit=40))
    return len(kern) / epochs


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def small_problem_backends(device: str, epochs: int = 30, n_lines: int = 200) -> list[dict]:
    """Every backend that runs on ``device`` on a small problem (``n_lines`` random lines on 20,000
    pixels, far field on, float64): ms per epoch (median), to check that the backend rule holds
    below the paper's size."""
    from blase_specutils.core import EngineOptions, LineCloneModel
    from blase_specutils.core.backends import BACKEND_CLASSES, get_backend

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(3)
    wl = torch.linspace(8600.0, 8800.0, 20_000, dtype=torch.float64, device=dev)
    c = 8600.0 + 200.0 * torch.rand(n_lines, generator=gen, dtype=torch.float64)
    a, s_, g = (torch.log(lo + w * torch.rand(n_lines, generator=gen, dtype=torch.float64))
                for lo, w in ((0.001, 0.03), (0.02, 0.05), (0.01, 0.05)))
    rows = []
    for name in BACKEND_CLASSES:
        if name == "dense" or not get_backend(name).runs_on(dev):
            continue
        model = LineCloneModel(c, a, s_, g, device=dev, engine=EngineOptions(backend=name), wing_tolerance=1e-7)
        with torch.no_grad():
            target = model(wl) * 1.01
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
        times = []
        for _ in range(epochs + 3):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = ((model(wl) - target) ** 2).sum()
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append(dict(backend=name, lines=n_lines, pixels=wl.numel(), ms=1e3 * float(np.median(times[3:]))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="run configurations whose name contains this text (or one of several, \"a,b\")")
    ap.add_argument("--data", type=Path, default=SHARED,
                    help="folder holding clones/ and reference/ as in ../shared/data (default: %(default)s)")
    ap.add_argument("--exclude", help="skip configurations whose name contains this text (or one of several)")
    ap.add_argument("--group", help="only the configurations of this group (\"triton\": the rows that time the "
                                    "Triton paths against the default, about 3 minutes on a GPU)")
    ap.add_argument("--json", type=Path, help="where the results go (default: benchmarks/engine_speed_DEVICE.json)")
    ap.add_argument("--profile-dir", help="also profile each configuration; operator tables go in this folder")
    ap.add_argument("--small", action="store_true",
                    help="time every backend on a small synthetic problem instead (200 lines, 20,000 pixels)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.small:
        print(f"machine: {machine(args.device)}")
        for row in small_problem_backends(args.device):
            print(f"| {row['backend']} | {row['lines']} | {row['pixels']} | {row['ms']:.2f} |")
        return
    if args.one:
        cfg = json.loads(args.one)
        epochs = cfg.get("epochs", args.epochs)
        print(json.dumps(run_one(cfg, args.device, epochs, min(args.warmup, max(1, epochs // 2)), args.data,
                                 args.profile_dir)))
        return
    if not (args.data / "clones").exists():
        sys.exit(f"needs {args.data} (the project's shared data; see --data)")
    rows = []
    print(f"machine: {machine(args.device)}")
    print("| configuration | ms / epoch | peak memory | max abs err | RMS err |")
    print("|---|---|---|---|---|")
    for cfg in CONFIGS:
        if args.only and not any(part in cfg["name"] for part in args.only.split(",")):
            continue
        if args.exclude and any(part in cfg["name"] for part in args.exclude.split(",")):
            continue
        if args.group and cfg.get("group") != args.group:
            continue
        if args.device.split(":")[0] not in cfg.get("devices", ("cpu", "cuda")):
            continue
        cfg = dict(cfg)
        if args.quick:
            cfg["epochs"] = min(cfg.get("epochs", args.epochs), 5)
        cmd = [sys.executable, __file__, "--device", args.device, "--epochs", str(args.epochs),
               "--warmup", str(args.warmup), "--data", str(args.data), "--one", json.dumps(cfg)]
        if args.profile_dir:
            cmd += ["--profile-dir", args.profile_dir]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {cfg['name']} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr else '?'} | | | |")
            print("\n".join(out.stderr.strip().splitlines()[-25:]), file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        ms = r["ms_per_epoch"]
        launches = "" if r.get("kernels_per_epoch") is None else f" ({r['kernels_per_epoch']:.0f} kernels)"
        if "plan_rebuilds" in r:
            launches += f" ({r['plan_rebuilds']} plan rebuilds"
            launches += f", {r['graph_recordings']} graph recordings)" if "graph_recordings" in r else ")"
        print(f"| {r['name']} | {ms:.3g}{launches} | {r['peak_memory']:.0f} {r['memory_kind']} | "
              f"{r['max_abs_err']:.2e} | {r['rms_err']:.2e} |", flush=True)
        # written after every row, so that an interrupted run keeps what it measured
        (args.json or ROOT / "benchmarks" / f"engine_speed_{args.device.replace(':', '')}.json").write_text(
            json.dumps({"machine": machine(args.device), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
