"""Reading spectra from files: anything specutils reads, plus simple wavelength/flux tables."""

from __future__ import annotations

import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.nddata import StdDevUncertainty
from specutils import Spectrum

__all__ = ["read_spectrum"]

_WAVE_NAMES = ("wavelength", "wave", "lambda", "wl", "wave_ang", "wavelength_a", "spectral_axis")
_FLUX_NAMES = ("flux", "transmission", "intensity")
_UNC_NAMES = ("uncertainty", "error", "err", "sigma", "flux_err", "flux_error")


def _column(table, names):
    lower = {c.lower(): c for c in table.colnames}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def read_spectrum(path: str | Path) -> Spectrum:
    """Read a 1-D spectrum from ``path``.

    First asks specutils (``Spectrum.read``, all its registered formats). If that fails, reads
    the file as a table (FITS binary table, ECSV, CSV, ...) with a wavelength column
    (``wavelength``, ``wave``, ``lambda``…), a flux column (``flux``, ``transmission``) and an
    optional uncertainty column (``uncertainty``, ``error``, ``sigma``). A wavelength column
    without a unit is taken to be in Å, with a warning.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Nothing could read it as a spectrum.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    errors = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = Spectrum.read(path)
        if isinstance(spec, Spectrum) and spec.flux.ndim == 1:
            return spec
        errors.append("specutils read it but not as a single 1-D spectrum")
    except Exception as err:  # specutils raises many types for formats it does not know
        errors.append(f"specutils: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    from astropy.table import QTable

    try:
        table = QTable.read(path)
    except Exception as err:
        errors.append(f"as a table: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        raise ValueError(f"could not read {path} as a spectrum ({'; '.join(errors)})") from err
    wcol, fcol, ucol = _column(table, _WAVE_NAMES), _column(table, _FLUX_NAMES), _column(table, _UNC_NAMES)
    if wcol is None or fcol is None:
        raise ValueError(
            f"could not read {path} as a spectrum ({'; '.join(errors)}); as a table it has columns "
            f"{table.colnames} but no wavelength and flux columns"
        )
    wave = table[wcol]
    if not isinstance(wave, u.Quantity) or wave.unit is None or wave.unit == u.dimensionless_unscaled:
        warnings.warn(f"column {wcol!r} of {path.name} has no unit; assuming Å", UserWarning, stacklevel=2)
        wave = np.asarray(wave, dtype=np.float64) * u.AA
    flux = table[fcol]
    if not isinstance(flux, u.Quantity):
        flux = np.asarray(flux, dtype=np.float64) * u.dimensionless_unscaled
    kw = {}
    if ucol is not None:
        unc = table[ucol]
        kw["uncertainty"] = StdDevUncertainty(np.asarray(getattr(unc, "value", unc), dtype=np.float64))
    return Spectrum(spectral_axis=u.Quantity(wave, dtype=np.float64), flux=u.Quantity(flux, dtype=np.float64),
                    meta={"file": str(path)}, **kw)
