"""The README's ``fit_spectrum(order, clone)`` call, defaults throughout, on HR 4829 HPF orders 4 and 17
and on WASP 69 (issue 20, part 1: fits that are right or say they are not).

HR 4829 (an A-type telluric standard rotating at ~140 km/s): each order with a clone of muler's
PHOENIX 10 kK template over the order's band (prominence 0.01, 200 epochs; cached in
``benchmarks/.cache``). WASP 69 (a K5 dwarf, v sin i ≈ 2 km/s): the paper's 9,028-line clone,
``rv_range=60`` as in ``wasp69_fit.py``. Prints one JSON line per fit: RV, v sin i and their σ from
the curvature of χ², χ²_red after template matching and after the line stage, the flags, the
epochs and the wall time; ``--json PATH`` writes them all.

Usage: python benchmarks/readme_fits.py [4 17 wasp] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import astropy.units as u
import torch

import blase_specutils as bs
from blase_specutils.fitting import fit_spectrum
from blase_specutils.io import read_orders

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
GOLDILOCKS = SHARED / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits"
#: Clone bands (Å) covering each order (8534-8644 and 10448-10582 Å).
BANDS = {4: (8520.0, 8660.0), 17: (10440.0, 10590.0)}


def _clone(order: int):
    path = HERE / ".cache" / f"phoenix-10kK_order{order}_clone.fits"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        c = bs.clone_spectrum(bs.load_template("phoenix-10kK-hpf"), band=BANDS[order] * u.AA, buffer=10 * u.AA,
                              teff=10000 * u.K, prominence=0.01, epochs=200, progress=False)
        c.save(path, overwrite=True)
    return bs.SpectralClone.load(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="*", default=["4", "17", "wasp"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    for key in args.which:
        if key == "wasp":
            data = bs.read_spectrum(SHARED / "hpf" / "WASP_69_hpf_stack.fits")
            clone = bs.load_blase03(SHARED / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt")
            kw = {"rv_range": 60}
        else:
            clone = _clone(int(key))
            data = read_orders(GOLDILOCKS, [int(key)])[0]
            kw = {}
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = fit_spectrum(data, clone, progress=False, **kw)
        s = r.summary()
        rec = {k: s.get(k) for k in ("rv_kms", "rv_sigma_kms", "vsini_kms", "vsini_sigma_kms", "chi2_reduced")}
        rec |= {"template_chi2_reduced": s["template_matching"]["chi2_reduced"],
                "template_rv_kms": s["template_matching"]["rv"], "flags": s["flag_codes"],
                "epochs": {k: v.epochs_run for k, v in r.fit.stages.items()},
                "seconds": round(time.perf_counter() - t0, 1)}
        out[key] = rec
        print(key, json.dumps(rec), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
