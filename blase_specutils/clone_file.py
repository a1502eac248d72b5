"""Saving and loading a :class:`~blase_specutils.SpectralClone` as a FITS file (no pickle).

Layout: primary header with the settings (``BLFORMAT = 'BLASE-SPECUTILS-CLONE'``, ``BLFMTVER``,
``MODE``, ``PROFILE``, ``EMISSION``, ``WINGTOL``, ``FARFIELD``, ``TUNE``, ``NLINES``, ``ENGINE``,
``BANDLO``/``BANDHI`` and the cloning settings of ``meta``); binary table ``LINES``
(``lam_center`` Å, ``log_amp``, ``log_sigma``, ``log_gamma``, ``residual_pass``); table ``WING``
(``line``, ``alpha``, ``log_lt``, ``log_b`` of the broad lines); optionally ``TARGET`` (the
preprocessed spectrum: ``wavelength`` Å, ``flux``, ``good``).
"""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits
from specutils import Spectrum

from . import __version__ as _version
from .core.clone import TUNABLE, LineCloneModel
from .core.profiles import PROFILES
from .core.training import resolve_device
from .io import LOG_PARAMETER_LIMIT, _checked_array, _header_bool, _header_choice, _header_number, atomic_write
from .spectra import spectrum_to_arrays

__all__ = ["CloneFileError", "FORMAT_NAME", "FORMAT_VERSION", "save_clone", "load_clone"]

#: Identifier written into the FITS primary header of saved clones.
FORMAT_NAME = "BLASE-SPECUTILS-CLONE"
#: Version of the saved-clone layout.
FORMAT_VERSION = 1

#: Header keywords the loader reads itself; every other one goes to the clone's ``meta``.
_OWN_KEYWORDS = {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "BLFORMAT", "BLFMTVER", "BLVERSN", "MODE", "PROFILE",
                 "EMISSION", "WINGTOL", "TUNE", "NLINES", "BANDLO", "BANDHI", "FARFIELD"}


class CloneFileError(ValueError):
    """A clone file that cannot be read: corrupt, truncated, or not a clone."""


def _float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------------------------- writing
def save_clone(clone, path: str | Path, *, overwrite: bool = False, include_target: bool = True) -> Path:
    """Write ``clone`` to ``path`` atomically (see :meth:`SpectralClone.save`)."""
    path = Path(path)
    hdus = [fits.PrimaryHDU(header=_clone_header(clone)), _lines_hdu(clone), _wing_hdu(clone.model)]
    if include_target and clone.target is not None:
        hdus.append(_target_hdu(clone.target))
    hdul = fits.HDUList(hdus)
    return atomic_write(path, lambda tmp: hdul.writeto(tmp), overwrite=overwrite)


def _clone_header(clone) -> fits.Header:
    """The primary header: format, model settings, engine, band and the scalar entries of ``meta``."""
    m = clone.model
    hdr = fits.Header()
    hdr["BLFORMAT"] = FORMAT_NAME
    hdr["BLFMTVER"] = FORMAT_VERSION
    hdr["BLVERSN"] = _version
    hdr["MODE"] = m.mode
    hdr["PROFILE"] = m.profile
    hdr["EMISSION"] = m.emission
    hdr["WINGTOL"] = m.wing_tolerance
    hdr["FARFIELD"] = (bool(m.far_field), "near/far-field split of the line wings")
    hdr["TUNE"] = ",".join(m.tuned)
    hdr["NLINES"] = m.n_lines
    hdr["ENGINE"] = (clone.engine["backend"], "backend that computed the line sums")
    if clone.band is not None:
        hdr["BANDLO"] = (clone.band[0], "band of interest, Angstrom")
        hdr["BANDHI"] = (clone.band[1], "band of interest, Angstrom")
    for k, v in clone.meta.items():
        if isinstance(v, (bool, int, float, str)) and len(k) <= 8 and k.upper() != "ENGINE":
            hdr[k.upper()] = v
    return hdr


def _lines_hdu(clone) -> fits.BinTableHDU:
    """The LINES table: centres, log parameters and the residual pass of each line."""
    m = clone.model
    return fits.BinTableHDU.from_columns([
        fits.Column("lam_center", "D", unit="Angstrom", array=_float64(m.lam_centers)),
        fits.Column("log_amp", "D", array=_float64(m.log_amplitudes)),
        fits.Column("log_sigma", "D", array=_float64(m.log_sigmas)),
        fits.Column("log_gamma", "D", array=_float64(m.log_gammas)),
        fits.Column("residual_pass", "K", array=clone.line_pass),
    ], name="LINES")


