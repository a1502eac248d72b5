"""How closely a clone follows the spectrum it was trained on: residual, RMS, fidelity, weakest windows.

:class:`CloneDiagnostics` is a mixin of :class:`~blase_specutils.SpectralClone`: every method
compares the clone with its stored preprocessed spectrum (``target``).
"""

from __future__ import annotations

import astropy.units as u
import numpy as np
from astropy.table import QTable
from specutils import Spectrum

from .core.training import check_integer
from .preprocessing import _as_band, _buffer_angstrom
from .spectra import arrays_to_spectrum, spectrum_to_arrays, wavelength_to_angstrom

__all__ = ["CloneDiagnostics"]


class CloneDiagnostics:
    """The residual S − S_clone of a clone against its ``target`` and the numbers read off it.

    Needs ``target``, ``band``, ``line_pass``, ``model``, ``lines`` and ``_eval_angstrom`` of the
    class it is mixed into.
    """

    def _target_arrays(self):
        if self.target is None:
            raise ValueError("this clone was not trained on a stored spectrum (loaded without one)")
        return spectrum_to_arrays(self.target)

    def _target_arrays_all(self) -> tuple[np.ndarray, np.ndarray]:
        if self.target is None:
            raise ValueError("this clone was not trained on a stored spectrum (loaded without one)")
        wl = wavelength_to_angstrom(self.target.spectral_axis, "spectral_axis")
        flux = np.asarray(self.target.flux.value, dtype=np.float64)
        order = np.argsort(wl, kind="stable")
        return wl[order], flux[order]

    @property
    def residual(self) -> Spectrum:
        """Residual R = S - S_clone on the native grid, as a Spectrum (masked pixels masked)."""
        arr = self._target_arrays()
        model = self._eval_angstrom(arr.wavelength, False, None)
        return arrays_to_spectrum(arr.wavelength, arr.flux - model, mask=~arr.good, like=self.target)

    def rms_residual(self, band: tuple | u.Quantity | None = None) -> float:
        """Root-mean-square of S - S_clone over the usable pixels inside ``band`` (default: the
        clone's band of interest, or all pixels)."""
        arr = self._target_arrays()
        model = self._eval_angstrom(arr.wavelength, False, None)
        sel = arr.good.copy()
        b = _as_band(band) if band is not None else self.band
        if b is not None:
            sel &= (arr.wavelength >= b[0]) & (arr.wavelength <= b[1])
        if not sel.any():
            raise ValueError("no usable pixels inside the band")
        r = arr.flux[sel] - model[sel]
        return float(np.sqrt(np.mean(r * r)))

    def _band_residual(self, band) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
        """Wavelengths and S − S_clone at every pixel of ``band`` with a finite flux (masked ones too)."""
        wl, flux = self._target_arrays_all()
        model = self._eval_angstrom(wl, False, None)
        b = _as_band(band) if band is not None else self.band
        sel = np.isfinite(flux)
        if b is not None:
            sel &= (wl >= b[0]) & (wl <= b[1])
        if not sel.any():
            raise ValueError("no pixels inside the band")
        return wl[sel], (flux - model)[sel], b

    def fidelity(self, band: tuple | u.Quantity | None = None) -> dict:
        """How closely the clone follows the spectrum it was trained on, over every pixel of ``band``.

        The residual S − S_clone is taken against the preprocessed spectrum S (the input after the
        blackbody division and the continuum polynomial P that :func:`clone_spectrum` applied),
        at every pixel with a finite flux, masked pixels included, so that neither masking nor the
        loss weights can move the numbers.

        Parameters
        ----------
        band : (Quantity, Quantity), optional
            Default: the clone's band of interest (or every pixel).

        Returns
        -------
        dict
            ``rms``, ``p99`` (99th percentile of abs(S − S_clone)) and ``max`` (dimensionless, in
            units of the continuum), ``n_pixels``, and ``band`` (Å, or None).
        """
        _, r, b = self._band_residual(band)
        a = np.abs(r)
        return {"rms": float(np.sqrt(np.mean(r * r))), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
                "n_pixels": int(a.size), "band": None if b is None else (float(b[0]), float(b[1]))}

    def worst_windows(self, n: int = 10, *, width: u.Quantity = 20 * u.AA, band=None) -> QTable:
        """Where the clone is weakest: the ``n`` windows of the band with the largest RMS residual.

        The band (default: the clone's band of interest) is tiled with adjacent windows of
        ``width``; each is scored by the RMS of S − S_clone over all of its pixels.

        Parameters
        ----------
        n : int
            Number of windows returned (fewer if the band holds fewer).
        width : Quantity
            Window width (default 20 Å, the width of a zoomed plot panel).
        band : (Quantity, Quantity), optional

        Returns
        -------
        QTable
            One row per window, worst first: ``start``, ``end`` (Å), ``rms``, ``max_abs`` (of
            S − S_clone), ``n_lines`` (lines centred inside), ``n_added`` (of which added from the
            residual), ``deepest_line`` (centre of the deepest line inside, Å; NaN if none), and
            ``line_indices`` (rows of :attr:`lines` inside the window).
        """
        n = check_integer(n, "n", minimum=1)
        w = _buffer_angstrom(width)
        if w <= 0:
            raise ValueError("width must be > 0")
        wl, r, _ = self._band_residual(band)
        edges = np.arange(wl[0], wl[-1] + w, w)
        which = np.clip(np.searchsorted(edges, wl, side="right") - 1, 0, edges.size - 2)
        sumsq = np.bincount(which, weights=r * r, minlength=edges.size - 1)
        count = np.bincount(which, minlength=edges.size - 1)
        peak = np.zeros(edges.size - 1)
        np.maximum.at(peak, which, np.abs(r))
        filled = np.flatnonzero(count > 0)
        rms = np.sqrt(sumsq[filled] / count[filled])
        worst = filled[np.argsort(rms)[::-1][:n]]
        centres = self.model.lam_centers.detach().cpu().numpy()
        depth = np.asarray(self.lines["depth"]) if self.n_lines else np.zeros(0)
        rows = []
        for k in worst:
            lo, hi = edges[k], min(edges[k + 1], wl[-1])
            idx = np.flatnonzero((centres >= lo) & (centres < hi))
            deepest = float(centres[idx[np.argmax(depth[idx])]]) if idx.size else np.nan
            rows.append((lo, hi, np.sqrt(sumsq[k] / count[k]), peak[k], idx.size,
                         int(np.count_nonzero(self.line_pass[idx])), deepest, idx))
        return _windows_table(rows)


def _windows_table(rows: list[tuple]) -> QTable:
    """The rows of :meth:`CloneDiagnostics.worst_windows` as a table with units."""
    t = QTable()
    t["start"] = np.array([x[0] for x in rows]) * u.AA
    t["end"] = np.array([x[1] for x in rows]) * u.AA
    t["rms"] = np.array([x[2] for x in rows])
    t["max_abs"] = np.array([x[3] for x in rows])
    t["n_lines"] = np.array([x[4] for x in rows], dtype=np.int64)
    t["n_added"] = np.array([x[5] for x in rows], dtype=np.int64)
    t["deepest_line"] = np.array([x[6] for x in rows]) * u.AA
    col = np.empty(len(rows), dtype=object)
    col[:] = [x[7] for x in rows]
    t["line_indices"] = col
    return t
