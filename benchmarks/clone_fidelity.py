"""Clone fidelity with the command line's defaults on four kinds of input (issue: line-rich cool stars).

Runs ``blase-specutils clone INPUT --prominence 0.01 --json`` (nothing tuned to the input) on

* ``moog4250``: the MOOG/MARCS 4250 K K-dwarf synthesis of ``../shared/data/synthetic`` (written
  as a table of ``wave_vac`` in Å and ``flux_norm``), metrics over 8100-12700 Å, and over its two
  halves 8100-10400 Å and 10400-12700 Å;
* ``phoenix``: muler's PHOENIX 10 kK HPF template (``--teff 10000`` from the template), 8100-12700 Å;
* ``telfit``: muler's TelFit HPF transmission, 8100-12700 Å;
* ``psg``: muler's PSG transmission over the IGRINS H band (1.45-1.81 µm).

For each: lines, lines added from the residual, RMS / p99 / max of |S - S_clone| over every
pixel of the band (``SpectralClone.fidelity``), epochs, stop reason and wall seconds. ``--before``
adds the settings of the previous defaults (no residual passes, fixed centres, 1000 epochs).

Usage: ``python benchmarks/clone_fidelity.py [--only moog4250,phoenix,telfit,psg] [--before]
[--extra "--mode log"] [-o results.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MOOG = SHARED / "synthetic" / "moog_T4250_g4.5_feh0_vac.npz"
BANDS = {"moog4250": (8100, 12700), "phoenix": (8100, 12700), "telfit": (8100, 12700), "psg": (14500, 18100)}
INPUTS = {"phoenix": "phoenix-10kK-hpf", "telfit": "telfit-hpf", "psg": "psg-igrins"}
BEFORE = ["--residual-passes", "0", "--fixed-centers", "--epochs", "1000"]


def moog_table(folder: Path) -> Path:
    """The 4250 K synthesis as a wavelength/flux table, as a user would hand it to the command line."""
    import astropy.units as u
    from astropy.table import QTable

    d = np.load(MOOG)
    path = folder / "moog_T4250_g4.5_feh0_vac.ecsv"
    QTable({"wavelength": d["wave_vac"] * u.AA, "flux": d["flux_norm"].astype(np.float64)}).write(path, overwrite=True)
    return path


def band_metrics(clone_file: str, bands: dict) -> dict:
    import astropy.units as u

    import blase_specutils as bs

    clone = bs.SpectralClone.load(clone_file)
    return {name: {k: v for k, v in clone.fidelity(b * u.AA).items() if k in ("rms", "p99", "max")}
            for name, b in bands.items()}


def run(name: str, source: str, extra: list, folder: Path) -> dict:
    cmd = [sys.executable, "-m", "blase_specutils.cli", "clone", source, "--prominence", "0.01", "--json", "-q",
           "-o", str(folder / name), *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    s = json.loads(out.stdout)
    lo, hi = BANDS[name]
    bands = {"band": (lo, hi)}
    if name == "moog4250":
        bands |= {"blue_half": (8100, 10400), "red_half": (10400, 12700)}
    res = {"lines": s["n_lines"], "added": s["lines_added_from_residual"], "passes": s["residual_passes"],
           "epochs": s["epochs"], "stop": s["stop_reason"], "clone_seconds": s["seconds"],
           "wall_seconds": round(wall, 1), "worst_window": s["worst_windows"][0] if s["worst_windows"] else None}
    res |= band_metrics(s["clone_file"], bands)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="moog4250,phoenix,telfit,psg")
    ap.add_argument("--before", action="store_true", help="the previous defaults")
    ap.add_argument("--extra", default="", help="more command-line options for every clone")
    ap.add_argument("-o", "--output", help="also write the JSON here")
    args = ap.parse_args()
    extra = (BEFORE if args.before else []) + shlex.split(args.extra)
    res = {"machine": f"{platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores",
           "options": " ".join(extra) or "defaults"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.only.split(","):
            if name == "moog4250" and not MOOG.exists():
                res[name] = {"skipped": f"{MOOG} is missing"}
                continue
            source = str(moog_table(folder)) if name == "moog4250" else INPUTS[name]
            res[name] = run(name, source, extra, folder)
            print(name, json.dumps(res[name]), file=sys.stderr, flush=True)
    text = json.dumps(res, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
