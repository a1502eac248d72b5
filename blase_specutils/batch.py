"""Many independent clones and fits: serially, or on a Dask cluster (paper Sect. 8.2).

Every job (one spectrum to clone, one order of one file to fit) is independent, so a batch is a
set of Dask tasks. The functions here take a sequence of inputs and return one
:class:`BatchRecord` per input, in input order, whatever order the jobs finish in.

* With ``client=None`` the jobs run one after another in this process.
* With a :class:`dask.distributed.Client` (a ``LocalCluster`` on a laptop, ``dask-jobqueue`` on
  SLURM/PBS) each job is a task; results stream back with a progress bar as they finish.
* A job that raises becomes an error record (type, message, traceback) and never loses the
  others; a worker that dies is replaced and its jobs are rerun by Dask's scheduler.
* With ``output_dir`` each job writes its own product (clone or fit FITS plus line table) on the
  worker and sends back only a summary, so the client's memory does not grow with the number of
  inputs. A summary table (ECSV) is written at the end.
* Each task sets the torch thread count so that all Dask threads on one host together use the
  host's cores once (no oversubscription); with ``device="auto"`` a worker with a GPU uses it,
  others use their CPU, and ``gpu=True`` asks Dask for a worker with a ``GPU`` resource.

``dask.distributed`` is only needed when a client is given.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import astropy.units as u
import numpy as np
from astropy.table import QTable, Table

from .core.clone import SPEED_OF_LIGHT_KMS

__all__ = [
    "BatchRecord",
    "BatchResult",
    "run_batch",
    "fit_many",
    "clone_many",
    "clone_grid",
    "match_lines",
    "LineGrid",
    "hpf_order_jobs",
]

#: Columns of the line tables that the grid product carries over.
_GRID_COLUMNS = ("center", "amplitude", "sigma", "gamma", "fwhm", "depth", "equivalent_width")


# --------------------------------------------------------------------------------------- records
@dataclass
class BatchRecord:
    """What one job of a batch produced.

    Attributes
    ----------
    index : int
        Position of the input in the batch.
    label : str
        A name for the input (file name and order, or ``item N``).
    ok : bool
        The job finished without an error.
    summary : dict
        Numbers the job reported (RV, χ², number of lines, ...); empty on error.
    output : str or None
        Product the job wrote (``output_dir`` given), else None.
    error : str or None
        ``"ExceptionType: message"`` when the job failed.
    traceback : str or None
        The worker's traceback of the failure.
    seconds : float
        Wall time of the job on its worker.
    worker : str
        Where it ran (``"local"`` without a client, else the Dask worker address).
    threads : int
        torch threads the job used.
    device : str
        torch device the job used.
    result : object
        The in-memory result (``SpectralClone`` or ``TransferResult``) when no ``output_dir`` was
        given, else None.
    """

    index: int
    label: str
    ok: bool
    summary: dict = field(default_factory=dict)
    output: str | None = None
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0
    worker: str = "local"
    threads: int = 0
    device: str = ""
    result: Any = None


class BatchResult(Sequence):
    """The records of a batch, in input order (a read-only sequence of :class:`BatchRecord`).

    Attributes
    ----------
    wall_seconds : float
        Wall time of the whole batch as seen by the client.
    n_workers : int
        Dask workers at the start (0 for a serial run).
    """

    def __init__(self, records: list[BatchRecord], *, wall_seconds: float, n_workers: int) -> None:
        self._records = sorted(records, key=lambda r: r.index)
        self.wall_seconds = float(wall_seconds)
        self.n_workers = int(n_workers)

    def __getitem__(self, i):
        return self._records[i]

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (f"<BatchResult: {len(self)} jobs, {len(self.failed)} failed, {self.wall_seconds:.1f} s on "
                f"{self.n_workers or 'no'} Dask workers>")

    @property
    def ok(self) -> bool:
        """Every job succeeded."""
        return all(r.ok for r in self._records)

    @property
    def failed(self) -> list[BatchRecord]:
        """The records of the jobs that failed."""
        return [r for r in self._records if not r.ok]

    @property
    def results(self) -> list:
        """The in-memory results (None for failed jobs and for jobs that wrote to ``output_dir``)."""
        return [r.result for r in self._records]

    def table(self) -> Table:
        """One row per job: label, status, error, seconds, worker and the summary's scalar numbers."""
        keys: list[str] = []
        for r in self._records:
            for k, v in _flat(r.summary).items():
                if k not in keys and isinstance(v, (int, float, str, bool, np.number)):
                    keys.append(k)
        t = Table()
        t["index"] = [r.index for r in self._records]
        t["label"] = [r.label for r in self._records]
        t["ok"] = [r.ok for r in self._records]
        t["error"] = [r.error or "" for r in self._records]
        t["output"] = [r.output or "" for r in self._records]
        t["seconds"] = [r.seconds for r in self._records]
        t["worker"] = [r.worker for r in self._records]
        t["threads"] = [r.threads for r in self._records]
        t["device"] = [r.device for r in self._records]
        for k in keys:
            vals = [_flat(r.summary).get(k) for r in self._records]
            kinds = {type(v) for v in vals if v is not None}
            if kinds and kinds <= {str}:
                t[k] = ["" if v is None else v for v in vals]
            else:
                t[k] = np.array([np.nan if v is None or isinstance(v, str) else float(v) for v in vals])
        t.meta["wall_seconds"] = self.wall_seconds
        t.meta["n_workers"] = self.n_workers
        return t

    def write(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write :meth:`table` (ECSV when the suffix is ``.ecsv``, else whatever astropy infers)."""
        path = Path(path)
        self.table().write(path, overwrite=overwrite, **({"format": "ascii.ecsv"} if path.suffix == ".ecsv" else {}))
        return path


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------ the engine
def _torch_threads_for(worker_threads: dict[str, int] | None, requested: int | None) -> int | None:
    if requested is not None:
        return int(requested)
    if worker_threads is None:
        return None
    try:
        from distributed import get_worker

        return worker_threads.get(get_worker().address)
    except (ImportError, ValueError):
        return None


def _execute(job: Callable, index: int, label: str, item, threads: int | None,
             worker_threads: dict[str, int] | None, shared: dict | None = None) -> BatchRecord:
    """Run one job where it lands (this process or a Dask worker) and wrap what happens."""
    import torch

    worker = "local"
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        pass
    n = _torch_threads_for(worker_threads, threads)
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, int(n)))
    used = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        out = job(item, **(shared or {}))
        rec = BatchRecord(index, label, True, summary=out.get("summary", {}), output=out.get("output"),
                          result=out.get("result"), device=str(out.get("device", "")))
    except Exception as err:  # one bad input must never sink the batch: record it
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        rec = BatchRecord(index, label, False, error=f"{type(err).__name__}: {msg}", traceback=traceback.format_exc())
    finally:
        torch.set_num_threads(before)
    rec.seconds = time.perf_counter() - t0
    rec.worker = worker
    rec.threads = used
    return rec


def _threads_per_worker(client) -> dict[str, int]:
    """torch threads per Dask worker: the host's cores shared among all Dask threads on that host."""
    info = _workers(client)
    cores = client.run(os.cpu_count)
    host_threads: dict[str, int] = {}
    for addr, w in info.items():
        host = w.get("host", addr.rsplit(":", 1)[0])
        host_threads[host] = host_threads.get(host, 0) + int(w.get("nthreads", 1))
    out = {}
    for addr, w in info.items():
        host = w.get("host", addr.rsplit(":", 1)[0])
        out[addr] = max(1, int(cores.get(addr, 1) or 1) // max(host_threads[host], 1))
    return out


def _workers(client) -> dict:
    """Every worker of the cluster (recent ``scheduler_info`` lists only five unless asked)."""
    import inspect

    try:
        many = "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        many = False
    return (client.scheduler_info(n_workers=-1) if many else client.scheduler_info())["workers"]


def run_batch(
    job: Callable[[Any], dict],
    items: Sequence,
    *,
    labels: Sequence[str] | None = None,
    client=None,
    threads_per_task: int | None = None,
    resources: dict | None = None,
    shared: dict | None = None,
    summary_path: str | Path | None = None,
    progress: bool = True,
    desc: str = "batch",
) -> BatchResult:
    """Run ``job(item)`` for every item, serially or on a Dask cluster, and gather the records.

    Parameters
    ----------
    job : callable
        ``job(item, **shared)`` returns a dict with optional keys ``summary`` (dict of numbers),
        ``output`` (path written), ``result`` (in-memory object) and ``device``. Must be
        picklable (a module-level function or a :func:`functools.partial` of one) when a client
        is given.
    items : sequence
        The inputs.
    labels : sequence of str, optional
        Names of the inputs for the records (default ``item N``).
    client : dask.distributed.Client, optional
        Run on this cluster; None runs serially in this process.
    threads_per_task : int, optional
        torch threads per job. Default: serially, torch's current setting; on a cluster, each
        host's cores divided by the Dask threads on that host.
    resources : dict, optional
        Dask resources each task needs, e.g. ``{"GPU": 1}``.
    shared : dict, optional
        Keyword arguments of every job (e.g. a clone). On a cluster, Dask futures among them (from
        ``client.scatter``) are resolved on the worker, so big shared inputs travel once.
    summary_path : str or Path, optional
        Write the summary table there (ECSV) at the end.
    progress : bool
        A progress bar that advances as jobs finish.
    desc : str
        Label of the progress bar.

    Returns
    -------
    BatchResult
    """
    from tqdm.std import tqdm

    items = list(items)
    if labels is None:
        labels = [f"item {i}" for i in range(len(items))]
    labels = [str(x) for x in labels]
    if len(labels) != len(items):
        raise ValueError(f"got {len(labels)} labels for {len(items)} items")
    if threads_per_task is not None and int(threads_per_task) < 1:
        raise ValueError(f"threads_per_task must be >= 1, got {threads_per_task}")
    t0 = time.perf_counter()
    records: list[BatchRecord] = []
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="job")
    n_workers = 0
    if client is None:
        for i, (item, label) in enumerate(zip(items, labels)):
            records.append(_execute(job, i, label, item, threads_per_task, None, shared))
            bar.update(1)
            bar.set_postfix(failed=sum(not r.ok for r in records))
    else:
        try:
            from distributed import as_completed
        except ImportError as err:  # pragma: no cover - dask is a dependency
            raise ImportError("running on a cluster needs dask.distributed: pip install 'dask[distributed]'") from err
        worker_threads = None if threads_per_task is not None else _threads_per_worker(client)
        n_workers = len(_workers(client))
        futures = {}
        for i, (item, label) in enumerate(zip(items, labels)):
            fut = client.submit(_execute, job, i, label, item, threads_per_task, worker_threads, shared, pure=False,
                                resources=resources, key=f"blase-{i}-{os.urandom(4).hex()}")
            futures[fut] = (i, label)
        for fut in as_completed(list(futures)):
            i, label = futures.pop(fut)
            try:
                rec = fut.result()
            except Exception as err:  # the task itself died (e.g. its workers were killed too often)
                msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
                rec = BatchRecord(i, label, False, error=f"{type(err).__name__}: {msg}", worker="?")
            fut.release()
            records.append(rec)
            bar.update(1)
            bar.set_postfix(failed=sum(not r.ok for r in records))
    bar.close()
    result = BatchResult(records, wall_seconds=time.perf_counter() - t0, n_workers=n_workers)
    if summary_path is not None:
        result.write(summary_path)
    return result


def _atomic_dir(output_dir: str | Path | None) -> Path | None:
    if output_dir is None:
        return None
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is an existing file, not a folder; give a folder (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way higher up, no permission, ...
        raise ValueError(f"cannot create the output folder output_dir={out}: {err}") from err
    return out


def _check_keywords(kwargs: dict, target: Callable, *, caller: str, reserved: Iterable[str] = ()) -> None:
    """TypeError, before any job starts, for keywords that ``target`` does not take (or that the batch sets).

    Without it a misspelt keyword would fail every job, one by one, on the workers.
    """
    import inspect

    reserved = set(reserved)
    params = inspect.signature(target).parameters
    valid = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and k not in reserved and p.default is not p.empty]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise TypeError(f"{caller} got keyword argument(s) {unknown} that {target.__name__} does not take; "
                        f"check the spelling. Valid keywords: {', '.join(valid)}")


def _safe_stem(label: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return keep.strip("_") or "item"


# ---------------------------------------------------------------------------------------- inputs
def hpf_order_jobs(paths: Iterable[str | Path], orders: Sequence[int] | None = None) -> tuple[list, list[str]]:
    """Expand files into one fitting job per échelle order, without reading the data here.

    Parameters
    ----------
    paths : iterable of str or Path
        HPF Goldilocks files (one job per order) or single-spectrum files (one job each).
    orders : sequence of int, optional
        Order indices to take from every Goldilocks file (default: all 28).

    Returns
    -------
    items, labels : list, list of str
        Items ``(path, order)`` (order None for a single-spectrum file) for :func:`fit_many`.
    """
    from .io import is_goldilocks

    items, labels = [], []
    for p in paths:
        p = Path(p)
        if p.exists() and is_goldilocks(p):
            for o in (range(28) if orders is None else orders):
                items.append((str(p), int(o)))
                labels.append(f"{p.stem}_order{int(o):02d}")
        else:  # read (and fail, if it must) on the worker
            items.append((str(p), None))
            labels.append(p.stem)
    return items, labels


def _load_input(item):
    """A spectrum, a list of orders, a path, or a (path, order) pair -> what fit_spectrum takes."""
    from .io import read_orders

    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, Path)):
        path, order = item
        spectra = read_orders(path, None if order is None else [order])
        return spectra[0] if len(spectra) == 1 else spectra
    if isinstance(item, (str, Path)):
        spectra = read_orders(item)
        return spectra[0] if len(spectra) == 1 else spectra
    return item


