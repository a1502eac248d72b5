"""Clones from line tables: the inverse of :attr:`SpectralClone.lines`, and how a user starts from a
native line list (paper Appendix C.5)."""

from __future__ import annotations

import astropy.units as u
import numpy as np

from .constants import LOG_PARAMETER_LIMIT

__all__ = ["clone_from_table", "REQUIRED_COLUMNS"]

#: Columns a line table must have (with length units; ``center`` may be any spectral unit).
REQUIRED_COLUMNS = ("center", "amplitude", "sigma", "gamma")


def _column_angstrom(table, name: str, *, spectral: bool = False) -> np.ndarray:
    col = table[name]
    if not isinstance(col, u.Quantity) or col.unit is None or col.unit == u.dimensionless_unscaled:
        raise u.UnitsError(f"line table column {name!r} needs a unit (e.g. u.AA), got a column without one")
    try:
        values = col.to_value(u.AA, equivalencies=u.spectral() if spectral else [])
    except u.UnitConversionError as err:
        raise u.UnitsError(f"line table column {name!r} is in {col.unit}, which is not "
                           f"{'a spectral unit' if spectral else 'a length'}") from err
    values = np.asarray(values, dtype=np.float64).ravel()
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
        raise ValueError(f"line table column {name!r} must be finite and > 0; row {int(bad[0])} holds "
                         f"{values[bad[0]]!r}")
    return values


def clone_from_table(cls, table, *, mode: str | None = None, profile: str | None = None,
                     emission: bool | None = None, tune=("amplitude", "sigma", "gamma"), band=None,
                     meta: dict | None = None, device: str = "cpu"):
    """A :class:`~blase_specutils.SpectralClone` from a line table (see
    :meth:`SpectralClone.from_table`)."""
    from astropy.table import Table

    from .core.clone import LineCloneModel
    from .core.training import resolve_device
    from .preprocessing import _as_band

    if not isinstance(table, Table):
        raise TypeError(f"table must be an astropy QTable (e.g. clone.lines), got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise ValueError(f"the line table lacks column(s) {missing}; it needs {list(REQUIRED_COLUMNS)} with units, "
                         f"has {table.colnames}")
    if len(table) == 0:
        raise ValueError("the line table has no rows")
    centers = _column_angstrom(table, "center", spectral=True)
    amp, sig, gam = (_column_angstrom(table, c) for c in ("amplitude", "sigma", "gamma"))
    logs = [np.log(x) for x in (amp, sig, gam)]
    for name, x in zip(("amplitude", "sigma", "gamma"), logs):
        bad = np.flatnonzero(np.abs(x) > LOG_PARAMETER_LIMIT)
        if bad.size:
            raise ValueError(f"line table column {name!r} row {int(bad[0])}: {np.exp(x[bad[0]]):.3g} Å is beyond "
                             f"e^±{LOG_PARAMETER_LIMIT:g} Å, not a line of a real spectrum")
    order = np.argsort(centers, kind="stable")
    broad = []
    if "broad" in table.colnames:
        flags = np.asarray(table["broad"])
        if flags.dtype.kind != "b":
            raise TypeError(f"line table column 'broad' must be boolean, got {flags.dtype}")
        broad = np.flatnonzero(flags[order]).tolist()
    line_pass = None
    if "residual_pass" in table.colnames:
        line_pass = np.asarray(table["residual_pass"], dtype=np.int64)[order]
        if np.any(line_pass < 0):
            raise ValueError("line table column 'residual_pass' must be >= 0")
    tmeta = dict(table.meta or {})
    mode = tmeta.get("mode", "linear") if mode is None else mode
    profile = tmeta.get("profile", "pseudo-voigt") if profile is None else profile
    emission = bool(tmeta.get("emission", False)) if emission is None else emission
    model = LineCloneModel(centers[order], logs[0][order], logs[1][order], logs[2][order], mode=mode, profile=profile,
                           emission=bool(emission), tune=tune, broad_lines=broad, device=resolve_device(device))
    b = _as_band(band) if band is not None else None
    return cls(model, band=b, meta=dict({"source": "line table"}, **(meta or {})), line_pass=line_pass)
