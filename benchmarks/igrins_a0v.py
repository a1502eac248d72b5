"""Telluric-only fits of the IGRINS H-band A0V standard with a clone of the PSG telluric model.

Data: ``../shared/data/igrins/SDCH_20201202_0059.spec_a0v.fits``, extension ``A0V_SPEC`` (the A0V
telluric standard observed for the target CPD-57 1131, Gemini South, 2020-12-03; 28 orders × 2048
px, read with :func:`blase_specutils.io.read_igrins_plp`). Model: the PSG transmission inside
muler (R = 100,000, 1.4-2.5 µm), one clone per molecule column (default H2O, CO2, CH4; ``--total``:
one clone of the total transmission, the recipe before 2026-12-07), each over 1.45-1.81 µm ± 30 Å
(prominence 0.01, centres tuned, no flattening, 300 epochs, log mode, trained for the Beer's-law
powers ``--powers``: ``clone_spectrum(powers=...)``; cached in ``benchmarks/.cache``), fitted order
by order (IGRINS orders overlap, so they cannot be fitted jointly) with one power per molecule,
``fit_spectrum(order, None, telluric={"H2O": ..., "CO2": ..., "CH4": ...})``: R
starts at 45,000; template matching tunes the telluric power X, the continuum (quadratic per
order) and R; the line stage tunes the telluric amplitudes (``tune_telluric=("amplitude",)``,
Λ = 5) with X, continuum and R free. ``--width-orders`` fits a few orders again with the telluric
widths tuned too (``("amplitude", "sigma", "gamma")``).

The clone is in log mode by default (Eq. A2, ln T = −Σ a V): then T^X = exp(−X Σ a V) is Beer's
law exactly. A linear-mode clone floors each saturated line's transmission at 1e-12, and
(1e-12)^X is a flat-bottomed box for X ≪ 1 (``--mode linear`` shows it in the 1.75-1.8 µm water
band).

Orders are numbered 0-27 in ascending wavelength (the order of
:func:`~blase_specutils.io.read_igrins_plp`); ``file_row`` is the row in the FITS images.

The user-side reduction, stated because it decides what the fit sees:

* **Uncertainties.** ``A0V_SPEC`` has none, and the ``.variance.fits`` file is the variance of
  ``TGT_SPEC`` (the science target, same night and pipeline). A straight line
  var = α·F + β fitted to (TGT_SPEC, variance) per order (α ≈ 0.55 ADU, β ≈ 500 ADU² over all
  orders: photon noise plus a read/sky floor) is applied to the A0V counts. This is an
  assumption (same gain, read noise and number of frames for the standard); the DER_SNR noise
  of each order is reported beside it so that χ² can be rescaled.
* **Order edges.** Pixels where a 65-px running median of the counts is below 10 % of the
  order's 95th percentile (the blaze edges) are masked, and so are the outermost 120 of the
  remaining pixels at each end (where the blaze turns over faster than the normalisation
  follows); the number per order is reported (``n_masked_edge``). Nothing else is masked.
* **Blaze.** Each order is divided by a cubic spline (knots every 200 px, two more within 160 px
  of each end) through the 90th percentiles of 32-px bins, iteratively rejecting bins more than
  3 % below it (absorbed bins). Broad stellar lines partly enter this continuum; the per-order
  quadratic of the fit takes up what is left.
* **Hydrogen.** The A0V star has Brackett lines (Br 10 at 1.7367 µm to the series limit at
  1.4588 µm, vacuum) that a telluric-only model cannot fit. The pixels within ``--mask-brackett``
  Å (default 5) of each are masked in the fit (``n_masked_brackett``); the orders containing one
  (centre within the order ± 20 Å) are listed, and the reduced χ² is given both over all fitted
  pixels and over the pixels farther than 15 Å from every Brackett centre (a diagnostic).
* **Transmission mask.** Each order's row also gives the fitted transmission at its median good
  pixel and χ²_red over the pixels whose fitted transmission is at least 20 % (with the fraction of
  pixels kept), the numbers of the telluric issue's targets.

Usage: ``python benchmarks/igrins_a0v.py [--orders N ...] [--width-orders N ...] [--epochs N] [--total [--mode
linear|log]] [--molecules M ...] [--powers X ...] [--mask-brackett AA] [--json PATH]``; default: every order with usable
pixels inside the clone's band.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
IGRINS = HERE.parent.parent / "shared" / "data" / "igrins"
SPEC = IGRINS / "SDCH_20201202_0059.spec_a0v.fits"
VARIANCE = IGRINS / "SDCH_20201202_0059.variance.fits"
CACHE = HERE / ".cache"
BAND_UM = (1.45, 1.81)
#: Pixels where the running median of the counts is below this fraction of the 95th percentile are masked.
EDGE_FRACTION = 0.1
#: ... and so are the outermost pixels of what is left at each end of an order.
TRIM_PX = 120
#: Rydberg constant of hydrogen (cm^-1): vacuum wavenumbers of the Brackett series n -> 4.
RYDBERG_H = 109677.583


def brackett_lines(n_max: int = 40) -> dict[int, float]:
    """Vacuum wavelengths (Å) of Brackett n -> 4 for n = 10 ... n_max (the H-band members)."""
    return {n: 1e8 / (RYDBERG_H * (1.0 / 16.0 - 1.0 / n**2)) for n in range(10, n_max + 1)}


def psg_clone(mode: str, epochs: int = 300):
    """The PSG clone over the H band, cloned once and cached (about 1-2 min on 2 CPU cores)."""
    import astropy.units as u

    from blase_specutils import SpectralClone, clone_spectrum, load_template

    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"psg-igrins_{mode}_clone.fits"
    if path.exists():
        return SpectralClone.load(path), path, 0.0
    t0 = time.perf_counter()
    clone = clone_spectrum(load_template("psg-igrins"), band=BAND_UM * u.um, buffer=30 * u.AA, flatten=False,
                           prominence=0.01, epochs=epochs, mode=mode, progress=False,
                           tune=("amplitude", "sigma", "gamma", "center"))
    seconds = time.perf_counter() - t0
    clone.save(path, overwrite=True)
    return clone, path, seconds


def molecule_clones(molecules, epochs: int = 300, powers=None):
    """One log-mode clone per PSG molecule column over the H band (cached), for one Beer's-law
    power per molecule; a molecule with no line above the prominence in the band is left out."""
    import astropy.units as u

    from blase_specutils import SpectralClone, clone_spectrum, load_template

    CACHE.mkdir(exist_ok=True)
    out, seconds = {}, 0.0
    for mol in molecules:
        path = CACHE / f"psg-igrins_{mol}_log{'_powers' if powers else ''}_clone.fits"
        if path.exists():
            out[mol] = SpectralClone.load(path)
            continue
        t0 = time.perf_counter()
        try:
            clone = clone_spectrum(load_template("psg-igrins", molecule=mol), band=BAND_UM * u.um, buffer=30 * u.AA,
                                   flatten=False, prominence=0.01, epochs=epochs, mode="log", progress=False,
                                   tune=("amplitude", "sigma", "gamma", "center"), powers=powers)
        except ValueError as err:
            print(f"{mol}: no clone ({err})")
            continue
        seconds += time.perf_counter() - t0
        clone.save(path, overwrite=True)
        out[mol] = clone
    return out, seconds


def _transmission_numbers(r, floor: float = 0.2) -> dict:
    """The issue's masks: the fitted transmission at the order's median good pixel, and χ²_red over
    the good pixels whose fitted transmission is at least ``floor`` (with the fraction kept)."""
    trans = r.telluric_transmission()
    good = r.good
    keep = good & (trans >= floor)
    res = (r.flux - r.model_flux) / r.sigma
    n = int(keep.sum())
    return {"median_transmission": float(np.median(trans[good])),
            "chi2_reduced_transmission_above_20pc": float(np.sum(res[keep] ** 2) / max(n - 3, 1)) if n else None,
            "fraction_kept_transmission_above_20pc": n / max(int(good.sum()), 1)}


def _fmt_power(x) -> str:
    return f"{x:.3f}" if not isinstance(x, dict) else ",".join(f"{k} {v:.3f}" for k, v in x.items())


def noise_model() -> tuple[float, float]:
    """α, β of var = α·F + β, fitted to the target's spectrum and variance (orders with good pixels)."""
    from astropy.io import fits

    with fits.open(SPEC) as h:
        tgt = np.asarray(h["TGT_SPEC"].data, dtype=float)
    with fits.open(VARIANCE) as h:
        var = np.asarray(h[0].data, dtype=float)
    ok = np.isfinite(tgt) & np.isfinite(var) & (tgt > 0) & (var > 0)
    a = np.vstack([tgt[ok], np.ones(ok.sum())]).T
    # a robust fit: iterate, dropping the worst 5 % of relative residuals
    keep = np.ones(ok.sum(), bool)
    for _ in range(5):
        coef = np.linalg.lstsq(a[keep], var[ok][keep], rcond=None)[0]
        rel = np.abs(var[ok] / (a @ coef) - 1)
        keep = rel < np.percentile(rel, 95)
    return float(coef[0]), float(coef[1])


