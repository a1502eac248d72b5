"""Reading spectra from files: anything specutils reads, plus simple wavelength/flux tables."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import astropy.units as u
import numpy as np
from astropy.nddata import StdDevUncertainty
from specutils import Spectrum

__all__ = ["read_spectrum", "read_orders", "is_goldilocks", "read_igrins_plp"]

_WAVE_NAMES = ("wavelength", "wave", "lambda", "wl", "wave_ang", "wavelength_a", "spectral_axis")
_FLUX_NAMES = ("flux", "transmission", "intensity")
_UNC_NAMES = ("uncertainty", "error", "err", "sigma", "flux_err", "flux_error")


def _column(table, names):
    lower = {c.lower(): c for c in table.colnames}
    for n in names:
        if n in lower:
            return lower[n]
    return None


#: Wavelengths (Å) that a table whose wavelength column has no unit may plausibly hold; the reader
#: assumes Å, so numbers outside this range are in another unit (µm, m, Hz, ...).
PLAUSIBLE_ANGSTROM = (100.0, 1e7)

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


def read_spectrum(path: str | Path) -> Spectrum:
    """Read a 1-D spectrum from ``path``.

    First asks specutils (``Spectrum.read``, all its registered formats). If that fails, reads
    the file as a table (FITS binary table, ECSV, CSV, ...) with a wavelength column
    (``wavelength``, ``wave``, ``lambda``…), a flux column (``flux``, ``transmission``) and an
    optional uncertainty column (``uncertainty``, ``error``, ``sigma``). A wavelength column
    without a unit is taken to be in Å, with a warning; where its numbers cannot be Å (below 100 or
    above 1e7), a ValueError names the unit they look like and how to state it.

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
        wave = np.asarray(wave, dtype=np.float64) * u.AA
        _check_assumed_angstrom(wave.value, path)
        warnings.warn(f"column {wcol!r} of {path.name} has no unit; assuming Å", UserWarning, stacklevel=2)
    flux = table[fcol]
    if not isinstance(flux, u.Quantity):
        flux = np.asarray(flux, dtype=np.float64) * u.dimensionless_unscaled
    kw = {}
    if ucol is not None:
        unc = table[ucol]
        kw["uncertainty"] = StdDevUncertainty(np.asarray(getattr(unc, "value", unc), dtype=np.float64))
    return Spectrum(spectral_axis=u.Quantity(wave, dtype=np.float64), flux=u.Quantity(flux, dtype=np.float64),
                    meta={"file": str(path)}, **kw)


def is_goldilocks(path: str | Path) -> bool:
    """True when ``path`` is an HPF Goldilocks-pipeline product (it has a ``SCI FLUX`` extension)."""
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            return any(h.name.upper() == "SCI FLUX" for h in hdul)
    except (OSError, ValueError):
        return False


def read_orders(path: str | Path, orders: Sequence[int] | None = None, *, reduce: bool = True) -> list[Spectrum]:
    """Read the échelle orders of a file as a list of spectra.

    An HPF Goldilocks file is read with muler (``HPFSpectrumList``) and, with ``reduce=True``,
    each order goes through muler's ``remove_nans().deblaze().normalize()``; any other file is
    read with :func:`read_spectrum` and counts as one order.

    Parameters
    ----------
    path : str or Path
        The file.
    orders : sequence of int, optional
        Indices of the orders to return (default: all), in the order given.
    reduce : bool
        Apply muler's standard reduction chain to Goldilocks orders.

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
                out.append(s.remove_nans().deblaze().normalize() if reduce else s)
        return out
    spectra = [read_spectrum(path)]
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
    ascending wavelength order, with NaN pixels masked.

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
                            mask=mask, meta={"file": str(path), "order": o, "extension": ext, "object": obj}, **kw))
    out.sort(key=lambda s: float(s.spectral_axis[0].value))
    return out
