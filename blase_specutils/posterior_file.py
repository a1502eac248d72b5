"""The posterior file: :meth:`PosteriorFit.save <blase_specutils.posterior.PosteriorFit.save>`
(atomic) and :meth:`PosteriorFit.load <blase_specutils.posterior.PosteriorFit.load>` (every field
checked, named in the error).

Layout (``FORMAT`` = ``BLASE-SPECUTILS-POSTERIOR``, ``FMTVER`` 2): a primary header with the guide,
the run settings (:data:`HEADER_KEYS`), the RV, v sin i, R and telluric power percentiles and the
line mode, profile, sign and flux unit; then the tables ``LINES`` (the line table with units),
``SAMPLES`` (one row per draw), ``VALUES`` (the fit's and the clone's line parameters), ``DATA``
(λ_D, flux, ε, mask, order), the image ``PREDICT`` (model draws) and the table ``ELBO``.

Version 2 adds the telluric power: the ``SAMPLES`` column ``ln_telluric_power`` (one value per
draw, or one per component), the header's ``TELNAMES`` (the components' names, comma-separated)
and ``XSCALE``; and the telluric-only posterior (``STELLAR = F``: no ``LINES``, ``VALUES``, RV or
v sin i, nor the line mode, profile and sign). Version 1 files read as before.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.table import QTable

from .constants import LOG_PARAMETER_LIMIT
from .io import SavedFileError, _checked_array, _header_choice, _header_number, atomic_write

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HEADER_KEYS", "save_posterior", "load_posterior"]

FORMAT_NAME = "BLASE-SPECUTILS-POSTERIOR"
#: Layout version of the posterior file (``FMTVER``; 2: telluric powers, telluric-only posteriors).
FORMAT_VERSION = 2

#: settings key → FITS header keyword
HEADER_KEYS = {
    "guide": "GUIDE",
    "rank": "RANK",
    "num_steps": "NSTEPS",
    "num_samples": "NSAMPLE",
    "lr": "LR",
    "seed": "SEED",
    "regularization": "REGUL",
    "width_regularization": "WREGUL",
    "noise_scale": "NOISESC",
    "tuned": "TUNED",
    "rv_scale": "RVSCALE",
    "vsini_scale": "VSCALE",
    "resolving_power_scale": "RSCALE",
    "continuum_scale": "CSCALE",
    "telluric_power_scale": "XSCALE",
    "seconds": "SECONDS",
    "skipped_steps": "SKIPPED",
    "device": "DEVICE",
}

#: The guide kinds a file may name (the values of :data:`blase_specutils.bayes.GUIDES`).
GUIDE_KINDS = ("delta", "lowrank", "normal")

#: settings that are numbers (the others are strings); integers among them.
_NUMERIC_SETTINGS = {"rank", "num_steps", "num_samples", "lr", "seed", "regularization", "width_regularization",
                     "noise_scale", "rv_scale", "vsini_scale", "resolving_power_scale", "continuum_scale",
                     "telluric_power_scale", "seconds", "skipped_steps"}
_INTEGER_SETTINGS = {"rank", "num_steps", "num_samples", "seed", "skipped_steps"}

_DAMAGED = "the file is damaged or was not written by blase_specutils; write it again from the original"

_SHORT = {"rv": "RV", "vsini": "VS", "resolving_power": "R", "telluric_power": "X"}
_LINE_KEYS = ("ln_amplitude", "ln_sigma", "ln_gamma")
_POWER_KEY = "ln_telluric_power"


# ------------------------------------------------------------------------------ saving
def save_posterior(fit, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``fit`` (a :class:`~blase_specutils.posterior.PosteriorFit`) to ``path`` atomically;
    see :meth:`PosteriorFit.save <blase_specutils.posterior.PosteriorFit.save>`."""
    path = Path(path)
    hdus = [fits.PrimaryHDU(header=_primary_header(fit))]
    if fit.has_stellar:
        lines = fits.table_to_hdu(fit._lines)
        lines.name = "LINES"
        hdus.append(lines)
    hdus.append(_samples_hdu(fit.samples))
    if fit.has_stellar:
        hdus.append(_values_hdu(fit))
    hdus += [_data_hdu(fit._data), fits.ImageHDU(np.asarray(fit.predictive, dtype=np.float32), name="PREDICT"),
             fits.BinTableHDU.from_columns([fits.Column("elbo", "D", array=fit.elbo_history)], name="ELBO")]
    hdul = fits.HDUList(hdus)
    return atomic_write(path, lambda tmp: hdul.writeto(tmp), overwrite=overwrite)


