"""Command line: ``blase-specutils clone INPUT -o OUT``, ``demo``, ``fit DATA [--stellar CLONE]
[--telluric CLONE] [--tune-telluric]``, ``fit-many FILES... [--stellar CLONE] [--telluric CLONE] --scheduler local``,
``clone-grid GRID.csv``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .constants import TELLURIC_ONLY_TUNED

__all__ = ["main", "EXIT_OK", "EXIT_JOBS_FAILED", "EXIT_USAGE", "EXIT_DATA", "EXIT_FAILED", "CommandError"]

#: Exit status: success; a fit whose result carries flags (they are printed and in the JSON) exits 0 too.
EXIT_OK = 0
#: Exit status of ``fit-many`` and ``clone-grid`` when some of their jobs failed (the others are written).
EXIT_JOBS_FAILED = 1
#: Exit status of a usage error: unknown or bad options, settings out of range (argparse's own code).
EXIT_USAGE = 2
#: Exit status when the input cannot be read or used: no such file, an unreadable or damaged
#: spectrum, clone or grid table, an order that does not exist.
EXIT_DATA = 3
#: Exit status when the work itself failed: a clone or fit that raised while running, a Dask
#: scheduler that cannot be reached.
EXIT_FAILED = 4

#: The table of exit codes, as ``--help`` prints it (the same for every command).
EXIT_CODES = f"""exit codes (every command):
  {EXIT_OK}  success (a fit whose result carries flags too: they are printed and in --json)
  {EXIT_JOBS_FAILED}  fit-many / clone-grid: some jobs failed (the others were written)
  {EXIT_USAGE}  usage error: unknown or bad options, settings out of range
  {EXIT_DATA}  bad input: no such file, unreadable or damaged data, clone or table, no such order
  {EXIT_FAILED}  the clone or fit failed while running, or the Dask scheduler cannot be reached"""


class CommandError(SystemExit):
    """A command-line error with its exit status (:data:`EXIT_DATA`, :data:`EXIT_USAGE`, ...).

    It is a ``SystemExit`` whose ``code`` is the status; ``str()`` gives the message, which
    :func:`main` prints on stderr as ``error: MESSAGE`` before it propagates.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


#: Settings of the demo: 150 Å of the embedded PHOENIX 10 kK HPF model between Paschen δ and γ (the
#: band of the shipped HR 4829 order, so that ``demo --fit`` can fit it), the paper's prominence,
#: and an epoch budget in which the last training stage stops on its plateau rule.
DEMO = dict(template="phoenix-10kK-hpf", band=(10440.0, 10590.0), prominence=0.01, epochs=2000, buffer=30.0,
            example="hr4829-hpf")


def _calibration_degree(text: str) -> int | str | None:
    """``--calibration-degree``: an integer >= 0, ``auto`` or ``none``."""
    low = text.strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        degree = int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, 'auto' or 'none', got {text!r}") from None
    if degree < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, 'auto' or 'none', got {text!r}")
    return degree


def _read_input(name: str, order: int | None = None):
    from .templates import TEMPLATES, load_template

    template = _template_arg(name)
    if template is not None:
        if order is not None:
            raise CommandError(EXIT_USAGE, f"--order is for files with échelle orders, not the template {name!r}")
        try:
            return load_template(template[0], molecule=template[1]), TEMPLATES[template[0]]
        except ValueError as err:
            raise CommandError(EXIT_DATA, str(err)) from err
    path = Path(name)
    if not path.exists():
        raise CommandError(EXIT_DATA,
                           f"{name!r} is neither a file nor an embedded template (choose from {', '.join(sorted(TEMPLATES))})")
    from .io import read_orders

    try:
        spectra = read_orders(path, None if order is None else [order])
    except ValueError as err:
        raise CommandError(EXIT_DATA, str(err)) from err
    if len(spectra) > 1:
        raise CommandError(EXIT_USAGE, f"{path.name} holds {len(spectra)} échelle orders (0-{len(spectra) - 1}); "
                                       "choose the one to clone with --order N")
    return spectra[0], {}


def _output_folder(path: str, *, create: bool = True) -> Path:
    """The ``-o/--output`` folder, made when missing; ValueError when a file stands in its way."""
    out = Path(path)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"-o/--output {path}: {blocker} is an existing file, not a folder; give a folder "
                         "(it is created if missing)")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. no permission
            raise ValueError(f"-o/--output {path}: cannot create the folder ({err})") from err
        import tempfile

        try:  # a folder that exists may still refuse files (permissions, a read-only or special file system)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
                pass
        except OSError as err:
            raise ValueError(f"-o/--output {path}: cannot write files into this folder ({err.strerror or err}); "
                             "give a folder you can write to") from err
    return out