def _label_for(item, i: int) -> str:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, Path)):
        return Path(item[0]).stem + ("" if item[1] is None else f"_order{int(item[1]):02d}")
    if isinstance(item, (str, Path)):
        return Path(item).stem
    meta = getattr(item, "meta", None) or {}
    for key in ("template", "file", "name"):
        if key in meta:
            return f"{Path(str(meta[key])).stem}_{i}"
    return f"item {i}"


def _resolve_clone(clone):
    """A SpectralClone, or a path to one (blase_specutils FITS or blasé 0.3 .pt), loaded once per process."""
    from .cloning import SpectralClone

    if clone is None or isinstance(clone, SpectralClone):
        return clone
    return _cached_clone(str(Path(clone).resolve()))


_CLONE_CACHE: dict[str, Any] = {}


def _cached_clone(path: str):
    if path not in _CLONE_CACHE:
        from .cloning import SpectralClone, load_blase03

        p = Path(path)
        _CLONE_CACHE[path] = load_blase03(p) if p.suffix in (".pt", ".pth") else SpectralClone.load(p)
    return _CLONE_CACHE[path]


# ------------------------------------------------------------------------------------------ jobs
def _fit_job(item, *, output_dir, label_of, fit_kwargs, stellar=None, telluric=None) -> dict:
    from .fitting import fit_spectrum

    data = _load_input(item[1])
    result = fit_spectrum(data, _resolve_clone(stellar), telluric=_resolve_clone(telluric), **fit_kwargs)
    summary = result.summary()
    out = {"summary": summary, "device": str(result.model.rv.device)}
    if output_dir is None:
        out["result"] = result
        return out
    stem = _safe_stem(label_of[item[0]])
    path = Path(output_dir) / f"{stem}_fit.fits"
    tmp = path.with_suffix(".tmp.fits")
    result.save(tmp, overwrite=True)
    os.replace(tmp, path)
    result.lines.write(Path(output_dir) / f"{stem}_fit_lines.ecsv", overwrite=True)
    out["output"] = str(path)
    return out


