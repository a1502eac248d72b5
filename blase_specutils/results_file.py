"""The transfer-result file: :meth:`TransferResult.save` (atomic) and :meth:`TransferResult.load`
(every field checked, named in the error).

Layout versions (``TRFMTVER``): 1 had no ``TRANSFER``, ``CONTINUUM`` or ``ORDERS`` and cannot be
rebuilt (its lines still read with :meth:`SpectralClone.load`); 2 added them; 3 (this version)
adds the frames of the fit (``TRANSFER`` keyword ``FRAMES``: air or vacuum, the data's frame, the
tagged velocity, the barycentric correction and its source), the masked flux outliers (``DATA``
column ``outlier`` and keyword ``OUTLIERS``), the telluric line-spread flag (``TELINST``) and the
wavelength-correction coefficients (``CALIB``). Layout-2 files are read as before: their frame
is ``"unstated"``, with no correction and no outliers.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits

from .constants import LOG_PARAMETER_LIMIT
from .frames import UNSTATED, FitFrames
from .io import SavedFileError, _checked_array, _header_bool, _header_choice, _header_number, atomic_write

__all__ = ["RESULT_FORMAT_VERSION", "save_result", "load_result"]

#: Layout version of the transfer-result file (``TRFMTVER``), see the module docstring.
RESULT_FORMAT_VERSION = 3
#: The oldest layout :func:`load_result` rebuilds.
OLDEST_READABLE = 2

#: Keys of :attr:`TransferResult.uncertainties` kept in the file.
SIGMA_KEYS = ("rv", "vsini", "telluric_power", "rv_continuum", "vsini_halves")
#: Keys of :attr:`TransferResult.template`.
TEMPLATE_KEYS = ("chi2", "chi2_reduced", "rv", "vsini", "resolving_power", "telluric_power")
#: Columns of ``TRANSFER`` that must be finite numbers.
_FINITE = ("rv", "log_vsini", "log_resolving_power", "log_telluric_power", "limb_darkening", "dv", "max_vsini",
           "lsf_half_width", "max_rv")


def _components_hdu(result) -> fits.BinTableHDU:
    """``TCOMP``: the component index of each telluric line (in ``TLINES`` order); keywords ``NAMES``
    (JSON list), ``LOGPOW`` (JSON list of ln X_k), ``TEMPLATE`` (X_k after template matching) and
    ``SIGMAS`` (σ of X_k) as JSON."""
    m = result.model
    comp = np.zeros(m.telluric.n_lines, dtype=np.int64)
    for k, mask in enumerate(m.telluric_masks):
        comp[mask.cpu().numpy()] = k
    hdu = fits.BinTableHDU.from_columns([fits.Column("component", "K", array=comp)], name="TCOMP")
    hdu.header["NAMES"] = json.dumps(list(m.telluric_names))
    hdu.header["LOGPOW"] = json.dumps([float(x) for x in m.log_telluric_power.detach().cpu()])
    hdu.header["TEMPLATE"] = json.dumps(result.template.get("telluric_power"))
    hdu.header["SIGMAS"] = json.dumps({k: v for k, v in result.uncertainties.items()
                                       if k.startswith("telluric_power_") and math.isfinite(v)})
    return hdu


def _read_components(hdul, n_lines: int, path) -> tuple | None:
    """(component per line, names, ln X_k, template X_k, σ of X_k) from ``TCOMP``, checked; None without it."""
    if "TCOMP" not in hdul:
        return None
    hdu = hdul["TCOMP"]
    comp = _checked_array(_col(hdu.data, "TCOMP", "component", path), path, "TCOMP.component", integer=True,
                          minimum=0, size=n_lines).astype(np.int64)
    names = _json(hdu.header, "NAMES", path, list, None)
    logpow = _json(hdu.header, "LOGPOW", path, list, None)
    if names is None or logpow is None or len(names) != len(logpow) or (comp.size and comp.max() >= len(names)):
        raise SavedFileError(f"{path}: TCOMP must name every telluric component and its power (NAMES, LOGPOW)",
                             path=path, field="TCOMP")
    logpow = _checked_array(np.asarray(logpow, dtype=np.float64), path, "TCOMP.LOGPOW")
    template = _json(hdu.header, "TEMPLATE", path, dict, None)
    sigmas = _json(hdu.header, "SIGMAS", path, dict, {})
    return comp, [str(x) for x in names], logpow, template, {str(k): float(v) for k, v in sigmas.items()}


def _nan_if_none(v) -> float:
    return float("nan") if v is None else float(v)


def _none_if_nan(v):
    v = float(v)
    return None if math.isnan(v) else v


def save_result(result, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``result`` (a :class:`~blase_specutils.fitting.TransferResult`) to ``path``, atomically:
    the file is written under a temporary name in the same folder and moved onto ``path`` when
    complete (:func:`~blase_specutils.io.atomic_write`), so a failed save leaves a previous file as
    it was. See :meth:`TransferResult.save` for the layout."""
    path = Path(path)
    clone = result.stellar_clone() if result.has_stellar else result.telluric_clone()
    clone.meta.update(_clone_meta(result))

    def write(tmp: Path) -> None:
        clone.save(tmp, overwrite=True, include_target=False)
        with fits.open(tmp, mode="update") as hdul:
            _append_result(hdul, result)

    return atomic_write(path, write, overwrite=overwrite)