def _primary_header(fit) -> fits.Header:
    """The format, the run settings, the RV, v sin i, R and telluric power percentiles (``X_MED``, or
    ``X1_MED``, ``X2_MED``, ... per component, the name in the comment), the telluric component
    names and the line kind."""
    hdr = fits.Header()
    hdr["FORMAT"] = (FORMAT_NAME, "blase_specutils posterior file")
    hdr["FMTVER"] = (FORMAT_VERSION, "layout version")
    hdr["FITKIND"] = ("posterior", "blase_specutils transfer-learning posterior")
    for k, v in fit.settings.items():
        key = HEADER_KEYS.get(k)
        if key is not None and v is not None:
            hdr[key] = (v, k)
    hdr["STELLAR"] = (bool(fit.has_stellar), "fit had a stellar clone (F: telluric-only)")
    if fit.telluric_names:
        hdr["TELNAMES"] = (",".join(fit.telluric_names), "telluric components, one power each")
    for k, m in fit.measurements.items():
        short, comment = _SHORT.get(k), k
        if short is None:  # "telluric_power:<name>": numbered in the order of TELNAMES
            name = k.split(":", 1)[1]
            short, comment = f"X{fit.telluric_names.index(name) + 1}", f"telluric power of {name}"
        hdr[f"{short}_MED"] = (float(m.value.value), comment)
        hdr[f"{short}_P16"] = float(m.lower.value)
        hdr[f"{short}_P84"] = float(m.upper.value)
    info = fit._line_info
    if info is not None:
        hdr["LINEMODE"] = info["mode"]
        hdr["PROFILE"] = info["profile"]
        hdr["LSIGN"] = float(info["sign"])
    hdr["BUNIT"] = str(fit._data["flux_unit"])
    return hdr


def _samples_hdu(samples: dict) -> fits.BinTableHDU:
    """``SAMPLES``: one row per draw, a vector column (with its shape in ``TDIM``) per array."""
    cols = []
    for k, v in samples.items():
        v = np.asarray(v, dtype=np.float64)
        flat = v.reshape(v.shape[0], -1)
        fmt = f"{flat.shape[1]}D" if v.ndim > 1 else "D"
        dim = "(" + ",".join(str(x) for x in v.shape[:0:-1]) + ")" if v.ndim > 2 else None
        cols.append(fits.Column(k, fmt, array=flat if v.ndim > 1 else v, dim=dim))
    return fits.BinTableHDU.from_columns(cols, name="SAMPLES")


def _values_hdu(fit) -> fits.BinTableHDU:
    """``VALUES``: each line's centre and its fitted and cloned ln a, ln σ, ln γ."""
    vcols = [fits.Column("center", "D", unit="Angstrom", array=fit._line_info["center"])]
    for src, tag in ((fit.fit_values, "fit"), (fit.clone_values, "clone")):
        for k in _LINE_KEYS:
            vcols.append(fits.Column(f"{k}_{tag}", "D", array=src[k]))
    return fits.BinTableHDU.from_columns(vcols, name="VALUES")


def _data_hdu(d: dict) -> fits.BinTableHDU:
    """``DATA``: the pixels the posterior was drawn from."""
    return fits.BinTableHDU.from_columns([
        fits.Column("wavelength", "D", unit="Angstrom", array=d["wavelength"]),
        fits.Column("flux", "D", array=d["flux"]),
        fits.Column("sigma", "D", array=d["sigma"]),
        fits.Column("good", "L", array=d["good"]),
        fits.Column("order", "K", array=d["order"].astype(np.int64)),
    ], name="DATA")