def _clone_job(item, *, output_dir, label_of, clone_kwargs, item_kwargs=None) -> dict:
    from .cloning import clone_spectrum

    spectrum = _load_input(item[1])
    if isinstance(spectrum, list):
        raise TypeError("clone_many takes single spectra; this input holds several orders")
    extra = item_kwargs[item[0]] if item_kwargs is not None else {}
    clone = clone_spectrum(spectrum, **dict(clone_kwargs, **extra))
    summary = {"n_lines": clone.n_lines, "rms_residual": clone.rms_residual(),
               "epochs": clone.history.epochs_run}
    lines = clone.lines
    keep = [c for c in _GRID_COLUMNS if c in lines.colnames]
    out = {"summary": summary, "device": str(clone.model.lam_centers.device),
           "lines": {c: (np.asarray(getattr(lines[c], "value", lines[c])), str(lines[c].unit or "")) for c in keep}}
    if output_dir is None:
        out["result"] = clone
        return out
    stem = _safe_stem(label_of[item[0]])
    path = Path(output_dir) / f"{stem}_clone.fits"
    tmp = path.with_suffix(".tmp.fits")
    clone.save(tmp, overwrite=True)
    os.replace(tmp, path)
    out["output"] = str(path)
    return out


def _with_lines(job: Callable, item, **shared) -> dict:
    out = job(item, **shared)
    out["summary"] = dict(out["summary"], _lines=out.pop("lines", None))
    return out


