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
    dict(name="far-field, float64, torch kernel (the GPU code path)", dtype="float64", far_field=True, tol=1e-7,
         kernel="torch", devices=("cpu",)),
    dict(name="far-field, float64, Triton kernel", dtype="float64", far_field=True, tol=1e-7, kernel="triton",
         devices=("cuda",)),
    dict(name="far-field, float64, log mode, Triton kernel", dtype="float64", far_field=True, tol=1e-7, mode="log",
         kernel="triton", devices=("cuda",)),
    dict(name="far-field, float64, exact Voigt, Triton kernel", dtype="float64", far_field=True, tol=1e-7,
         profile="voigt", kernel="triton", devices=("cuda",)),
    dict(name="truncated windows, tol 1e-6, float64", dtype="float64", far_field=False, tol=1e-6),
    dict(name="fixed 6000-px windows (paper), float64", dtype="float64", far_field=False, fixed_px=6000, epochs=3),
]


def _problem():
    sd = torch.load(SHARED / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt", map_location="cpu", weights_only=True)
    path = files("muler.templates").joinpath("PHOENIX_10kK_hpf_template.csv")
    wl = np.loadtxt(path, delimiter=",", skiprows=1, usecols=0)
    wl = wl[(wl >= 8049) & (wl <= 12815)]
    ref = np.load(SHARED / "reference" / "blase03_T4700g4p5_HPF_forward.npz")
    assert wl.size == 335851 and np.array_equal(wl, ref["wavelength"])
    return sd, wl, ref["flux_dense"]


def run_one(cfg: dict, device: str, epochs: int, warmup: int) -> dict:
    from blase_specutils.core import LineCloneModel
    from blase_specutils.core.engine import windowed_log_flux

    if cfg.get("kernel") == "torch":
        # run what a GPU runs (blocked torch operations), here on the CPU: hide the compiled kernel
        import blase_specutils.core.engine as engine
        import blase_specutils.core.farfield as farfield

        engine.HAVE_NUMBA = farfield.HAVE_NUMBA = False
    elif cfg.get("kernel") == "triton":
        import blase_specutils.core.engine as engine

        engine.KERNEL_ON_CUDA = "triton"
    sd, wl_np, dense = _problem()
    dtype = getattr(torch, cfg["dtype"])
    dev = torch.device(device)
    order = torch.argsort(sd["lam_centers"])
    args = [sd[k][order] for k in ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")]
    kw = dict(mode=cfg.get("mode", "linear"), profile=cfg.get("profile", "pseudo-voigt"),
              wing_tolerance=cfg["tol"] if "tol" in cfg else 1e-6, far_field=cfg["far_field"], dtype=dtype, device=dev)
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
                                               m.log_gammas.exp(), profile=pseudo_voigt, half_widths=hw))
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
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    times = []
    for i in range(warmup + epochs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = ((forward(model) - target) ** 2).sum()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
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
                max_abs_err=float(err.max()), rms_err=float(np.sqrt(np.mean(err**2))))


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="run configurations whose name contains this text")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        cfg = json.loads(args.one)
        epochs = cfg.get("epochs", args.epochs)
        print(json.dumps(run_one(cfg, args.device, epochs, min(args.warmup, max(1, epochs // 2)))))
        return
    if not (SHARED / "clones").exists():
        sys.exit(f"needs {SHARED} (the project's shared data)")
    rows = []
    print(f"machine: {machine(args.device)}")
    print("| configuration | ms / epoch | peak memory | max abs err | RMS err |")
    print("|---|---|---|---|---|")
    for cfg in CONFIGS:
        if args.only and args.only not in cfg["name"]:
            continue
        if args.device.split(":")[0] not in cfg.get("devices", ("cpu", "cuda")):
            continue
        cfg = dict(cfg)
        if args.quick:
            cfg["epochs"] = min(cfg.get("epochs", args.epochs), 5)
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--epochs", str(args.epochs),
                              "--warmup", str(args.warmup), "--one", json.dumps(cfg)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {cfg['name']} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr else '?'} | | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"| {r['name']} | {r['ms_per_epoch']:.1f} | {r['peak_memory']:.0f} {r['memory_kind']} | "
              f"{r['max_abs_err']:.2e} | {r['rms_err']:.2e} |", flush=True)
    Path(ROOT / "benchmarks" / f"engine_speed_{args.device.replace(':', '')}.json").write_text(
        json.dumps({"machine": machine(args.device), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
