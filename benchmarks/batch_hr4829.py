"""Fit the usable orders of the HR 4829 Goldilocks file as independent jobs: serially, and on a
Dask LocalCluster of 1 and 2 workers. Checks that the cluster results are identical to the
serial ones and reports the wall times. Prints JSON (and writes it with --json PATH).

HR 4829 is a hot telluric standard: each order is fitted with the PHOENIX 10 kK clone (Paschen
lines) and the TelFit clone (telluric lines, held fixed), both cloned from the templates inside
muler (the clones are cached in benchmarks/.cache). "Usable" orders are those where fewer than
1 % of the pixels lie below 10 % of the continuum: the saturated water bands (orders 10, 11,
20-22) carry no information on the line depths and are left out.

Usage: python benchmarks/batch_hr4829.py [--epochs N] [--skip-1-worker] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
GOLDILOCKS = HERE.parent.parent / "shared" / "data" / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits"
CACHE = HERE / ".cache"


def clones():
    import astropy.units as u

    from blase_specutils import clone_spectrum, load_template
    from blase_specutils.templates import TEMPLATES

    CACHE.mkdir(exist_ok=True)
    out = {}
    for name, buffer in (("phoenix-10kK-hpf", 40.0), ("telfit-hpf", 30.0)):
        path = CACHE / f"{name}_clone.fits"
        if not path.exists():
            info = TEMPLATES[name]
            c = clone_spectrum(load_template(name), band=info["band"] * u.AA, buffer=buffer * u.AA,
                               teff=None if info["teff"] is None else info["teff"] * u.K,
                               flatten=info["kind"] != "telluric", prominence=0.01, epochs=300)
            c.save(path, overwrite=True)
        out[name] = path
    return out


def usable_orders() -> list[int]:
    from blase_specutils.io import read_orders

    keep = []
    for k, s in enumerate(read_orders(GOLDILOCKS)):
        f = s.flux.value
        if np.mean(f[np.isfinite(f)] < 0.1) < 0.01:
            keep.append(k)
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=200, help="template and line epochs per order")
    ap.add_argument("--skip-1-worker", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serial-from", type=Path, help="take the serial run (values and wall time) from an earlier JSON")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from distributed import Client, LocalCluster

    from blase_specutils.batch import fit_many, hpf_order_jobs

    paths = clones()
    orders = usable_orders()
    items, labels = hpf_order_jobs([GOLDILOCKS], orders)
    kw = dict(telluric=str(paths["telfit-hpf"]), vsini=100.0, rv_range=100.0, template_epochs=args.epochs,
              line_epochs=args.epochs, labels=labels, progress=True)
    runs = {}
    results = {}
    if args.serial_from:
        old = json.loads(args.serial_from.read_text())
        runs["serial (1 thread)"] = old["wall_seconds"]["serial (1 thread)"]
        ref = {lab: {k: r[k] for k in r if k != "order"} for lab, r in zip(labels, old["per_order"])}
    else:
        t0 = time.perf_counter()
        serial = fit_many(items, str(paths["phoenix-10kK-hpf"]), threads_per_task=1, **kw)
        runs["serial (1 thread)"] = time.perf_counter() - t0
        results["serial"] = serial
        ref = {r.label: r.summary for r in serial}
    client_peak = {}
    for n in ([] if args.skip_1_worker else [1]) + [2]:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            client.run(lambda: None)  # workers up before the clock starts
            tracemalloc.start()
            t0 = time.perf_counter()
            res = fit_many(items, str(paths["phoenix-10kK-hpf"]), client=client, output_dir=CACHE / f"out{n}", **kw)
            runs[f"LocalCluster {n} worker{'s' if n > 1 else ''}"] = time.perf_counter() - t0
            client_peak[n] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            results[n] = res
    keys = ("rv_kms", "vsini_kms", "chi2", "chi2_reduced")
    identical = {}
    for n, res in results.items():
        if n == "serial":
            continue
        identical[f"{n} worker(s)"] = all(r.ok and all(r.summary[k] == ref[r.label][k] for k in keys) for r in res)
    rows = [{"order": o, **{k: ref[lab][k] for k in keys}} for o, lab in zip(orders, labels) if lab in ref and ref[lab]]
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "usable_orders": orders,
        "n_jobs": len(items),
        "epochs": args.epochs,
        "wall_seconds": {k: round(v, 1) for k, v in runs.items()},
        "failed": {str(n): [r.error for r in res.failed] for n, res in results.items()},
        "identical_to_serial": identical,
        "client_peak_python_MiB": {str(k): round(v, 1) for k, v in client_peak.items()},
        "per_order": rows,
        "rv_kms_median": float(np.median([r["rv_kms"] for r in rows])),
        "vsini_kms_median": float(np.median([r["vsini_kms"] for r in rows])),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
