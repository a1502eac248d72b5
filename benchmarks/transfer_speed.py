"""Speed of transfer learning (``fit_transfer``), with and without window plans.

The problem has the size of one HPF order: the paper's 4700 K clone (blasé 0.3) within 8626–8798 Å,
with four of its broadest lines given the Appendix C.4 wing correction. The data are HPF-like pixels
(0.0525 Å, 8656–8768 Å, as the WASP 69 order of ``wasp69_fit.py``) made from the clone with its
amplitudes perturbed by up to ±20 %, RV −9.5 km/s, v sin i 2 km/s, R = 55,000 and S/N 300. Both
stages run a fixed number of epochs (no early stopping); a stage's time per epoch is its wall time
(``TrainingHistory.seconds``) over its epochs, warm-up, plan rebuilds and graph recordings included.
Only torch and numpy are needed (no astropy), so it runs on a bare GPU machine.

    python benchmarks/transfer_speed.py [--device cuda] [--epochs 300] [--data ../shared/data]

Results go to ``benchmarks/transfer_speed_DEVICE.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _setup(data: Path, device: str):
    from blase_specutils.core import LineCloneModel
    from blase_specutils.core.engine import window_half_widths
    from blase_specutils.core.transfer import TransferModel

    sd = torch.load(data / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt", map_location="cpu", weights_only=True)
    c = sd["lam_centers"]
    sel = torch.nonzero((c > 8626.0) & (c < 8798.0)).flatten()
    sel = sel[torch.argsort(c[sel])]
    args = [sd[k][sel].clone() for k in ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")]
    hw = window_half_widths(args[1].exp(), args[2].exp(), args[3].exp(), 1e-7)
    broad = torch.argsort(hw, descending=True)[:4].tolist()
    wl = np.arange(8656.0, 8768.0, 0.0525)
    gen = np.random.default_rng(11)
    truth = LineCloneModel(args[0], args[1] + torch.as_tensor(np.log1p(gen.uniform(-0.2, 0.2, sel.numel()))),
                           args[2], args[3], broad_lines=broad, device=device)
    sim = TransferModel(truth, wl, rv=-9.5, vsini=2.0, continuum_degree=2)
    with torch.no_grad():
        flux = sim()
    sigma = 1.0 / 300.0
    data_flux = flux + torch.as_tensor(gen.normal(0.0, sigma, wl.size), device=flux.device)
    weight = torch.full_like(data_flux, 1.0 / sigma**2)
    clone = LineCloneModel(*args, broad_lines=broad, device=device)
    model = TransferModel(clone, wl, rv=-8.0, vsini=3.0, continuum_degree=2)
    return model, data_flux, weight, len(sel)


def run(data: Path, device: str, epochs: int, plan: bool) -> dict:
    from blase_specutils.core.transfer import fit_transfer

    model, flux, weight, n_lines = _setup(data, device)
    t0 = time.perf_counter()
    fit = fit_transfer(model, flux, weight, rv_scan=None, template_epochs=epochs, line_epochs=epochs,
                       tune_lines=("amplitude", "sigma", "gamma", "wing"), patience=None, progress=False, plan=plan)
    total = time.perf_counter() - t0
    out = dict(device=device, plan=plan, lines=n_lines, pixels=int(flux.numel()), model_pixels=int(model.lam_z.numel()),
               seconds=round(total, 3), chi2=fit.chi2)
    for stage, hist in fit.stages.items():
        out[f"{stage}_ms_per_epoch"] = 1e3 * hist.seconds / max(hist.epochs_run, 1)
        out[f"{stage}_epochs"] = hist.epochs_run
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=300, help="epochs of each stage (default: %(default)s)")
    ap.add_argument("--data", type=Path, default=SHARED, help="folder holding clones/ (default: %(default)s)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    rows = []
    print(f"machine: {machine}, torch {torch.__version__}")
    print("| plan | template ms / epoch | lines ms / epoch | χ² start → lines | total s |")
    print("|---|---|---|---|---|")
    for plan in (False, True, False, True):  # twice each, alternating
        r = run(args.data, args.device, args.epochs, plan)
        rows.append(r)
        print(f"| {plan} | {r['template_ms_per_epoch']:.3g} | {r['lines_ms_per_epoch']:.3g} | "
              f"{r['chi2']['start']:.4g} → {r['chi2']['lines']:.4g} | {r['seconds']:.1f} |", flush=True)
        (args.json or ROOT / "benchmarks" / f"transfer_speed_{args.device.replace(':', '')}.json").write_text(
            json.dumps({"machine": machine, "torch": torch.__version__, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