def _as_items(inputs) -> list:
    """The inputs of a batch as a list: a single path or spectrum is one item (a str is not a
    sequence of one-character paths, nor a spectrum a sequence of pixels)."""
    from specutils import Spectrum

    if isinstance(inputs, (bytes, os.PathLike)):
        inputs = Path(os.fsdecode(inputs))
    if isinstance(inputs, (str, Path, Spectrum)):
        return [inputs]
    if isinstance(inputs, dict):
        raise TypeError("inputs must be a sequence of spectra, file paths or (path, order) pairs, not a dict")
    try:
        return list(inputs)
    except TypeError:
        raise TypeError(f"inputs must be a spectrum, a file path, or a sequence of them; got {type(inputs).__name__}") from None


def _prepare(inputs, labels):
    inputs = _as_items(inputs)
    if not inputs:
        raise ValueError("no inputs: give at least one spectrum or file")
    if labels is None:
        labels = [_label_for(x, i) for i, x in enumerate(inputs)]
    labels = [str(x) for x in labels]
    if len(labels) != len(inputs):
        raise ValueError(f"got {len(labels)} labels for {len(inputs)} inputs")
    seen: dict[str, int] = {}
    unique = []
    for lab in labels:  # output files are named after labels: keep them distinct
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        unique.append(lab if n == 0 else f"{lab}_{n}")
    return list(enumerate(inputs)), unique


def _clone_arg(clone, client):
    """Send a SpectralClone to the workers once (broadcast), not once per task."""
    from .cloning import SpectralClone

    if client is not None and isinstance(clone, SpectralClone):
        return client.scatter(clone, broadcast=True, hash=False)
    if clone is not None and not isinstance(clone, (SpectralClone, str, Path)):
        raise TypeError(f"clones must be SpectralClone objects or paths to clone files, got {type(clone).__name__}")
    if isinstance(clone, (str, Path)) and not Path(clone).exists():
        raise FileNotFoundError(f"no clone file at {clone}")
    return clone


def _check_fit_kwargs(fit_kwargs: dict) -> None:
    """The keywords of :func:`fit_many` meant for fit_spectrum: names and values, checked before any job."""
    from .fit_settings import FitSettings
    from .fitting import fit_spectrum

    _check_keywords(fit_kwargs, fit_spectrum, caller="fit_many",
                    reserved=("data", "stellar", "telluric", "device", "progress"))
    # bad values fail here, not in every job (the dataclass holds the defaults)
    FitSettings(**{k: v for k, v in fit_kwargs.items() if k in FitSettings.field_names()})