def _wing_hdu(model: LineCloneModel) -> fits.BinTableHDU:
    """The WING table: the Appendix C.4 wing parameters of the broad lines."""
    return fits.BinTableHDU.from_columns([
        fits.Column("line", "K", array=model.broad_lines.cpu().numpy().astype(np.int64)),
        fits.Column("alpha", "D", array=_float64(model.wing_alpha)),
        fits.Column("log_lt", "D", array=_float64(model.wing_log_lt)),
        fits.Column("log_b", "D", array=_float64(model.wing_log_b)),
    ], name="WING")


def _target_hdu(target: Spectrum) -> fits.BinTableHDU:
    """The TARGET table: the preprocessed spectrum (masked pixels as NaN and ``good`` False)."""
    arr = spectrum_to_arrays(target)
    return fits.BinTableHDU.from_columns([
        fits.Column("wavelength", "D", unit="Angstrom", array=arr.wavelength),
        fits.Column("flux", "D", array=np.where(arr.good, arr.flux, np.nan)),
        fits.Column("good", "L", array=arr.good),
    ], name="TARGET")


# ------------------------------------------------------------------------------------- reading
def load_clone(cls, path: str | Path, *, device: str | torch.device = "cpu"):
    """Read a clone written by :func:`save_clone` as an instance of ``cls`` (see :meth:`SpectralClone.load`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no clone file at {path}")
    try:
        with fits.open(path, memmap=False) as hdul:
            parts = _read_clone(hdul, path)
    except CloneFileError:
        raise
    except Exception as err:  # astropy/numpy raise many types for damaged files
        raise CloneFileError(f"could not read a clone from {path}: the file is corrupt or not a clone ({err})") from err
    model = _build_model(parts, path, resolve_device(device))
    return cls(model, target=parts["target"], band=parts["band"], meta=parts["meta"], line_pass=parts["line_pass"])


def _read_clone(hdul: fits.HDUList, path: Path) -> dict:
    """Every checked part of an open clone file, in the order the checks name their errors."""
    hdul.verify("exception")
    hdr = hdul[0].header
    _check_format(hdul, hdr, path)
    nlines = _header_number(hdr, "NLINES", path, error=CloneFileError, integer=True)
    if nlines < 0:
        raise CloneFileError(f"{path}: NLINES must be >= 0, got {nlines}")
    columns, line_pass = _read_lines(hdul["LINES"].data, path, nlines)
    broad, wing = _read_wing(hdul["WING"].data, path, nlines)
    target = _read_target(hdul["TARGET"].data, path) if "TARGET" in hdul else None
    return dict(columns=columns, line_pass=line_pass, broad=broad, wing=wing, target=target,
                model=_read_model_settings(hdr, path), band=_read_band(hdr, path),
                meta={k.lower(): hdr[k] for k in hdr if k not in _OWN_KEYWORDS and k})


def _check_format(hdul: fits.HDUList, hdr: fits.Header, path: Path) -> None:
    """That the file is a clone of a format this version reads, with its LINES and WING tables."""
    if hdr.get("BLFORMAT") != FORMAT_NAME:
        raise CloneFileError(f"{path} is a FITS file but not a blase_specutils clone (no BLFORMAT={FORMAT_NAME!r})")
    version = _header_number(hdr, "BLFMTVER", path, error=CloneFileError, integer=True, default=0)
    if version > FORMAT_VERSION:
        raise CloneFileError(f"{path} was written by a newer blase_specutils (format {version}); "
                             "upgrade blase_specutils to read it")
    for ext in ("LINES", "WING"):
        if ext not in hdul or not isinstance(hdul[ext], fits.BinTableHDU):
            raise CloneFileError(f"{path}: the {ext} table is missing; the file is damaged or was not "
                                 "written by blase_specutils; write it again from the original")


def _column(data, ext: str, name: str, path: Path):
    """Column ``name`` of table ``ext``, or a CloneFileError naming it."""
    names = [] if data is None else list(data.columns.names)
    if name not in names:
        raise CloneFileError(f"{path}: column {ext}.{name} is missing; the file is damaged or was not "
                             "written by blase_specutils; write it again from the original")
    return data[name]


def _read_lines(data, path: Path, nlines: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The LINES table: [centres, ln a, ln σ, ln γ] and the residual pass of each line."""
    said = " (the header's NLINES)"
    lam = _checked_array(_column(data, "LINES", "lam_center", path), path, "LINES.lam_center", error=CloneFileError,
                         positive=True, size=nlines, size_source=said)
    logs = [_checked_array(_column(data, "LINES", c, path), path, f"LINES.{c}", error=CloneFileError,
                           log_limit=LOG_PARAMETER_LIMIT, size=nlines, size_source=said)
            for c in ("log_amp", "log_sigma", "log_gamma")]
    names = [] if data is None else list(data.columns.names)
    line_pass = (_checked_array(data["residual_pass"], path, "LINES.residual_pass", error=CloneFileError,
                                integer=True, minimum=0, size=nlines)
                 if "residual_pass" in names else np.zeros(nlines, dtype=np.int64))
    return [lam, *logs], line_pass


