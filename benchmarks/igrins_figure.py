"""Figure of the IGRINS A0V benchmark: residuals of two orders with the recipe before and after.

Order 24 (1.757-1.782 µm, saturated water band edge) and order 13 (1.589-1.611 µm, a CO₂ band),
fitted telluric-only as in ``igrins_a0v.py``: "before" tunes the telluric amplitudes only with no
wavelength correction (the defaults of 2026-12-07, first session), "after" uses ``fit_spectrum``'s
defaults (amplitudes and widths tuned, X and R held in the line stage, a linear wavelength
correction). Writes ``igrins_a0v.png``.

Usage: ``python benchmarks/igrins_figure.py [--orders 13 24]``
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    import sys

    sys.path.insert(0, str(HERE))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from igrins_a0v import BAND_UM, SPEC, brackett_lines, molecule_clones, noise_model, prepare  # noqa: F401

    from blase_specutils.fitting import fit_spectrum
    from blase_specutils.io import read_igrins_plp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, nargs="+", default=[13, 24])
    ap.add_argument("--png", type=Path, default=HERE / "igrins_a0v.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    clone, _ = molecule_clones(["H2O", "CO2", "CH4"], powers=[0.02, 0.05, 0.15, 0.4, 1.0])
    orders = read_igrins_plp(SPEC, extension="A0V_SPEC")
    alpha, beta = noise_model()
    recipes = {"before: amplitudes, no wavelength correction": dict(tune_telluric=("amplitude",), calibration_degree=None),
               "after: defaults (amplitudes and widths, wavelength correction)": {}}
    fig, axes = plt.subplots(2 * len(args.orders), 1, figsize=(12, 3.2 * 2 * len(args.orders)), sharex=False)
    for row, k in enumerate(args.orders):
        spec, _ = prepare(orders[k], alpha, beta, 5.0)
        ax_f, ax_r = axes[2 * row], axes[2 * row + 1]
        for n, (label, kw) in enumerate(recipes.items()):
            r = fit_spectrum(spec, None, telluric=clone, resolving_power=45000.0, tune_resolving_power=True,
                             template_epochs=300, line_epochs=300, progress=False, **kw)
            g = r.good
            wl = r.wavelength[g] / 1e4
            if n == 0:
                ax_f.plot(wl, r.flux[g], "k.", ms=1.5, label="data")
            ax_f.plot(wl, r.model_flux[g], lw=0.8, label=f"{label}: χ²_red {r.chi2_reduced:.2f}")
            ax_r.plot(wl, ((r.flux - r.model_flux) / r.sigma)[g] + (0 if n else 15), ".", ms=1.5,
                      label=f"{label} (offset {15 if n == 0 else 0})")
        ax_f.set_title(f"IGRINS A0V order {k}")
        ax_f.set_ylabel("normalised flux")
        ax_f.legend(fontsize=7, loc="lower left")
        ax_r.set_ylabel("(data − model) / σ")
        ax_r.set_ylim(-25, 45)
        ax_r.set_xlabel("wavelength (µm)")
        ax_r.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=90)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