def fit_many(
    inputs: Sequence,
    stellar=None,
    *,
    telluric=None,
    client=None,
    output_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    threads_per_task: int | None = None,
    gpu: bool = False,
    device: str = "auto",
    progress: bool = True,
    **fit_kwargs,
) -> BatchResult:
    """Fit many spectra with the same clones: one :func:`~blase_specutils.fit_spectrum` per input.

    The keywords and settings are checked before any job starts (see Raises); errors of single
    inputs (an unreadable file, no overlap with a clone) become error records instead.

    Parameters
    ----------
    inputs : sequence
        Each a ``Spectrum`` (or list of orders fitted jointly), a file path (every order of it, fitted
        jointly), or a ``(path, order)`` pair (see :func:`hpf_order_jobs`). Paths are read on the
        worker, so a corrupt file fails only its own job. A single path (``str`` or ``Path``) or a
        single ``Spectrum`` is one input.
    stellar, telluric : SpectralClone or path
        The clones (paths are loaded once per worker process). At least one is needed; a telluric
        clone alone gives telluric-only fits (A0V standards; RV and v sin i are NaN).
    client : dask.distributed.Client, optional
        Run on this cluster (default: serially here).
    output_dir : str or Path, optional
        Each job writes ``<label>_fit.fits`` and ``<label>_fit_lines.ecsv`` there as it finishes
        and returns only its summary; ``summary.ecsv`` is written at the end. Without it, the
        :class:`~blase_specutils.TransferResult` objects come back in memory.
    labels : sequence of str, optional
        Names of the inputs (default: from file names or the spectra's metadata).
    threads_per_task : int, optional
        torch threads per job (see :func:`run_batch`).
    gpu : bool
        Ask Dask for workers with a ``GPU`` resource (start them with ``--resources GPU=1``) and fit
        on CUDA.
    device : str
        torch device of each job; ``"auto"`` uses the worker's GPU when it has one.
    progress : bool
        Progress bar over jobs (the per-fit bars are off).
    **fit_kwargs
        Passed to :func:`~blase_specutils.fit_spectrum` (``resolving_power``, ``rv``, ``vsini``,
        ``line_epochs``, ...).

    Returns
    -------
    BatchResult
        ``summary`` of each record holds the fit's :meth:`~blase_specutils.TransferResult.summary`.

    Raises
    ------
    TypeError
        A keyword that :func:`~blase_specutils.fit_spectrum` does not take (e.g. a misspelt one), a
        setting of the wrong type, no clone, or a clone that is neither a SpectralClone nor a path.
    ValueError, astropy.units.UnitsError
        A setting :func:`~blase_specutils.fit_spectrum` rejects, or ``output_dir`` names a file.
    FileNotFoundError
        A clone path that does not exist.
    """
    _check_fit_kwargs(fit_kwargs)
    if stellar is None and telluric is None:
        raise TypeError("fit_many needs a stellar clone, a telluric clone, or both (SpectralClone objects or "
                        "paths to clone files)")
    pairs, labels = _prepare(inputs, labels)
    out = _atomic_dir(output_dir)
    fit_kwargs = dict(fit_kwargs, device="cuda" if gpu else device, progress=False)
    shared = {"stellar": _clone_arg(stellar, client), "telluric": _clone_arg(telluric, client)}
    job = partial(_fit_job, output_dir=None if out is None else str(out), label_of=labels, fit_kwargs=fit_kwargs)
    return run_batch(job, pairs, labels=labels, client=client, threads_per_task=threads_per_task, shared=shared,
                     resources={"GPU": 1} if gpu else None, progress=progress, desc="fitting",
                     summary_path=None if out is None else out / "summary.ecsv")


def clone_many(
    inputs: Sequence,
    *,
    client=None,
    output_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    item_kwargs: Sequence[dict] | None = None,
    threads_per_task: int | None = None,
    gpu: bool = False,
    device: str = "auto",
    progress: bool = True,
    **clone_kwargs,
) -> BatchResult:
    """Clone many spectra with the same settings: one :func:`~blase_specutils.clone_spectrum` each.

    Parameters
    ----------
    inputs : sequence
        Each a ``Spectrum`` or a path to a file :func:`~blase_specutils.read_spectrum` reads; a
        single path or ``Spectrum`` is one input.
    client, output_dir, labels, threads_per_task, gpu, device, progress
        As in :func:`fit_many`; products are ``<label>_clone.fits``.
    item_kwargs : sequence of dict, optional
        Settings of each input that differ from the common ones (e.g. ``{"teff": 4700 * u.K}``).
    **clone_kwargs
        Passed to :func:`~blase_specutils.clone_spectrum` (``prominence``, ``band``, ``teff``, ...).

    Returns
    -------
    BatchResult

    Raises
    ------
    TypeError
        A keyword (in ``clone_kwargs`` or ``item_kwargs``) that
        :func:`~blase_specutils.clone_spectrum` does not take, e.g. a misspelt one; raised before
        any job starts.
    ValueError
        No inputs, mismatched ``labels`` or ``item_kwargs``, or ``output_dir`` names a file.
    """
    from .cloning import clone_spectrum

    _check_keywords(clone_kwargs, clone_spectrum, caller="clone_many", reserved=("spectrum", "device", "progress"))
    pairs, labels = _prepare(inputs, labels)
    if item_kwargs is not None:
        item_kwargs = [dict(k or {}) for k in item_kwargs]
        if len(item_kwargs) != len(pairs):
            raise ValueError(f"got {len(item_kwargs)} item_kwargs for {len(pairs)} inputs")
        for extra in item_kwargs:
            _check_keywords(extra, clone_spectrum, caller="clone_many (item_kwargs)", reserved=("spectrum",))
    out = _atomic_dir(output_dir)
    clone_kwargs = dict(clone_kwargs, device="cuda" if gpu else device, progress=False)
    job = partial(_clone_job, output_dir=None if out is None else str(out), label_of=labels,
                  clone_kwargs=clone_kwargs, item_kwargs=item_kwargs)
    res = run_batch(partial(_with_lines, job), pairs, labels=labels, client=client,
                    threads_per_task=threads_per_task, resources={"GPU": 1} if gpu else None,
                    progress=progress, desc="cloning")
    lines = [r.summary.pop("_lines", None) for r in res]
    res.line_tables = lines  # kept for clone_grid; small (one row per line)
    if out is not None:
        res.write(out / "summary.ecsv")
    return res


