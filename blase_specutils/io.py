"""Reading spectra from files: anything specutils reads, plus simple wavelength/flux tables."""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Callable, Sequence

import astropy.units as u
import numpy as np
from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty
from specutils import Spectrum

from .constants import LOG_PARAMETER_LIMIT, PLAUSIBLE_ANGSTROM  # noqa: F401 (re-exported)
from .spectra import to_vacuum

__all__ = ["read_spectrum", "read_orders", "is_goldilocks", "is_igrins_plp", "read_igrins_plp", "atomic_write", "SavedFileError",
           "LOG_PARAMETER_LIMIT"]

_WAVE_NAMES = ("wavelength", "wave", "lambda", "wl", "wave_ang", "wavelength_a", "spectral_axis")
_FLUX_NAMES = ("flux", "transmission", "intensity")
_UNC_NAMES = ("uncertainty", "error", "err", "sigma", "flux_err", "flux_error")
_VAR_NAMES = ("variance", "var", "flux_var", "flux_variance")
_IVAR_NAMES = ("ivar", "inverse_variance", "invvar", "flux_ivar")


# ------------------------------------------------------------------------------------ saving
def atomic_write(path: str | Path, write: Callable[[Path], object], *, overwrite: bool = False) -> Path:
    """Write a file so that it is either the complete new file or untouched.

    ``write`` writes to a temporary file in the same folder (``.<name>.<random>.tmp<suffix>``),
    which is then flushed to disk and moved onto ``path`` with :func:`os.replace` (atomic on
    POSIX and Windows). If ``write`` fails or is interrupted (disk full, file-size limit,
    Ctrl-C), the temporary file is removed and a previous file at ``path`` is left as it was.

    Parameters
    ----------
    path : str or Path
        The file to write.
    write : callable
        ``write(tmp_path)`` writes the whole file to ``tmp_path`` (which does not exist yet), e.g.
        ``lambda p: hdul.writeto(p)``.
    overwrite : bool
        Replace an existing file at ``path``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False (an ``OSError``).
    FileNotFoundError
        The folder of ``path`` does not exist.
    Exception
        Whatever ``write`` raised (after the temporary file was removed).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} to write {path.name} into; create it first")
    tmp = folder / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}"
    try:
        write(tmp)
        if not tmp.is_file():
            raise OSError(f"the writer of {path.name} did not write its temporary file {tmp.name}")
        with open(tmp, "rb+") as fh:  # on disk before it replaces the old file
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


# ------------------------------------------------------------------------------ loading checks
class SavedFileError(ValueError):
    """A file written by blase_specutils (a posterior, a fit) that cannot be read: corrupt,
    truncated, or with a field whose value cannot be right. The message names the file and the
    field; ``path`` and ``field`` hold them."""

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.field = field


# LOG_PARAMETER_LIMIT (the largest |ln x| the loaders accept for ln a, ln σ, ln γ and the wing
# parameters) and PLAUSIBLE_ANGSTROM live in constants.py; imported above, and kept importable from here.

_REMEDY = "the file is damaged or was not written by blase_specutils; write it again from the original"


def _bad(error: type, path, field: str, problem: str):
    """An ``error`` naming the file and the field (raise it)."""
    msg = f"{path}: {field} {problem}; {_REMEDY}"
    try:
        return error(msg, path=path, field=field)
    except TypeError:  # an error class without path/field keywords (CloneFileError)
        return error(msg)


def _checked_array(values, path, field: str, *, error: type = SavedFileError, finite: bool = True,
                   log_limit: float | None = None, positive: bool = False, minimum: float | None = None,
                   integer: bool = False, size: int | None = None, size_source: str = "") -> np.ndarray:
    """``values`` as a 1-D float64 (or int64) array, checked; ``error`` naming file and field otherwise."""
    try:
        arr = np.asarray(values)
        if arr.dtype.kind not in "biuf":
            raise TypeError
        arr = arr.astype(np.int64 if integer else np.float64).ravel()
    except (TypeError, ValueError):
        raise _bad(error, path, field, f"is not numeric (got {type(values).__name__})") from None
    if size is not None and arr.size != size:
        raise _bad(error, path, field, f"holds {arr.size} values where {size} are expected{size_source}")
    if finite and not integer:
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise _bad(error, path, field, f"has non-finite values (NaN or inf) at {bad.size} entries, first at {int(bad[0])}")
    if positive:
        bad = np.flatnonzero(~(arr > 0))
        if bad.size:
            raise _bad(error, path, field, f"must be > 0 but has {arr[bad[0]]:.6g} at entry {int(bad[0])}")
    if minimum is not None:
        bad = np.flatnonzero(arr < minimum)
        if bad.size:
            raise _bad(error, path, field, f"must be >= {minimum:g} but has {arr[bad[0]]:.6g} at entry {int(bad[0])}")
    if log_limit is not None:
        bad = np.flatnonzero(np.abs(arr) > log_limit)
        if bad.size:
            raise _bad(error, path, field,
                       f"is a natural log and must lie within ±{log_limit:g} (e^±{log_limit:g}), but has "
                       f"{arr[bad[0]]:.6g} at entry {int(bad[0])}")
    return arr


def _header_bool(header, key: str, path, *, error: type = SavedFileError, default: bool | None = None) -> bool:
    """A FITS logical (T/F) keyword; a string such as ``'F'`` or a number is refused."""
    if key not in header:
        if default is None:
            raise _bad(error, path, key, "is missing from the primary header")
        return default
    value = header[key]
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(error, path, key, f"must be a FITS logical (T or F), got {value!r} ({type(value).__name__})")
    return bool(value)


def _header_number(header, key: str, path, *, error: type = SavedFileError, integer: bool = False,
                   positive: bool = False, default=None):
    """A finite numeric FITS keyword (not a logical, not a string)."""
    if key not in header:
        if default is None:
            raise _bad(error, path, key, "is missing from the primary header")
        return default
    value = header[key]
    ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, (bool, np.bool_)) or not ok:
        raise _bad(error, path, key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    value = int(value) if integer else float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        raise _bad(error, path, key, f"must be finite{' and > 0' if positive else ''}, got {value!r}")
    return value


def _header_choice(header, key: str, path, choices, *, error: type = SavedFileError) -> str:
    """A string FITS keyword that must be one of ``choices``."""
    if key not in header:
        raise _bad(error, path, key, "is missing from the primary header")
    value = header[key]
    if not isinstance(value, str) or value not in choices:
        raise _bad(error, path, key, f"must be one of {sorted(choices)}, got {value!r}")
    return value


def _column(table, names):
    lower = {c.lower(): c for c in table.colnames}
    for n in names:
        if n in lower:
            return lower[n]
    return None


#: Units that wavelength numbers may be in, tried in this order to name the likely one.
_UNIT_GUESSES = (("µm", u.um), ("nm", u.nm), ("m", u.m), ("cm", u.cm), ("mm", u.mm), ("Hz", u.Hz), ("GHz", u.GHz))


def _check_assumed_angstrom(wl: np.ndarray, path) -> None:
    """ValueError when the numbers of a wavelength column without a unit are implausible as Å."""
    lo, hi = float(np.nanmin(wl)), float(np.nanmax(wl))
    low, high = PLAUSIBLE_ANGSTROM
    if low <= lo and hi <= high:
        return
    mid = float(np.nanmedian(wl))
    looks = [name for name, unit in _UNIT_GUESSES
             if mid > 0 and 1e3 <= (mid * unit).to_value(u.AA, equivalencies=u.spectral()) <= 1e6]
    raise ValueError(
        f"the wavelength column of {Path(path).name} has no unit, so its numbers ({lo:.6g}-{hi:.6g}) are read as "
        f"Å, which is implausible ({f'below {low:g}' if lo < low else f'above {high:,.0f}'} Å); they look like "
        f"{' or '.join(looks) or 'another unit'}. State the unit in the file: a unitless column is taken as Å, so "
        "give the wavelength column its unit in an ECSV file or a FITS table (TUNITn), e.g. "
        "QTable({'wavelength': wl * u.um, 'flux': flux}).write('spectrum.ecsv')"
    )


def read_spectrum(path: str | Path, *, air: bool | None = None, format: str | None = None,
                  columns: dict | None = None) -> Spectrum:
    """Read a 1-D spectrum from ``path``, with vacuum wavelengths.

    First asks specutils (``Spectrum.read``, all its registered formats). If that fails, or if
    it left out an uncertainty column the file has (specutils keeps one only in exactly the flux's
    unit), reads the file as a table (FITS binary table, ECSV, CSV, ...) with a wavelength column
    (``wavelength``, ``wave``, ``lambda``…), a flux column (``flux``, ``transmission``) and an
    optional uncertainty column: 1-σ (``uncertainty``, ``error``, ``sigma``…), variance
    (``variance``, ``var``) or inverse variance (``ivar``, ``inverse_variance``). An uncertainty
    column in another unit than the flux (mJy for a Jy flux, a variance in Jy²) is converted to
    the flux's unit; one that does not convert is refused. A wavelength column without a unit is
    taken to be in Å, with a warning; where its numbers cannot be Å (below 100 or above 1e7), a
    ValueError names the unit they look like and how to state it.

    Air wavelengths are converted to vacuum once, here, by :func:`~blase_specutils.spectra.to_vacuum`
    (Morton 2000 refractive index of standard air): where the file says air (a FITS WCS
    ``CTYPE1 = 'AWAV'``, a header keyword ``AIRORVAC = 'air'`` or logical ``AIR = T``), or where
    ``air=True``. The result's ``meta['blase_specutils_wavelength_frame']`` says which it was.

    Parameters
    ----------
    path : str or Path
        The file.
    air : bool or None
        None (default): air or vacuum as the file says (vacuum where it says nothing). True: the
        file's wavelengths are in air, convert them. False: they are in vacuum, whatever the file
        says.
    format : str, optional
        A specutils reader (e.g. ``"tabular-fits"``, ``"wcs1d-fits"``, ``"SDSS-III/IV spec"``;
        ``specutils.Spectrum.read.list_formats()`` lists them) passed to ``Spectrum.read`` as
        ``format=``: that reader alone is used, and its error is the error.
    columns : dict, optional
        Column names of a table, for tables whose names the reader does not guess: keys
        ``"wavelength"``, ``"flux"`` and one of ``"uncertainty"`` (1 σ), ``"variance"``,
        ``"ivar"``, e.g. ``{"wavelength": "LAMBDA_VAC", "flux": "F"}``. The table is then read
        with astropy (``QTable.read``, with ``format`` if given) rather than specutils.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Nothing could read it as a spectrum; the reader named by ``format`` failed; a column named
        in ``columns`` is missing; a FITS image without a spectral WCS (its pixel numbers would be
        read as wavelengths); an IGRINS PLP file (several orders: use :func:`read_orders`); an
        uncertainty column whose unit does not convert to the flux's; or a file that says both
        air and vacuum while ``air`` is None.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if columns is not None:
        return to_vacuum(_spectrum_from_named_columns(path, columns, format), air)
    if format is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spec = Spectrum.read(path, format=format)
        except Exception as err:  # the named reader's own error, whatever its type
            raise ValueError(f"could not read {path} with the specutils reader format={format!r}: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
        if not (isinstance(spec, Spectrum) and spec.flux.ndim == 1):
            raise ValueError(f"the specutils reader format={format!r} read {path.name} but not as one 1-D spectrum")
        _refuse_pixel_axis(spec, path)
        return to_vacuum(spec, air)
    if is_igrins_plp(path):
        raise ValueError(f"{path.name} is an IGRINS PLP file of several orders; read it with read_orders (or "
                         "read_igrins_plp) and pick orders")
    errors = []
    spec = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = Spectrum.read(path)
        if not (isinstance(spec, Spectrum) and spec.flux.ndim == 1):
            errors.append("specutils read it but not as a single 1-D spectrum")
            spec = None
    except Exception as err:  # specutils raises many types for formats it does not know
        errors.append(f"specutils: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if spec is not None:
        _refuse_pixel_axis(spec, path)
        if spec.uncertainty is None:  # specutils drops an uncertainty column in another unit than the flux
            table = _try_table(path)
            if table is not None and _uncertainty_column(table)[0] is not None \
                    and _column(table, _WAVE_NAMES) is not None and _column(table, _FLUX_NAMES) is not None:
                return to_vacuum(_spectrum_from_table(table, path, errors), air)
        return to_vacuum(spec, air)
    from astropy.table import QTable

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)
            table = QTable.read(path)
    except Exception as err:
        errors.append(f"as a table: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        raise ValueError(f"could not read {path} as a spectrum ({'; '.join(errors)})") from err
    return to_vacuum(_spectrum_from_table(table, path, errors), air)


def _try_table(path: Path):
    """The file as a QTable, or None."""
    from astropy.table import QTable

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return QTable.read(path)
    except Exception:  # not a table: specutils' reading stands
        return None


def _refuse_pixel_axis(spec: Spectrum, path: Path) -> None:
    """ValueError for a spectrum whose spectral axis is its pixel numbers (a FITS image without a
    spectral WCS, which specutils reads with the pixel numbers as Å)."""
    axis = spec.spectral_axis
    vals = np.asarray(axis.value, dtype=np.float64)
    n = vals.size
    pixels = axis.unit == u.pix or (n > 1 and any(np.array_equal(vals, np.arange(n) + o) for o in (0, 1)))
    header = (spec.meta or {}).get("header") if hasattr(spec.meta, "get") else None
    try:
        solution = header is not None and any(k in header for k in ("CRVAL1", "CDELT1", "CD1_1"))
    except Exception:  # a header that cannot be searched: judge by the axis alone
        solution = False
    if pixels and not solution:
        raise ValueError(
            f"{path.name} has no spectral WCS (no CRVAL1/CDELT1 wavelength solution), so its spectral axis would be "
            f"the pixel numbers {vals[0]:g}..{vals[-1]:g} read as {axis.unit}. Give the file its wavelength solution "
            "(FITS keywords CTYPE1 = 'WAVE' for vacuum or 'AWAV' for air, CUNIT1, CRVAL1, CDELT1, CRPIX1), or write "
            "it as a table with a wavelength column"
        )


def _uncertainty_column(table) -> tuple[str | None, int]:
    """The uncertainty column and its power of the flux: 1 (σ), 2 (variance), -2 (inverse variance)."""
    for names, power in ((_UNC_NAMES, 1), (_VAR_NAMES, 2), (_IVAR_NAMES, -2)):
        col = _column(table, names)
        if col is not None:
            return col, power
    return None, 1


def _spectrum_from_named_columns(path: Path, columns: dict, format: str | None) -> Spectrum:
    """A Spectrum from a table whose wavelength, flux and uncertainty columns the user named."""
    from astropy.table import QTable

    if not isinstance(columns, dict):
        raise TypeError(f"columns must be a dict such as {{'wavelength': 'WAVE', 'flux': 'FLUX'}}, got "
                        f"{type(columns).__name__}")
    known = {"wavelength", "flux", "uncertainty", "variance", "ivar"}
    unknown = sorted(set(columns) - known)
    if unknown or not {"wavelength", "flux"} <= set(columns):
        raise ValueError(f"columns needs 'wavelength' and 'flux' and may have one of 'uncertainty', 'variance', "
                         f"'ivar'; got keys {sorted(columns)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)
            table = QTable.read(path, **({} if format is None else {"format": format}))
    except Exception as err:
        raise ValueError(f"could not read {path} as a table: {str(err).splitlines()[0] if str(err) else err}") from err
    missing = [c for c in columns.values() if c not in table.colnames]
    if missing:
        raise ValueError(f"columns {missing} named in columns= are not in {path.name}; it has {table.colnames}")
    named = [k for k in ("uncertainty", "variance", "ivar") if k in columns]
    if len(named) > 1:
        raise ValueError(f"name one uncertainty column (uncertainty, variance or ivar), got {named}")
    unc = (columns[named[0]], {"uncertainty": 1, "variance": 2, "ivar": -2}[named[0]]) if named else (None, 1)
    return _spectrum_from_table(table, path, [], wave=columns["wavelength"], flux=columns["flux"], unc=unc)


def _spectrum_from_table(table, path: Path, errors: list, *, wave: str | None = None, flux: str | None = None,
                         unc: tuple | None = None) -> Spectrum:
    """A Spectrum from a table with named wavelength, flux and (optional) uncertainty columns
    (found by their usual names, or as given)."""
    wcol = wave if wave is not None else _column(table, _WAVE_NAMES)
    fcol = flux if flux is not None else _column(table, _FLUX_NAMES)
    ucol, power = unc if unc is not None else _uncertainty_column(table)
    if wcol is None or fcol is None:
        raise ValueError(
            f"could not read {path} as a spectrum ({'; '.join(errors)}); as a table it has columns "
            f"{table.colnames} but no wavelength and flux columns"
        )
    wave = table[wcol]
    if not isinstance(wave, u.Quantity) or wave.unit is None or wave.unit == u.dimensionless_unscaled:
        wave = np.asarray(wave, dtype=np.float64) * u.AA
        _check_assumed_angstrom(wave.value, path)
        warnings.warn(f"column {wcol!r} of {path.name} has no unit; assuming Å", UserWarning, stacklevel=3)
    flux = table[fcol]
    if not isinstance(flux, u.Quantity):
        flux = np.asarray(flux, dtype=np.float64) * u.dimensionless_unscaled
    kw = {}
    if ucol is not None:
        kw["uncertainty"] = _uncertainty_in_flux_unit(table[ucol], power, flux.unit, ucol, path)
    meta = {"file": str(path)}
    if table.meta:
        meta["header"] = dict(table.meta)
    return Spectrum(spectral_axis=u.Quantity(wave, dtype=np.float64), flux=u.Quantity(flux, dtype=np.float64),
                    meta=meta, **kw)


def _uncertainty_in_flux_unit(column, power: int, flux_unit, name: str, path: Path):
    """The uncertainty column as an astropy uncertainty in the flux's unit (converted where its
    own unit differs; a column without a unit is taken to be in the flux's unit)."""
    cls = {1: StdDevUncertainty, 2: VarianceUncertainty, -2: InverseVariance}[power]
    values = np.array(getattr(column, "value", column), dtype=np.float64)
    unit = getattr(column, "unit", None)
    if unit is not None and unit != u.dimensionless_unscaled:
        want = u.Unit(flux_unit) ** power
        try:
            values = values * float(u.Unit(unit).to(want))
        except u.UnitConversionError as err:
            what = {1: "1-σ uncertainty", 2: "variance", -2: "inverse variance"}[power]
            raise ValueError(
                f"the {what} column {name!r} of {path.name} is in {unit}, which does not convert to "
                f"{want if want != u.dimensionless_unscaled else 'the unit of the flux'} (the flux is in "
                f"{flux_unit if flux_unit != u.dimensionless_unscaled else 'no unit'}); give the column in the flux's "
                f"unit{'' if power == 1 else ' to the power ' + str(power)}, or give the flux its unit"
            ) from err
    return cls(values)


def is_igrins_plp(path: str | Path) -> bool:
    """True when ``path`` is an IGRINS PLP ``.spec_a0v.fits`` product (a ``WAVELENGTH`` image and
    the PLP's spectrum extensions, :data:`IGRINS_PLP_EXTENSIONS`)."""
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            names = {h.name.upper() for h in hdul}
    except (OSError, ValueError):
        return False
    return "WAVELENGTH" in names and bool(names & set(IGRINS_PLP_EXTENSIONS))


def is_goldilocks(path: str | Path) -> bool:
    """True when ``path`` is an HPF Goldilocks-pipeline product (it has a ``SCI FLUX`` extension)."""
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            return any(h.name.upper() == "SCI FLUX" for h in hdul)
    except (OSError, ValueError):
        return False


def read_orders(path: str | Path, orders: Sequence[int] | None = None, *, reduce: bool = True,
                air: bool | None = None, format: str | None = None, columns: dict | None = None,
                extension: str = "TGT_SPEC") -> list[Spectrum]:
    """Read the échelle orders of a file as a list of spectra.

    An HPF Goldilocks file is read with muler (``HPFSpectrumList``) and, with ``reduce=True``,
    each order goes through muler's ``remove_nans().deblaze().normalize()``; an IGRINS PLP
    ``.spec_a0v.fits`` file (the older layout muler cannot read) with :func:`read_igrins_plp`
    (``extension``; the target's variance from the ``.variance.fits`` beside it, for
    ``extension="TGT_SPEC"``); any other file is read with :func:`read_spectrum` (``format``,
    ``columns``) and counts as one order.

    Order numbers are the file's own: rows of the Goldilocks arrays (muler's ``order``) or of the
    IGRINS images (``meta['order']``), returned in the sequence asked for (all: the file's
    sequence for Goldilocks, ascending wavelength for IGRINS).

    Parameters
    ----------
    path : str or Path
        The file.
    orders : sequence of int, optional
        Indices of the orders to return (default: all), in the order given.
    reduce : bool
        Apply muler's standard reduction chain to Goldilocks orders.
    air : bool or None
        Air or vacuum wavelengths, as in :func:`read_spectrum` (None: as the file says; vacuum
        where it says nothing, as HPF Goldilocks and IGRINS PLP files are). Each order goes through
        :func:`~blase_specutils.spectra.to_vacuum`, which records the frame in its ``meta``.
    format, columns
        For single-spectrum files, passed to :func:`read_spectrum`.
    extension : str
        The spectrum of an IGRINS PLP file: ``"TGT_SPEC"`` (default: the target as observed, with
        its variance), ``"A0V_SPEC"`` (the A0V telluric standard), ``"SPEC_DIVIDE_A0V"``, ...

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file cannot be read, or an order index does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if is_goldilocks(path):
        from muler.hpf import HPFSpectrumList

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                raw = HPFSpectrumList.read(str(path))
            except Exception as err:  # muler raises whatever astropy raises on a damaged file
                raise ValueError(f"could not read {path} as an HPF Goldilocks file: {err}") from err
        picked = range(len(raw)) if orders is None else list(orders)
        bad = [o for o in picked if not 0 <= int(o) < len(raw)]
        if bad:
            raise ValueError(f"orders {bad} do not exist; {path.name} has orders 0-{len(raw) - 1}")
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for o in picked:
                s = raw[int(o)]
                out.append(to_vacuum(s.remove_nans().deblaze().normalize() if reduce else s, air))
        return out
    if format is None and columns is None and is_igrins_plp(path):
        var = path.with_name(path.name.replace(".spec_a0v.fits", ".variance.fits"))
        picked = read_igrins_plp(path, extension=extension, orders=orders,
                                 variance=var if var != path and var.exists() else None)
        if orders is not None:  # the sequence asked for, not wavelength order
            by_row = {s.meta["order"]: s for s in picked}
            picked = [by_row[int(o)] for o in orders]
        return [to_vacuum(s, air) for s in picked]
    spectra = [read_spectrum(path, air=air, format=format, columns=columns)]
    if orders is not None:
        bad = [o for o in orders if int(o) != 0]
        if bad:
            raise ValueError(f"orders {bad} do not exist; {path.name} holds a single spectrum (order 0)")
    return spectra


#: Image extensions of the older IGRINS PLP ``.spec_a0v.fits`` product.
IGRINS_PLP_EXTENSIONS = ("SPEC_DIVIDE_A0V", "TGT_SPEC", "A0V_SPEC", "VEGA_SPEC", "SPEC_DIVIDE_CONT")


def read_igrins_plp(
    path: str | Path,
    *,
    extension: str = "A0V_SPEC",
    variance: str | Path | None = None,
    orders: Sequence[int] | None = None,
) -> list[Spectrum]:
    """Read the orders of an IGRINS PLP ``.spec_a0v.fits`` file (the older layout muler cannot read).

    The file holds 28 orders × 2048 pixels in image extensions ``SPEC_DIVIDE_A0V``, ``TGT_SPEC``,
    ``A0V_SPEC`` (the A0V telluric standard), ``VEGA_SPEC`` and ``SPEC_DIVIDE_CONT``, and the
    wavelengths (µm) in ``WAVELENGTH``. Orders come back with ascending wavelength in µm, in
    ascending wavelength order, with NaN pixels masked. Their ``meta`` holds the primary FITS
    header (``meta['header']``: time, target and site for the barycentric correction) and says
    that they are as recorded (``meta['blase_specutils_frame'] = 'observatory'``), so a fit takes
    them in the observatory frame by default; the PLP wavelengths are vacuum.

    Parameters
    ----------
    path : str or Path
        The ``.spec_a0v.fits`` file.
    extension : str
        Which spectrum to read (default the A0V standard).
    variance : str or Path, optional
        The matching ``.variance.fits`` file; it is the variance of ``TGT_SPEC``, so it is only used
        (as a ``VarianceUncertainty``) when ``extension="TGT_SPEC"``.
    orders : sequence of int, optional
        Indices (into the file's rows) to return; default all.

    Raises
    ------
    FileNotFoundError, ValueError
    """
    from astropy.io import fits
    from astropy.nddata import VarianceUncertainty

    from .frames import FRAME_KEY

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    ext = extension.upper()
    if ext not in IGRINS_PLP_EXTENSIONS:
        raise ValueError(f"unknown extension {extension!r}; choose one of {IGRINS_PLP_EXTENSIONS}")
    with fits.open(path) as hdul:
        names = [h.name.upper() for h in hdul]
        if "WAVELENGTH" not in names or (ext not in names and not (ext == "SPEC_DIVIDE_A0V" and names[0] == "SPEC_DIVIDE_A0V")):
            raise ValueError(f"{path.name} is not an IGRINS PLP .spec_a0v file (extensions {names})")
        flux = np.asarray(hdul[ext].data, dtype=np.float64)
        wave = np.asarray(hdul["WAVELENGTH"].data, dtype=np.float64)
        obj = hdul[0].header.get("OBJECT", "")
        header = hdul[0].header.copy()
    var = None
    if variance is not None and ext == "TGT_SPEC":
        with fits.open(variance) as hv:
            var = np.asarray(hv[0].data, dtype=np.float64)
        if var.shape != flux.shape:
            raise ValueError(f"variance shape {var.shape} does not match the spectra {flux.shape}")
    if flux.shape != wave.shape or flux.ndim != 2:
        raise ValueError(f"flux {flux.shape} and wavelength {wave.shape} extensions do not match")
    rows = range(flux.shape[0]) if orders is None else [int(o) for o in orders]
    bad = [o for o in rows if not 0 <= o < flux.shape[0]]
    if bad:
        raise ValueError(f"orders {bad} do not exist; {path.name} has orders 0-{flux.shape[0] - 1}")
    out = []
    for o in rows:
        w, f = wave[o], flux[o]
        srt = np.argsort(w)
        kw = {}
        if var is not None:
            kw["uncertainty"] = VarianceUncertainty(var[o][srt])
        mask = ~np.isfinite(f[srt]) | (~np.isfinite(var[o][srt]) if var is not None else False)
        out.append(Spectrum(spectral_axis=w[srt] * u.um, flux=np.where(mask, np.nan, f[srt]) * u.dimensionless_unscaled,
                            mask=mask, meta={"file": str(path), "order": o, "extension": ext, "object": obj,
                                             "header": header, FRAME_KEY: "observatory"}, **kw))
    out.sort(key=lambda s: float(s.spectral_axis[0].value))
    return out