def _run_clone(args, source: str, spectrum, info: dict) -> dict:
    """``clone`` and ``demo``: clone the input, write the clone, its line table and its figure; the summary."""
    from .cloning import clone_spectrum

    settings = _clone_settings(args, info)
    out = _output_folder(args.output)
    t0 = time.perf_counter()
    # tqdm writes to stderr: stdout keeps only the JSON
    clone = clone_spectrum(spectrum, settings=settings, device=args.device, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    summary = _clone_summary(clone, args, source, seconds)
    return summary | _write_clone_products(clone, out, _clone_stem(args, source), source, args.prominence)


def _clone_settings(args, info: dict):
    """The CloneSettings of the command line: its options, else the template's band, Teff and kind."""
    import astropy.units as u

    from .clone_settings import CloneSettings

    band = None
    if args.band is not None:
        band = tuple(args.band) * u.AA
    elif info.get("band") is not None:
        band = tuple(info["band"]) * u.AA
    teff = args.teff if args.teff is not None else info.get("teff")
    return CloneSettings(
        prominence=args.prominence, band=band, buffer=args.buffer * u.AA, teff=None if teff is None else teff * u.K,
        flatten=False if args.no_flatten else info.get("kind", "stellar") != "telluric", mode=args.mode,
        profile=args.profile, tune=("amplitude", "sigma", "gamma") + (() if args.fixed_centers else ("center",)),
        epochs=args.epochs, residual_passes=args.residual_passes, lr=args.lr, plan=_plan(args))


def _clone_stem(args, source: str) -> str:
    """Stem of the output files: ``--name``, else the input's (with the order, when one was chosen)."""
    stem = args.name or (Path(source).stem if Path(source).exists() else source)
    if getattr(args, "order", None) is not None and not args.name:
        stem = f"{stem}_order{args.order:02d}"
    return stem


def _clone_summary(clone, args, source: str, seconds: float) -> dict:
    """What ``clone --json`` prints about the clone: size, fidelity, weakest windows, training, engine."""
    weak = clone.worst_windows(5)
    return {
        "input": source,
        "n_lines": clone.n_lines,
        "rms_residual": clone.rms_residual(),
        "fidelity": clone.fidelity(),
        "lines_added_from_residual": int((clone.line_pass > 0).sum()),
        "residual_passes": len(clone.passes) - 1,
        "worst_windows": [{"start": float(r["start"].value), "end": float(r["end"].value), "rms": float(r["rms"]),
                           "max_abs": float(r["max_abs"]), "n_lines": int(r["n_lines"])} for r in weak],
        "epochs": clone.history.epochs_run,
        "stop_reason": clone.history.stop_reason,
        "seconds": round(seconds, 2),
        "mode": args.mode,
        "profile": args.profile,
        "device": str(args.device),
        "engine": clone.engine,
    }


def _write_clone_products(clone, out: Path, stem: str, source: str, prominence: float) -> dict:
    """Write the clone (FITS), its line table (ECSV) and its figure (PNG) into ``out``; their paths."""
    clone_path = clone.save(out / f"{stem}_clone.fits", overwrite=True)
    table_path = out / f"{stem}_lines.ecsv"
    clone.lines.write(table_path, overwrite=True)
    import matplotlib

    matplotlib.use("Agg")
    fig = clone.plot(title=f"{source}: {clone.n_lines} lines, prominence {prominence}")
    png_path = out / f"{stem}_clone.png"
    fig.savefig(png_path, dpi=110)
    return {"clone_file": str(clone_path), "line_table": str(table_path), "figure": str(png_path)}


#: What each stop reason of the training means, for people.
_STOP_WORDS = {"max_epochs": "the epoch budget (not converged; --epochs raises it)",
               "plateau": "a plateau (converged: no 0.01 % gain in the last epochs)",
               "non-finite": "a NaN/inf loss (the best parameters before it were kept)"}


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    fid = summary["fidelity"]
    print(
        f"cloned {summary['input']}: {summary['n_lines']} lines ({summary['lines_added_from_residual']} added from the "
        f"residual in {summary['residual_passes']} passes), {summary['epochs']} epochs in {summary['seconds']:.1f} s, "
        f"stopped by: {_STOP_WORDS.get(summary['stop_reason'], summary['stop_reason'])}\n"
        f"  |S - clone| over every pixel of the band: RMS {100 * fid['rms']:.3f} %, p99 {100 * fid['p99']:.2f} %, "
        f"max {100 * fid['max']:.2f} %"
    )
    if summary["worst_windows"]:
        w = summary["worst_windows"][0]
        print(f"  weakest window: {w['start']:.1f}-{w['end']:.1f} Å, RMS {100 * w['rms']:.2f} %")
    for key in ("clone_file", "line_table", "figure"):
        print(f"  {key.replace('_', ' ')}: {summary[key]}")
    fit = summary.get("fit")
    if fit:
        rv = "n/a" if fit["rv_kms"] is None else f"{fit['rv_kms']:.2f} ± {fit['rv_sigma_kms'] or float('nan'):.2f} km/s"
        vs = "n/a" if fit["vsini_kms"] is None else f"{fit['vsini_kms']:.1f} ± {fit['vsini_sigma_kms'] or float('nan'):.1f} km/s"
        print(f"fitted {fit['data']} with the clone in {fit['seconds']:.1f} s: RV {rv}, v sin i {vs}, "
              f"chi2_red {fit['chi2_reduced']:.2f}, flags: {', '.join(fit['flag_codes']) or 'none'}\n"
              f"  fit file: {fit['result_file']}\n  fit figure: {fit['figure']}")


def _add_clone_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("-o", "--output", default=defaults.get("output", "."), help="output folder (default: %(default)s)")
    p.add_argument("--prominence", type=float, default=defaults.get("prominence", 0.01), help="line prominence threshold in (0, 1) (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults.get("epochs", 800),
                   help="Adam epochs of the whole run, residual passes included (default: %(default)s)")
    p.add_argument("--residual-passes", type=int, default=defaults.get("residual_passes", 3),
                   help="largest number of passes that add the lines found in the residual, 0 for none "
                        "(default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--mode", choices=("linear", "log"), default="linear", help="clone in linear (Eq. 2) or log (Eq. A2) flux (default: %(default)s)")
    p.add_argument("--profile", choices=("pseudo-voigt", "voigt"), default="pseudo-voigt", help="line shape (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--plan", choices=("auto", "yes", "no"), default="auto",
                   help="train through window plans, each epoch one CUDA-graph replay on a GPU (default: %(default)s, "
                        "which does not plan yet)")
    p.add_argument("--band", type=float, nargs=2, metavar=("LO", "HI"), default=defaults.get("band"),
                   help="band of interest in Å (default: " + ("%(default)s" if defaults.get("band") else
                                                            "the template's band, or the whole input") + ")")
    p.add_argument("--buffer", type=float, default=defaults.get("buffer", 30.0), help="buffer around the band in Å (default: %(default)s)")
    p.add_argument("--teff", type=float, help="divide by a blackbody of this Teff in K (default: the template's, else none)")
    p.add_argument("--no-flatten", action="store_true", help="do not divide by a continuum polynomial")
    p.add_argument("--tune-centers", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.add_argument("--fixed-centers", action="store_true", help="do not tune the line centres (tuned by default)")
    p.add_argument("--name", help="stem of the output file names")
    p.add_argument("--json", action="store_true",
                   help="print a machine-readable summary on stdout (the progress bar stays on stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stellar", help="stellar clone: a blase_specutils clone file, a blasé 0.3 .pt file, or the "
                                     "name of an embedded template (see 'templates'), cloned over the data's range "
                                     "once and cached (optional with --telluric: a telluric-only fit)")
    p.add_argument("--telluric", action="append", metavar="[NAME=]CLONE",
                   help="telluric clone: a clone file or an embedded template's name, e.g. telfit-hpf, or one "
                        "molecule of psg-igrins as psg-igrins:H2O (cloned once and cached; optional). Repeat it for "
                        "one Beer's-law power per component, e.g. --telluric psg-igrins:H2O --telluric "
                        "psg-igrins:CO2, or name files: --telluric H2O=h2o.fits")
    p.add_argument("--tune-telluric", action="store_true",
                   help="tune the telluric line amplitudes and widths in the line stage, X and R holding their "
                        "template-matching values (always on for a telluric-only fit)")
    p.add_argument("--fixed-telluric-power", action="store_true",
                   help="hold the Beer's-law power X of the telluric transmission at 1 (default: fitted)")
    p.add_argument("--telluric-regularization", type=float, default=5.0,
                   help="Λ of the L1 pull of the telluric ln a (default: %(default)s)")
    p.add_argument("--continuum-degree", type=int, default=2, help="degree of the per-order continuum polynomial (default: %(default)s)")
    p.add_argument("--calibration-degree", type=_calibration_degree, default="auto",
                   help="fit a per-order wavelength correction, a polynomial of this degree in velocity, with the "
                        "telluric lines as calibrators (reported in m/s); 'none' for none; default 'auto': degree 1 "
                        "in a telluric-only fit, none beside a stellar clone")
    p.add_argument("--corrected", action="store_true",
                   help="with --telluric: also write the telluric-corrected spectrum (data / fitted transmission, "
                        "pixels below 20 %% transmission masked) to STEM_corrected.fits")
    p.add_argument("--resolving-power", type=float, default=55000.0, help="R (default: %(default)s, HPF)")
    p.add_argument("--air", choices=("auto", "yes", "no"), default="auto",
                   help="wavelengths in air (converted to vacuum, Morton 2000) or vacuum (default: %(default)s, as the "
                        "file says; vacuum where it says nothing)")
    p.add_argument("--frame", choices=("observatory", "barycentric"), default=None,
                   help="frame of the data's axis (default: observatory for HPF/IGRINS pipeline files, else unstated: "
                        "no barycentric RV); barycentric data are shifted back so the tellurics are at rest")
    p.add_argument("--barycentric-correction", type=float, default=None, metavar="KMS",
                   help="barycentric correction in km/s (default: from the file's time, target and site)")
    p.add_argument("--rv-range", type=float, default=150.0,
                   help="RV scan half range and RV bound in km/s (default: %(default)s)")
    p.add_argument("--vsini", type=float, default=None,
                   help="starting v sin i in km/s, at most 600 (default: the best of a scan over 2-400 km/s, jointly "
                        "with the RV scan)")
    p.add_argument("--epochs", type=int, default=4000, help="largest number of epochs of the line stage (default: %(default)s)")
    p.add_argument("--template-only", action="store_true", help="template matching only (no line tuning)")
    p.add_argument("--regularization", type=float, default=5.0, help="Λ of the L1 pull of ln a (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    p.add_argument("--plan", choices=("auto", "yes", "no"), default="auto",
                   help="train through window plans, each epoch one CUDA-graph replay on a GPU (default: %(default)s, "
                        "which does not plan yet)")
    p.add_argument("-o", "--output", default=".", help="output folder (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print a machine-readable summary on stdout (progress bars stay on stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_scheduler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", help="'local' (a LocalCluster on this machine) or a Dask scheduler address "
                                       "(tcp://host:8786); default: run serially")
    p.add_argument("--workers", type=int, default=2, help="workers of the local cluster (default: %(default)s)")
    p.add_argument("--threads-per-task", type=int, help="torch threads per job (default: cores / Dask threads per host)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="blase-specutils",
        description="Clone precomputed stellar and telluric spectra into tunable lines (the blasé method).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("clone", help="clone a spectrum file or an embedded template")
    pc.add_argument("input", help="a file specutils can read, or a template: phoenix-10kK-hpf, telfit-hpf, psg-igrins (psg-igrins:H2O: one molecule's column)")
    pc.add_argument("--order", type=int, help="the échelle order to clone, for files that hold several (an HPF "
                                               "Goldilocks file: 0-27), as in fit --order")
    _add_clone_options(pc, {})
    pd = sub.add_parser("demo", help="clone 150 Å of the embedded PHOENIX 10 kK HPF model end to end (about half a "
                                     "minute on 2 CPU cores); --fit: then fit the shipped HR 4829 HPF order with it",
                        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_clone_options(pd, {"output": "blase_demo", "prominence": DEMO["prominence"], "epochs": DEMO["epochs"],
                            "buffer": DEMO["buffer"], "band": DEMO["band"]})
    pd.add_argument("--fit", action="store_true",
                    help="then fit the shipped HPF order of HR 4829 (blase_specutils.load_example('hr4829-hpf')) with "
                         "the fresh clone and write the fit, its line table and its figure")
    pf = sub.add_parser("fit", help="transfer-learn a clone against an observed spectrum")
    pf.add_argument("data", help="a file specutils or muler reads (an HPF Goldilocks file, a wavelength/flux table)")
    pf.add_argument("--order", type=int, nargs="+", help="échelle orders to fit jointly (indices into the file's orders)")
    _add_fit_options(pf)
    pm = sub.add_parser("fit-many", help="fit many files (each échelle order its own job), serially or on Dask")
    pm.add_argument("files", nargs="+", help="data files; an HPF Goldilocks file gives one job per order")
    pm.add_argument("--orders", type=int, nargs="+", help="orders to take from each Goldilocks file (default: all)")
    _add_fit_options(pm)
    _add_scheduler_options(pm)
    pg = sub.add_parser("clone-grid", help="clone every spectrum of a model grid and match the lines across it")
    pg.add_argument("grid", help="a table (CSV or ECSV) with a 'file' column and one column per grid parameter")
    pg.add_argument("--tolerance", type=float, default=3.0, help="line matching tolerance in km/s (default: %(default)s)")
    pg.add_argument("--blackbody-from", metavar="COLUMN", help="divide each spectrum by a blackbody of the Teff in this grid column")
    _add_clone_options(pg, {"output": "blase_grid"})
    _add_scheduler_options(pg)
    sub.add_parser("templates", help="list the embedded templates")
    for command in sub.choices.values():  # one table of exit codes, in every command's --help
        command.epilog = EXIT_CODES
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _read_clone(path: str):
    from .cloning import SpectralClone, load_blase03

    p = Path(path)
    if not p.exists():
        raise CommandError(EXIT_DATA, f"no clone file at {p}")
    try:
        return load_blase03(p) if p.suffix in (".pt", ".pth") else SpectralClone.load(p)
    except ValueError as err:
        raise CommandError(EXIT_DATA, str(err)) from err


def _template_arg(arg: str) -> tuple[str, str | None] | None:
    """``(template, molecule)`` when ``arg`` names an embedded template (``psg-igrins`` or
    ``psg-igrins:H2O``) rather than a file; None otherwise."""
    from .templates import TEMPLATES

    if Path(arg).exists():
        return None
    name, _, molecule = arg.partition(":")
    return (name, molecule or None) if name in TEMPLATES else None


def _telluric_parts(value: str) -> tuple[str | None, str]:
    """``NAME=CLONE`` → (NAME, CLONE); a bare CLONE (or a file whose name holds "=") → (None, CLONE)."""
    if "=" in value and not Path(value).exists():
        name, _, source = value.partition("=")
        if not name or not source:
            raise CommandError(EXIT_USAGE, f"--telluric {value!r}: give NAME=CLONE, e.g. H2O=h2o.fits")
        return name, source
    return None, value


def _telluric_arg(values: list[str], data, progress: bool):
    """The telluric clone(s) of ``--telluric``: one SpectralClone for a single unnamed value, else a
    dict name → clone (names from ``NAME=``, a template's molecule, or the clone's ``meta["molecule"]``)."""
    parts = [_telluric_parts(v) for v in values]
    clones = [_clone_arg(source, data, progress) for _, source in parts]
    if len(parts) == 1 and parts[0][0] is None:
        return clones[0]
    named = {}
    for (name, source), clone in zip(parts, clones):
        template = _template_arg(source)
        name = name or (template[1] if template else None) or (clone.meta or {}).get("molecule")
        if not name:
            raise CommandError(EXIT_USAGE, f"--telluric {source!r}: name each of several telluric clones "
                                           f"(--telluric H2O={source}), or give a psg-igrins molecule (psg-igrins:H2O)")
        if name in named:
            raise CommandError(EXIT_USAGE, f"--telluric: the component name {name!r} is given twice")
        named[str(name)] = clone
    return named


def _clone_arg(arg: str, data, progress: bool):
    """A clone file, or an embedded template's name (``psg-igrins:H2O``: one molecule's column): its
    clone over the data's range, from the cache (:mod:`blase_specutils.template_cache`) or made now."""
    template = _template_arg(arg)
    if template is not None:
        from .spectra import wavelength_to_angstrom
        from .template_cache import cache_folder, template_clone

        orders = data if isinstance(data, list) else list(data) if not hasattr(data, "spectral_axis") else [data]
        w = [wavelength_to_angstrom(s.spectral_axis) for s in orders]
        lo, hi = min(float(x.min()) for x in w), max(float(x.max()) for x in w)
        if progress:
            print(f"clone of the template {arg!r} over {lo:.0f}-{hi:.0f} Å (cached in {cache_folder()})", file=sys.stderr)
        try:
            return template_clone(template[0], (lo, hi), progress=progress, molecule=template[1])
        except ValueError as err:
            raise CommandError(EXIT_DATA, str(err)) from err
    return _read_clone(arg)


def _read_data(path: str, orders):
    from .io import read_orders

    p = Path(path)
    if not p.exists():
        raise CommandError(EXIT_DATA, f"no data file at {p}")
    try:
        spectra = read_orders(p, orders)
    except ValueError as err:
        raise CommandError(EXIT_DATA, str(err)) from err
    return spectra[0] if len(spectra) == 1 else spectra


def _fit_kwargs(args) -> dict:
    """Keyword arguments of fit_spectrum shared by ``fit`` and ``fit-many``."""
    return dict(resolving_power=args.resolving_power, rv_range=args.rv_range, vsini=args.vsini,
                line_epochs=0 if args.template_only else args.epochs, regularization=args.regularization,
                tune_telluric=TELLURIC_ONLY_TUNED if args.tune_telluric else None,
                tune_telluric_power=not args.fixed_telluric_power,
                telluric_regularization=args.telluric_regularization, continuum_degree=args.continuum_degree,
                plan=_plan(args), calibration_degree=args.calibration_degree,
                air={"auto": None, "yes": True, "no": False}[getattr(args, "air", "auto")],
                frame=getattr(args, "frame", None), barycentric_correction=getattr(args, "barycentric_correction", None))


def _plan(args):
    """``--plan``: "auto", True or False."""
    return {"auto": "auto", "yes": True, "no": False}[getattr(args, "plan", "auto")]


def _fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _run_fit(args) -> int:
    """``fit``: read the data and the clones, fit, write the result, its products and the summary."""
    usage = _fit_usage_error(args)
    if usage:
        print(f"error: {usage}", file=sys.stderr)
        return EXIT_USAGE
    tellurics = args.telluric or []
    # a missing clone file is named before any data are read
    _check_clone_files(args.stellar, *(_telluric_parts(v)[1] for v in tellurics))
    data = _read_data(args.data, args.order)
    stellar = _clone_arg(args.stellar, data, not args.quiet) if args.stellar else None
    telluric = _telluric_arg(tellurics, data, not args.quiet) if tellurics else None
    t0 = time.perf_counter()
    try:
        out = _output_folder(args.output)
        result = _fit(data, stellar, telluric, args)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, FloatingPointError) as err:
        print(f"error: the fit failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    # a flagged fit is still written and exits 0; its flags are in the JSON and on stderr
    for flag in result.flags:
        print(f"warning: [{flag.code}] {flag.message}", file=sys.stderr)
    summary = result.summary()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary |= _write_fit_products(result, out, args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_fit(summary)
    return EXIT_OK


def _fit_usage_error(args) -> str | None:
    """Why the options of ``fit`` cannot work together (None when they can)."""
    if not args.stellar and not args.telluric:
        return "give --stellar CLONE, --telluric CLONE, or both (--telluric alone: a telluric-only fit)"
    if getattr(args, "corrected", False) and not args.telluric:
        return "--corrected needs a telluric clone (--telluric CLONE): it divides by the fitted transmission"
    return None


def _check_clone_files(*args: str | None) -> None:
    """CommandError (bad input) for a clone that is neither an existing file nor an embedded template."""
    from .templates import TEMPLATES

    for arg in args:
        if arg and _template_arg(arg) is None and not Path(arg).exists():
            raise CommandError(EXIT_DATA, f"no clone file at {Path(arg)} (nor an embedded template of that name: "
                                          f"{', '.join(sorted(TEMPLATES))})")


def _fit(data, stellar, telluric, args):
    """fit_spectrum with the command line's settings; its flags are reported by the caller, not warned."""
    import warnings

    from .fitting import FitFlagWarning, fit_spectrum

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitFlagWarning)  # reported by _run_fit, one line per flag
        return fit_spectrum(data, stellar, telluric=telluric, device=args.device, progress=not args.quiet,
                            **_fit_kwargs(args))


def _write_fit_products(result, out: Path, args) -> dict:
    """Write the fit (FITS), its line table, the corrected spectrum when asked and the figure; their paths."""
    stem = Path(args.data).stem
    paths = {"result_file": str(result.save(out / f"{stem}_fit.fits", overwrite=True))}
    table = out / f"{stem}_fit_lines.ecsv"
    result.lines.write(table, overwrite=True)
    paths["line_table"] = str(table)
    if getattr(args, "corrected", False):
        paths["corrected_file"] = str(result.save_corrected(out / f"{stem}_corrected.fits", overwrite=True))
    import matplotlib

    matplotlib.use("Agg")
    png = out / f"{stem}_fit.png"
    result.plot(title=Path(args.data).name).savefig(png, dpi=110)
    paths["figure"] = str(png)
    return paths


def _fmt_power(x) -> str:
    """One Beer's-law power, or several by component ("H2O 0.020, CO2 0.561")."""
    if isinstance(x, dict):
        return ", ".join(f"{k} {float(v):.3f}" for k, v in x.items())
    return f"{float(x):.3f}"


def _print_fit(summary: dict) -> None:
    """The fit's summary for people: both stages, the RV in both frames, the flags and the files."""
    tm = summary["template_matching"]
    power = "" if tm["telluric_power"] is None else f", telluric power {_fmt_power(tm['telluric_power'])}"
    print(f"template matching: chi2_red {tm['chi2_reduced']:.2f}, RV {_fmt(tm['rv'], '.3f', ' km/s')}, "
          f"v sin i {_fmt(tm['vsini'], '.2f', ' km/s')}, R {tm['resolving_power']:.0f}{power}")
    power = "" if summary.get("telluric_power") is None else f", telluric power {_fmt_power(summary['telluric_power'])}"
    print(f"transfer learning: chi2_red {summary['chi2_reduced']:.2f}, RV {_fmt(summary['rv_kms'], '.3f', ' km/s')}, "
          f"v sin i {_fmt(summary['vsini_kms'], '.2f', ' km/s')}{power}, "
          f"{summary['n_lines_changed']} of {summary['n_lines']} lines changed")
    if summary["rv_kms"] is not None:
        print(f"  RV: measured (observatory) {_fmt(summary['rv_observatory_kms'], '.3f', ' km/s')}, barycentric "
              f"{_fmt(summary['rv_barycentric_kms'], '.3f', ' km/s')} (correction "
              f"{_fmt(summary['barycentric_correction_kms'], '+.3f', ' km/s')}); {summary['frame']} frame, "
              f"{summary['wavelength_frame']}")
    print(f"  flags: {summary['flag_codes'] or 'none'}")
    for key in ("result_file", "line_table", "corrected_file", "figure"):
        if key in summary:
            print(f"  {key.replace('_', ' ')}: {summary[key]}")


def _client(args):
    """None (serial), a LocalCluster client, or a client of a running scheduler."""
    if not args.scheduler:
        return None, None
    from distributed import Client, LocalCluster

    if args.scheduler == "local":
        if args.workers < 1:
            raise CommandError(EXIT_USAGE, "--workers must be >= 1")
        import logging

        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        return Client(cluster), cluster
    try:
        return Client(args.scheduler, timeout="20s"), None
    except OSError as err:
        raise CommandError(EXIT_FAILED, f"cannot reach the Dask scheduler at {args.scheduler}: {err}") from err


def _batch_report(res, table: Path, as_json: bool, extra: dict | None = None) -> int:
    summary = {"jobs": len(res), "failed": len(res.failed), "wall_seconds": round(res.wall_seconds, 2),
               "workers": res.n_workers, "summary_table": str(table), **(extra or {})}
    if as_json:
        summary["errors"] = {r.label: r.error for r in res.failed}
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['jobs']} jobs, {summary['failed']} failed, {summary['wall_seconds']:.1f} s "
              f"({res.n_workers or 'no'} Dask workers); summary: {table}")
        for k, v in (extra or {}).items():
            print(f"  {k.replace('_', ' ')}: {v}")
        for r in res.failed:
            print(f"  FAILED {r.label}: {r.error}", file=sys.stderr)
    return 0 if res.ok else 1


def _run_fit_many(args) -> int:
    from .batch import _check_fit_kwargs, fit_many, hpf_order_jobs

    if not args.stellar and not args.telluric:
        raise CommandError(EXIT_USAGE, "give --stellar CLONE, --telluric CLONE, or both (--telluric alone: "
                                       "telluric-only fits)")
    if args.telluric and len(args.telluric) > 1:
        raise CommandError(EXIT_USAGE, "fit-many takes one telluric clone file (--telluric CLONE); fit one target "
                                       "with several components with 'fit'")
    telluric = args.telluric[0] if args.telluric else None
    for f in (args.stellar, telluric):
        if f and not Path(f).exists():
            raise CommandError(EXIT_DATA, f"no clone file at {f}")
    try:
        _check_fit_kwargs(_fit_kwargs(args))  # before a cluster starts
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    items, labels = hpf_order_jobs(args.files, args.orders)
    out = Path(args.output)
    client, cluster = _client(args)
    try:
        res = fit_many(items, args.stellar, telluric=telluric, client=client, output_dir=out, labels=labels,
                       threads_per_task=args.threads_per_task, device=args.device,
                       progress=not args.quiet, **_fit_kwargs(args))
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return _batch_report(res, out / "summary.ecsv", args.json)


def _run_clone_grid(args) -> int:
    import astropy.units as u
    from astropy.table import Table

    from .batch import clone_grid

    grid_path = Path(args.grid)
    if not grid_path.exists():
        raise CommandError(EXIT_DATA, f"no grid table at {grid_path}")
    try:
        table = Table.read(grid_path, format="ascii.ecsv" if grid_path.suffix == ".ecsv" else None)
    except Exception as err:  # astropy raises many kinds for an unreadable table
        raise CommandError(EXIT_DATA, f"cannot read the grid table {grid_path}: {err}") from err
    if "file" not in table.colnames:
        raise CommandError(EXIT_DATA, f"the grid table needs a 'file' column; it has {table.colnames}")
    params = [c for c in table.colnames if c != "file"]
    if not params:
        raise CommandError(EXIT_DATA, "the grid table needs at least one parameter column besides 'file'")
    files = [str((grid_path.parent / str(f)).resolve()) if not Path(str(f)).is_absolute() else str(f)
             for f in table["file"]]
    item_kwargs = None
    if args.blackbody_from:
        if args.blackbody_from not in params:
            raise CommandError(EXIT_USAGE, f"--blackbody-from {args.blackbody_from!r} is not a column of the grid table")
        item_kwargs = [{"teff": float(t) * u.K} for t in table[args.blackbody_from]]
    out = Path(args.output)
    client, cluster = _client(args)
    try:
        grid = clone_grid(
            files, table[params], tolerance=args.tolerance * u.km / u.s, client=client, output_dir=out,
            item_kwargs=item_kwargs, progress=not args.quiet, prominence=args.prominence,
            band=None if args.band is None else tuple(args.band) * u.AA, buffer=args.buffer * u.AA,
            teff=None if args.teff is None else args.teff * u.K, flatten=not args.no_flatten, mode=args.mode,
            profile=args.profile, epochs=args.epochs, lr=args.lr, device=args.device, plan=_plan(args),
            tune=("amplitude", "sigma", "gamma") + (() if args.fixed_centers else ("center",)),
            residual_passes=args.residual_passes,
        )
    except (ValueError, TypeError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    n_lines = len(set(grid.table["line_id"]))
    return _batch_report(grid.batch, out / "summary.ecsv", args.json,
                         {"matched_lines": n_lines, "line_table": str(out / "grid_lines.ecsv")})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``blase-specutils`` command.

    Returns the exit status (:data:`EXIT_CODES`: 0 success, flagged fits included; 1 some batch
    jobs failed; 2 usage error; 4 the clone or fit failed). Input that cannot be read or used
    raises :class:`CommandError` (a ``SystemExit`` with status 3, :data:`EXIT_DATA`) after printing
    ``error: MESSAGE`` on stderr; argparse's own usage errors raise ``SystemExit(2)``.
    """
    try:
        return _main(argv)
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        raise


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "output", None) is not None:
        try:
            _output_folder(args.output, create=False)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.command == "fit":
        return _run_fit(args)
    if args.command == "fit-many":
        return _run_fit_many(args)
    if args.command == "clone-grid":
        return _run_clone_grid(args)
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
    spectrum, info = _read_input(source, getattr(args, "order", None))
    try:
        summary = _run_clone(args, source, spectrum, info)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, FloatingPointError) as err:
        print(f"error: the clone failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "demo" and args.fit:
        try:
            summary["fit"] = _demo_fit(args, summary)
        except (RuntimeError, FloatingPointError, ValueError) as err:
            print(f"error: the demo fit failed: {err}", file=sys.stderr)
            return EXIT_FAILED
    _report(summary, args.json)
    return EXIT_OK


def _demo_fit(args, summary: dict) -> dict:
    """``demo --fit``: fit the shipped HR 4829 HPF order with the demo's clone (library defaults)."""
    import matplotlib

    import warnings

    from .cloning import SpectralClone
    from .examples import load_example
    from .fitting import FitFlagWarning, fit_spectrum

    matplotlib.use("Agg")
    data = load_example(DEMO["example"])
    clone = SpectralClone.load(summary["clone_file"])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitFlagWarning)  # reported below, one line per flag, as by ``fit``
        result = fit_spectrum(data, clone, resolving_power=data.meta["resolving_power"], device=args.device,
                              progress=not args.quiet)
    for flag in result.flags:
        print(f"warning: [{flag.code}] {flag.message}", file=sys.stderr)
    out = Path(args.output)
    stem = DEMO["example"]
    fit = {"data": f"load_example({DEMO['example']!r})", "rv_kms": _finite(result.rv.value),
           "rv_sigma_kms": _finite(result.summary().get("rv_sigma_kms")),
           "rv_continuum_spread_kms": _finite(result.summary().get("rv_continuum_spread_kms")),
           "vsini_halves_spread_kms": _finite(result.summary().get("vsini_halves_spread_kms")),
           "vsini_kms": _finite(result.vsini.value), "vsini_sigma_kms": _finite(result.summary().get("vsini_sigma_kms")),
           "chi2_reduced": float(result.chi2_reduced), "flag_codes": [f.code for f in result.flags],
           "seconds": round(time.perf_counter() - t0, 2)}
    fit["result_file"] = str(result.save(out / f"{stem}_fit.fits", overwrite=True))
    fit["figure"] = str(out / f"{stem}_fit.png")
    result.plot(title=f"HR 4829, HPF order 17, fitted with the demo's clone").savefig(fit["figure"], dpi=110)
    return fit


def _finite(value) -> float | None:
    return None if value is None or not (float(value) == float(value)) else float(value)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