def _clone_meta(result) -> dict:
    """The fit's headline numbers, written as keywords of the clone's primary header."""
    meta = {"r": result.resolving_power, "chi2": result.chi2, "chi2red": result.chi2_reduced}
    if result.has_stellar:
        meta |= {"rv_kms": float(result.rv.value), "vsini": float(result.vsini.value)}
    if result.has_telluric:
        meta["telpower"] = result.telluric_power
    return meta


def _append_result(hdul, result) -> None:
    """Add the result's keywords and tables to a saved clone file opened for update, in layout order."""
    from .fitting import _lines_hdus, _prior_hdu

    m = result.model
    main_model = m.stellar if result.has_stellar else m.telluric
    main_prior = result.prior if result.has_stellar else result.telluric_prior
    hdr = hdul[0].header
    _write_result_keywords(hdr, result)
    hdul.append(_prior_hdu(main_prior, result._start_centers(main_model), "PRIOR"))
    _write_gp_keywords(hdr, result)
    hdul.append(_data_hdu(result))
    if result.has_telluric:
        hdul.extend(_lines_hdus(m.telluric, "T"))
        hdul.append(_prior_hdu(result.telluric_prior, result._start_centers(m.telluric), "TPRIOR"))
    hdul.append(fits.ImageHDU(m.continuum_coeffs.detach().cpu().numpy().astype(np.float64), name="CONTINUUM"))
    if getattr(m, "calibration_degree", None) is not None:
        hdul.append(fits.ImageHDU(m.calibration_coeffs.detach().cpu().numpy().astype(np.float64), name="CALIB"))
    if getattr(m, "telluric_masks", None) is not None:
        hdul.append(_components_hdu(result))
    hdul.append(_transfer_hdu(result))
    hdul.append(_orders_hdu(result))


def _write_result_keywords(hdr, result) -> None:
    """Primary keywords: the file kind, the layout version and which clones were fitted."""
    hdr["FITKIND"] = ("transfer", "blase_specutils transfer-learning result")
    hdr["TRFMTVER"] = (RESULT_FORMAT_VERSION, "layout version of the transfer result")
    hdr["HASSTEL"] = (result.has_stellar, "a stellar clone was fitted (LINES holds it)")
    hdr["HASTELL"] = (result.has_telluric, "a telluric clone was fitted (TLINES holds it)")
    hdr["TELINST"] = (bool(getattr(result.model, "telluric_instrumental", False)),
                      "telluric clone at the instrument's resolution")


def _write_gp_keywords(hdr, result) -> None:
    """Primary keywords of a GP pseudo-continuum likelihood: its kernel and, when shared by all
    orders, its amplitude and length scale."""
    if result.pseudo_continuum_flux is None or result.gp_hyperparameters is None:
        return
    hp = result.gp_hyperparameters
    hdr["GPKERNEL"] = (hp["kernel"], "GP pseudo-continuum likelihood kernel")
    if np.ndim(hp["amplitude"]) == 0:
        hdr["GPAMP"] = (float(hp["amplitude"].value), "GP amplitude, data flux units")
        hdr["GPLENGTH"] = (float(hp["length_scale"].to_value(u.AA)), "GP length scale, Angstrom")


def _data_hdu(result) -> fits.BinTableHDU:
    """``DATA``: the pixels, their masks, the model, the order of each pixel (and the pseudo-continuum)."""
    columns = [
        fits.Column("wavelength", "D", unit="Angstrom", array=result.wavelength),
        fits.Column("flux", "D", array=result.flux),
        fits.Column("sigma", "D", array=result.sigma),
        fits.Column("good", "L", array=result.good),
        fits.Column("unmasked", "L", array=np.concatenate([a.good for a in result._arrays])),
        fits.Column("model", "D", array=result.model_flux),
        fits.Column("order", "K", array=result.order_of_pixel.astype(np.int64)),
        fits.Column("outlier", "L", array=result.outlier_mask),
    ]
    if result.pseudo_continuum_flux is not None:
        columns.append(fits.Column("pseudo_continuum", "D", array=result.pseudo_continuum_flux))
    return fits.BinTableHDU.from_columns(columns, name="DATA")