def _read_wing(data, path: Path, nlines: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The WING table: the broad lines' indices (distinct, in range) and their three wing parameters."""
    if data is None or len(data) == 0:
        return np.zeros(0, np.int64), [np.zeros(0)] * 3
    broad = _checked_array(_column(data, "WING", "line", path), path, "WING.line", error=CloneFileError,
                           integer=True, minimum=0)
    if broad.size and broad.max() >= nlines:
        raise CloneFileError(f"{path}: WING.line holds line index {int(broad.max())}, but the clone has "
                             f"{nlines} lines (indices 0-{nlines - 1}); the file is damaged")
    if np.unique(broad).size != broad.size:
        raise CloneFileError(f"{path}: WING.line lists a line twice; the file is damaged")
    wing = [_checked_array(_column(data, "WING", c, path), path, f"WING.{c}", error=CloneFileError,
                           log_limit=LOG_PARAMETER_LIMIT, size=broad.size)
            for c in ("alpha", "log_lt", "log_b")]
    return broad, wing


def _read_target(data, path: Path) -> Spectrum:
    """The TARGET table as a Spectrum: increasing wavelengths, finite flux at the good pixels."""
    good_raw = np.asarray(_column(data, "TARGET", "good", path))
    if good_raw.dtype.kind != "b":
        raise CloneFileError(f"{path}: TARGET.good must be a logical column (T/F), got {good_raw.dtype}")
    good = good_raw.astype(bool)
    wl = _checked_array(_column(data, "TARGET", "wavelength", path), path, "TARGET.wavelength",
                        error=CloneFileError, positive=True, size=good.size)
    if wl.size > 1 and not np.all(np.diff(wl) > 0):
        raise CloneFileError(f"{path}: TARGET.wavelength must be strictly increasing; the file is damaged")
    flux = _checked_array(_column(data, "TARGET", "flux", path), path, "TARGET.flux", error=CloneFileError,
                          finite=False, size=good.size)
    if not np.all(np.isfinite(flux[good])):
        raise CloneFileError(f"{path}: TARGET.flux is not finite at pixels marked good; the file is damaged")
    return Spectrum(spectral_axis=wl * u.AA, flux=flux * u.dimensionless_unscaled, mask=~good)


def _read_model_settings(hdr: fits.Header, path: Path) -> dict:
    """The keywords of :class:`LineCloneModel` stored in the header, each checked."""
    E = CloneFileError
    settings = dict(mode=_header_choice(hdr, "MODE", path, ("linear", "log"), error=E),
                    profile=_header_choice(hdr, "PROFILE", path, tuple(PROFILES), error=E),
                    emission=_header_bool(hdr, "EMISSION", path, error=E),
                    wing_tolerance=_header_number(hdr, "WINGTOL", path, error=E, positive=True))
    if not settings["wing_tolerance"] < 1.0:
        raise CloneFileError(f"{path}: WINGTOL must be in (0, 1), got {settings['wing_tolerance']!r}")
    settings["far_field"] = _header_bool(hdr, "FARFIELD", path, error=E, default=True)
    tune_raw = hdr.get("TUNE", "")
    if not isinstance(tune_raw, str):
        raise CloneFileError(f"{path}: TUNE must be a string of names such as 'amplitude,sigma', got {tune_raw!r}")
    settings["tune"] = [t for t in tune_raw.split(",") if t]
    unknown = [t for t in settings["tune"] if t not in TUNABLE]
    if unknown:
        raise CloneFileError(f"{path}: TUNE names unknown parameters {unknown}; known: {list(TUNABLE)}")
    return settings


def _read_band(hdr: fits.Header, path: Path) -> tuple[float, float] | None:
    """BANDLO and BANDHI (Å, lower first), or None when the file has no band."""
    if "BANDLO" not in hdr and "BANDHI" not in hdr:
        return None
    band = (_header_number(hdr, "BANDLO", path, error=CloneFileError, positive=True),
            _header_number(hdr, "BANDHI", path, error=CloneFileError, positive=True))
    if not band[0] < band[1]:
        raise CloneFileError(f"{path}: BANDLO ({band[0]}) must be below BANDHI ({band[1]})")
    return band


def _build_model(parts: dict, path: Path, device: torch.device) -> LineCloneModel:
    """The line model of the parts read, its wing parameters copied in."""
    try:
        model = LineCloneModel(*parts["columns"], broad_lines=parts["broad"].tolist(), device=device,
                               **parts["model"])
    except ValueError as err:
        raise CloneFileError(f"{path}: the line parameters do not make a clone ({err}); the file is damaged") from err
    wing = parts["wing"]
    with torch.no_grad():
        model.wing_alpha.copy_(torch.as_tensor(wing[0]))
        model.wing_log_lt.copy_(torch.as_tensor(wing[1]))
        model.wing_log_b.copy_(torch.as_tensor(wing[2]))
    return model
