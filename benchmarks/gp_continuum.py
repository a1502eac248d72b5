"""The Gaussian-process pseudo-continuum likelihood (Appendix C.2, Eq. C4): bias, agreement, speed.

Four parts, each printed as JSON (``--out`` also writes them to a file):

``bias``
    Injection-recovery with a wrong continuum. HPF-like data (0.064 Å pixels, 8690-8760 Å) are
    simulated from the paper's 4700 K clone with amplitudes perturbed by up to ±30 %, RV 12.3
    km/s, v sin i 2.5 km/s, R = 55,000, multiplied by ``1 + e(λ)`` with ``e`` drawn from a
    Matérn-3/2 GP of amplitude 2 % and length scale 5 Å, plus Gaussian noise at S/N 100. Line
    amplitudes are fitted (RV scan, template matching, then ln a with Λ = 5, as in
    ``injection_recovery.py``) with the white-noise χ² and with the GP likelihood (defaults:
    Matérn-3/2, initial amplitude 1 %, length scale 5 Å, ℓ ≥ 1 Å). Each fit is repeated on the
    same noise without ``e``; the *bias* of a line is the shift of its fitted ln a caused by the
    continuum error, ``ln â(data with e) − ln â(same data without e)`` for the same likelihood,
    which cancels the noise and the regularisation to first order. Reported: the RMS and the mean
    of the bias over the deep lines (single-line depth > 2 %, 2 Å inside the window) and all
    realisations, their ratio white/GP (target ≥ 3), and the plain errors against the truth.
``agreement``
    Exact (Cholesky) and scalable (KISS-GP, CG, Lanczos) evaluations of the same problem
    (3000 pixels, residual drawn from the GP plus noise): ln p(R), its two terms, the
    conditional mean and the gradient with respect to R.
``timing``
    Seconds per loss evaluation (forward, and forward + backward) of both methods at 2,000 and
    20,000 pixels; exact at 20,000 pixels only with ``--exact-20k`` (≈ 10 GB of memory, minutes),
    otherwise extrapolated as n³ from 2,000, 4,000 and 8,000 pixels.
``cloning``
    A TelFit telluric template (HPF sampling, continuum exactly 1) over 8490-8550 Å is multiplied
    by ``1 + e(λ)`` (the same GP, amplitude 2 %, length 5 Å) and cloned with
    ``likelihood="gp"`` and without; reported: how well the GP's conditional mean (the
    ``pseudo_continuum``) matches the injected ``e``, and how far each clone's line depths are
    from the clone of the clean template.

Run with one thread (``torch.set_num_threads(1)``), e.g.
``python benchmarks/gp_continuum.py all --realisations 5 --out benchmarks/gp_continuum.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from blase_specutils.core import LineCloneModel
from blase_specutils.core.profiles import pseudo_voigt
from blase_specutils.core.transfer import TransferModel, fit_transfer
from blase_specutils.gp import GPContinuumLikelihood

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
F64 = torch.float64


def matern32(x: np.ndarray, amplitude: float, length: float) -> np.ndarray:
    """Dense Matérn-3/2 covariance A² (1 + √3 d/ℓ) exp(−√3 d/ℓ)."""
    t = np.sqrt(3.0) * np.abs(x[:, None] - x[None, :]) / length
    return amplitude**2 * (1.0 + t) * np.exp(-t)


def draw_gp(x: np.ndarray, amplitude: float, length: float, gen: np.random.Generator) -> np.ndarray:
    """One draw of a zero-mean Matérn-3/2 GP at x."""
    chol = np.linalg.cholesky(matern32(x, amplitude, length) + 1e-12 * np.eye(x.size))
    return chol @ gen.normal(size=x.size)


# --------------------------------------------------------------------------------------- bias
def bias(realisations: int, lo: float = 8690.0, hi: float = 8760.0, snr: float = 100.0, seed: int = 1) -> dict:
    sd = torch.load(SHARED / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt", map_location="cpu", weights_only=True)
    full = LineCloneModel(*[sd[k] for k in ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")])
    clone = full.subset((full.lam_centers > lo - 5.0) & (full.lam_centers < hi + 5.0))
    wl = np.arange(lo, hi, 0.064)
    with torch.no_grad():
        v0 = pseudo_voigt(torch.zeros(1, dtype=F64), clone.log_sigmas.exp(), clone.log_gammas.exp()).numpy()
        depth = clone.log_amplitudes.exp().numpy() * v0
        centres = clone.lam_centers.numpy()
        ln_a_clone = clone.log_amplitudes.detach().numpy().copy()
    deep = (centres > lo + 2.0) & (centres < hi - 2.0) & (depth > 0.02)
    gen = np.random.default_rng(seed)
    w = torch.full((wl.size,), snr**2, dtype=F64)

    def fit(data: np.ndarray, gp: bool):
        model = TransferModel(clone.subset(torch.arange(clone.n_lines)), wl, vsini=4.0, continuum_degree=1)
        lik = GPContinuumLikelihood.from_weight(wl, w) if gp else None
        t0 = time.perf_counter()
        fit_transfer(model, torch.as_tensor(data), w, progress=False, rv_scan=np.arange(-30.0, 30.1, 1.0),
                     template_epochs=300, line_epochs=3000, lr=0.03, tune_lines=("amplitude",), regularization=5.0,
                     patience=100, likelihood=lik)
        seconds = time.perf_counter() - t0
        ln_a = model.stellar.log_amplitudes.detach().numpy().copy()
        return model, lik, ln_a, seconds

    runs = []
    shifts = {"white": [], "gp": []}
    errors = {"white": [], "gp": []}
    for r in range(realisations):
        perturb = np.log1p(gen.uniform(-0.3, 0.3, clone.n_lines))
        truth = clone.subset(torch.arange(clone.n_lines))
        with torch.no_grad():
            truth.log_amplitudes += torch.as_tensor(perturb)
        sim = TransferModel(truth, wl, rv=12.3, vsini=2.5, resolving_power=55000.0, continuum_degree=1)
        with torch.no_grad():
            flux = sim().numpy()
        e = draw_gp(wl, 0.02, 5.0, gen)
        noise = gen.normal(0.0, 1.0 / snr, wl.size)
        with_e, without_e = flux * (1.0 + e) + noise, flux + noise
        ln_true = ln_a_clone + perturb
        row = {"realisation": r, "rms_injected_error": float(np.sqrt(np.mean(e**2)))}
        for name in ("white", "gp"):
            model, lik, ln_a, sec = fit(with_e, name == "gp")
            _, _, ln_a0, sec0 = fit(without_e, name == "gp")
            shift = (ln_a - ln_a0)[deep]
            err = (ln_a - ln_true)[deep]
            shifts[name].append(shift)
            errors[name].append(err)
            row[name] = {"rms_bias": float(np.sqrt(np.mean(shift**2))), "mean_bias": float(shift.mean()),
                         "rms_error_vs_truth": float(np.sqrt(np.mean(err**2))),
                         "rms_error_vs_truth_without_e": float(np.sqrt(np.mean((ln_a0 - ln_true)[deep] ** 2))),
                         "rv_kms": float(model.rv), "seconds": [round(sec, 1), round(sec0, 1)]}
            if lik is not None:
                with torch.no_grad():
                    mu = lik.conditional_mean(torch.as_tensor(with_e) - model()).numpy()
                    unscaled = model.unscaled().numpy()
                    e_hat = (model().numpy() + mu) / unscaled - 1.0  # P_data and the GP together
                row[name].update(amplitude=float(lik.amplitude[0]), length_scale=float(lik.length_scale[0]),
                                 rms_gp_mean_minus_e=float(np.sqrt(np.mean((mu - e) ** 2))),
                                 rms_continuum_minus_e=float(np.sqrt(np.mean((e_hat - e) ** 2))))
        row["ratio"] = row["white"]["rms_bias"] / row["gp"]["rms_bias"]
        runs.append(row)
        print(json.dumps(row), flush=True)
    out = {"window_angstrom": [lo, hi], "pixels": int(wl.size), "n_lines": int(clone.n_lines),
           "n_deep_lines": int(deep.sum()), "snr": snr, "realisations": realisations, "runs": runs}
    for name in ("white", "gp"):
        s = np.concatenate(shifts[name])
        er = np.concatenate(errors[name])
        out[name] = {"rms_bias": float(np.sqrt(np.mean(s**2))), "mean_bias": float(s.mean()),
                     "mean_abs_bias": float(np.mean(np.abs(s))), "rms_error_vs_truth": float(np.sqrt(np.mean(er**2)))}
    out["bias_ratio_white_over_gp"] = out["white"]["rms_bias"] / out["gp"]["rms_bias"]
    out["mean_abs_bias_ratio"] = out["white"]["mean_abs_bias"] / out["gp"]["mean_abs_bias"]
    return out


# --------------------------------------------------------------------------------------- agreement
def _residual(n: int, gen: np.random.Generator):
    wl = 8700.0 + 0.064 * np.arange(n)
    sigma = np.full(n, 0.01)
    r = draw_gp(wl, 0.02, 5.0, gen) + gen.normal(0.0, 0.01, n)
    return wl, sigma, torch.as_tensor(r)


def agreement(n: int = 3000, seed: int = 3) -> dict:
    wl, sigma, r = _residual(n, np.random.default_rng(seed))
    out = {"pixels": n}
    res = {}
    for method in ("exact", "scalable"):
        lik = GPContinuumLikelihood(wl, sigma, amplitude=0.02, length_scale=5.0, method=method)
        rg = r.clone().requires_grad_()
        quad, logdet = lik.quad_logdet(rg)
        (grad,) = torch.autograd.grad(quad + logdet, rg)
        with torch.no_grad():
            res[method] = {"lml": float(lik.log_marginal_likelihood(r)), "quad": float(quad), "logdet": float(logdet),
                           "loss": float(lik(r)), "mean": lik.conditional_mean(r).numpy(), "grad": grad.numpy()}
    ex, sc = res["exact"], res["scalable"]
    out.update(
        lml_exact=ex["lml"], lml_scalable=sc["lml"], lml_abs_diff=abs(sc["lml"] - ex["lml"]),
        loss_exact=ex["loss"], loss_scalable=sc["loss"],
        quad_rel_diff=abs(sc["quad"] - ex["quad"]) / ex["quad"], logdet_abs_diff=abs(sc["logdet"] - ex["logdet"]),
        mean_max_abs_diff=float(np.max(np.abs(sc["mean"] - ex["mean"]))),
        mean_rms=float(np.sqrt(np.mean(ex["mean"] ** 2))),
        grad_rel_diff=float(np.linalg.norm(sc["grad"] - ex["grad"]) / np.linalg.norm(ex["grad"])),
    )
    return out


# --------------------------------------------------------------------------------------- timing
def _time(lik: GPContinuumLikelihood, r: torch.Tensor, repeats: int) -> dict:
    fwd, both = [], []
    lik(r)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            lik(r)
        fwd.append(time.perf_counter() - t0)
        rg = r.clone().requires_grad_()
        t0 = time.perf_counter()
        loss = lik(rg)
        loss.backward()
        both.append(time.perf_counter() - t0)
    return {"forward_s": float(np.median(fwd)), "forward_backward_s": float(np.median(both))}


def timing(exact_20k: bool = False, seed: int = 4) -> dict:
    gen = np.random.default_rng(seed)
    out = {}
    for n in (2000, 4000, 8000, 20000):
        wl = 8700.0 + 0.064 * np.arange(n)
        sigma = np.full(n, 0.01)
        r = torch.as_tensor(0.02 * np.sin(wl / 2.0) + gen.normal(0.0, 0.01, n))
        row = {}
        if n < 20000 or exact_20k:
            row["exact"] = _time(GPContinuumLikelihood(wl, sigma, amplitude=0.02, method="exact"), r, 3 if n < 8000 else 1)
        if n in (2000, 20000):
            row["scalable"] = _time(GPContinuumLikelihood(wl, sigma, amplitude=0.02, method="scalable"), r, 3)
        out[str(n)] = row
        print(n, json.dumps(row), flush=True)
    if not exact_20k:
        ns = np.array([2000.0, 4000.0, 8000.0])
        for key in ("forward_s", "forward_backward_s"):
            t = np.array([out[str(int(k))]["exact"][key] for k in ns])
            scale = np.exp(np.mean(np.log(t / ns**3)))  # least squares of t = c n³ in log space
            out["20000"].setdefault("exact_extrapolated_n3", {})[key] = float(scale * 20000.0**3)
    return out


# --------------------------------------------------------------------------------------- cloning
def cloning(band=(8490.0, 8550.0), epochs: int = 400, seed: int = 5) -> dict:
    import astropy.units as u
    from specutils import Spectrum

    from blase_specutils import clone_spectrum, load_template, trim

    clean = trim(load_template("telfit-hpf"), band * u.AA, 0.0 * u.AA)
    wl = clean.spectral_axis.to_value(u.AA)
    e = draw_gp(wl, 0.02, 5.0, np.random.default_rng(seed))
    dirty = Spectrum(spectral_axis=clean.spectral_axis, flux=clean.flux * (1.0 + e))
    kw = {"band": band * u.AA, "buffer": 0.0 * u.AA, "flatten": False, "prominence": 0.01, "epochs": epochs,
          "progress": False}
    out = {"band_angstrom": list(band), "pixels": int(wl.size)}
    clones = {}
    for name, spec, lik in (("clean", clean, None), ("white", dirty, None), ("gp", dirty, "gp")):
        t0 = time.perf_counter()
        clones[name] = clone_spectrum(spec, likelihood=lik, **kw)
        out[f"seconds_{name}"] = round(time.perf_counter() - t0, 1)
    pc = clones["gp"].pseudo_continuum
    mu = np.interp(wl, pc.spectral_axis.to_value(u.AA), pc.flux.value)
    out["rms_injected_e"] = float(np.sqrt(np.mean(e**2)))
    out["rms_pseudo_continuum_minus_e"] = float(np.sqrt(np.mean((mu - e) ** 2)))
    out["correlation_pseudo_continuum_e"] = float(np.corrcoef(mu, e)[0, 1])
    out["gp"] = {k: clones["gp"].meta[k] for k in ("gpkernel", "gpamp", "gplength", "gpnoise")}
    # line depths of each clone against the clean template's clone, evaluated on the same grid
    ref = clones["clean"].evaluate(clean.spectral_axis).flux.value
    for name in ("white", "gp"):
        model = clones[name].evaluate(clean.spectral_axis).flux.value
        out[f"rms_clone_minus_clean_clone_{name}"] = float(np.sqrt(np.mean((model - ref) ** 2)))
        out[f"n_lines_{name}"] = clones[name].n_lines
    out["n_lines_clean"] = clones["clean"].n_lines
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["bias", "agreement", "timing", "cloning", "all"])
    parser.add_argument("--realisations", type=int, default=5)
    parser.add_argument("--exact-20k", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    parts = ["agreement", "timing", "cloning", "bias"] if args.part == "all" else [args.part]
    result = json.loads(args.out.read_text()) if args.out is not None and args.out.exists() else {}
    for part in parts:
        if part == "bias":
            result[part] = bias(args.realisations)
        elif part == "agreement":
            result[part] = agreement()
        elif part == "timing":
            result[part] = timing(args.exact_20k)
        else:
            result[part] = cloning()
        print(json.dumps({part: result[part]}, indent=2), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