def _transfer_row(result) -> dict:
    """The forward model's numbers, the σ, the template-matching values and the χ² of each stage."""
    m, tm = result.model, result.template
    return {
        "rv": float(m.rv.detach()), "log_vsini": float(m.rot.log_vsini.detach()),
        "log_resolving_power": float(m.inst.log_resolving_power.detach()),
        # with telluric components their powers are in TCOMP (here: their mean log)
        "log_telluric_power": float(m.log_telluric_power.detach().mean()),
        "limb_darkening": m.rot.limb_darkening, "dv": m.rot.dv, "max_vsini": m.rot.max_vsini,
        "lsf_half_width": m.inst.half_width, "max_rv": m.max_rv,
        "calibration_prior": float(getattr(m, "calibration_prior", 1.0)),
        **{f"sigma_{k}": _nan_if_none(result.uncertainties.get(k)) for k in SIGMA_KEYS},
        **{f"template_{k}": _nan_if_none(None if isinstance(tm.get(k), dict) else tm.get(k)) for k in TEMPLATE_KEYS},
        **{f"chi2_{k}": _nan_if_none(result.fit.chi2.get(k)) for k in ("start", "template", "lines")},
    }


def _transfer_hdu(result) -> fits.BinTableHDU:
    """``TRANSFER``: one row of :func:`_transfer_row` and the continuum degree; keywords ``SETTINGS``,
    ``FLAGS``, ``FRAMES`` and ``OUTLIERS`` as JSON."""
    cols = [fits.Column(k, "D", array=np.array([v], dtype=np.float64)) for k, v in _transfer_row(result).items()]
    cols.append(fits.Column("continuum_degree", "K", array=np.array([result.model._powers.shape[1] - 1])))
    tab = fits.BinTableHDU.from_columns(cols, name="TRANSFER")
    tab.header["SETTINGS"] = json.dumps(result.settings)
    tab.header["FLAGS"] = json.dumps([f.to_dict() for f in result.flags])
    tab.header["FRAMES"] = json.dumps(result.frames.to_dict())
    tab.header["OUTLIERS"] = json.dumps(result.outliers)
    return tab


def _orders_hdu(result) -> fits.BinTableHDU:
    """``ORDERS``: each order's id, pixel count and the units of its spectral axis and flux."""
    units = [(k, a.wavelength.size, a.spectral_unit.to_string(), a.flux_unit.to_string())
             for k, a in zip(result._order_ids, result._arrays)]
    width = max(8, *(len(x[2]) for x in units), *(len(x[3]) for x in units))
    return fits.BinTableHDU.from_columns([
        fits.Column("order", "K", array=np.array([x[0] for x in units], dtype=np.int64)),
        fits.Column("n_pixels", "K", array=np.array([x[1] for x in units], dtype=np.int64)),
        fits.Column("spectral_unit", f"{width}A", array=np.array([x[2] for x in units])),
        fits.Column("flux_unit", f"{width}A", array=np.array([x[3] for x in units])),
    ], name="ORDERS")


# ------------------------------------------------------------------------------ loading
def _table(hdul, name: str, path):
    if name not in hdul or not isinstance(hdul[name], fits.BinTableHDU) or hdul[name].data is None:
        raise SavedFileError(f"{path}: the {name} table is missing or empty; the file is damaged or was not written "
                             "by blase_specutils; fit again and save", path=path, field=name)
    return hdul[name].data


def _col(data, ext: str, name: str, path):
    if name not in data.columns.names:
        raise SavedFileError(f"{path}: column {ext}.{name} is missing; the file is damaged or was not written by "
                             "blase_specutils; fit again and save", path=path, field=f"{ext}.{name}")
    return data[name]


