"""HR 4829, one order a fit on the command line, over every usable HPF order (issue 20).

Runs the issue's command for each usable order of the Goldilocks file (the orders of
``batch_hr4829.usable_orders``)::

    blase-specutils fit GOLDILOCKS --stellar phoenix-10kK-hpf --telluric telfit-hpf --tune-telluric --order N --json

with the package's defaults (both template clones are made once and cached by the package, see
``docs/telluric.md``), ``--jobs`` at a time, one torch thread each. Writes each fit's ``--json``
summary to ``hr4829_orders.json`` and prints a table: χ²_red, RV, v sin i, the telluric power X and
the flags of each order. It also counts the orders whose RV lies more than ``--rv-tolerance`` km/s
from the joint fit of all orders (``hr4829_joint.json``) and carries no RV flag: the silent
wrong answers the fit must not give.

Usage: ``python benchmarks/hr4829_orders.py [--orders N ...] [--jobs 2] [--json PATH]``
(about 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from batch_hr4829 import GOLDILOCKS, usable_orders  # noqa: E402

#: HPF orders of the Goldilocks file dominated by telluric water (the issue's "water orders").
WATER_ORDERS = (8, 9, 12, 13, 23, 24, 27)


def fit_order(order: int, folder: Path) -> dict:
    """Run the command line on one order; its ``--json`` summary, with the wall time."""
    cmd = [sys.executable, "-m", "blase_specutils.cli", "fit", str(GOLDILOCKS), "--stellar", "phoenix-10kK-hpf",
           "--telluric", "telfit-hpf", "--tune-telluric", "--order", str(order), "--json", "-q",
           "--output", str(folder / f"order{order}")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        return {"order": order, "exit_code": run.returncode, "stderr": run.stderr[-2000:]}
    out = json.loads(run.stdout)
    summary = out[0] if isinstance(out, list) else out
    keep = ("rv_kms", "rv_sigma_kms", "rv_continuum_spread_kms", "vsini_kms", "vsini_sigma_kms",
            "vsini_halves_spread_kms", "telluric_power", "telluric_power_sigma", "chi2_reduced", "template_matching")
    return {"order": order, "exit_code": 0, **{k: summary.get(k) for k in keep},
            "flag_codes": [f["code"] for f in summary["flags"]], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, nargs="*", help="orders (default: the usable ones)")
    ap.add_argument("--jobs", type=int, default=2, help="fits at a time (default: %(default)s)")
    ap.add_argument("--rv-tolerance", type=float, default=10.0,
                    help="km/s from the joint fit's RV beyond which an order's RV must be flagged (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=HERE / "hr4829_orders.json")
    args = ap.parse_args()
    orders = sorted(args.orders) if args.orders else usable_orders()
    joint = json.loads((HERE / "hr4829_joint.json").read_text())["joint"]["overall"]["final"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda k: fit_order(k, Path(tmp)), orders))
    failed = [r["order"] for r in rows if r["exit_code"] != 0]
    ok = [r for r in rows if r["exit_code"] == 0]
    silent = [r["order"] for r in ok if abs(r["rv_kms"] - joint["rv_kms"]) > args.rv_tolerance
              and not any(c.startswith("rv_") for c in r["flag_codes"])]
    report = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {args.jobs} fits at a time, 1 thread each",
        "command": "blase-specutils fit GOLDILOCKS --stellar phoenix-10kK-hpf --telluric telfit-hpf --tune-telluric "
                   "--order N --json",
        "joint_rv_kms": joint["rv_kms"], "joint_vsini_kms": joint["vsini_kms"], "rv_tolerance_kms": args.rv_tolerance,
        "orders": rows, "failed": failed,
        "max_chi2_reduced_clean": max((r["chi2_reduced"] for r in ok if r["order"] not in WATER_ORDERS), default=None),
        "max_chi2_reduced_water": max((r["chi2_reduced"] for r in ok if r["order"] in WATER_ORDERS), default=None),
        "rv_off_without_rv_flag": silent,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    tmp_path = args.json.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(report, indent=2))
    tmp_path.replace(args.json)
    print("| order | χ²_red | RV (km/s) | v sin i (km/s) | X | flags |\n|---|---|---|---|---|---|")
    for r in ok:
        water = " (water)" if r["order"] in WATER_ORDERS else ""
        print(f"| {r['order']}{water} | {r['chi2_reduced']:.2f} | {r['rv_kms']:.1f} | {r['vsini_kms']:.1f} | "
              f"{r['telluric_power']:.3g} | {', '.join(r['flag_codes']) or '-'} |")
    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    print(f"largest χ²_red: clean orders {fmt(report['max_chi2_reduced_clean'])}, water orders "
          f"{fmt(report['max_chi2_reduced_water'])}; RVs more than {args.rv_tolerance:g} km/s from the joint "
          f"{joint['rv_kms']:.2f} km/s without an RV flag: {silent or 'none'}; failed: {failed or 'none'}; "
          f"{report['total_seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
