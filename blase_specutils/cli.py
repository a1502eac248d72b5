"""Command line: ``blase-specutils clone INPUT -o OUT`` and ``blase-specutils demo``."""

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
    sub.add_parser("templates", help="list the embedded templates")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``blase-specutils`` command."""
    args = build_parser().parse_args(argv)
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