def _blaze(w, f, good, nbin=32, knot_px=200, end_px=160, clip=0.03):
    """Cubic spline through the 90th percentiles of ``nbin``-px bins (knots every ``knot_px`` px and
    two more within ``end_px`` of each end, where the blaze turns over fast), rejecting bins more than
    ``clip`` below it, except the bins within ``end_px`` of the ends."""
    from scipy.interpolate import LSQUnivariateSpline

    idx = np.flatnonzero(good)
    first, last = idx[0], idx[-1]
    xb, yb, ends = [], [], []
    for i in range(first, last + 1, nbin):
        sl = slice(i, min(i + nbin, last + 1))
        g = good[sl] & (f[sl] > 0)
        if g.sum() < max(4, (sl.stop - sl.start) // 2):
            continue
        xb.append(np.median(w[sl][g]))
        yb.append(np.percentile(f[sl][g], 90))
        ends.append(i - first < end_px or last - i < end_px)
    xb, yb, ends = np.asarray(xb), np.asarray(yb), np.asarray(ends)
    dl = (w[last] - w[first]) / (last - first)  # Å per pixel
    keep = np.ones(xb.size, bool)
    spl = None
    for _ in range(10):
        xk = xb[keep]
        n_int = max(2, int((last - first) / knot_px))
        knots = list(np.linspace(w[first], w[last], n_int + 1)[1:-1])
        knots += [w[first] + f_ * end_px * dl for f_ in (0.3, 0.7)] + [w[last] - f_ * end_px * dl for f_ in (0.3, 0.7)]
        knots = np.unique(np.asarray(knots))
        knots = knots[(knots > xk[1]) & (knots < xk[-2])]
        # at least one kept bin between neighbouring knots (Schoenberg-Whitney)
        ok = [knots[0]] if knots.size else []
        for kn in knots[1:]:
            if np.any((xk > ok[-1]) & (xk < kn)):
                ok.append(kn)
        spl = LSQUnivariateSpline(xk, yb[keep], np.asarray(ok), k=3)
        new = (yb > spl(xb) * (1 - clip)) | ends
        if np.array_equal(new, keep):
            break
        keep = new
    return spl(np.clip(w, xb[0], xb[-1]))


def prepare(order, alpha: float, beta: float, brackett_mask: float = 0.0):
    """Normalised order (flux / blaze, σ / blaze), as a Spectrum with the edge mask (and pixels within
    ``brackett_mask`` Å of a Brackett line masked); and facts."""
    import astropy.units as u
    from astropy.nddata import StdDevUncertainty
    from scipy.ndimage import median_filter
    from specutils import Spectrum

    from blase_specutils.fitting import _noise_from_flux

    w = order.spectral_axis.to_value(u.AA)
    f = np.asarray(order.flux.value, dtype=float)
    finite = np.isfinite(f)
    smooth = median_filter(np.where(finite, f, 0.0), size=65, mode="nearest")
    good = finite & (smooth >= EDGE_FRACTION * np.percentile(f[finite], 95))
    idx = np.flatnonzero(good)
    good[idx[:TRIM_PX]] = False  # the last pixels before each end, where the blaze turns over too fast
    good[idx[-TRIM_PX:]] = False
    cont = _blaze(w, f, good)
    good &= cont > 0
    n_brackett = 0
    if brackett_mask > 0:
        near = np.zeros(w.size, bool)
        for lam in brackett_lines().values():
            near |= np.abs(w - lam) < brackett_mask
        n_brackett = int((good & near).sum())
        good &= ~near
    cont = np.where(good, cont, 1.0)
    sigma = np.sqrt(np.clip(alpha * np.where(good, f, 0.0), 0.0, None) + beta) / cont
    norm = np.where(good, f / cont, np.nan)
    spec = Spectrum(spectral_axis=order.spectral_axis, flux=norm * u.one,
                    uncertainty=StdDevUncertainty(np.where(good, sigma, 1.0)), mask=~good)
    der = _noise_from_flux(norm[good])
    facts = {"n_pixels_finite": int(finite.sum()), "n_masked_edge": int((finite & ~good).sum()),
             "median_sigma": float(np.median(sigma[good])), "der_snr_sigma": der,
             "median_snr": float(np.median(norm[good] / sigma[good])), "n_masked_brackett": n_brackett}
    return spec, facts


def fit_order(k, s, clone, alpha, beta, br, epochs, tune_telluric, brackett_mask: float = 0.0) -> dict:
    """Fit one order telluric-only and collect the numbers of the report."""
    import astropy.units as u

    from blase_specutils.fitting import fit_spectrum

    w = s.spectral_axis.to_value(u.AA)
    spec, facts = prepare(s, alpha, beta, brackett_mask)
    t0 = time.perf_counter()
    r = fit_spectrum(spec, None, telluric=clone, resolving_power=45000.0, tune_resolving_power=True,
                     tune_telluric=tune_telluric, template_epochs=epochs, line_epochs=epochs, progress=False)
    seconds = time.perf_counter() - t0
    inside = {n: lam for n, lam in br.items() if w[0] - 20 <= lam <= w[-1] + 20}
    near = np.zeros(r.wavelength.size, bool)
    for lam in br.values():
        near |= np.abs(r.wavelength - lam) < 15.0
    res = ((r.flux - r.model_flux) / r.sigma)[r.good]
    far = ~near[r.good]
    tm = r.template
    r_min = r.model.inst.min_resolving_power
    row = {
        "order": k, "file_row": int(s.meta["order"]), "wavelength_um": [round(w[0] / 1e4, 5), round(w[-1] / 1e4, 5)], "tune_telluric": list(tune_telluric),
        **facts, "n_pixels_fitted": r.n_pixels, "n_telluric_lines": r.model.telluric.n_lines,
        "telluric_power_sigma": {k[len("telluric_power_"):] or "X": v for k, v in r.uncertainties.items()
                                 if k.startswith("telluric_power")},
        "template_chi2_reduced": tm["chi2_reduced"], "template_telluric_power": tm["telluric_power"],
        "template_resolving_power": tm["resolving_power"],
        "chi2_reduced": r.chi2_reduced, "telluric_power": r.telluric_power, "resolving_power": r.resolving_power,
        "resolving_power_at_kernel_limit": bool(r.resolving_power <= r_min * 1.0001),
        "rms_residual": r.rms_residual, "n_lines_changed": int(np.sum(r.lines["changed"])),
        "flag_codes": [f.code for f in r.flags],
        "brackett": {f"Br{n}": round(lam / 1e4, 5) for n, lam in inside.items()},
        "chi2_reduced_far_from_brackett": float(np.sum(res[far] ** 2) / max(far.sum() - 3, 1)) if far.any() else None,
        "n_pixels_far_from_brackett": int(far.sum()),
        **_transmission_numbers(r),
        "epochs": [r.fit.stages["template"].epochs_run, r.fit.stages["lines"].epochs_run],
        "seconds": round(seconds, 1),
    }
    print(f"order {k:2d} {w[0] / 1e4:.4f}-{w[-1] / 1e4:.4f} µm [{','.join(tune_telluric)}]: chi2_red template "
          f"{tm['chi2_reduced']:8.2f} (X {_fmt_power(tm['telluric_power'])}, R {tm['resolving_power']:.0f}) -> lines "
          f"{r.chi2_reduced:8.2f} (X {_fmt_power(r.telluric_power)}, R {r.resolving_power:.0f}); Brackett {list(inside) or '-'}; "
          f"{seconds:.0f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, nargs="+", help="order indices (ascending wavelength); default all usable")
    ap.add_argument("--epochs", type=int, default=300, help="largest epochs of each stage (default: %(default)s)")
    ap.add_argument("--mode", choices=("linear", "log"), default="log", help="mode of the PSG clone (default: %(default)s)")
    ap.add_argument("--width-orders", type=int, nargs="*", default=[5, 12, 24],
                    help="orders also fitted with the telluric widths tuned (default: %(default)s)")
    ap.add_argument("--molecules", nargs="*", default=["H2O", "CO2", "CH4"],
                    help="clone these PSG molecule columns separately and fit one power per molecule "
                         "(default: %(default)s)")
    ap.add_argument("--total", action="store_true",
                    help="one clone of the total transmission and one power instead (the recipe before 2026-12-07)")
    ap.add_argument("--powers", type=float, nargs="*", default=[0.02, 0.05, 0.15, 0.4, 1.0],
                    help="train the molecule clones for these Beer's-law powers (clone_spectrum(powers=...); "
                         "default: %(default)s; none given: on the transmission alone)")
    ap.add_argument("--mask-brackett", type=float, default=5.0,
                    help="mask the pixels within this many Å of each Brackett line in the fit (the A0V star's own "
                         "hydrogen lines, which a telluric-only model cannot fit; default: %(default)s; 0: none)")
    ap.add_argument("--tune-telluric", nargs="+", default=None, choices=("amplitude", "sigma", "gamma", "center"),
                    help="telluric line parameters tuned in the line stage of every order (default: fit_spectrum's "
                         "default for a telluric-only fit)")
    ap.add_argument("--json", type=Path, default=HERE / "igrins_a0v.json")
    args = ap.parse_args()
    if args.total:
        args.molecules = None
    if not args.powers:
        args.powers = None
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import astropy.units as u

    from blase_specutils.fit_settings import FitSettings
    from blase_specutils.io import read_igrins_plp

    t_start = time.perf_counter()
    if args.molecules:
        clone, clone_seconds = molecule_clones(args.molecules, powers=args.powers)
        clone_path = CACHE / f"psg-igrins_{{molecule}}_log{'_powers' if args.powers else ''}_clone.fits"
    else:
        clone, clone_path, clone_seconds = psg_clone(args.mode)
    orders = read_igrins_plp(SPEC, extension="A0V_SPEC")
    alpha, beta = noise_model()
    lo, hi = BAND_UM[0] * 1e4, BAND_UM[1] * 1e4
    br = brackett_lines()
    rows, skipped = [], {}
    tune = tuple(args.tune_telluric) if args.tune_telluric else FitSettings().tune_telluric_for(has_stellar=False)
    picked = range(len(orders)) if args.orders is None else args.orders
    for k in picked:
        s = orders[k]
        w = s.spectral_axis.to_value(u.AA)
        nfin = int(np.isfinite(s.flux.value).sum())
        if w[0] < lo or w[-1] > hi:
            skipped[k] = f"{w[0]:.0f}-{w[-1]:.0f} Å reaches outside the clone's band {lo:.0f}-{hi:.0f} Å"
            continue
        if nfin < 1000:
            skipped[k] = f"only {nfin} finite pixels"
            continue
        rows.append(fit_order(k, s, clone, alpha, beta, br, args.epochs, tune, args.mask_brackett))
    widths = []
    for k in args.width_orders or []:
        if k in picked and k not in skipped:
            widths.append(fit_order(k, orders[k], clone, alpha, beta, br, args.epochs, ("amplitude", "sigma", "gamma"),
                                    args.mask_brackett))
    out = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)",
        "data": str(SPEC.name) + " [A0V_SPEC]",
        "clone": {"file": str(clone_path.relative_to(HERE.parent)), "mode": "log" if args.molecules else args.mode,
                  "n_lines": ({k: c.n_lines for k, c in clone.items()} if args.molecules else clone.n_lines),
                  "molecules": list(clone) if args.molecules else None, "powers": args.powers,
                  "clone_seconds": round(clone_seconds, 1) or None},
        "noise_model": {"alpha": alpha, "beta": beta, "note": "var = alpha*F + beta fitted to TGT_SPEC and its variance"},
        "settings": {"mask_brackett_aa": args.mask_brackett, "resolving_power_start": 45000.0, "tune_resolving_power": True, "tune_telluric": list(tune),
                     "calibration_degree": FitSettings().calibration_degree_for(False, True),
                     "telluric_regularization": 5.0, "continuum_degree": 2, "epochs_per_stage": args.epochs},
        "orders": rows,
        "width_variant": widths,
        "skipped_orders": skipped,
        "brackett_orders": [r["order"] for r in rows if r["brackett"]],
        "median_template_chi2_reduced": float(np.median([r["template_chi2_reduced"] for r in rows])) if rows else None,
        "median_chi2_reduced": float(np.median([r["chi2_reduced"] for r in rows])) if rows else None,
        "median_chi2_reduced_orders_median_transmission_above_20pc": (
            float(np.median([r["chi2_reduced"] for r in rows if r["median_transmission"] >= 0.2]))
            if any(r["median_transmission"] >= 0.2 for r in rows) else None),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    args.json.write_text(json.dumps(out, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    print(f"wrote {args.json} ({out['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
