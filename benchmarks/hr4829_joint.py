"""Joint fit of the usable orders of the HR 4829 HPF Goldilocks file (issue 4), reported per order.

Data: ``../shared/data/hpf/Goldilocks_20210517T054403_v1.0_0060.spectra.fits`` read with
:func:`blase_specutils.io.read_orders` (muler's ``remove_nans().deblaze().normalize()`` per order).
"Usable" orders are those of ``batch_hr4829.py``: fewer than 1 % of the pixels below 10 % of the
continuum (the saturated water bands, orders 7, 10, 11, 20-22, are left out).

Model: the PHOENIX 10 kK clone (stellar: Paschen and metal lines) times the TelFit clone raised to
the Beer's-law power X (telluric), both cloned from muler's templates and cached by
``batch_hr4829.py`` (``benchmarks/.cache``). All usable orders are fitted *jointly* with one
:func:`~blase_specutils.fitting.fit_spectrum` call: one RV, one v sin i, one X, one R (fixed at
55,000), a quadratic continuum per order. Stage 1, template matching: RV scan over ± ``--rv-range``,
X scan, then Adam on RV, v sin i (starting at ``--vsini``), X and the continua. Stage 2, line
tuning: the stellar amplitudes (L1 pull Λ = 5) and the telluric amplitudes (their own pull,
Λ = 5), with RV, v sin i, X and the continua still free.

Reported per order: number of good pixels, χ²_red after template matching and after line tuning
(χ² / (n_good − 3), the convention of ``TransferResult.chi2_reduced``) and the RMS residual;
overall RV, v sin i, X, χ²_red and wall times.

"Telluric lines are absorbed by the telluric clone, not by the star": per order, the integrated
absorption (mÅ) of the stellar model S_ext (RV-shifted, rotationally broadened, before the
instrument) and of the telluric transmission T^X on the model grid, from the clones (at the
template-matching X) and after line tuning; the summed change of the stellar lines' own
equivalent widths; and, in the "pure-telluric" points of the model grid (telluric absorption of
the clone > 5 %, broadened stellar absorption of the clone < 1 %), the mean growth of the stellar
absorption against that of the telluric absorption, with the stellar growth in the "clean" points
(both absorptions < 1 %) as the control (a growth there is continuum, not telluric). The ablation
(telluric clone held fixed: ``tune_telluric=()``, ``tune_telluric_power=False``, so X = 1) is
run on a subset of orders (``--subset``, default the water orders 8, 9, 12, 13), next to the same
subset fitted with the tuned telluric clone, so that the two are compared like for like; on the
same subset also: telluric widths tuned (a, σ, γ), and both fits with R tuned
(``--no-subset-variants`` skips these three). ``--full-ablation`` runs the fixed-telluric fit on
all orders too (as long again as the main fit).

The TelFit template in muler is sampled at HPF's pixels (0.062 Å) and is already at about HPF's
resolution; its clone's lines have a median FWHM of 14 km/s against the 5.5 km/s of the R = 55,000
kernel. Since 2026-12-07 the template carries ``meta["lsf"] = "instrument"`` and its clones
multiply in *after* the instrumental kernel, so the telluric lines are no longer broadened twice
(before that, a free R ran away to ~2e6). ``--tune-resolving-power`` lets R go free,
and ``--telluric-mode log`` uses a log-mode clone of the same template (centres tuned, 1000
epochs). Results: ``benchmarks/RESULTS.md``.

Run times on the project's 2-vCPU VM with 2 torch threads: about 13 min for the default run
(joint fit 8.5 min, five subset fits of about 50 s each), about 11.5 min for the log/free-R run.

Shortcuts for this 2-vCPU machine, stated because they change what is fitted:

* The initial scans are coarser than fit_spectrum's (a thin wrapper around
  ``blase_specutils.fitting.fit_transfer`` swaps them; the library is not changed): RV in
  ``--rv-step`` km/s steps (fit_spectrum: 1 km/s, 201 forward passes of the whole model for
  ± 100 km/s), X on ``--power-grid`` (fit_spectrum: 70 values, 0.01-10). Both only start Adam,
  which then tunes RV and X freely; the lines are ~100 km/s wide.
* Only the telluric lines within 30 Å of a fitted order are passed to the fit (fit_spectrum keeps
  every line of the joint range ± 30 Å, including the saturated bands in the gaps, which cannot
  reach the data but cost time).
* The same wrapper snapshots the model after template matching, for the per-order χ² of that
  stage.

Usage: python benchmarks/hr4829_joint.py [--threads 2] [--template-epochs N] [--line-epochs N]
[--rv-step KMS] [--power-grid X ...] [--subset N ...] [--no-subset-variants] [--full-ablation]
[--tune-resolving-power] [--telluric-mode linear|log] [--edge-trim PX] [--json PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from batch_hr4829 import GOLDILOCKS, clones, usable_orders  # noqa: E402

#: Orders shown in the figure: Paschen lines (4), water (12, 24), Paschen γ among water lines (19).
PLOT_ORDERS = (4, 12, 19, 24)
#: Thresholds of the "pure-telluric" pixels: telluric absorption above, stellar absorption below.
TEL_DEPTH, STAR_DEPTH = 0.05, 0.01


# ----------------------------------------------------------------------------- data
def load_orders(orders: list[int], edge_trim: int):
    """The reduced orders; with ``edge_trim`` the outermost pixels of each order are masked."""
    from specutils import Spectrum

    from blase_specutils.io import read_orders

    out = []
    for s in read_orders(GOLDILOCKS, orders):
        if edge_trim > 0:
            mask = np.zeros(s.flux.size, bool) if s.mask is None else np.asarray(s.mask, bool).copy()
            mask[:edge_trim] = True
            mask[-edge_trim:] = True
            s = Spectrum(spectral_axis=s.spectral_axis, flux=s.flux, uncertainty=s.uncertainty, mask=mask)
        out.append(s)
    return out


def telfit_log_clone() -> Path:
    """A clone of muler's TelFit HPF template in log mode (Eq. A2: ln T = −Σ a V, so T^X is Beer's
    law exactly), centres tuned, 1000 epochs; cached in ``benchmarks/.cache``."""
    import astropy.units as u

    from blase_specutils import clone_spectrum, load_template
    from blase_specutils.templates import TEMPLATES

    path = HERE / ".cache" / "telfit-hpf_log_clone.fits"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        c = clone_spectrum(load_template("telfit-hpf"), band=TEMPLATES["telfit-hpf"]["band"] * u.AA, buffer=30 * u.AA,
                           flatten=False, prominence=0.01, epochs=1000, mode="log", progress=False,
                           tune=("amplitude", "sigma", "gamma", "center"))
        c.save(path, overwrite=True)
    return path


# ----------------------------------------------------------------------------- stage snapshots
class StageRecorder:
    """Wraps ``blase_specutils.fitting.fit_transfer``: keeps the model state after each stage and
    (optionally) replaces the initial scans by coarser ones.

    ``rv_step``: step (km/s) of the RV scan over the same range (fit_spectrum scans in 1 km/s
    steps: 201 forward passes of the whole model for ± 100 km/s, too slow for all orders on this
    machine; the lines are ~ 100 km/s wide, and Adam refines the RV from the best grid point).
    ``power_grid``: the telluric powers X of the scan (fit_spectrum: 47 values from 0.1 to 10).
    """

    def __init__(self, rv_step: float | None = None, power_grid=None) -> None:
        self.stages: list[dict] = []
        self.rv_step = rv_step
        self.power_grid = None if power_grid is None else [float(x) for x in power_grid]

    def __enter__(self):
        import blase_specutils.fitting as fitting

        self._mod = fitting
        self._orig = fitting.fit_transfer

        def wrapped(model, data, weight, **kw):
            if self.rv_step and kw.get("rv_scan") is not None:
                lo, hi = float(np.min(kw["rv_scan"])), float(np.max(kw["rv_scan"]))
                kw["rv_scan"] = np.arange(lo, hi + 1e-9, self.rv_step)
            if self.power_grid is not None and kw.get("telluric_power_scan") is not None:
                kw["telluric_power_scan"] = self.power_grid
            t0 = time.perf_counter()
            fit = self._orig(model, data, weight, **kw)
            dt = time.perf_counter() - t0
            with torch.no_grad():
                snap = dict(
                    seconds=dt,
                    flux=model().cpu().numpy().copy(),
                    rv=float(model.rv.detach()),
                    vsini=float(model.vsini.detach()),
                    resolving_power=float(model.resolving_power.detach()),
                    telluric_power=None if model.telluric is None else float(model.telluric_power.detach()),
                    epochs={k: v.epochs_run for k, v in fit.stages.items()},
                    stop={k: v.stop_reason for k, v in fit.stages.items()},
                )
            self.stages.append(snap)
            return fit

        fitting.fit_transfer = wrapped
        return self

    def __exit__(self, *exc) -> None:
        self._mod.fit_transfer = self._orig


# ----------------------------------------------------------------------------- diagnostics
def per_order_chi2(result, model_flux: np.ndarray, order_numbers: list[int]) -> dict[int, dict]:
    """χ², n_good, χ²/(n_good − 3) and RMS residual of each order for the model ``model_flux``."""
    out = {}
    r = (result.flux - model_flux) / result.sigma
    for k, o in enumerate(order_numbers):
        sel = (result.order_of_pixel == k) & result.good
        n = int(sel.sum())
        chi2 = float(np.sum(r[sel] ** 2))
        rms = float(np.sqrt(np.mean((result.flux - model_flux)[sel] ** 2)))
        out[o] = dict(n_good=n, chi2=chi2, chi2_reduced=chi2 / max(n - 3, 1), rms_residual=rms)
    return out


@torch.no_grad()
def _components(result, telluric_power_template: float | None):
    """Stellar S_ext and telluric T^X on λ_Z: fitted, and from the clones (same RV and v sin i)."""
    m = result.model
    st, tel = m.stellar, m.telluric
    keys = ("log_amplitudes", "log_sigmas", "log_gammas")
    s_fit = m.extrinsic().cpu().numpy()
    saved = {k: getattr(st, k).detach().clone() for k in keys}
    for k in keys:
        getattr(st, k).copy_(result.prior[k])
    s_clone = m.extrinsic().cpu().numpy()
    for k in keys:
        getattr(st, k).copy_(saved[k])
    out = dict(s_fit=s_fit, s_clone=s_clone)
    if tel is not None:
        x_fit = float(m.log_telluric_power.detach())
        t_fit = m.telluric_transmission().cpu().numpy()
        tsaved = {k: getattr(tel, k).detach().clone() for k in keys}
        for k in keys:
            getattr(tel, k).copy_(result.telluric_prior[k])
        t_clone_xfit = m.telluric_transmission().cpu().numpy()
        xt = x_fit if telluric_power_template is None else math.log(telluric_power_template)
        m.log_telluric_power.fill_(xt)
        t_clone_xtm = m.telluric_transmission().cpu().numpy()
        m.log_telluric_power.fill_(x_fit)
        for k in keys:
            getattr(tel, k).copy_(tsaved[k])
        out |= dict(t_fit=t_fit, t_clone_xfit=t_clone_xfit, t_clone_xtm=t_clone_xtm)
    return out


def absorption_check(result, order_numbers: list[int], telluric_power_template: float | None) -> dict[int, dict]:
    """Per order: integrated stellar and telluric absorption (mÅ) from the clones and after the fit,
    and the changes in the pure-telluric pixels of the model grid."""
    lz = result.model.lam_z.cpu().numpy()
    dl = np.gradient(lz)
    c = _components(result, telluric_power_template)
    has_tel = "t_fit" in c
    lines = result.lines
    lc = lines["center"].value * (1 + float(result.rv.value) / 299792.458)
    ew_c = lines["equivalent_width_clone"].value
    ew_f = lines["equivalent_width_fit"].value
    out = {}
    for k, o in enumerate(order_numbers):
        w = result.wavelength[result.order_of_pixel == k]
        sel = (lz >= w[0]) & (lz <= w[-1])
        mA = lambda a: float(np.sum(a[sel] * dl[sel]) * 1e3)  # noqa: E731
        row = dict(
            star_clone_mA=mA(1 - c["s_clone"]), star_fit_mA=mA(1 - c["s_fit"]),
        )
        row["star_change_mA"] = row["star_fit_mA"] - row["star_clone_mA"]
        inl = (lc >= w[0]) & (lc <= w[-1])
        row["star_lines_in_order"] = int(inl.sum())
        row["star_lines_ew_change_mA"] = float(np.sum(ew_f[inl] - ew_c[inl]) * 1e3)
        row["star_lines_grown_20pct"] = int(np.sum(ew_f[inl] > 1.2 * ew_c[inl]))
        if has_tel:
            row |= dict(
                telluric_clone_mA=mA(1 - c["t_clone_xtm"]),
                telluric_clone_xfit_mA=mA(1 - c["t_clone_xfit"]),
                telluric_fit_mA=mA(1 - c["t_fit"]),
            )
            row["telluric_change_mA"] = row["telluric_fit_mA"] - row["telluric_clone_mA"]
            row["telluric_change_lines_only_mA"] = row["telluric_fit_mA"] - row["telluric_clone_xfit_mA"]
            t_ref = c["t_clone_xtm"]
        else:
            t_ref = None
        if t_ref is not None:
            pure = sel & (1 - t_ref > TEL_DEPTH) & (1 - c["s_clone"] < STAR_DEPTH)
            clean = sel & (1 - t_ref < STAR_DEPTH) & (1 - c["s_clone"] < STAR_DEPTH)
            row["pure_telluric_grid_points"] = int(pure.sum())
            row["clean_grid_points"] = int(clean.sum())
            if pure.any():
                row["pure_telluric_star_growth"] = float(np.mean(c["s_clone"][pure] - c["s_fit"][pure]))
                row["pure_telluric_telluric_growth"] = float(np.mean(t_ref[pure] - c["t_fit"][pure]))
            if clean.any():
                row["clean_star_growth"] = float(np.mean(c["s_clone"][clean] - c["s_fit"][clean]))
        out[o] = row
    return out, c


# ----------------------------------------------------------------------------- fits
def telluric_near(orders_data, telluric, buffer: float = 30.0):
    """The telluric clone's lines within ``buffer`` Å of the fitted orders (fit_spectrum keeps every
    line within the whole joint range ± buffer, including those of the saturated bands in the
    gaps, which cost time and cannot reach the data)."""
    from blase_specutils.cloning import SpectralClone

    c = telluric.model.lam_centers.detach().cpu().numpy()
    keep = np.zeros(c.size, bool)
    for sp in orders_data:
        w = sp.spectral_axis.to_value("AA")
        keep |= (c > w.min() - buffer) & (c < w.max() + buffer)
    return SpectralClone(telluric.model.subset(torch.as_tensor(keep)), meta=dict(telluric.meta))


def run_fit(orders_data, stellar, telluric, *, order_numbers, label, rv_step=None, power_grid=None, **kw):
    from blase_specutils.fitting import fit_spectrum

    print(f"[{time.strftime('%H:%M:%S')}] {label}: {len(orders_data)} orders", flush=True)
    t0 = time.perf_counter()
    with StageRecorder(rv_step, power_grid) as rec:
        res = fit_spectrum(orders_data, stellar, telluric=telluric_near(orders_data, telluric), progress=False, **kw)
    wall = time.perf_counter() - t0
    tm = rec.stages[0]
    after = rec.stages[-1] if len(rec.stages) > 1 else None
    chi_tm = per_order_chi2(res, tm["flux"], order_numbers)
    chi_fit = per_order_chi2(res, res.model_flux, order_numbers)
    s = res.summary()
    n = res.n_pixels
    chi2_tm_total = float(sum(v["chi2"] for v in chi_tm.values()))
    overall = dict(
        n_orders=len(order_numbers), n_pixels=n, wall_seconds=round(wall, 1),
        template_seconds=round(tm["seconds"], 1), line_seconds=None if after is None else round(after["seconds"], 1),
        epochs={**tm["epochs"], **({} if after is None else after["epochs"])},
        stop_reasons={**tm["stop"], **({} if after is None else after["stop"])},
        template=dict(rv_kms=tm["rv"], vsini_kms=tm["vsini"], telluric_power=tm["telluric_power"],
                      resolving_power=tm["resolving_power"],
                      chi2_reduced=chi2_tm_total / max(n - 3, 1),
                      chi2_reduced_library=res.template["chi2_reduced"]),
        final=dict(rv_kms=s["rv_kms"], vsini_kms=s["vsini_kms"], telluric_power=s.get("telluric_power"),
                   resolving_power=s["resolving_power"], chi2_reduced=s["chi2_reduced"],
                   rms_residual=s["rms_residual"], rv_sigma_kms=s["rv_sigma_kms"],
                   rv_continuum_spread_kms=s["rv_continuum_spread_kms"], vsini_sigma_kms=s["vsini_sigma_kms"],
                   vsini_halves_spread_kms=s["vsini_halves_spread_kms"],
                   flag_codes=s["flag_codes"]),
        n_stellar_lines=s["n_lines"], n_stellar_lines_changed=s["n_lines_changed"],
        n_telluric_lines=s.get("n_telluric_lines"), n_telluric_lines_changed=s.get("n_telluric_lines_changed"),
    )
    if res.fit.rv_scan is not None:
        rvs, chi = res.fit.rv_scan
        overall["rv_scan_best_kms"] = float(rvs[int(np.argmin(chi))])
    if res.fit.telluric_power_scan is not None:
        xs, chi = res.fit.telluric_power_scan
        overall["telluric_power_scan_best"] = float(xs[int(np.argmin(chi))])
    check, comps = absorption_check(res, order_numbers, tm["telluric_power"])
    per_order = [dict(order=o, n_good=chi_fit[o]["n_good"],
                      chi2_reduced_template=chi_tm[o]["chi2_reduced"], chi2_reduced_lines=chi_fit[o]["chi2_reduced"],
                      rms_template=chi_tm[o]["rms_residual"], rms_lines=chi_fit[o]["rms_residual"],
                      **check[o]) for o in order_numbers]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {wall:.0f} s, " + json.dumps(overall["final"]), flush=True)
    return res, dict(overall=overall, per_order=per_order), comps, tm


# ----------------------------------------------------------------------------- figure
def figure(res, comps, order_numbers, plot_orders, path: Path, ablation=None) -> None:
    """Per plotted order: data and model; the stellar and telluric components (each convolved
    with the instrument, without the continuum); data − model (and that of the fixed-telluric fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = res.model
    with torch.no_grad():
        star_d = m.resampler(m.inst(torch.as_tensor(comps["s_fit"]))).cpu().numpy()
        tel_d = m.resampler(m.inst(torch.as_tensor(comps["t_fit"]))).cpu().numpy()
    plot_orders = [o for o in plot_orders if o in order_numbers]
    ncol = 2
    nrow = math.ceil(len(plot_orders) / ncol)
    fig, axes = plt.subplots(3 * nrow, ncol, figsize=(13, 4.6 * nrow), dpi=80,
                             gridspec_kw=dict(height_ratios=[2.2, 1.2, 1.0] * nrow, hspace=0.08), squeeze=False,
                             layout="constrained")
    for i, o in enumerate(plot_orders):
        r, col = divmod(i, ncol)
        a0, a1, a2 = axes[3 * r, col], axes[3 * r + 1, col], axes[3 * r + 2, col]
        a1.sharex(a0)
        a2.sharex(a0)
        for a in (a0, a1, a2):
            a.tick_params(labelsize=7, labelbottom=a is a2)
        k = order_numbers.index(o)
        sel = res.order_of_pixel == k
        w = res.wavelength[sel]
        g = res.good[sel]
        a0.plot(w, np.where(g, res.flux[sel], np.nan), lw=0.6, color="k", label="data")
        a0.plot(w, res.model_flux[sel], lw=0.6, color="C1", label="model")
        sg = sel & res.good
        chi2r = np.sum(((res.flux - res.model_flux)[sg] / res.sigma[sg]) ** 2) / max(int(sg.sum()) - 3, 1)
        a0.set_title(f"order {o}: χ²_red {chi2r:.1f}", fontsize=9)
        a1.plot(w, tel_d[sel], lw=0.6, color="C0", label="telluric T^X")
        a1.plot(w, star_d[sel], lw=0.8, color="C2", label="stellar")
        resid = np.where(g, res.flux[sel] - res.model_flux[sel], np.nan)
        if ablation is not None and o in ablation[1]:
            ra, on = ablation
            sa = ra.order_of_pixel == on.index(o)
            a2.plot(ra.wavelength[sa], np.where(ra.good[sa], ra.flux[sa] - ra.model_flux[sa], np.nan), lw=0.5,
                    color="C3", alpha=0.7, label="telluric clone fixed (X = 1)")
        a2.plot(w, resid, lw=0.5, color="C0", label="telluric tuned")
        a2.axhline(0, color="0.5", lw=0.5)
        a2.set_xlabel("wavelength (Å, vacuum, observatory frame)", fontsize=7)
        if col == 0:
            a0.set_ylabel("flux", fontsize=8)
            a1.set_ylabel("components", fontsize=8)
            a2.set_ylabel("data − model", fontsize=8)
        a0.legend(loc="lower left", fontsize=6, ncol=2)
        a1.legend(loc="lower left", fontsize=6, ncol=2)
        a2.legend(loc="lower left", fontsize=6, ncol=2)
    for j in range(len(plot_orders), nrow * ncol):
        r, col = divmod(j, ncol)
        for q in range(3):
            axes[3 * r + q, col].axis("off")
    fig.suptitle(f"HR 4829, HPF: joint fit of {len(order_numbers)} orders, RV {res.rv.value:.2f} km/s, "
                 f"v sin i {res.vsini.value:.1f} km/s, X {res.telluric_power:.3f}, χ²_red {res.chi2_reduced:.2f}",
                 fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def _other_jobs() -> list[str]:
    try:
        pattern = "engine_speed.py|batch_hr4829.py|svi_calibration.py|pytest|ipykernel"
        out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    return [line for line in out.splitlines() if line.split()[:1] != [str(os.getpid())]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--orders", type=int, nargs="*", help="orders of the joint fit (default: the usable ones)")
    ap.add_argument("--template-epochs", type=int, default=150)
    ap.add_argument("--line-epochs", type=int, default=300)
    ap.add_argument("--vsini", type=float, default=120.0, help="starting v sin i (km/s)")
    ap.add_argument("--rv-range", type=float, default=100.0, help="RV scan half range (km/s)")
    ap.add_argument("--rv-step", type=float, default=5.0, help="RV scan step (km/s); 0: fit_spectrum's 1 km/s")
    ap.add_argument("--power-grid", type=float, nargs="*", default=[0.4, 0.5, 0.63, 0.8, 1.0, 1.25, 1.6, 2.0, 2.5],
                    help="telluric powers X of the initial scan (none given: fit_spectrum's 47 from 0.1 to 10)")
    ap.add_argument("--continuum-degree", type=int, default=2)
    ap.add_argument("--edge-trim", type=int, default=0, help="mask this many pixels at each end of every order")
    ap.add_argument("--subset", type=int, nargs="*", default=[8, 9, 12, 13],
                    help="orders of the tuned-vs-fixed telluric comparison (joint fits of these orders alone)")
    ap.add_argument("--full-ablation", action="store_true", help="also fit all orders with the telluric clone fixed")
    ap.add_argument("--no-subset-variants", action="store_true",
                    help="on the subset, only the tuned and the fixed telluric fits (not the widths and free-R ones)")
    ap.add_argument("--tune-resolving-power", action="store_true", help="tune R in the joint fit of all orders")
    ap.add_argument("--telluric-amplitudes-only", action="store_true",
                    help="tune the telluric amplitudes only in the joint fit (the recipe before 2026-12-07, second "
                         "session); default: amplitudes and widths, as the command line's --tune-telluric, X and R "
                         "keeping their template-matching values in the line stage")
    ap.add_argument("--telluric-mode", choices=("linear", "log"), default="linear",
                    help="linear: the cached TelFit clone of batch_hr4829.py (Eq. 2, 300 epochs); log: a TelFit clone "
                         "in log mode (Eq. A2) with centres tuned, 1000 epochs (cloned once, about 2 min, and cached)")
    ap.add_argument("--plot-orders", type=int, nargs="*", default=list(PLOT_ORDERS))
    ap.add_argument("--json", type=Path, default=HERE / "hr4829_joint.json")
    ap.add_argument("--png", type=Path, help="the figure (default: the JSON path with .png)")
    args = ap.parse_args()
    args.png = args.png or args.json.with_suffix(".png")
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    from blase_specutils.cloning import SpectralClone

    t_start = time.perf_counter()
    others = _other_jobs()
    paths = clones()
    stellar = SpectralClone.load(paths["phoenix-10kK-hpf"])
    telluric_path = paths["telfit-hpf"] if args.telluric_mode == "linear" else telfit_log_clone()
    telluric = SpectralClone.load(telluric_path)
    orders = sorted(args.orders) if args.orders else usable_orders()
    data = load_orders(orders, args.edge_trim)
    scans = dict(rv_step=args.rv_step or None, power_grid=args.power_grid or None)
    common = dict(resolving_power=55000.0, rv_range=args.rv_range, vsini=args.vsini, tune_lines=("amplitude",),
                  regularization=5.0, continuum_degree=args.continuum_degree, template_epochs=args.template_epochs,
                  line_epochs=args.line_epochs, **scans)
    free_r = dict(tune_resolving_power=True)
    if args.tune_resolving_power:
        common |= free_r
    from blase_specutils.constants import TELLURIC_ONLY_TUNED

    tuned = dict(tune_telluric=("amplitude",) if args.telluric_amplitudes_only else TELLURIC_ONLY_TUNED,
                 tune_telluric_power=True, telluric_regularization=5.0)
    fixed = dict(tune_telluric=(), tune_telluric_power=False)
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} vCPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} torch threads",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "other_jobs_at_start": others,
        "load_average_at_start": os.getloadavg(),
        "data": str(GOLDILOCKS.name),
        "orders": orders,
        "settings": dict(template_epochs=args.template_epochs, line_epochs=args.line_epochs, vsini_start_kms=args.vsini,
                         rv_range_kms=args.rv_range, rv_scan_step_kms=args.rv_step or 1.0,
                         telluric_power_scan=args.power_grid or "fit_spectrum default (70 values, 0.01-10)",
                         continuum_degree=args.continuum_degree, edge_trim_px=args.edge_trim,
                         resolving_power=55000.0, stellar_regularization=5.0, telluric_regularization=5.0,
                         tune_lines="amplitude", tune_telluric=",".join(tuned["tune_telluric"]), tune_telluric_power=True,
                         tune_resolving_power=bool(args.tune_resolving_power),
                         telluric_clone=str(telluric_path.relative_to(HERE.parent)),
                         telluric_lines_kept="within 30 Å of a fitted order",
                         pure_telluric_thresholds=dict(telluric_absorption_above=TEL_DEPTH,
                                                       stellar_absorption_below=STAR_DEPTH)),
        "clones": {"stellar_lines": stellar.model.n_lines, "telluric_lines": telluric.model.n_lines},
    }
    res, main_rep, comps, _ = run_fit(data, stellar, telluric, order_numbers=orders,
                                      label=f"joint fit, all orders, telluric {'/'.join(tuned['tune_telluric'])} tuned (X and R held in the line stage when widths are)", **common, **tuned)
    report["joint"] = main_rep
    batch = HERE / "batch_hr4829.json"
    if batch.exists():
        b = {r["order"]: r for r in json.loads(batch.read_text())["per_order"]}
        report["independent_per_order_fits_batch_hr4829"] = {
            "note": "batch_hr4829.json: each order alone, 150+150 epochs, fit_spectrum defaults "
                    "(stellar a, σ, γ, λc tuned; telluric lines as cloned)",
            "per_order": [dict(order=o, rv_kms=b[o]["rv_kms"], vsini_kms=b[o]["vsini_kms"],
                               chi2_reduced=b[o]["chi2_reduced"]) for o in orders if o in b],
        }
    json_dump(report, args.json)
    ablation = None
    sub = sorted(o for o in args.subset if o in orders)
    if sub:
        sub_data = load_orders(sub, args.edge_trim)
        comp = {"orders": sub}
        variants = {
            "tuned_telluric": (f"subset, telluric {'/'.join(tuned['tune_telluric'])} tuned", tuned),
            "fixed_telluric": ("subset, telluric clone fixed (X = 1)", fixed),
        }
        if not args.no_subset_variants:
            variants["tuned_telluric_widths"] = ("subset, telluric a, σ, γ and X tuned",
                                                 dict(tuned, tune_telluric=("amplitude", "sigma", "gamma")))
        if not args.no_subset_variants and not args.tune_resolving_power:
            variants["tuned_telluric_free_R"] = ("subset, telluric amplitudes, X and R tuned", dict(tuned, **free_r))
            variants["fixed_telluric_free_R"] = ("subset, telluric clone fixed (X = 1), R tuned", dict(fixed, **free_r))
        for name, (label, kw) in variants.items():
            r_, comp[name], _, _ = run_fit(sub_data, stellar, telluric, order_numbers=sub, label=label, **common, **kw)
            if name == "fixed_telluric":
                ablation = (r_, sub)
        report["subset_comparison"] = comp
        json_dump(report, args.json)
    if args.full_ablation:
        res_ab, report["ablation_fixed_telluric_all_orders"], _, _ = run_fit(
            data, stellar, telluric, order_numbers=orders, label="all orders, telluric clone fixed (X = 1)",
            **common, **fixed)
        ablation = (res_ab, orders)
        json_dump(report, args.json)
    figure(res, comps, orders, args.plot_orders, args.png, ablation=ablation)
    report["total_wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["other_jobs_at_end"] = _other_jobs()
    report["load_average_at_end"] = os.getloadavg()
    json_dump(report, args.json)
    print_table(report)


def json_dump(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1, default=float) + "\n")


def print_table(report: dict) -> None:
    j = report["joint"]
    print("order  n_good  chi2r_TM  chi2r_lines  dW_star(mA)  dW_tel(mA)")
    for r in j["per_order"]:
        print(f"{r['order']:5d}  {r['n_good']:6d}  {r['chi2_reduced_template']:8.2f}  {r['chi2_reduced_lines']:11.2f}"
              f"  {r['star_change_mA']:11.1f}  {r.get('telluric_change_mA', float('nan')):10.1f}")
    print(json.dumps(j["overall"], indent=1))
    comp = report.get("subset_comparison")
    if comp:
        for name in comp:
            if name != "orders":
                o = comp[name]["overall"]
                print(name, json.dumps(o["final"]), f"{o['wall_seconds']} s")
                for r in comp[name]["per_order"]:
                    print(f"   {r['order']:3d} chi2r {r['chi2_reduced_template']:8.2f} -> "
                          f"{r['chi2_reduced_lines']:8.2f}"
                          f"  dW_star {r['star_change_mA']:8.1f} mA  pure-tel star growth "
                          f"{r.get('pure_telluric_star_growth', float('nan')):.5f}")


if __name__ == "__main__":
    main()