# ------------------------------------------------------------------------------------- the grid
class LineGrid:
    """Lines of clones of a model grid, matched across neighbouring grid points.

    Attributes
    ----------
    table : QTable
        Long format, one row per (line, grid point): ``line_id``, one column per grid parameter,
        ``label`` of the grid point, and the clone's ``center``, ``amplitude``, ``sigma``,
        ``gamma``, ``fwhm``, ``depth``, ``equivalent_width``.
    parameters : list of str
        Names of the grid parameters.
    batch : BatchResult
        The cloning jobs (errors included).
    """

    def __init__(self, table: QTable, parameters: list[str], batch: BatchResult | None = None) -> None:
        self.table = table
        self.parameters = list(parameters)
        self.batch = batch

    def __repr__(self) -> str:
        n_lines = len(np.unique(self.table["line_id"])) if len(self.table) else 0
        return f"<LineGrid: {n_lines} matched lines over {len(self.grid_points())} grid points ({', '.join(self.parameters)})>"

    def grid_points(self) -> Table:
        """The distinct grid points, sorted."""
        t = Table(self.table[self.parameters + ["label"]])
        t = Table(np.unique(t.as_array()))
        t.sort(self.parameters)
        return t

    def pivot(self, column: str = "amplitude") -> tuple[np.ndarray, np.ndarray, Table]:
        """``column`` as a (lines × grid points) array, NaN where a line is absent.

        Returns
        -------
        values : ndarray
            ``values[i, k]``: line ``line_ids[i]`` at grid point ``points[k]``.
        line_ids : ndarray of int
        points : Table
            The grid points (columns per parameter, and ``label``).
        """
        if column not in self.table.colnames:
            raise ValueError(f"no column {column!r}; choose from {self.table.colnames}")
        points = self.grid_points()
        col = {lab: k for k, lab in enumerate(points["label"])}
        ids = np.unique(np.asarray(self.table["line_id"]))
        row = {int(j): i for i, j in enumerate(ids)}
        values = np.full((ids.size, len(points)), np.nan)
        v = np.asarray(getattr(self.table[column], "value", self.table[column]), dtype=float)
        for lid, lab, x in zip(np.asarray(self.table["line_id"]), self.table["label"], v):
            values[row[int(lid)], col[str(lab)]] = x
        return values, ids, points

    def line(self, line_id: int) -> QTable:
        """Every grid point's row of one line, sorted by the grid parameters."""
        t = self.table[np.asarray(self.table["line_id"]) == int(line_id)]
        t.sort(self.parameters)
        return t

    def plot_heatmap(self, column: str = "amplitude", *, parameter: str | None = None, band=None,
                     relative: bool = True, ax=None):
        """The paper's heatmap g_j: each line's ``column`` (rows, sorted by wavelength) across the grid.

        Parameters
        ----------
        column : str
            Line property to show.
        parameter : str, optional
            Grid parameter along the x axis (default: the first).
        band : (Quantity, Quantity), optional
            Only lines whose mean centre lies in this range.
        relative : bool
            Divide each line by its median over the grid (shows how it changes, not how strong it is).
        ax : matplotlib Axes, optional

        Returns
        -------
        matplotlib.figure.Figure
        """
        import matplotlib.pyplot as plt

        parameter = parameter or self.parameters[0]
        if parameter not in self.parameters:
            raise ValueError(f"unknown grid parameter {parameter!r}; the grid has {self.parameters}")
        values, ids, points = self.pivot(column)
        centers, _, _ = self.pivot("center")
        mean_c = np.nanmean(centers, axis=1)
        keep = np.ones(ids.size, dtype=bool)
        if band is not None:
            lo, hi = (float(u.Quantity(b, u.AA).value) for b in band)
            keep = (mean_c >= lo) & (mean_c <= hi)
        order = np.argsort(mean_c[keep])
        shown = values[keep][order]
        if relative:
            with np.errstate(invalid="ignore", divide="ignore"):
                shown = shown / np.nanmedian(shown, axis=1, keepdims=True)
        xs = np.asarray(points[parameter], dtype=float)
        sort_x = np.argsort(xs, kind="stable")
        fig = ax.figure if ax is not None else plt.figure(figsize=(7, 5))
        ax = ax or fig.add_subplot()
        im = ax.imshow(shown[:, sort_x], aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        ax.set_xticks(range(xs.size), [f"{x:g}" for x in xs[sort_x]], rotation=90 if xs.size > 12 else 0)
        ax.set_xlabel(parameter)
        ax.set_ylabel(f"line (by wavelength, {int(keep.sum())} lines)")
        fig.colorbar(im, ax=ax, label=f"{column}{' / median' if relative else ''}")
        return fig

    def write(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write the matched line table (ECSV or FITS by suffix)."""
        path = Path(path)
        self.table.write(path, overwrite=overwrite, **({"format": "ascii.ecsv"} if path.suffix == ".ecsv" else {}))
        return path


def _tolerance(tolerance) -> tuple[float | None, float | None]:
    """Line matching tolerance as (relative, None) for a velocity or (None, Å) for a wavelength."""
    tol = u.Quantity(tolerance)
    if tol.unit.physical_type == "speed":
        rel, absolute = float(tol.to_value(u.km / u.s)) / SPEED_OF_LIGHT_KMS, None
    elif tol.unit.physical_type == "length":
        rel, absolute = None, float(tol.to_value(u.AA))
    else:
        raise u.UnitsError(f"tolerance must be a velocity or a wavelength (e.g. 3 * u.km / u.s), got {tolerance!r}")
    return rel, absolute


def match_lines(
    line_tables: Sequence[QTable],
    parameters: Table | Sequence[dict],
    *,
    tolerance: u.Quantity = 3.0 * u.km / u.s,
    labels: Sequence[str] | None = None,
) -> LineGrid:
    """Match the lines of clones of neighbouring grid points by centre, into one table.

    The grid points are visited in sorted order of their parameters; each line of a point joins
    the nearest line already found at the previous points (one to one, closest pairs first) if
    their centres differ by less than ``tolerance``, and starts a new line otherwise. A line that
    vanishes at some grid points and comes back keeps its identity as long as its centre stays
    within the tolerance of where it was last seen.

    Parameters
    ----------
    line_tables : sequence of QTable
        The clones' line tables (:attr:`SpectralClone.lines`), one per grid point.
    parameters : Table or sequence of dict
        The grid parameters of each point (e.g. ``[{"teff": 4700, "logg": 4.5}, ...]``).
    tolerance : Quantity
        Largest centre difference, as a velocity (km/s) or a wavelength (Å).
    labels : sequence of str, optional
        Names of the grid points.

    Returns
    -------
    LineGrid
    """
    params, labels = _grid_points(line_tables, parameters, labels)
    tol = u.Quantity(tolerance)
    rel, absolute = _tolerance(tol)
    order = np.lexsort([np.asarray(params[c], dtype=float) for c in reversed(params.colnames)])
    rows, track_id = _track_lines(line_tables, order, rel, absolute)
    if not rows:
        raise ValueError("no line tables to match")
    out = _matched_table(line_tables, rows, track_id, params, labels)
    out.meta["tolerance"] = str(tol)
    return LineGrid(out, list(params.colnames))


def _grid_points(line_tables: Sequence[QTable], parameters, labels) -> tuple[Table, list[str]]:
    """The grid parameters as a table (one row per line table, at least one column) and unique labels."""
    params = Table(rows=list(parameters)) if not isinstance(parameters, Table) else Table(parameters)
    if len(params) != len(line_tables):
        raise ValueError(f"got {len(params)} grid points for {len(line_tables)} line tables")
    if len(params.colnames) == 0:
        raise ValueError("the grid points need at least one parameter (e.g. teff)")
    labels = [f"point {i}" for i in range(len(params))] if labels is None else [str(x) for x in labels]
    if len(set(labels)) != len(labels):
        raise ValueError("grid point labels must be unique")
    return params, labels


def _track_lines(line_tables: Sequence[QTable], order: np.ndarray, rel: float | None,
                 absolute: float | None) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    """Follow the lines through the grid points in ``order``: (point, track id of each line) per point,
    and the ids of all tracks sorted by their last centre. Each line joins the nearest open track within the tolerance (closest
    pairs first, one to one) or opens a new one."""
    # open tracks: last seen centre and id, kept sorted by centre for the nearest-neighbour search
    track_c = np.empty(0)
    track_id = np.empty(0, dtype=int)
    n_tracks = 0
    rows = []
    for k in order:
        c = np.asarray(u.Quantity(line_tables[k]["center"], u.AA).value, dtype=float)
        ids = _join_tracks(c, track_c, track_id, rel, absolute)
        new = ids < 0
        ids[new] = n_tracks + np.arange(int(new.sum()))
        n_tracks += int(new.sum())
        track_c = np.concatenate([track_c, c[new]])
        track_id = np.concatenate([track_id, ids[new]])
        srt = np.argsort(track_c, kind="stable")
        track_c, track_id = track_c[srt], track_id[srt]
        rows.append((k, ids))
    return rows, track_id


def _join_tracks(c: np.ndarray, track_c: np.ndarray, track_id: np.ndarray, rel: float | None,
                 absolute: float | None) -> np.ndarray:
    """The track id each centre ``c`` joins (-1: none within the tolerance), closest pairs first, one to
    one; a joined track's centre moves to the line's (``track_c`` is updated in place)."""
    ids = np.full(c.size, -1)
    if not (track_c.size and c.size):
        return ids
    pos = np.searchsorted(track_c, c)
    cand = []
    for i, ci in enumerate(c):
        lim = absolute if absolute is not None else rel * ci
        for j in (pos[i] - 1, pos[i]):
            if 0 <= j < track_c.size and abs(track_c[j] - ci) <= lim:
                cand.append((abs(track_c[j] - ci), i, j))
    cand.sort()
    taken = set()
    for _, i, j in cand:  # closest pairs first, one to one
        if ids[i] < 0 and j not in taken:
            ids[i] = track_id[j]
            taken.add(j)
            track_c[j] = c[i]
    return ids


def _matched_table(line_tables: Sequence[QTable], rows: list, track_id: np.ndarray, params: Table,
                   labels: list[str]) -> QTable:
    """One row per line per grid point: its line id (numbered by wavelength), the point's parameters and
    label, and the line-table columns of :data:`_GRID_COLUMNS`."""
    renumber = np.empty(track_id.size, dtype=int)  # number the lines by wavelength
    renumber[track_id] = np.arange(track_id.size)
    out = QTable()
    out["line_id"] = np.concatenate([renumber[ids] for _, ids in rows]).astype(int)
    for p in params.colnames:
        out[p] = np.concatenate([np.full(ids.size, params[p][k]) for k, ids in rows])
    out["label"] = np.concatenate([np.full(ids.size, labels[k], dtype=object) for k, ids in rows]).astype(str)
    for name in _GRID_COLUMNS:
        if all(name in line_tables[k].colnames for k, _ in rows):
            first = line_tables[rows[0][0]][name]
            if isinstance(first, u.Quantity):
                unit = first.unit
                out[name] = np.concatenate([u.Quantity(line_tables[k][name]).to_value(unit) for k, _ in rows]) * unit
            else:
                out[name] = np.concatenate([np.asarray(line_tables[k][name], dtype=float) for k, _ in rows])
    return out


def clone_grid(
    inputs: Sequence,
    parameters: Table | Sequence[dict],
    *,
    tolerance: u.Quantity = 3.0 * u.km / u.s,
    client=None,
    output_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    item_kwargs: Sequence[dict] | None = None,
    progress: bool = True,
    **clone_kwargs,
) -> LineGrid:
    """Clone every spectrum of a model grid and match their lines across the grid (Sect. 8.2).

    Parameters
    ----------
    inputs : sequence
        One precomputed spectrum per grid point (``Spectrum`` or path).
    parameters : Table or sequence of dict
        The grid parameters of each input, e.g. ``{"teff": 4700, "logg": 4.5, "feh": 0.0}``.
    tolerance : Quantity
        Line matching tolerance (velocity or wavelength), see :func:`match_lines`.
    client, output_dir, labels, item_kwargs, progress
        As in :func:`clone_many`; with ``output_dir`` the clones are written there, with the
        summary and the matched table ``grid_lines.ecsv``.
    **clone_kwargs
        Passed to :func:`~blase_specutils.clone_spectrum` (use the same settings for every point).

    Returns
    -------
    LineGrid
        Failed grid points are listed in ``LineGrid.batch.failed`` and left out of the matching.

    Raises
    ------
    TypeError
        As in :func:`clone_many` (an unknown keyword), before any cloning.
    astropy.units.UnitsError
        ``tolerance`` is neither a velocity nor a wavelength (checked before any cloning).
    ValueError
        As in :func:`clone_many`, or the numbers of grid points and inputs differ.
    RuntimeError
        Every grid point failed.
    """
    params = Table(rows=list(parameters)) if not isinstance(parameters, Table) else Table(parameters)
    inputs = _as_items(inputs)
    if len(params) != len(inputs):
        raise ValueError(f"got {len(params)} grid points for {len(inputs)} inputs")
    _tolerance(tolerance)  # before the cloning, not after it
    if labels is None:
        labels = ["_".join(f"{c}{params[c][i]:g}" if np.isscalar(params[c][i]) and not isinstance(params[c][i], str)
                           else f"{c}{params[c][i]}" for c in params.colnames) for i in range(len(params))]
    batch = clone_many(inputs, client=client, output_dir=output_dir, labels=labels, item_kwargs=item_kwargs,
                       progress=progress, **clone_kwargs)
    tables = []
    for r, lines in zip(batch, batch.line_tables):
        if not r.ok or lines is None:
            tables.append(None)
            continue
        t = QTable()
        for name, (vals, unit) in lines.items():
            t[name] = vals * u.Unit(unit) if unit not in ("", "None") else vals
        tables.append(t)
    keep = [i for i, t in enumerate(tables) if t is not None]
    if not keep:
        raise RuntimeError(f"every grid point failed; first error: {batch.failed[0].error}")
    grid = match_lines([tables[i] for i in keep], params[keep], tolerance=tolerance,
                       labels=[batch[i].label for i in keep])
    grid.batch = batch
    if output_dir is not None:
        grid.write(Path(output_dir) / "grid_lines.ecsv")
    return grid