# ------------------------------------------------------------------------------ loading
def load_posterior(cls, path: str | Path):
    """Read a file written by :func:`save_posterior` into ``cls``; see
    :meth:`PosteriorFit.load <blase_specutils.posterior.PosteriorFit.load>`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no posterior file at {path}")
    try:
        with fits.open(path, memmap=False) as hdul:
            hdul.verify("exception")
            out = _read_posterior(hdul, path)
        info = out["line_info"]
        lines = None if info is None else _read_line_table(path, info["center"].size)
        return cls(**out, result=None, lines=lines)
    except SavedFileError:
        raise
    except Exception as err:  # astropy/numpy raise many types for damaged files
        raise SavedFileError(f"could not read a posterior from {path}: the file is corrupt or not a blase_specutils "
                             f"posterior file ({type(err).__name__}: {err})", path=path) from err


def _read_line_table(path: Path, n_lines: int) -> QTable:
    """``LINES`` as a QTable with its units, checked to hold one row per line of ``VALUES``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)
            lines = QTable.read(path, hdu="LINES")
    except Exception as err:  # astropy raises many types for a damaged table
        raise SavedFileError(f"{path}: the LINES table cannot be read ({err}); {_DAMAGED}",
                             path=path, field="LINES") from err
    if len(lines) != n_lines or "center" not in lines.colnames:
        raise SavedFileError(f"{path}: the LINES table has {len(lines)} rows (and columns {lines.colnames[:4]}...) "
                             f"where VALUES has {n_lines} lines; {_DAMAGED}", path=path, field="LINES")
    return lines


class _Reader:
    """Checked access to the tables of an open posterior file; each error names the file and the field."""

    def __init__(self, hdul, path: Path) -> None:
        self.hdul, self.path = hdul, path

    def fail(self, field: str, problem: str) -> SavedFileError:
        return SavedFileError(f"{self.path}: {field} {problem}; {_DAMAGED}", path=self.path, field=field)

    def table(self, ext: str):
        hdul = self.hdul
        if ext not in hdul or not isinstance(hdul[ext], fits.BinTableHDU) or hdul[ext].data is None:
            raise SavedFileError(f"{self.path}: the {ext} table is missing or empty; {_DAMAGED}", path=self.path,
                                 field=ext)
        return hdul[ext].data

    def column(self, data, ext: str, name: str):
        if name not in data.columns.names:
            raise SavedFileError(f"{self.path}: column {ext}.{name} is missing; {_DAMAGED}", path=self.path,
                                 field=f"{ext}.{name}")
        return data[name]

    def array(self, ext: str, name: str, data=None, **checks) -> np.ndarray:
        """Column ``ext.name`` checked by :func:`~blase_specutils.io._checked_array` with ``checks``."""
        data = self.table(ext) if data is None else data
        return _checked_array(self.column(data, ext, name), self.path, f"{ext}.{name}", **checks)


def _read_posterior(hdul, path: Path) -> dict:
    """The keyword arguments of :class:`~blase_specutils.posterior.PosteriorFit` from an open
    posterior file, every field checked."""
    r = _Reader(hdul, path)
    settings = _read_settings(r)
    stellar = _read_stellar(r)
    names = _read_telluric_names(r)
    flux_unit = _read_flux_unit(r)
    if stellar:
        line_info = _read_line_kind(r)
        center = r.array("VALUES", "center", positive=True)
        fitv, clov = _read_values(r, center.size)
        line_info = {"center": center, **line_info}
    else:  # a telluric-only posterior: no stellar lines
        line_info, fitv, clov = None, {}, {}
    samples = _read_samples(r, 0 if line_info is None else line_info["center"].size, stellar=stellar,
                            n_powers=len(names))
    data = _read_data(r, flux_unit)
    predictive = _read_predictive(r, len(r.table("DATA")))
    elbo = r.array("ELBO", "elbo", finite=False)
    return dict(samples=samples, fit_values=fitv, clone_values=clov, line_info=line_info,
                data=data, predictive=predictive, elbo_history=elbo, settings=settings, telluric_names=names)


