"""Rebuild the shipped example orders from the project's real data (maintainers only).

Usage, from the repository root with the project's ``../shared/data`` next to it::

    python -m blase_specutils.examples._build [SHARED_DATA]

Each example is one échelle order written as a small FITS file: a primary header with the
provenance and the observation keywords users and muler look for, and a binary table
``SPECTRUM`` with ``WAVELENGTH`` (Å, vacuum, float64), ``FLUX`` and ``UNCERTAINTY`` (1 σ, same
unit as the flux; float32) and ``MASK`` (uint8, 1 = bad pixel). What was done to each order is
written in its header (``REDUCED``) and in ``data/README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "data"

#: Header keywords copied from the source files when present.
KEEP = ("OBJECT", "OBSERVAT", "TELESCOP", "INSTRUME", "DATE-OBS", "DATE-END", "JD-OBS", "MJD-OBS", "EXPTIME",
        "EXPLNDR", "QRA", "QDEC", "RA", "DEC", "OBJRA", "OBJDEC", "AMSTART", "AMEND", "ZA", "EL", "ENVHUM",
        "BRVCORR", "PROGID", "QPROG", "BAND")


def _write(name: str, wavelength, flux, sigma, mask, header_src, extra: dict) -> Path:
    from astropy.io import fits

    hdr = fits.Header()
    for key in KEEP:
        if key in header_src and header_src[key] not in ("", None):
            hdr[key] = header_src[key]
    for key, value in extra.items():
        hdr[key] = value
    hdr["AIRORVAC"] = ("vac", "wavelengths in vacuum")
    cols = [
        fits.Column(name="WAVELENGTH", format="D", unit="Angstrom", array=np.asarray(wavelength, dtype=np.float64)),
        fits.Column(name="FLUX", format="E", array=np.asarray(flux, dtype=np.float32)),
        fits.Column(name="UNCERTAINTY", format="E", array=np.asarray(sigma, dtype=np.float32)),
        fits.Column(name="MASK", format="B", array=np.asarray(mask, dtype=np.uint8)),
    ]
    table = fits.BinTableHDU.from_columns(cols, name="SPECTRUM")
    path = HERE / f"{name}.fits"
    fits.HDUList([fits.PrimaryHDU(header=hdr), table]).writeto(path, overwrite=True, checksum=True)
    return path


def build_hr4829(shared: Path) -> Path:
    """HR 4829, HPF order 17 (10448-10582 Å): water lines and the wing of Paschen γ-δ continuum."""
    from astropy.io import fits

    from blase_specutils.io import read_orders

    src = shared / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits"
    s = read_orders(src, [17])[0]  # muler: remove_nans().deblaze().normalize()
    w = s.spectral_axis.to_value("AA")
    f = np.asarray(s.flux.value, dtype=float)
    e = np.asarray(s.uncertainty.array, dtype=float)
    m = np.zeros(w.size, bool) if s.mask is None else np.asarray(s.mask, bool)
    return _write("hr4829_hpf_order17", w, f, e, m | ~np.isfinite(f) | ~np.isfinite(e), fits.getheader(src),
                  {"SRCFILE": src.name, "SRCORDER": (17, "order index in the Goldilocks file (0-27)"),
                   "REDUCED": "muler remove_nans().deblaze().normalize()", "LICENSE": "MIT (muler repository)"})


def build_wasp69(shared: Path) -> Path:
    """WASP 69, the HPF stack of the blasé repository (8656-8768 Å), as it is."""
    from astropy.io import fits

    src = shared / "hpf" / "WASP_69_hpf_stack.fits"
    with fits.open(src) as hdul:
        t = hdul[1].data
        w, f, e = (np.asarray(t[c], dtype=float) for c in ("wavelength", "flux", "uncertainty"))
        header = hdul[1].header  # the observation keywords are in the table's header
    bad = ~np.isfinite(f) | ~np.isfinite(e) | (e <= 0)
    return _write("wasp69_hpf_stack", w, f, e, bad, header,
                  {"SRCFILE": src.name, "REDUCED": "stacked and continuum-normalized upstream (blase repository)",
                   "LICENSE": "MIT (blase repository)"})


#: IGRINS example: the 18th order in ascending wavelength (file row 10), 1.646-1.669 µm, no Brackett line.
IGRINS_ORDER = 17
#: Edge mask of the IGRINS order: pixels whose running median is below this fraction of the 95th percentile.
EDGE_FRACTION = 0.1
#: Pixels masked at each end of what the edge mask leaves.
TRIM_PX = 150


def _upper_envelope(w: np.ndarray, f: np.ndarray, good: np.ndarray, degree: int = 7, clip: float = 0.01,
                    iterations: int = 20) -> np.ndarray:
    """A polynomial through the upper envelope of ``f``: refitted without the pixels more than ``clip``
    (fractional) below it, then without those more than 3 sigma above it, until nothing changes."""
    x = (w - w[good].mean()) / np.ptp(w[good])
    keep = good.copy()
    for _ in range(iterations):
        coef = np.polyfit(x[keep], f[keep], degree)
        model = np.polyval(coef, x)
        resid = f / model - 1.0
        scatter = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep])))
        new = good & (resid > -clip) & (resid < 3 * scatter)
        if np.array_equal(new, keep):
            break
        keep = new
    return np.polyval(coef, x)


def build_a0v_igrins(shared: Path) -> Path:
    """The A0V standard of an IGRINS H-band night, one order, blaze-normalised, noise from the target's variance."""
    from astropy.io import fits
    from scipy.ndimage import median_filter

    from blase_specutils.io import read_igrins_plp

    src = shared / "igrins" / "SDCH_20201202_0059.spec_a0v.fits"
    var_src = shared / "igrins" / "SDCH_20201202_0059.variance.fits"
    a0v = read_igrins_plp(src, extension="A0V_SPEC")[IGRINS_ORDER]
    tgt = read_igrins_plp(src, extension="TGT_SPEC", variance=var_src)[IGRINS_ORDER]
    # noise model: var = alpha F + beta, fitted to the target's counts and variance in this order
    tf, tv = np.asarray(tgt.flux.value, float), np.asarray(tgt.uncertainty.array, float)
    ok = np.isfinite(tf) & np.isfinite(tv) & (tf > 0)
    alpha, beta = np.polyfit(tf[ok], tv[ok], 1)
    w = a0v.spectral_axis.to_value("AA")
    f = np.asarray(a0v.flux.value, float)
    finite = np.isfinite(f)
    smooth = median_filter(np.where(finite, f, 0.0), size=65, mode="nearest")
    good = finite & (smooth >= EDGE_FRACTION * np.percentile(f[finite], 95))
    idx = np.flatnonzero(good)
    good[idx[:TRIM_PX]] = False  # where the blaze turns over faster than a smooth curve follows
    good[idx[-TRIM_PX:]] = False
    blaze = _upper_envelope(w, f, good)
    good &= blaze > 0
    blaze = np.where(good, blaze, 1.0)
    sigma = np.sqrt(np.clip(alpha * np.where(good, f, 0.0) + beta, 0.0, None)) / blaze
    norm = np.where(good, f / blaze, np.nan)
    sigma = np.where(good, sigma, np.nan)
    header = fits.getheader(src)
    return _write("a0v_igrins_order17", w, norm, sigma, ~good, header,
                  {"OBJECT": ("A0V standard", "the telluric standard of the night"),
                   "TARGET": (header.get("OBJECT", ""), "science target; DATE-OBS etc. are its exposure's"),
                   "A0VFILE": header.get("IGR_A0V_BASENAME", ""),
                   "SRCFILE": src.name, "SRCEXT": "A0V_SPEC", "SRCORDER": (IGRINS_ORDER, "ascending-wavelength order"),
                   "NOISEA": (float(alpha), "var = NOISEA*F + NOISEB, fitted to TGT_SPEC"),
                   "NOISEB": (float(beta), "ADU^2"),
                   "REDUCED": "edges masked, divided by a degree-7 upper-envelope polynomial",
                   "LICENSE": "MIT (gollum repository)"})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    shared = Path(argv[0]) if argv else Path(__file__).resolve().parents[3] / "shared" / "data"
    for build in (build_hr4829, build_wasp69, build_a0v_igrins):
        path = build(shared)
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
