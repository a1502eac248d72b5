"""Calibration of the Pyro posteriors (``blase_specutils.bayes``) on simulated HPF-like data.

Each realisation takes a 30 Å window of the paper's 4700 K clone (``../shared/data/clones``; the
lines within the window ± 6 Å), draws the true line amplitudes *from the prior*,
ln a = ln â + Laplace(0, 2Λ) with Λ = 0.15 (a typical change of ±30 %), a true RV (uniform in
±30 km/s), v sin i (uniform 1.5-4 km/s) and a tilted, curved continuum, pushes them through the
forward model of Eq. 10 (RV-shifted clone, rotational kernel, R = 55,000 Gaussian LSF, averaged
over HPF-like pixels of 0.064 Å at 8700 Å) and adds Gaussian noise at S/N 100. It then fits with
:func:`~blase_specutils.fitting.fit_spectrum` (Adam, amplitudes tuned with the same Λ) and runs
:func:`~blase_specutils.bayes.sample_posterior` with each guide.

Because the truth is drawn from the prior of the model that analyses it (and the data from its
likelihood), the exact posterior's 68 % intervals contain the truth 68 % of the time on average:
the coverage measures how well each variational guide approximates the posterior. Coverage is
counted over the line amplitudes whose centres lie inside the data (all of them: most weak lines
are prior-dominated) and, separately, over those the data constrain (posterior 68 % interval of
ln a under half the prior's); RV and v sin i once per realisation, with the RMS of the
standardised error (median − truth)/(half 68 % interval).

The MAP check compares the ``"map"`` guide with the Adam fit on the first realisations: started
from the Adam optimum (does it stay?) and started from the template-matching fit with the clone's
amplitudes (does it converge to the same optimum?), with the Eq. 11 loss at both points.

Usage: ``python benchmarks/svi_calibration.py [--realisations 32] [--steps 800]``; prints one JSON
line per realisation (``--rows FILE`` resumes from such lines), then the summary, and writes
``svi_calibration.json`` beside this file. Runs on one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import torch
from astropy.nddata import StdDevUncertainty
from specutils import Spectrum

from blase_specutils.bayes import sample_posterior
from blase_specutils.cloning import SpectralClone, load_blase03
from blase_specutils.core.transfer import TransferModel, transfer_loss
from blase_specutils.fitting import fit_spectrum

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: window starts (Å): 30 Å each, 50-80 cloned lines inside
WINDOWS = (8705, 9205, 9905, 8105, 9405, 10005, 8205, 9605, 10205, 8305, 9505, 11005)
LAMBDA = 0.15
SNR = 100.0


def simulate(clone: SpectralClone, lo: float, seed: int, *, lam: float = LAMBDA, snr: float = SNR,
             width: float = 30.0, pad: float = 6.0) -> dict:
    """HPF-like data of a window with amplitudes drawn from the Laplace(ln â, 2Λ) prior."""
    gen = np.random.default_rng(seed)
    hi = lo + width
    c = clone.model.lam_centers
    window = clone.model.subset((c > lo - pad) & (c < hi + pad))
    truth = window.subset(torch.arange(window.n_lines))
    with torch.no_grad():
        truth.log_amplitudes += torch.as_tensor(gen.laplace(0.0, 2.0 * lam, window.n_lines))
    wl = np.arange(lo, hi, 0.064 * lo / 8700.0)
    rv, vsini = gen.uniform(-30.0, 30.0), gen.uniform(1.5, 4.0)
    # the same max_vsini as fit_spectrum uses for a 3 km/s start, hence the same model grid λ_Z
    sim = TransferModel(truth, wl, rv=rv, vsini=vsini, continuum_degree=2, max_vsini=23.0)
    cc = np.array([1.0 + gen.normal(0.0, 0.02), gen.normal(0.0, 0.01), gen.normal(0.0, 0.005)])
    with torch.no_grad():
        sim.continuum_coeffs[0] = torch.as_tensor(cc)
        flux = sim().numpy()
    sigma = np.full(wl.size, 1.0 / snr)
    spec = Spectrum(spectral_axis=wl * u.AA, flux=(flux + gen.normal(0.0, sigma)) * u.dimensionless_unscaled,
                    uncertainty=StdDevUncertainty(sigma))
    inside = ((window.lam_centers > lo) & (window.lam_centers < hi)).numpy()
    return {"spec": spec, "clone": SpectralClone(window), "truth_ln_a": truth.log_amplitudes.detach().numpy(),
            "rv": rv, "vsini": vsini, "inside": inside, "start_rv": rv + 0.7}


def fit(sim: dict, *, line_epochs: int = 3000):
    return fit_spectrum(sim["spec"], sim["clone"], rv=sim["start_rv"], vsini=3.0, rv_range=20.0, buffer=10 * u.AA,
                        tune_lines=("amplitude",), regularization=LAMBDA, line_epochs=line_epochs, progress=False)


def eq11_loss(result, samples: dict | None = None) -> float:
    """χ² + Σ|ln a − ln â|/Λ at the fit (or at the first draw of ``samples``)."""
    m = copy.deepcopy(result.model)
    if samples is not None:
        with torch.no_grad():
            m.stellar.log_amplitudes.copy_(torch.as_tensor(samples["ln_amplitude"][0]))
            m.rv.fill_(float(samples["rv"][0]))
            m.rot.log_vsini.fill_(float(np.log(samples["vsini"][0])))
            m.continuum_coeffs.copy_(torch.as_tensor(samples["continuum"][0]))
    m.stellar.log_amplitudes.requires_grad_(True)
    data = torch.as_tensor(np.where(result.good, result.flux, 0.0))
    w = torch.as_tensor(np.where(result.good, 1.0 / result.sigma**2, 0.0))
    with torch.no_grad():
        return float(transfer_loss(m, data, w, log_amp_prior=result.prior["log_amplitudes"],
                                   regularization=result.settings["regularization"]))


def map_check(sim: dict, adam) -> dict:
    out = {}
    ref = adam.model
    lna_adam = ref.stellar.log_amplitudes.detach().numpy()
    rv_adam, vs_adam = float(ref.rv), float(ref.vsini)
    loss_adam = eq11_loss(adam)
    # the RV uncertainty and the constrained lines, from a short normal-guide run
    pf = sample_posterior(adam, "normal", num_steps=400, progress=False, seed=1)
    sig_rv = float(pf.measurements["rv"].error.value)
    sig_vs = float(pf.measurements["vsini"].error.value)
    constrained = np.asarray(pf.lines["data_constrained"]) & sim["inside"]
    for label, start, steps, lr in (("from the Adam fit", adam, 300, 0.01),
                                    ("from the clone (template fit)", fit(sim, line_epochs=0), 2000, 0.2)):
        pm = sample_posterior(start, "map", num_steps=steps, lr=lr, num_samples=1, num_predictive=0,
                              progress=False, seed=0)
        d = pm.samples["ln_amplitude"][0] - lna_adam
        out[label] = {
            "steps": steps, "lr": lr,
            "max_abs_dln_a_constrained": float(np.max(np.abs(d[constrained]))),
            "median_abs_dln_a_constrained": float(np.median(np.abs(d[constrained]))),
            "median_abs_dln_a_all": float(np.median(np.abs(d))),
            "n_constrained": int(constrained.sum()),
            "drv_kms": float(pm.samples["rv"][0] - rv_adam),
            "drv_over_sigma": float((pm.samples["rv"][0] - rv_adam) / sig_rv),
            "dvsini_kms": float(pm.samples["vsini"][0] - vs_adam),
            "dvsini_over_sigma": float((pm.samples["vsini"][0] - vs_adam) / sig_vs),
            "eq11_loss_adam": loss_adam, "eq11_loss_map": eq11_loss(adam, pm.samples),
        }
    return out


def coverage(flags) -> dict:
    f = np.asarray(flags, dtype=bool)
    p = float(f.mean()) if f.size else float("nan")
    return {"fraction": p, "n": int(f.size), "binomial_sd": float(np.sqrt(p * (1 - p) / max(f.size, 1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--realisations", type=int, default=32)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--guides", default="normal,lowrank")
    ap.add_argument("--map-checks", type=int, default=2)
    ap.add_argument("--rows", help="JSON lines of finished realisations to resume from (one row per line)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("svi_calibration.json")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    clone = load_blase03(SHARED / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt")
    guides = args.guides.split(",")
    per = {g: {"lines": [], "constrained": [], "rv": [], "vsini": [], "seconds": []} for g in guides}
    runs = []
    if args.rows:
        for line in Path(args.rows).read_text().splitlines():
            if line.startswith("{") and '"window"' in line and line.rstrip().endswith("}"):
                runs.append(json.loads(line))
    for row in runs:
        for g in guides:
            per[g]["lines"] += row[g]["hits"]
            per[g]["constrained"] += [h for h, c in zip(row[g]["hits"], row[g]["constrained"]) if c]
            for name in ("rv", "vsini"):
                per[g][name].append(row[g][name])
            per[g]["seconds"].append(row[g]["seconds"])
    for k in range(len(runs), args.realisations):
        lo = WINDOWS[k % len(WINDOWS)]
        sim = simulate(clone, lo, seed=100 + k)
        t0 = time.perf_counter()
        adam = fit(sim)
        row = {"window": [lo, lo + 30], "seed": 100 + k, "rv_true": sim["rv"], "vsini_true": sim["vsini"],
               "n_lines_inside": int(sim["inside"].sum()), "adam_seconds": round(time.perf_counter() - t0, 1),
               "adam_rv": float(adam.rv.value), "adam_vsini": float(adam.vsini.value)}
        for g in guides:
            pf = sample_posterior(adam, g, num_steps=args.steps, progress=False, seed=k)
            lo16, hi84 = np.percentile(pf.samples["ln_amplitude"], [16, 84], axis=0)
            t = sim["truth_ln_a"]
            hit = ((t >= lo16) & (t <= hi84))[sim["inside"]]
            con = np.asarray(pf.lines["data_constrained"])[sim["inside"]]
            per[g]["lines"] += hit.tolist()
            per[g]["constrained"] += hit[con].tolist()
            res = {}
            for name in ("rv", "vsini"):
                m = pf.measurements[name]
                truth = sim[name]
                res[name] = {"median": float(m.value.value), "p16": float(m.lower.value),
                             "p84": float(m.upper.value), "covered": bool(m.lower.value <= truth <= m.upper.value),
                             "z": float((m.value.value - truth) / m.error.value)}
                per[g][name].append(res[name])
            per[g]["seconds"].append(pf.settings["seconds"])
            row[g] = {"coverage_lines": float(hit.mean()), "n_constrained": int(con.sum()),
                      "coverage_constrained": float(hit[con].mean()) if con.any() else None,
                      "seconds": pf.settings["seconds"], "final_elbo": float(np.mean(pf.elbo_history[-50:])),
                      "hits": hit.tolist(), "constrained": con.tolist(), **res}
        if k < args.map_checks:
            row["map_check"] = map_check(sim, adam)
        runs.append(row)
        print(json.dumps(row), flush=True)
    maps = [{"window": r["window"], **r["map_check"]} for r in runs if "map_check" in r]
    summary = {}
    for g in guides:
        p = per[g]
        summary[g] = {
            "amplitudes_inside_data": coverage(p["lines"]),
            "amplitudes_data_constrained": coverage(p["constrained"]),
            "rv": coverage([r["covered"] for r in p["rv"]]),
            "rv_rms_z": float(np.sqrt(np.mean([r["z"] ** 2 for r in p["rv"]]))),
            "vsini": coverage([r["covered"] for r in p["vsini"]]),
            "vsini_rms_z": float(np.sqrt(np.mean([r["z"] ** 2 for r in p["vsini"]]))),
            "mean_seconds": float(np.mean(p["seconds"])),
        }
    out = {"machine": f"{platform.machine()} CPU, 1 torch thread", "snr": SNR, "regularization": LAMBDA,
           "prior_scale_ln_a": 2 * LAMBDA, "steps": args.steps, "realisations": args.realisations,
           "summary": summary, "map_checks": maps, "runs": runs}
    print(json.dumps({"summary": summary, "map_checks": maps}, indent=2))
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