def _read_settings(r: _Reader) -> dict:
    """The format and version, and the run settings of the header with their types."""
    hdr, path = r.hdul[0].header, r.path
    if hdr.get("FORMAT") != FORMAT_NAME:
        raise SavedFileError(f"{path} is not a blase_specutils posterior file (FORMAT={hdr.get('FORMAT')!r}, "
                             f"expected {FORMAT_NAME!r})", path=path, field="FORMAT")
    version = _header_number(hdr, "FMTVER", path, integer=True, default=0)
    if version > FORMAT_VERSION:
        raise SavedFileError(f"{path} was written by a newer blase_specutils (posterior format {version}); upgrade "
                             "blase_specutils to read it", path=path, field="FMTVER")
    settings = {}
    for k, key in HEADER_KEYS.items():
        if key not in hdr:
            continue
        if k in _NUMERIC_SETTINGS:
            settings[k] = _header_number(hdr, key, path, integer=k in _INTEGER_SETTINGS)
        else:
            v = hdr[key]
            if not isinstance(v, str):
                raise r.fail(key, f"must be a string, got {v!r}")
            settings[k] = v
    if settings.get("guide") not in GUIDE_KINDS:
        raise r.fail("GUIDE", f"must be one of {sorted(GUIDE_KINDS)}, got {hdr.get('GUIDE')!r}")
    settings.setdefault("tuned", "")
    return settings


def _read_stellar(r: _Reader) -> bool:
    """Whether the fit had a stellar clone (``STELLAR``; files of version 1 always had one)."""
    value = r.hdul[0].header.get("STELLAR", True)
    if not isinstance(value, bool):
        raise r.fail("STELLAR", f"must be a logical (T/F), got {value!r}")
    return value


def _read_telluric_names(r: _Reader) -> tuple[str, ...]:
    """The names of the telluric components (``TELNAMES``; empty for one power or none)."""
    value = r.hdul[0].header.get("TELNAMES")
    if value is None:
        return ()
    if not isinstance(value, str) or not value.strip():
        raise r.fail("TELNAMES", f"must be comma-separated component names, got {value!r}")
    names = tuple(value.split(","))
    if len(set(names)) != len(names):
        raise r.fail("TELNAMES", f"must name distinct components, got {value!r}")
    return names


def _read_flux_unit(r: _Reader):
    """The flux unit (``BUNIT``)."""
    bunit = r.hdul[0].header.get("BUNIT", "")
    try:
        return u.Unit(bunit if isinstance(bunit, str) else "?")
    except ValueError:
        raise r.fail("BUNIT", f"is not a unit: {bunit!r}") from None


def _read_line_kind(r: _Reader) -> dict:
    """The lines' mode, profile and sign from the header."""
    from .core.profiles import PROFILES

    hdr, path = r.hdul[0].header, r.path
    mode = _header_choice(hdr, "LINEMODE", path, ("linear", "log"))
    profile = _header_choice(hdr, "PROFILE", path, tuple(PROFILES))
    sign = _header_number(hdr, "LSIGN", path)
    if sign not in (-1.0, 1.0):
        raise r.fail("LSIGN", f"must be +1 (absorption) or -1 (emission), got {sign!r}")
    return {"mode": mode, "profile": profile, "sign": sign}


def _read_values(r: _Reader, n_lines: int) -> tuple[dict, dict]:
    """The fitted and cloned ln a, ln σ, ln γ of each line (``VALUES``)."""
    vt = r.table("VALUES")
    fitv, clov = {}, {}
    for src, tag in ((fitv, "fit"), (clov, "clone")):
        for k in _LINE_KEYS:
            src[k] = r.array("VALUES", f"{k}_{tag}", vt, log_limit=LOG_PARAMETER_LIMIT, size=n_lines)
    return fitv, clov


