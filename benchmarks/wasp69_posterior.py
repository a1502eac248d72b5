"""Posterior uncertainties on the real WASP 69 HPF order (``blase_specutils.bayes``).

Fits the order as ``wasp69_fit.py`` does by default (the paper's 4700 K clone, Λ = 5 on ln a;
ln σ, ln γ, λc free; R = 55,000 fixed), then runs SVI from that fit with:

- the mean-field and the low-rank guides (ln a, RV, v sin i, continuum latent; widths, centres
  and R held at the fit, so the v sin i error bar is conditional on the fitted widths),
- the mean-field guide with the data uncertainties inflated by √χ²_red (``noise_scale="chi2"``),
- the mean-field guide with ln σ and ln γ latent as well (Laplace prior of scale 2Λ_w = 1 around
  the clone values), which lets v sin i trade off against the widths.

Prints JSON (RV, v sin i with 16th/84th percentiles, wall times) and writes
``wasp69_posterior.json`` beside this file. Runs on one CPU thread.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import blase_specutils as bs
from blase_specutils.bayes import sample_posterior
from blase_specutils.fitting import fit_spectrum

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = bs.read_spectrum(SHARED / "hpf" / "WASP_69_hpf_stack.fits")
    clone = bs.load_blase03(SHARED / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt")
    t0 = time.perf_counter()
    fit = fit_spectrum(data, clone, rv_range=60, progress=False)
    out = {"machine": f"{platform.machine()} CPU, 1 torch thread",
           "adam_fit": {"seconds": round(time.perf_counter() - t0, 1), "rv_kms": float(fit.rv.value),
                        "vsini_kms": float(fit.vsini.value), "chi2_reduced": fit.chi2_reduced,
                        "n_lines": fit.model.stellar.n_lines, "n_pixels": fit.n_pixels}}
    print(json.dumps(out), flush=True)
    runs = {
        "normal": {"guide": "normal"},
        "lowrank": {"guide": "lowrank"},
        "normal, noise × √χ²_red": {"guide": "normal", "noise_scale": "chi2"},
        "normal, widths latent (Λ_w = 0.5)": {"guide": "normal", "tune_lines": ("amplitude", "sigma", "gamma"),
                                              "width_regularization": 0.5},
    }
    for name, kw in runs.items():
        t0 = time.perf_counter()
        p = sample_posterior(fit, num_steps=1000, progress=False, seed=0, **kw)
        wall = time.perf_counter() - t0
        m = p.measurements
        row = {"wall_seconds": round(wall, 1), "steps": 1000, "final_elbo": float(np.mean(p.elbo_history[-50:])),
               "n_lines_data_constrained": int(np.sum(p.lines["data_constrained"]))}
        for k in ("rv", "vsini"):
            row[k] = {"median": float(m[k].value.value), "p16": float(m[k].lower.value),
                      "p84": float(m[k].upper.value), "text": str(m[k])}
        out[name] = row
        print(name, json.dumps(row), flush=True)
    Path(__file__).with_name("wasp69_posterior.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