def _logical(values, path, field: str, size: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind != "b":
        raise SavedFileError(f"{path}: {field} must be a logical column (T/F), got {arr.dtype}; the file is damaged",
                             path=path, field=field)
    if arr.size != size:
        raise SavedFileError(f"{path}: {field} holds {arr.size} values where {size} are expected (DATA rows)",
                             path=path, field=field)
    return arr.astype(bool).ravel()


def _json(header, key: str, path, kind: type, default):
    raw = header.get(key)
    if raw is None:
        return default
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError as err:
        raise SavedFileError(f"{path}: TRANSFER keyword {key} is not valid JSON ({err.msg} at character {err.pos}); "
                             "the file is damaged; fit again and save", path=path, field=f"TRANSFER.{key}") from err
    if value is None and raw.strip() == "null":
        return default
    if not isinstance(value, kind):
        raise SavedFileError(f"{path}: TRANSFER keyword {key} must hold a JSON {kind.__name__}, got {raw!r:.80}",
                             path=path, field=f"TRANSFER.{key}")
    return value


def _checked_lines(lines_hdu, wing_hdu, prefix: str, path, device):
    """The line model of a ``{prefix}LINES``/``{prefix}WING`` pair, every field checked."""
    from .core.clone import TUNABLE, LineCloneModel
    from .core.profiles import PROFILES

    ext = f"{prefix}LINES"
    h, ld = lines_hdu.header, lines_hdu.data
    if ld is None:
        raise SavedFileError(f"{path}: the {ext} table is empty; the file is damaged", path=path, field=ext)
    n = _header_number(h, "NLINES", path, integer=True) if "NLINES" in h else len(ld)
    cols = [_checked_array(_col(ld, ext, "lam_center", path), path, f"{ext}.lam_center", positive=True, size=n)]
    cols += [_checked_array(_col(ld, ext, c, path), path, f"{ext}.{c}", log_limit=LOG_PARAMETER_LIMIT, size=n)
             for c in ("log_amp", "log_sigma", "log_gamma")]
    mode = _header_choice(h, "MODE", path, ("linear", "log"))
    profile = _header_choice(h, "PROFILE", path, tuple(PROFILES))
    emission = _header_bool(h, "EMISSION", path)
    wingtol = _header_number(h, "WINGTOL", path, positive=True)
    farfield = _header_bool(h, "FARFIELD", path, default=True)
    tune = [t for t in str(h.get("TUNE", "")).split(",") if t]
    if any(t not in TUNABLE for t in tune):
        raise SavedFileError(f"{path}: {ext} TUNE names unknown parameters {tune}", path=path, field=f"{ext}.TUNE")
    wd = wing_hdu.data
    if wd is None or len(wd) == 0:
        broad, wing = np.zeros(0, np.int64), None
    else:
        wext = f"{prefix}WING"
        broad = _checked_array(_col(wd, wext, "line", path), path, f"{wext}.line", integer=True, minimum=0)
        if broad.size and (broad.max() >= n or np.unique(broad).size != broad.size):
            raise SavedFileError(f"{path}: {wext}.line holds line indices out of 0-{n - 1} or twice; the file is damaged",
                                 path=path, field=f"{wext}.line")
        wing = [_checked_array(_col(wd, wext, c, path), path, f"{wext}.{c}", log_limit=LOG_PARAMETER_LIMIT,
                               size=broad.size) for c in ("alpha", "log_lt", "log_b")]
    try:
        model = LineCloneModel(*cols, mode=mode, profile=profile, emission=emission, tune=tune, wing_tolerance=wingtol,
                               far_field=farfield, broad_lines=broad.tolist(), device=device)
    except ValueError as err:
        raise SavedFileError(f"{path}: the {ext} parameters do not make a clone ({err}); the file is damaged",
                             path=path, field=ext) from err
    if wing is not None:
        with torch.no_grad():
            model.wing_alpha.copy_(torch.as_tensor(wing[0]))
            model.wing_log_lt.copy_(torch.as_tensor(wing[1]))
            model.wing_log_b.copy_(torch.as_tensor(wing[2]))
    return model


def _checked_prior(data, ext: str, n: int, path, device) -> tuple[dict, np.ndarray]:
    from .fitting import _LOG_PARAMS

    prior = {k: torch.as_tensor(_checked_array(_col(data, ext, k, path), path, f"{ext}.{k}",
                                               log_limit=LOG_PARAMETER_LIMIT, size=n), device=device)
             for k in _LOG_PARAMS}
    centers = _checked_array(_col(data, ext, "lam_center", path), path, f"{ext}.lam_center", positive=True, size=n)
    return prior, centers


@dataclass
class _DataTable:
    """The checked columns of ``DATA``."""

    wavelength: np.ndarray
    flux: np.ndarray
    sigma: np.ndarray
    good: np.ndarray
    unmasked: np.ndarray
    model_flux: np.ndarray
    order: np.ndarray
    outlier: np.ndarray
    pseudo_continuum: np.ndarray | None


@dataclass
class _OrdersTable:
    """The checked columns of ``ORDERS``."""

    ids: list
    n_pixels: list
    spectral_units: list
    flux_units: list


@dataclass
class _FittedLines:
    """The fitted clones and their starting values (``LINES``/``PRIOR``, ``TLINES``/``TPRIOR``)."""

    main: object  # the SpectralClone read from LINES and WING
    main_prior: dict
    main_centers: np.ndarray
    telluric: object = None  # the telluric LineCloneModel, with a telluric fit
    telluric_prior: dict | None = None
    telluric_centers: np.ndarray | None = None


@dataclass
class _TransferNumbers:
    """The forward model's numbers: ``TRANSFER``'s row, ``CONTINUUM``, ``CALIB`` and ``TCOMP``."""

    row: dict  # the columns that must be finite (``_FINITE``)
    extra: dict  # the other columns (σ, template values, χ² of each stage, ...)
    degree: int
    coeffs: np.ndarray
    calib: np.ndarray | None
    components: tuple | None


@dataclass
class _SavedResult:
    """Everything :func:`load_result` reads from a result file, checked, before the model is rebuilt."""

    version: int
    has_stellar: bool
    has_telluric: bool
    telluric_instrumental: bool
    data: _DataTable
    orders: _OrdersTable
    lines: _FittedLines
    numbers: _TransferNumbers
    settings: dict
    flags: list
    frames: FitFrames
    outliers: dict | None


def load_result(cls, path: str | Path, *, device: str = "cpu"):
    """Read a result written by :func:`save_result` (layouts 2 and 3); see :meth:`TransferResult.load`."""
    from .core.training import resolve_device

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no fit result at {path}")
    dev = resolve_device(device)
    try:
        with fits.open(path, memmap=False) as hdul:
            saved = _read_saved_result(hdul, path, dev)
    except SavedFileError:
        raise
    except Exception as err:  # astropy/numpy raise many types for damaged files
        raise SavedFileError(f"could not read a fit result from {path}: the file is corrupt or not a result "
                             f"({type(err).__name__}: {err})", path=path) from err
    model = _rebuild_model(saved, path, dev)
    _warn_if_rebuilt_model_differs(model, saved.data.model_flux, path)
    return _assemble_result(cls, saved, model)


def _read_saved_result(hdul, path: Path, device) -> _SavedResult:
    """Read and check every part of an open result file, in the order of its layout."""
    version = _check_layout(hdul, path)
    hdr = hdul[0].header
    has_st, has_tel = _header_bool(hdr, "HASSTEL", path), _header_bool(hdr, "HASTELL", path)
    tel_inst = _header_bool(hdr, "TELINST", path, default=False)
    data = _read_data(hdul, path)
    orders = _read_orders(hdul, data, path)
    lines = _read_fitted_lines(hdul, path, device, has_tel)
    numbers = _read_transfer_numbers(hdul, path, len(orders.ids), lines.telluric if has_tel else None)
    tr = hdul["TRANSFER"].header
    settings = _json(tr, "SETTINGS", path, dict, {})
    flags = _read_flags(tr, path)
    frames = _read_frames(tr, path, version)
    outliers = _json(tr, "OUTLIERS", path, dict, None)
    return _SavedResult(version, has_st, has_tel, tel_inst, data, orders, lines, numbers, settings, flags, frames,
                        outliers)


def _check_layout(hdul, path: Path) -> int:
    """The layout version (``TRFMTVER``) of a transfer result this code rebuilds; refuse clone files,
    layout 1 and newer layouts by name."""
    hdr = hdul[0].header
    if hdr.get("FITKIND") != "transfer":
        raise SavedFileError(f"{path} is a clone file, not a transfer-learning result (no FITKIND='transfer')",
                             path=path, field="FITKIND")
    version = _header_number(hdr, "TRFMTVER", path, integer=True, default=1)
    if version < OLDEST_READABLE or "TRANSFER" not in hdul:
        raise SavedFileError(
            f"{path} is a layout-{version} result, written by an older blase_specutils without the TRANSFER "
            "table; it cannot be rebuilt: fit again and save (its fitted lines still read with "
            "SpectralClone.load)", path=path, field="TRFMTVER")
    if version > RESULT_FORMAT_VERSION:
        raise SavedFileError(f"{path} was written by a newer blase_specutils (result layout {version}); "
                             "upgrade blase_specutils to read it", path=path, field="TRFMTVER")
    return version


def _read_data(hdul, path: Path) -> _DataTable:
    """``DATA``, checked: increasing wavelengths, finite flux and positive σ at the good pixels."""
    d = _table(hdul, "DATA", path)
    n = len(d)
    wl = _checked_array(_col(d, "DATA", "wavelength", path), path, "DATA.wavelength", positive=True)
    if wl.size < 2 or not np.all(np.diff(wl) > 0):
        raise SavedFileError(f"{path}: DATA.wavelength must hold 2 or more strictly increasing values; the "
                             "file is damaged", path=path, field="DATA.wavelength")
    flux = _checked_array(_col(d, "DATA", "flux", path), path, "DATA.flux", finite=False, size=n)
    sigma = _checked_array(_col(d, "DATA", "sigma", path), path, "DATA.sigma", finite=False, size=n)
    good = _logical(_col(d, "DATA", "good", path), path, "DATA.good", n)
    unmasked = _logical(_col(d, "DATA", "unmasked", path), path, "DATA.unmasked", n)
    if not (np.all(np.isfinite(flux[good])) and np.all(sigma[good] > 0) and np.all(np.isfinite(sigma[good]))):
        raise SavedFileError(f"{path}: DATA.flux or DATA.sigma is not finite and positive at pixels marked good; "
                             "the file is damaged", path=path, field="DATA.sigma")
    model_flux = _checked_array(_col(d, "DATA", "model", path), path, "DATA.model", size=n)
    oid = _checked_array(_col(d, "DATA", "order", path), path, "DATA.order", integer=True, minimum=0, size=n)
    outlier = (_logical(d["outlier"], path, "DATA.outlier", n) if "outlier" in d.columns.names
               else np.zeros(n, dtype=bool))
    pseudo = (_checked_array(d["pseudo_continuum"], path, "DATA.pseudo_continuum", size=n)
              if "pseudo_continuum" in d.columns.names else None)
    return _DataTable(wl, flux, sigma, good, unmasked, model_flux, oid, outlier, pseudo)


def _read_orders(hdul, data: _DataTable, path: Path) -> _OrdersTable:
    """``ORDERS``, checked against the rows of ``DATA`` and their ``DATA.order``."""
    od = _table(hdul, "ORDERS", path)
    n, oid = data.wavelength.size, data.order
    order_ids = _checked_array(_col(od, "ORDERS", "order", path), path, "ORDERS.order", integer=True,
                               minimum=0).tolist()
    npix = _checked_array(_col(od, "ORDERS", "n_pixels", path), path, "ORDERS.n_pixels", integer=True,
                          minimum=2, size=len(order_ids)).tolist()
    if sorted(order_ids) != list(range(len(order_ids))):
        raise SavedFileError(f"{path}: ORDERS.order must list each order 0-{len(order_ids) - 1} once, got "
                             f"{order_ids}; the file is damaged", path=path, field="ORDERS.order")
    if sum(npix) != n or not np.array_equal(oid, np.repeat(order_ids, npix)):
        raise SavedFileError(f"{path}: ORDERS.n_pixels {npix} (sum {sum(npix)}) does not match the {n} rows of "
                             "DATA and their DATA.order; the file is damaged", path=path, field="ORDERS.n_pixels")
    units = []
    for col in ("spectral_unit", "flux_unit"):
        try:
            units.append([u.Unit(str(s).strip() or "") for s in _col(od, "ORDERS", col, path)])
        except (ValueError, TypeError) as err:
            raise SavedFileError(f"{path}: ORDERS.{col} holds a unit astropy cannot read ({err})", path=path,
                                 field=f"ORDERS.{col}") from err
    return _OrdersTable(order_ids, npix, units[0], units[1])


def _read_fitted_lines(hdul, path: Path, device, has_telluric: bool) -> _FittedLines:
    """The fitted lines and their starting values: ``LINES``/``WING``/``PRIOR`` and, with a telluric
    fit, ``TLINES``/``TWING``/``TPRIOR``."""
    from .cloning import CloneFileError, SpectralClone

    try:
        main = SpectralClone.load(path, device=device)
    except CloneFileError as err:
        raise SavedFileError(f"{path}: the fitted lines (LINES, WING) cannot be read: {err}", path=path,
                             field="LINES") from err
    main_prior, main_centers = _checked_prior(_table(hdul, "PRIOR", path), "PRIOR", main.model.n_lines, path, device)
    lines = _FittedLines(main, main_prior, main_centers)
    if has_telluric:
        for ext in ("TLINES", "TWING"):
            if ext not in hdul or not isinstance(hdul[ext], fits.BinTableHDU):
                raise SavedFileError(f"{path}: the {ext} table is missing; the file is damaged", path=path, field=ext)
        lines.telluric = _checked_lines(hdul["TLINES"], hdul["TWING"], "T", path, device)
        lines.telluric_prior, lines.telluric_centers = _checked_prior(
            _table(hdul, "TPRIOR", path), "TPRIOR", lines.telluric.n_lines, path, device)
    return lines


def _read_transfer_numbers(hdul, path: Path, n_orders: int, telluric) -> _TransferNumbers:
    """``TRANSFER``'s row (finite, positive where it must be), ``CONTINUUM``, ``TCOMP`` and ``CALIB``."""
    td = _table(hdul, "TRANSFER", path)
    if len(td) != 1:
        raise SavedFileError(f"{path}: TRANSFER must have one row, has {len(td)}", path=path, field="TRANSFER")
    row = {k: float(_checked_array(_col(td, "TRANSFER", k, path), path, f"TRANSFER.{k}", size=1)[0]) for k in _FINITE}
    for k in ("dv", "max_vsini", "lsf_half_width", "max_rv"):
        if not row[k] > 0:
            raise SavedFileError(f"{path}: TRANSFER.{k} must be > 0, got {row[k]!r}", path=path, field=f"TRANSFER.{k}")
    extra = {k: float(np.asarray(td[k])[0]) for k in td.columns.names if k not in row and k != "continuum_degree"}
    degree = int(_checked_array(_col(td, "TRANSFER", "continuum_degree", path), path, "TRANSFER.continuum_degree",
                                integer=True, minimum=0, size=1)[0])
    coeffs = _checked_array(hdul["CONTINUUM"].data if "CONTINUUM" in hdul else None, path, "CONTINUUM",
                            size=n_orders * (degree + 1)).reshape(n_orders, degree + 1)
    components = _read_components(hdul, telluric.n_lines, path) if telluric is not None else None
    return _TransferNumbers(row, extra, degree, coeffs, _read_calibration(hdul, path, n_orders), components)


def _read_calibration(hdul, path: Path, n_orders: int) -> np.ndarray | None:
    """The wavelength-correction coefficients (``CALIB``, orders × degree+1), or None without them."""
    if "CALIB" not in hdul:
        return None
    raw = np.asarray(hdul["CALIB"].data, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[0] != n_orders:
        raise SavedFileError(f"{path}: CALIB must be an (orders x degree+1) image, got shape {raw.shape}",
                             path=path, field="CALIB")
    return _checked_array(raw, path, "CALIB").reshape(raw.shape)


def _read_flags(header, path: Path) -> list:
    """The fit's flags (``TRANSFER`` keyword ``FLAGS``), each a :class:`~blase_specutils.core.transfer.FitFlag`."""
    from .core.transfer import FitFlag

    try:
        return [FitFlag(**f) for f in _json(header, "FLAGS", path, list, [])]
    except TypeError as err:
        raise SavedFileError(f"{path}: TRANSFER keyword FLAGS holds an entry that is not a flag "
                             "({code, message, parameter}): the file is damaged", path=path,
                             field="TRANSFER.FLAGS") from err


def _read_frames(header, path: Path, version: int) -> FitFrames:
    """The frames of the fit (``TRANSFER`` keyword ``FRAMES``); ``"unstated"`` in a layout-2 file."""
    frames_dict = _json(header, "FRAMES", path, dict, None)
    try:
        return (FitFrames(frame=UNSTATED, barycentric_source=f"not recorded (a layout-{version} file)")
                if frames_dict is None else FitFrames.from_dict(frames_dict))
    except (TypeError, ValueError) as err:
        raise SavedFileError(f"{path}: TRANSFER keyword FRAMES is malformed ({err})", path=path,
                             field="TRANSFER.FRAMES") from err


def _rebuild_model(saved: _SavedResult, path: Path, device):
    """The :class:`~blase_specutils.core.transfer.TransferModel` of the file, at its saved parameters."""
    from .core.transfer import TransferModel

    row, num, lines = saved.numbers.row, saved.numbers, saved.lines
    max_vsini = row["max_vsini"]
    kw = {}
    if saved.telluric_instrumental:
        kw["telluric_instrumental"] = True
    if num.calib is not None:
        kw |= {"calibration_degree": num.calib.shape[1] - 1,
               "calibration_prior": num.extra.get("calibration_prior", 1.0)}
    if num.components is not None:
        kw |= {"telluric_components": num.components[0], "telluric_names": num.components[1]}
    try:
        model = TransferModel(
            lines.main.model if saved.has_stellar else None, saved.data.wavelength, order_index=saved.data.order,
            telluric=lines.telluric, rv=row["rv"], vsini=min(math.exp(row["log_vsini"]), max_vsini),
            resolving_power=math.exp(row["log_resolving_power"]), limb_darkening=row["limb_darkening"],
            continuum_degree=num.degree, dv=row["dv"], max_vsini=max_vsini, max_rv=max(row["max_rv"], abs(row["rv"])),
            lsf_half_width=row["lsf_half_width"], **kw,
        ).to(device)
    except (ValueError, TypeError, OverflowError) as err:
        raise SavedFileError(f"{path}: the TRANSFER numbers do not make a forward model ({err}); the file is damaged",
                             path=path, field="TRANSFER") from err
    _set_saved_parameters(model, num)
    return model


@torch.no_grad()
def _set_saved_parameters(model, num: _TransferNumbers) -> None:
    """Copy the saved RV, v sin i, R, telluric powers and coefficients into a rebuilt model."""
    row = num.row
    model.rv.fill_(row["rv"])
    model.rot.log_vsini.fill_(row["log_vsini"])
    model.inst.log_resolving_power.fill_(row["log_resolving_power"])
    if num.components is None:
        model.log_telluric_power.fill_(row["log_telluric_power"])
    else:
        model.log_telluric_power.copy_(torch.as_tensor(num.components[2], dtype=model.log_telluric_power.dtype))
    model.continuum_coeffs.copy_(torch.as_tensor(num.coeffs))
    if num.calib is not None:
        model.calibration_coeffs.copy_(torch.as_tensor(num.calib))


def _warn_if_rebuilt_model_differs(model, model_flux: np.ndarray, path: Path) -> None:
    """Warn when the rebuilt model does not reproduce the saved one (the saved one is kept)."""
    with torch.no_grad():
        rebuilt = model().cpu().numpy()
    scale = max(1.0, float(np.nanmax(np.abs(model_flux))))
    if not np.allclose(rebuilt, model_flux, rtol=0.0, atol=1e-8 * scale):
        warnings.warn(
            f"the rebuilt model of {path.name} differs from the saved one by up to "
            f"{np.nanmax(np.abs(rebuilt - model_flux)):.3g} (a different blase_specutils version?); the saved "
            "model is used for model_spectrum and chi2", UserWarning, stacklevel=4)


def _order_spectra(data: _DataTable, orders: _OrdersTable) -> tuple[list, list]:
    """Each order's arrays (in file order) and spectrum (in order-id order), with its units and mask."""
    from specutils import Spectrum

    from .spectra import SpectrumArrays, arrays_to_spectrum

    wl, flux, sigma, unmasked = data.wavelength, data.flux, data.sigma, data.unmasked
    arrays, spectra, start = [], [None] * len(orders.ids), 0
    for k, npx, su, fu in zip(orders.ids, orders.n_pixels, orders.spectral_units, orders.flux_units):
        sl = slice(start, start + npx)
        start += npx
        arrays.append(SpectrumArrays(wavelength=wl[sl], flux=flux[sl], uncertainty=sigma[sl], good=unmasked[sl],
                                     flux_unit=fu, reversed=False, spectral_unit=su))
        spectra[k] = arrays_to_spectrum(wl[sl], flux[sl], flux_unit=fu, uncertainty=sigma[sl], mask=~unmasked[sl],
                                        like=Spectrum(spectral_axis=[1.0, 2.0] * su, flux=[1.0, 1.0] * fu))
    return arrays, spectra


def _fit_summary(num: _TransferNumbers) -> tuple[dict, object, dict]:
    """The template-matching values, the fit record (χ² of each stage) and the uncertainties."""
    from .core.transfer import TransferFit

    extra = num.extra
    template = {k: _none_if_nan(extra.get(f"template_{k}", float("nan"))) for k in TEMPLATE_KEYS}
    fit = TransferFit()
    fit.chi2 = {k: float(extra[f"chi2_{k}"]) for k in ("start", "template", "lines")
                if f"chi2_{k}" in extra and not math.isnan(float(extra[f"chi2_{k}"]))}
    sigmas = {k: float(extra[f"sigma_{k}"]) for k in SIGMA_KEYS
              if f"sigma_{k}" in extra and not math.isnan(float(extra[f"sigma_{k}"]))}
    if num.components is not None:
        template["telluric_power"] = num.components[3]
        sigmas |= num.components[4]
    return template, fit, sigmas


def _assemble_result(cls, saved: _SavedResult, model):
    """The result object (``cls``) from what was read and the rebuilt model."""
    from .cloning import SpectralClone
    from .fitting import _clone_at

    d, lines, has_st, has_tel = saved.data, saved.lines, saved.has_stellar, saved.has_telluric
    arrays, orders = _order_spectra(d, saved.orders)
    template, fit, sigmas = _fit_summary(saved.numbers)
    st_model = lines.main.model if has_st else None
    tel_prior = lines.telluric_prior if has_tel else None
    stellar_clone = SpectralClone(_clone_at(st_model, lines.main_prior, lines.main_centers)) if has_st else None
    telluric_clone = (SpectralClone(_clone_at(lines.telluric, tel_prior, lines.telluric_centers)) if has_tel
                      else None)
    centers = (("stellar", lines.main_centers if has_st else None), ("telluric", lines.telluric_centers))
    return cls(model=model, orders=orders, order_ids=saved.orders.ids, arrays=arrays, wavelength=d.wavelength,
               flux=d.flux, sigma=d.sigma, good=d.good, order_of_pixel=d.order, model_flux=d.model_flux,
               prior=lines.main_prior if has_st else {}, template=template, fit=fit, settings=saved.settings,
               stellar_clone=stellar_clone, telluric_clone=telluric_clone, likelihood=None,
               pseudo_continuum_flux=d.pseudo_continuum, telluric_prior=tel_prior, flags=saved.flags,
               uncertainties=sigmas, frames=saved.frames, outlier_mask=d.outlier, outliers=saved.outliers,
               prior_centers={k: c for k, c in centers if c is not None})