def _read_samples(r: _Reader, n_lines: int, *, stellar: bool = True, n_powers: int = 0) -> dict:
    """The draws (``SAMPLES``): finite numbers, one per line per draw for ln a, ln σ, ln γ, one per
    draw for RV and v sin i (with a stellar clone) and R, and for ln X one per draw (``n_powers``
    0) or one per component."""
    st = r.table("SAMPLES")
    if len(st) < 1:
        raise r.fail("SAMPLES", "holds no draws")
    samples = {}
    for name in st.columns.names:
        raw = np.asarray(st[name])
        if raw.dtype.kind not in "biuf":
            raise r.fail(f"SAMPLES.{name}", f"is not numeric ({raw.dtype})")
        v = raw.astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise r.fail(f"SAMPLES.{name}", "has non-finite draws (NaN or inf)")
        if name in _LINE_KEYS and v.ndim == 1 and n_lines == 1:
            v = v[:, None]  # a one-line vector column reads back without its length-1 axis
        if name in _LINE_KEYS and (not stellar or v.ndim != 2 or v.shape[1] != n_lines):
            raise r.fail(f"SAMPLES.{name}", f"must hold one value per line ({n_lines}) per draw, got shape {v.shape}")
        if name == _POWER_KEY and v.shape[1:] != ((n_powers,) if n_powers else ()):
            raise r.fail(f"SAMPLES.{name}", f"must hold {n_powers or 'one'} telluric power(s) per draw (TELNAMES), "
                         f"got shape {v.shape}")
        # draws of ln a for lines the data do not constrain can reach far below any fitted value:
        # only finiteness is required of them (checked above)
        samples[name] = v
    if n_powers and _POWER_KEY not in samples:
        raise r.fail(f"SAMPLES.{_POWER_KEY}", f"is missing (TELNAMES names {n_powers} components)")
    for name in ("rv", "vsini", "resolving_power") if stellar else ("resolving_power",):
        if name not in samples:
            raise r.fail(f"SAMPLES.{name}", "is missing")
        if samples[name].ndim != 1:
            raise r.fail(f"SAMPLES.{name}", f"must hold one number per draw, got shape {samples[name].shape}")
    return samples


def _read_data(r: _Reader, flux_unit) -> dict:
    """The pixels (``DATA``), the flux finite where marked good."""
    dt = r.table("DATA")
    good_raw = np.asarray(r.column(dt, "DATA", "good"))
    if good_raw.dtype.kind != "b":
        raise r.fail("DATA.good", f"must be a logical column (T/F), got {good_raw.dtype}")
    good = good_raw.astype(bool)
    data = {"wavelength": r.array("DATA", "wavelength", dt, positive=True),
            "flux": r.array("DATA", "flux", dt, finite=False),
            "sigma": r.array("DATA", "sigma", dt, finite=False),
            "good": good,
            "order": r.array("DATA", "order", dt, integer=True, minimum=0),
            "flux_unit": flux_unit}
    if not np.all(np.isfinite(data["flux"][good])):
        raise r.fail("DATA.flux", "is not finite at pixels marked good")
    return data


def _read_predictive(r: _Reader, n_pix: int) -> np.ndarray:
    """The model draws (``PREDICT``): draws × the data's pixels."""
    hdul, path = r.hdul, r.path
    if "PREDICT" not in hdul or not isinstance(hdul["PREDICT"], fits.ImageHDU) or hdul["PREDICT"].data is None:
        raise SavedFileError(f"{path}: the PREDICT image (model draws) is missing; {_DAMAGED}", path=path,
                             field="PREDICT")
    pred = np.asarray(hdul["PREDICT"].data, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != n_pix or pred.shape[0] < 1:
        raise r.fail("PREDICT", f"must hold model draws × the {n_pix} data pixels, got shape {pred.shape}")
    return pred
