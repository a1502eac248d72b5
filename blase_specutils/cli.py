"""Command line: ``blase-specutils clone INPUT -o OUT``, ``demo``, ``fit DATA --stellar CLONE``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

#: Settings of the demo: the embedded PHOENIX 10 kK HPF model, the paper's prominence.
DEMO = dict(template="phoenix-10kK-hpf", prominence=0.01, epochs=200, buffer=40.0)


def _read_input(name: str):
    from .templates import TEMPLATES, load_template

    if name in TEMPLATES:
        return load_template(name), TEMPLATES[name]
    path = Path(name)
    if not path.exists():
        raise SystemExit(
            f"error: {name!r} is neither a file nor an embedded template (choose from {', '.join(sorted(TEMPLATES))})"
        )
    from .io import read_spectrum

    try:
        spec = read_spectrum(path)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    return spec, {}


def _run_clone(args, source: str, spectrum, info: dict) -> dict:
    import astropy.units as u

    from .cloning import clone_spectrum

    band = None
    if args.band is not None:
        band = tuple(args.band) * u.AA
    elif info.get("band") is not None:
        band = tuple(info["band"]) * u.AA
    teff = args.teff if args.teff is not None else info.get("teff")
    flatten = False if args.no_flatten else info.get("kind", "stellar") != "telluric"
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or (Path(source).stem if Path(source).exists() else source)
    t0 = time.perf_counter()
    clone = clone_spectrum(
        spectrum,
        prominence=args.prominence,
        band=band,
        buffer=args.buffer * u.AA,
        teff=None if teff is None else teff * u.K,
        flatten=flatten,
        mode=args.mode,
        profile=args.profile,
        tune=("amplitude", "sigma", "gamma") + (("center",) if args.tune_centers else ()),
        epochs=args.epochs,
        lr=args.lr,
        device=args.device,
        progress=not args.quiet and not args.json,
    )
    seconds = time.perf_counter() - t0
    clone_path = clone.save(out / f"{stem}_clone.fits", overwrite=True)
    table_path = out / f"{stem}_lines.ecsv"
    clone.lines.write(table_path, overwrite=True)
    import matplotlib

    matplotlib.use("Agg")
    fig = clone.plot(title=f"{source}: {clone.n_lines} lines, prominence {args.prominence}")
    png_path = out / f"{stem}_clone.png"
    fig.savefig(png_path, dpi=110)
    return {
        "input": source,
        "n_lines": clone.n_lines,
        "rms_residual": clone.rms_residual(),
        "epochs": clone.history.epochs_run,
        "stop_reason": clone.history.stop_reason,
        "seconds": round(seconds, 2),
        "mode": args.mode,
        "profile": args.profile,
        "device": str(args.device),
        "clone_file": str(clone_path),
        "line_table": str(table_path),
        "figure": str(png_path),
    }


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"cloned {summary['input']}: {summary['n_lines']} lines, RMS residual {100 * summary['rms_residual']:.3f} %, "
        f"{summary['epochs']} epochs in {summary['seconds']:.1f} s"
    )
    for key in ("clone_file", "line_table", "figure"):
        print(f"  {key.replace('_', ' ')}: {summary[key]}")


def _add_clone_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("-o", "--output", default=defaults.get("output", "."), help="output folder (default: %(default)s)")
    p.add_argument("--prominence", type=float, default=defaults.get("prominence", 0.01), help="line prominence threshold in (0, 1) (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults.get("epochs", 1000), help="largest number of Adam epochs (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--mode", choices=("linear", "log"), default="linear", help="clone in linear (Eq. 2) or log (Eq. A2) flux (default: %(default)s)")
    p.add_argument("--profile", choices=("pseudo-voigt", "voigt"), default="pseudo-voigt", help="line shape (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--band", type=float, nargs=2, metavar=("LO", "HI"), help="band of interest in Å (default: the template's band, or the whole input)")
    p.add_argument("--buffer", type=float, default=defaults.get("buffer", 30.0), help="buffer around the band in Å (default: %(default)s)")
    p.add_argument("--teff", type=float, help="divide by a blackbody of this Teff in K (default: the template's, else none)")
    p.add_argument("--no-flatten", action="store_true", help="do not divide by a continuum polynomial")
    p.add_argument("--tune-centers", action="store_true", help="also tune the line centres (helps undersampled models such as PSG)")
    p.add_argument("--name", help="stem of the output file names")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="blase-specutils",
        description="Clone precomputed stellar and telluric spectra into tunable lines (the blasé method).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("clone", help="clone a spectrum file or an embedded template")
    pc.add_argument("input", help="a file specutils can read, or a template: phoenix-10kK-hpf, telfit-hpf, psg-igrins")
    _add_clone_options(pc, {})
    pd = sub.add_parser("demo", help="clone the embedded PHOENIX 10 kK HPF model end to end (a few minutes on 2 CPU cores)")
    _add_clone_options(pd, {"output": "blase_demo", "prominence": DEMO["prominence"], "epochs": DEMO["epochs"], "buffer": DEMO["buffer"]})
    pf = sub.add_parser("fit", help="transfer-learn a clone against an observed spectrum")
    pf.add_argument("data", help="a file specutils or muler reads (an HPF Goldilocks file, a wavelength/flux table)")
    pf.add_argument("--stellar", required=True, help="stellar clone: a blase_specutils clone file or a blasé 0.3 .pt file")
    pf.add_argument("--telluric", help="telluric clone file (optional)")
    pf.add_argument("--order", type=int, nargs="+", help="échelle orders to fit (indices into the file's orders)")
    pf.add_argument("--resolving-power", type=float, default=55000.0, help="R (default: %(default)s, HPF)")
    pf.add_argument("--rv-range", type=float, default=150.0, help="RV scan half range in km/s (default: %(default)s)")
    pf.add_argument("--vsini", type=float, default=3.0, help="starting v sin i in km/s (default: %(default)s)")
    pf.add_argument("--epochs", type=int, default=4000, help="largest number of epochs of the line stage (default: %(default)s)")
    pf.add_argument("--template-only", action="store_true", help="template matching only (no line tuning)")
    pf.add_argument("--regularization", type=float, default=5.0, help="Λ of the L1 pull of ln a (default: %(default)s)")
    pf.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    pf.add_argument("-o", "--output", default=".", help="output folder (default: %(default)s)")
    pf.add_argument("--json", action="store_true", help="print a machine-readable summary")
    pf.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub.add_parser("templates", help="list the embedded templates")
    return parser


def _read_clone(path: str):
    from .cloning import SpectralClone, load_blase03

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: no clone file at {p}")
    try:
        return load_blase03(p) if p.suffix in (".pt", ".pth") else SpectralClone.load(p)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err


def _read_data(path: str, orders):
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: no data file at {p}")
    from astropy.io import fits

    spectra = None
    try:
        with fits.open(p) as hdul:
            is_goldilocks = any(h.name == "SCI FLUX" for h in hdul)
    except OSError:
        is_goldilocks = False
    if is_goldilocks:
        import warnings

        from muler.hpf import HPFSpectrumList

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = HPFSpectrumList.read(str(p))
            spectra = [s.remove_nans().deblaze().normalize() for s in raw]
    else:
        from .io import read_spectrum

        try:
            spectra = [read_spectrum(p)]
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
    if orders:
        bad = [o for o in orders if not 0 <= o < len(spectra)]
        if bad:
            raise SystemExit(f"error: orders {bad} do not exist; the file has orders 0-{len(spectra) - 1}")
        spectra = [spectra[o] for o in orders]
    return spectra[0] if len(spectra) == 1 else spectra


def _run_fit(args) -> int:
    from .fitting import fit_spectrum

    stellar = _read_clone(args.stellar)
    telluric = _read_clone(args.telluric) if args.telluric else None
    data = _read_data(args.data, args.order)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = fit_spectrum(
            data, stellar, telluric=telluric, resolving_power=args.resolving_power, rv_range=args.rv_range,
            vsini=args.vsini, line_epochs=0 if args.template_only else args.epochs,
            regularization=args.regularization, device=args.device, progress=not (args.quiet or args.json),
        )
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = result.summary()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    stem = Path(args.data).stem
    summary["result_file"] = str(result.save(out / f"{stem}_fit.fits", overwrite=True))
    table = out / f"{stem}_fit_lines.ecsv"
    result.lines.write(table, overwrite=True)
    summary["line_table"] = str(table)
    import matplotlib

    matplotlib.use("Agg")
    png = out / f"{stem}_fit.png"
    result.plot(title=Path(args.data).name).savefig(png, dpi=110)
    summary["figure"] = str(png)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        tm = summary["template_matching"]
        print(f"template matching: chi2_red {tm['chi2_reduced']:.2f}, RV {tm['rv']:.3f} km/s, "
              f"v sin i {tm['vsini']:.2f} km/s, R {tm['resolving_power']:.0f}")
        print(f"transfer learning: chi2_red {summary['chi2_reduced']:.2f}, RV {summary['rv_kms']:.3f} km/s, "
              f"v sin i {summary['vsini_kms']:.2f} km/s, {summary['n_lines_changed']} of {summary['n_lines']} lines changed")
        for key in ("result_file", "line_table", "figure"):
            print(f"  {key.replace('_', ' ')}: {summary[key]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``blase-specutils`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "fit":
        return _run_fit(args)
    if args.command == "templates":
        from .templates import TEMPLATES

        for name, info in TEMPLATES.items():
            print(f"{name:18s} {info['description']}")
        return 0
    if not (0.0 < args.prominence < 1.0):
        print(f"error: --prominence must be in (0, 1), got {args.prominence}", file=sys.stderr)
        return 2
    if args.epochs < 0:
        print("error: --epochs must be >= 0", file=sys.stderr)
        return 2
    source = DEMO["template"] if args.command == "demo" else args.input
    spectrum, info = _read_input(source)
    try:
        summary = _run_clone(args, source, spectrum, info)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _report(summary, args.json)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
