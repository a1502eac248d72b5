"""Accuracy of cloning on the embedded templates and of the engine on the blasé 0.3 clone.

Measures (printed as JSON, one object):

* ``phoenix``: the PHOENIX 10 kK HPF template (muler) cloned at prominence 0.01: number of lines,
  RMS residual at native resolution over 8100-12700 Å, epochs, seconds.
* ``psg``: the PSG telluric transmission cloned over the IGRINS H band (1.45-1.81 µm).
* ``blase03``: the paper's 9,028-line clone evaluated on the native PHOENIX grid, densely (every
  line at every pixel) and with the default windows, against ``flux_dense`` of
  ``../shared/data/reference/blase03_T4700g4p5_HPF_forward.npz``.

Usage: ``python benchmarks/clone_accuracy.py [--epochs N] [--skip phoenix,psg,blase03]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import astropy.units as u
import numpy as np
import torch

import blase_specutils as bs

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def phoenix(epochs: int) -> dict:
    spec = bs.load_template("phoenix-10kK-hpf")
    t0 = time.perf_counter()
    clone = bs.clone_spectrum(spec, band=(8079, 12785) * u.AA, buffer=40 * u.AA, teff=10000 * u.K,
                              prominence=0.01, epochs=epochs, progress=False)
    dt = time.perf_counter() - t0
    return dict(n_lines=clone.n_lines, broad_lines=int(clone.model.broad_lines.numel()),
                rms_8100_12700=clone.rms_residual((8100, 12700) * u.AA), epochs=clone.history.epochs_run,
                stop=clone.history.stop_reason, seconds=round(dt, 1))


def psg(epochs: int, mode: str) -> dict:
    spec = bs.load_template("psg-igrins")
    t0 = time.perf_counter()
    # PSG is sampled at R = 700,000 (0.14 Å): line centres sit on the pixel grid, so they are tuned too
    clone = bs.clone_spectrum(spec, band=(1.45, 1.81) * u.um, buffer=30 * u.AA, flatten=False,
                              prominence=0.01, epochs=epochs, mode=mode, progress=False,
                              tune=("amplitude", "sigma", "gamma", "center"))
    dt = time.perf_counter() - t0
    return dict(mode=mode, n_lines=clone.n_lines, rms_1450_1810nm=clone.rms_residual((1.45, 1.81) * u.um),
                epochs=clone.history.epochs_run, stop=clone.history.stop_reason, seconds=round(dt, 1))


def blase03() -> dict:
    clone = bs.load_blase03(SHARED / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt")
    ref = np.load(SHARED / "reference" / "blase03_T4700g4p5_HPF_forward.npz")
    wl = ref["wavelength"] * u.AA
    out = {}
    t0 = time.perf_counter()
    dense = clone.evaluate(wl, dense=True).flux.value
    out["dense_seconds"] = round(time.perf_counter() - t0, 1)
    out["dense_max_abs_err"] = float(np.abs(dense - ref["flux_dense"]).max())
    inner = (ref["wavelength"] > 8100) & (ref["wavelength"] < 12760)
    for far in (True, False):
        for tol in (1e-6, 1e-7):
            clone.model.wing_tolerance = tol
            clone.model.far_field = far
            f = clone.evaluate(wl).flux.value
            e = np.abs(f - ref["flux_dense"])
            key = f"{'farfield' if far else 'truncated'}_tol{tol:g}"
            out[key] = dict(max_abs_err=float(e.max()), rms_err=float(np.sqrt(np.mean(e**2))),
                            max_abs_err_8100_12760=float(e[inner].max()))
    e = np.abs(ref["flux_blase03"] - ref["flux_dense"])
    out["paper_6000px"] = dict(max_abs_err=float(e.max()), max_abs_err_8100_12760=float(e[inner].max()),
                               rms_err_8100_12760=float(np.sqrt(np.mean(e[inner] ** 2))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    res = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads"}
    if "blase03" not in skip:
        res["blase03"] = blase03()
    if "phoenix" not in skip:
        res["phoenix"] = phoenix(args.epochs)
    if "psg" not in skip:
        res["psg_log"] = psg(args.epochs, "log")
        res["psg_linear"] = psg(args.epochs, "linear")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
