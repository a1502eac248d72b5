"""Clone a precomputed spectrum given as a specutils ``Spectrum``: the user-facing layer."""

from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits
from astropy.table import QTable
from specutils import Spectrum

from . import __version__ as _version
from .core.clone import TUNABLE, LineCloneModel
from .core.detection import find_lines, residual_lines
from .core.profiles import PROFILES, profile_fwhm, pseudo_voigt_eta, pseudo_voigt_fwhm
from .core.training import (TrainingHistory, check_integer, check_real, resolve_device, seed_everything, train,
                             use_plans)
from .io import LOG_PARAMETER_LIMIT, _checked_array, _header_bool, _header_choice, _header_number, atomic_write
from .preprocessing import (DEFAULT_BUFFER, _as_band, _buffer_angstrom, _teff_kelvin, _velocity_kms, divide_blackbody,
                            flatten_continuum, trim)
from .spectra import arrays_to_spectrum, spectrum_to_arrays, to_vacuum, wavelength_to_angstrom

__all__ = ["CloneFileError", "SpectralClone", "clone_spectrum", "load_blase03", "EdgeWingWarning", "FORMAT_NAME", "FORMAT_VERSION"]

#: Identifier written into the FITS primary header of saved clones.
FORMAT_NAME = "BLASE-SPECUTILS-CLONE"
#: Version of the saved-clone layout.
FORMAT_VERSION = 1


class CloneFileError(ValueError):
    """A clone file that cannot be read: corrupt, truncated, or not a clone."""


class SpectralClone:
    """A tuned clone of a spectrum: N_lines line profiles you can evaluate anywhere.

    Do not build it by hand: use :func:`clone_spectrum`, :meth:`load`, or :func:`load_blase03`.

    Attributes
    ----------
    model : blase_specutils.core.LineCloneModel
        The torch module holding the line parameters.
    target : Spectrum or None
        The preprocessed (continuum-normalised) spectrum S the clone was trained on.
    band : (float, float) or None
        Region of interest in Å (the clone covers it ± the buffer).
    history : TrainingHistory or None
        Loss history of the training.
    meta : dict
        Settings used (prominence, Teff, ...).
    line_pass : ndarray of int
        Per line: 0 if found by the first detection, k if added from the residual by pass k.
    passes : list of dict
        One entry per training stage of :func:`clone_spectrum`: lines ``added``, ``lines`` in
        all, ``epochs`` run, and the ``rms`` residual after it (empty for loaded clones).
    pseudo_continuum : Spectrum or None
        With ``clone_spectrum(..., likelihood="gp")``: the GP's conditional mean of S − S_clone,
        the inferred pseudo-continuum error of the preprocessed spectrum (not saved to FITS;
        the GP's amplitude and length scale are, in ``meta``).
    engine : dict
        What computes the clone: backend, device and dtype (:meth:`LineCloneModel.engine_info`).
        A saved clone records the backend in its header (``ENGINE``); a loaded clone has it in
        ``meta["engine"]``.
    """

    def __init__(
        self,
        model: LineCloneModel,
        *,
        target: Spectrum | None = None,
        band: tuple[float, float] | None = None,
        history: TrainingHistory | None = None,
        meta: dict | None = None,
        pseudo_continuum: Spectrum | None = None,
        line_pass: np.ndarray | None = None,
        passes: list | None = None,
    ) -> None:
        self.model = model
        if line_pass is None:
            line_pass = np.zeros(model.n_lines, dtype=np.int64)
        line_pass = np.asarray(line_pass, dtype=np.int64)
        if line_pass.shape != (model.n_lines,):
            raise ValueError(f"line_pass must hold one entry per line ({model.n_lines}), got shape {line_pass.shape}")
        self.line_pass = line_pass
        self.passes = list(passes or [])
        self.target = target
        self.band = band
        self.history = history
        self.meta = dict(meta or {})
        self.pseudo_continuum = pseudo_continuum

    @classmethod
    def from_table(cls, table, *, mode: str | None = None, profile: str | None = None, emission: bool | None = None,
                   tune=("amplitude", "sigma", "gamma"), band=None, meta: dict | None = None,
                   device: str = "cpu") -> "SpectralClone":
        """A clone from a line table: the inverse of :attr:`lines`, and a start from a native line
        list (paper Appendix C.5).

        Parameters
        ----------
        table : astropy.table.QTable
            Columns ``center`` (any spectral unit), ``amplitude`` a (the line area, Å, in linear
            mode; a in Å⁻¹·Å of the log mode's optical depth), ``sigma`` and ``gamma`` (Å), all
            finite and > 0 within e^±45; optional ``broad`` (bool: the lines that get the Appendix
            C.4 wing correction, with its default parameters, which the table does not hold) and
            ``residual_pass``. Other columns (``fwhm``, ``depth``, ``equivalent_width``, ...) are
            derived and ignored. Rows need not be sorted.
        mode, profile, emission
            Default: the table's ``meta`` (as :attr:`lines` writes it), else ``"linear"``,
            ``"pseudo-voigt"``, absorption.
        tune : iterable of str
            Parameters to tune when the clone is trained further.
        band : (Quantity, Quantity), optional
            The band of interest.
        meta : dict, optional
            Metadata (``source`` defaults to ``"line table"``).
        device : str

        Raises
        ------
        TypeError, ValueError, astropy.units.UnitsError
            Not a table, a missing column, a column without a (convertible) unit, or a value that is
            not finite, not > 0 or beyond e^±45; the message names the column and the row.
        """
        from .line_tables import clone_from_table

        return clone_from_table(cls, table, mode=mode, profile=profile, emission=emission, tune=tune, band=band,
                                meta=meta, device=device)

    # ---------------------------------------------------------------- basic facts
    @property
    def n_lines(self) -> int:
        """Number of cloned lines."""
        return self.model.n_lines

    def __len__(self) -> int:
        return self.n_lines

    @property
    def engine(self) -> dict:
        """What computes the clone's lines: ``{"backend", "device", "dtype"}`` (JSON-ready)."""
        return self.model.engine_info()

    @property
    def instrument_resolution(self) -> bool:
        """True when the cloned spectrum already carried an instrument's line-spread function
        (``meta["lsf"] == "instrument"``, from the input spectrum's ``meta["lsf"]``; muler's TelFit
        HPF template is one): a fit then multiplies this clone in after the instrumental kernel
        instead of broadening its lines a second time. False: lines at the model's native
        resolution (the default, ``meta["lsf"] == "native"``)."""
        return str(self.meta.get("lsf", "native")).strip().lower() == "instrument"

    def __repr__(self) -> str:
        band = "" if self.band is None else f", band={self.band[0]:.1f}-{self.band[1]:.1f} Å"
        rms = ""
        if self.target is not None:
            rms = f", rms_residual={self.rms_residual():.4g}"
        return f"<SpectralClone n_lines={self.n_lines}, mode={self.model.mode!r}, profile={self.model.profile!r}{band}{rms}>"

    def to(self, device: str | torch.device) -> "SpectralClone":
        """Move the model to ``device`` ('cpu', 'cuda'); returns self for chaining."""
        self.model.to(resolve_device(device))
        return self

    # ---------------------------------------------------------------- evaluation
    def _axis(self, spectral_axis) -> tuple[np.ndarray, u.Quantity]:
        """The evaluation grid in Å, and a copy of the axis as given (its unit and order)."""
        if spectral_axis is None:
            if self.target is None:
                raise ValueError("this clone has no native grid stored; pass spectral_axis=...")
            spectral_axis = self.target.spectral_axis
        if isinstance(spectral_axis, Spectrum):
            spectral_axis = spectral_axis.spectral_axis
        if isinstance(spectral_axis, u.Quantity):
            spectral_axis = np.atleast_1d(u.Quantity(spectral_axis, copy=True))  # not a SpectralAxis
            if spectral_axis.ndim != 1:
                raise ValueError(f"spectral_axis must be 1-D, got shape {spectral_axis.shape}; "
                                 "evaluate one row at a time")
        wl = wavelength_to_angstrom(spectral_axis, "spectral_axis")
        if not np.all(np.isfinite(wl) & (wl > 0)):
            raise ValueError("spectral_axis must be finite, positive wavelengths (or frequencies, wavenumbers)")
        return wl, spectral_axis

    def _eval_angstrom(self, wl: np.ndarray, dense: bool, radial_velocity) -> np.ndarray:
        order = np.argsort(wl, kind="stable")
        ws = wl[order]
        if ws.size > 1 and np.any(np.diff(ws) == 0):
            raise ValueError("spectral_axis has duplicated values; remove them first")
        p = self.model.lam_centers
        rv = None if radial_velocity is None else _velocity_kms(radial_velocity, "radial_velocity")
        with torch.no_grad():
            f = self.model(torch.as_tensor(ws, dtype=p.dtype, device=p.device), rv, dense=dense)
        out = np.empty_like(ws)
        out[order] = f.cpu().numpy()
        return out

    def evaluate(
        self,
        spectral_axis: u.Quantity | Spectrum | None = None,
        *,
        dense: bool = False,
        radial_velocity: u.Quantity | float | None = None,
    ) -> Spectrum:
        """The clone S_clone as a Spectrum.

        Parameters
        ----------
        spectral_axis : Quantity or Spectrum, optional
            Where to evaluate: any spectral unit, either order. Default: the grid of the
            preprocessed spectrum it was trained on (``target``: Å, ascending).
        dense : bool
            Evaluate every line at every pixel (no windows; slow, exact reference).
        radial_velocity : Quantity or float (km/s), optional
            Doppler shift applied to every line centre.

        Returns
        -------
        Spectrum
            Dimensionless, continuum-normalised flux, on a copy of the axis given (the same values,
            unit and order, so ``spectrum / clone.evaluate(spectrum)`` works).

        Raises
        ------
        TypeError
            ``spectral_axis`` is not a Quantity or Spectrum, or ``radial_velocity`` not a number.
        ValueError
            ``spectral_axis`` is not 1-D or not finite, or has duplicated values;
            ``radial_velocity`` is not finite or not slower than light.
        astropy.units.UnitsError
            ``spectral_axis`` or ``radial_velocity`` has the wrong kind of unit.
        """
        wl, axis = self._axis(spectral_axis)
        flux = self._eval_angstrom(wl, dense, radial_velocity)
        return Spectrum(spectral_axis=axis, flux=flux * u.dimensionless_unscaled,
                        meta={"blase_specutils": "clone", "n_lines": self.n_lines})

    def _target_arrays(self):
        if self.target is None:
            raise ValueError("this clone was not trained on a stored spectrum (loaded without one)")
        return spectrum_to_arrays(self.target)

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
        t = self._target_arrays_all()
        wl, flux = t
        model = self._eval_angstrom(wl, False, None)
        b = _as_band(band) if band is not None else self.band
        sel = np.isfinite(flux)
        if b is not None:
            sel &= (wl >= b[0]) & (wl <= b[1])
        if not sel.any():
            raise ValueError("no pixels inside the band")
        return wl[sel], (flux - model)[sel], b

    def _target_arrays_all(self) -> tuple[np.ndarray, np.ndarray]:
        if self.target is None:
            raise ValueError("this clone was not trained on a stored spectrum (loaded without one)")
        wl = wavelength_to_angstrom(self.target.spectral_axis, "spectral_axis")
        flux = np.asarray(self.target.flux.value, dtype=np.float64)
        order = np.argsort(wl, kind="stable")
        return wl[order], flux[order]

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

    # ---------------------------------------------------------------- line table
    @property
    def lines(self) -> QTable:
        """The line table: one row per line, with units.

        Columns: ``center`` λc, ``amplitude`` a (line area), ``sigma`` σ, ``gamma`` γ,
        ``fwhm`` (the profile's true full width at half maximum), ``lorentz_fraction`` η, ``depth`` (single-line
        depth 1 - S at the centre), ``equivalent_width`` (of the line alone; equal to a in
        linear mode), ``broad`` (has the Appendix C.4 wing correction), and ``residual_pass``
        (0: found by the first detection; k: added from the residual by pass k).
        """
        m = self.model
        with torch.no_grad():
            c = m.lam_centers.detach().cpu().numpy()
            a = m.log_amplitudes.exp().cpu().numpy()
            s = m.log_sigmas.exp().cpu().numpy()
            g = m.log_gammas.exp().cpu().numpy()
            st, gt = torch.as_tensor(s), torch.as_tensor(g)
            fwhm = profile_fwhm(st, gt, m.profile).numpy()
            eta = pseudo_voigt_eta(st, gt).numpy()
            v0 = PROFILES[m.profile](torch.zeros(1, dtype=torch.float64), st, gt).numpy()
        ew = _equivalent_widths(a, s, g, m.mode, m.sign, m.profile)
        if m.mode == "linear":
            depth = m.sign * a * v0
        else:
            depth = 1.0 - np.exp(-m.sign * a * v0)
        broad = np.zeros(c.size, dtype=bool)
        broad[m.broad_lines.cpu().numpy()] = True
        t = QTable()
        t["center"] = c * u.AA
        t["amplitude"] = a * u.AA
        t["sigma"] = s * u.AA
        t["gamma"] = g * u.AA
        t["fwhm"] = fwhm * u.AA
        t["lorentz_fraction"] = eta
        t["depth"] = depth
        t["equivalent_width"] = ew * u.AA
        t["broad"] = broad
        t["residual_pass"] = self.line_pass
        t.meta.update({"mode": m.mode, "profile": m.profile, "emission": m.emission})
        return t

    # ---------------------------------------------------------------- plotting
    def plot(self, *, band=None, ax=None, fig=None, title: str | None = None, n_zoom: int = 3,
             zoom_width: u.Quantity = 20 * u.AA):
        """The whole band as a strip (spectrum, clone, residual) above zoomed panels of at most
        ``zoom_width`` on the weakest windows of :meth:`worst_windows` and on a typical one.

        The overview shades the five weakest windows (of the band of interest, or of ``band``) and the
        typical one; each zoom panel shows the
        native spectrum, the clone with its line centres ticked, and S − clone below, with the RMS
        of the window. Masked pixels (left out of the clone's loss) are marked in grey.

        Parameters
        ----------
        band : (Quantity, Quantity), optional
            Wavelength range to show (default: everything).
        ax : sequence of two matplotlib Axes, optional
            Draw only the overview (spectrum and clone, residual) into these two axes.
        fig : matplotlib.figure.Figure, optional
            Draw the overview and the zoom panels into this figure (cleared first); default: a new one.
        title : str, optional
        n_zoom : int
            Number of zoom panels (>= 0): the ``n_zoom - 1`` weakest windows and the median one
            (only the weakest when ``n_zoom`` is 1; none when 0).
        zoom_width : Quantity
            Width of each zoom panel (at most 20 Å; default 20 Å).

        Returns
        -------
        matplotlib.figure.Figure
        """
        import matplotlib.pyplot as plt

        n_zoom = check_integer(n_zoom, "n_zoom", minimum=0)
        width = _buffer_angstrom(zoom_width)
        if not 0 < width <= 20.0:
            raise ValueError(f"zoom_width must be > 0 and at most 20 Å, got {zoom_width}")
        arr = self._target_arrays()
        model = self._eval_angstrom(arr.wavelength, False, None)
        sel = np.ones(arr.wavelength.size, dtype=bool)
        if band is not None:
            lo, hi = _as_band(band)
            sel = (arr.wavelength >= lo) & (arr.wavelength <= hi)
        w = arr.wavelength[sel]
        zooms = self._zoom_windows(band, n_zoom, width) if ax is None and w.size > 1 else []
        if ax is None:
            if fig is None:
                fig = plt.figure(figsize=(12, 7.5 if zooms else 5.5))
            else:
                fig.clear()
            outer = fig.add_gridspec(2 if zooms else 1, 1, height_ratios=[1.0, 1.05] if zooms else [1.0],
                                     hspace=0.35)
            top = outer[0].subgridspec(2, 1, height_ratios=[3, 1.3], hspace=0.05)
            ax = [fig.add_subplot(top[0])]
            ax.append(fig.add_subplot(top[1], sharex=ax[0]))
        else:
            fig = ax[0].figure
        resid = arr.flux - model
        ax[0].plot(w, arr.flux[sel], lw=0.6, color="k", label="native S")
        ax[0].plot(w, model[sel], lw=0.6, color="C1", label=f"clone ({self.n_lines} lines)")
        ax[0].set_ylabel("normalised flux")
        ax[0].tick_params(labelbottom=False)
        ax[1].plot(w, resid[sel], lw=0.5, color="C0")
        ax[1].axhline(0, color="0.5", lw=0.5)
        ax[1].set_ylabel("S − clone")
        ax[1].set_xlabel("wavelength (Å)")
        bad = sel & ~arr.good
        if bad.any():
            ax[0].plot(arr.wavelength[bad], arr.flux[bad], "|", color="0.6", ms=4, label="masked")
        rms = float(np.sqrt(np.nanmean((resid[sel & arr.good]) ** 2)))
        # over the plotted pixels (rms_residual() defaults to the band of interest, without the buffer)
        ax[1].text(0.01, 0.92, f"RMS {100 * rms:.3f} % over the plotted range", transform=ax[1].transAxes,
                   fontsize=8, va="top")
        try:  # shade the weakest windows (clone.worst_windows) inside the plotted range
            weak = self.worst_windows(5, band=band) if w.size > 1 else []  # tiled as the zoom panels
        except ValueError:
            weak = []
        for k, row in enumerate(weak):
            for a in ax:
                a.axvspan(row["start"].value, row["end"].value, color="C3", alpha=0.12, lw=0,
                          label="weakest windows" if (k == 0 and a is ax[0]) else None)
        for lo_z, hi_z, label in zooms:
            if label == "typical":
                for a in ax:
                    a.axvspan(lo_z, hi_z, color="C2", alpha=0.12, lw=0,
                              label="typical window" if a is ax[0] else None)
        ax[0].legend(loc="lower left", fontsize=8)
        if title:
            ax[0].set_title(title)
        if zooms:
            self._draw_zooms(fig, outer[1], zooms, arr, model)
        else:
            fig.tight_layout()
        return fig

    def _zoom_windows(self, band, n_zoom: int, width: float) -> list[tuple[float, float, str]]:
        """(start, end, label) of the zoom panels inside ``band`` (default: the band of interest, without
        the buffer): the weakest windows and a typical (median) one."""
        if n_zoom == 0:
            return []
        try:
            table = self.worst_windows(10_000, width=width * u.AA, band=band)
        except ValueError:
            return []
        rows = [(float(r["start"].value), float(r["end"].value)) for r in table]
        n_worst = n_zoom if n_zoom == 1 or len(rows) <= n_zoom else n_zoom - 1
        out = [(lo, hi, f"weakest {k + 1}") for k, (lo, hi) in enumerate(rows[:n_worst])]
        if n_worst < n_zoom and len(rows) > n_worst:
            lo, hi = rows[n_worst + (len(rows) - n_worst) // 2]
            out.append((lo, hi, "typical"))
        return out

    def _draw_zooms(self, fig, spec, zooms, arr, model) -> None:
        """Zoom panels (spectrum and clone over S − clone) in the gridspec cell ``spec``."""
        grid = spec.subgridspec(2, len(zooms), height_ratios=[3, 1.3], hspace=0.05, wspace=0.28)
        centres = self.model.lam_centers.detach().cpu().numpy()
        resid = arr.flux - model
        for k, (lo, hi, label) in enumerate(zooms):
            sel = (arr.wavelength >= lo) & (arr.wavelength <= hi)
            top = fig.add_subplot(grid[0, k])
            bottom = fig.add_subplot(grid[1, k], sharex=top)
            top.plot(arr.wavelength[sel], arr.flux[sel], lw=0.8, color="k")
            top.plot(arr.wavelength[sel], model[sel], lw=0.8, color="C1")
            inside = centres[(centres >= lo) & (centres <= hi)]
            if inside.size:
                ymin, ymax = top.get_ylim()
                top.vlines(inside, ymax - 0.06 * (ymax - ymin), ymax, color="C1", lw=0.6)
            bad = sel & ~arr.good
            if bad.any():
                top.plot(arr.wavelength[bad], arr.flux[bad], "|", color="0.6", ms=4)
            good = sel & arr.good
            rms = float(np.sqrt(np.mean(resid[good] ** 2))) if good.any() else float("nan")
            top.set_title(f"{label}: {lo:.0f}-{hi:.0f} Å, RMS {100 * rms:.2f} %, {inside.size} lines", fontsize=8)
            top.tick_params(labelbottom=False, labelsize=7)
            bottom.plot(arr.wavelength[sel], resid[sel], lw=0.6, color="C0")
            bottom.axhline(0, color="0.5", lw=0.5)
            bottom.tick_params(labelsize=7)
            bottom.set_xlabel("wavelength (Å)", fontsize=8)
            if k == 0:
                top.set_ylabel("flux", fontsize=8)
                bottom.set_ylabel("S − clone", fontsize=8)

    # ---------------------------------------------------------------- saving
    def save(self, path: str | Path, *, overwrite: bool = False, include_target: bool = True) -> Path:
        """Write the clone to a FITS file (no pickle).

        Layout: primary header with the settings (``BLFORMAT = 'BLASE-SPECUTILS-CLONE'``,
        ``BLFMTVER``, ``MODE``, ``PROFILE``, ``EMISSION``, ``WINGTOL``, ``TUNE``, ``ENGINE`` (the
        backend that computed the line sums; optional when loading), band, and the cloning
        settings); binary table ``LINES`` with float64 columns ``lam_center`` (Å),
        ``log_amp``, ``log_sigma``, ``log_gamma`` (natural logs of values in Å; no FITS unit) and ``residual_pass``
        (integer, see :attr:`line_pass`); table ``WING`` with
        ``line``, ``alpha``, ``log_lt``, ``log_b`` for broad lines; and, optionally, ``TARGET``
        with the preprocessed spectrum (``wavelength`` Å, ``flux``, ``good``). Float64 values
        round-trip exactly.

        The file is written to a temporary file in the same folder and moved onto ``path`` when
        complete (:func:`blase_specutils.io.atomic_write`): a write that fails (disk full,
        Ctrl-C) leaves a previous file at ``path`` as it was.

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is False.
        """
        path = Path(path)
        m = self.model
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
        hdr["ENGINE"] = (self.engine["backend"], "backend that computed the line sums")
        if self.band is not None:
            hdr["BANDLO"] = (self.band[0], "band of interest, Angstrom")
            hdr["BANDHI"] = (self.band[1], "band of interest, Angstrom")
        for k, v in self.meta.items():
            if isinstance(v, (bool, int, float, str)) and len(k) <= 8 and k.upper() != "ENGINE":
                hdr[k.upper()] = v
        cpu = lambda t: t.detach().cpu().numpy().astype(np.float64)  # noqa: E731
        lines = fits.BinTableHDU.from_columns(
            [
                fits.Column("lam_center", "D", unit="Angstrom", array=cpu(m.lam_centers)),
                fits.Column("log_amp", "D", array=cpu(m.log_amplitudes)),
                fits.Column("log_sigma", "D", array=cpu(m.log_sigmas)),
                fits.Column("log_gamma", "D", array=cpu(m.log_gammas)),
                fits.Column("residual_pass", "K", array=self.line_pass),
            ],
            name="LINES",
        )
        wing = fits.BinTableHDU.from_columns(
            [
                fits.Column("line", "K", array=m.broad_lines.cpu().numpy().astype(np.int64)),
                fits.Column("alpha", "D", array=cpu(m.wing_alpha)),
                fits.Column("log_lt", "D", array=cpu(m.wing_log_lt)),
                fits.Column("log_b", "D", array=cpu(m.wing_log_b)),
            ],
            name="WING",
        )
        hdus = [fits.PrimaryHDU(header=hdr), lines, wing]
        if include_target and self.target is not None:
            arr = spectrum_to_arrays(self.target)
            hdus.append(
                fits.BinTableHDU.from_columns(
                    [
                        fits.Column("wavelength", "D", unit="Angstrom", array=arr.wavelength),
                        fits.Column("flux", "D", array=np.where(arr.good, arr.flux, np.nan)),
                        fits.Column("good", "L", array=arr.good),
                    ],
                    name="TARGET",
                )
            )
        hdul = fits.HDUList(hdus)
        return atomic_write(path, lambda tmp: hdul.writeto(tmp), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "SpectralClone":
        """Read a clone written by :meth:`save`, checking every field it reads.

        Header values must have their FITS types (``EMISSION`` and ``FARFIELD`` logicals T/F, not
        strings; ``MODE``, ``PROFILE`` and ``TUNE`` known names; ``WINGTOL`` in (0, 1)); line
        centres finite and > 0 Å; ``log_amp``, ``log_sigma``, ``log_gamma`` and the wing's
        ``alpha``, ``log_lt``, ``log_b`` finite and within ±45 (e^±45, see
        :data:`blase_specutils.io.LOG_PARAMETER_LIMIT`); residual passes integers >= 0; broad-line
        indices distinct and in range; the target's wavelengths finite and increasing.

        Raises
        ------
        FileNotFoundError
            No such file.
        CloneFileError
            (a ValueError) The file is not a readable blase_specutils clone (corrupt, truncated,
            another format, or a field out of range); the message names the file and the field.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no clone file at {path}")
        E = CloneFileError
        try:
            with fits.open(path, memmap=False) as hdul:
                hdul.verify("exception")
                hdr = hdul[0].header
                if hdr.get("BLFORMAT") != FORMAT_NAME:
                    raise CloneFileError(f"{path} is a FITS file but not a blase_specutils clone (no BLFORMAT={FORMAT_NAME!r})")
                version = _header_number(hdr, "BLFMTVER", path, error=E, integer=True, default=0)
                if version > FORMAT_VERSION:
                    raise CloneFileError(f"{path} was written by a newer blase_specutils (format {version}); "
                                         "upgrade blase_specutils to read it")
                for ext in ("LINES", "WING"):
                    if ext not in hdul or not isinstance(hdul[ext], fits.BinTableHDU):
                        raise CloneFileError(f"{path}: the {ext} table is missing; the file is damaged or was not "
                                             "written by blase_specutils; write it again from the original")
                nlines = _header_number(hdr, "NLINES", path, error=E, integer=True)
                if nlines < 0:
                    raise CloneFileError(f"{path}: NLINES must be >= 0, got {nlines}")
                ld = hdul["LINES"].data
                lnames = [] if ld is None else list(ld.columns.names)

                def column(data, names, ext, name):
                    if name not in names:
                        raise CloneFileError(f"{path}: column {ext}.{name} is missing; the file is damaged or was not "
                                             "written by blase_specutils; write it again from the original")
                    return data[name]

                said = " (the header's NLINES)"
                lam = _checked_array(column(ld, lnames, "LINES", "lam_center"), path, "LINES.lam_center", error=E,
                                     positive=True, size=nlines, size_source=said)
                logs = [_checked_array(column(ld, lnames, "LINES", c), path, f"LINES.{c}", error=E,
                                       log_limit=LOG_PARAMETER_LIMIT, size=nlines, size_source=said)
                        for c in ("log_amp", "log_sigma", "log_gamma")]
                cols = [lam, *logs]
                line_pass = (_checked_array(ld["residual_pass"], path, "LINES.residual_pass", error=E, integer=True,
                                            minimum=0, size=nlines)
                             if "residual_pass" in lnames else np.zeros(nlines, dtype=np.int64))
                wd = hdul["WING"].data
                wnames = [] if wd is None else list(wd.columns.names)
                if wd is None or len(wd) == 0:
                    broad, wing = np.zeros(0, np.int64), [np.zeros(0)] * 3
                else:
                    broad = _checked_array(column(wd, wnames, "WING", "line"), path, "WING.line", error=E,
                                           integer=True, minimum=0)
                    if broad.size and broad.max() >= nlines:
                        raise CloneFileError(f"{path}: WING.line holds line index {int(broad.max())}, but the clone has "
                                             f"{nlines} lines (indices 0-{nlines - 1}); the file is damaged")
                    if np.unique(broad).size != broad.size:
                        raise CloneFileError(f"{path}: WING.line lists a line twice; the file is damaged")
                    wing = [_checked_array(column(wd, wnames, "WING", c), path, f"WING.{c}", error=E,
                                           log_limit=LOG_PARAMETER_LIMIT, size=broad.size)
                            for c in ("alpha", "log_lt", "log_b")]
                target = None
                if "TARGET" in hdul:
                    td = hdul["TARGET"].data
                    tnames = [] if td is None else list(td.columns.names)
                    good_raw = np.asarray(column(td, tnames, "TARGET", "good"))
                    if good_raw.dtype.kind != "b":
                        raise CloneFileError(f"{path}: TARGET.good must be a logical column (T/F), got {good_raw.dtype}")
                    good = good_raw.astype(bool)
                    twl = _checked_array(column(td, tnames, "TARGET", "wavelength"), path, "TARGET.wavelength",
                                         error=E, positive=True, size=good.size)
                    if twl.size > 1 and not np.all(np.diff(twl) > 0):
                        raise CloneFileError(f"{path}: TARGET.wavelength must be strictly increasing; the file is damaged")
                    tflux = _checked_array(column(td, tnames, "TARGET", "flux"), path, "TARGET.flux", error=E,
                                           finite=False, size=good.size)
                    if not np.all(np.isfinite(tflux[good])):
                        raise CloneFileError(f"{path}: TARGET.flux is not finite at pixels marked good; the file is damaged")
                    target = Spectrum(spectral_axis=twl * u.AA, flux=tflux * u.dimensionless_unscaled, mask=~good)
                mode = _header_choice(hdr, "MODE", path, ("linear", "log"), error=E)
                profile = _header_choice(hdr, "PROFILE", path, tuple(PROFILES), error=E)
                emission = _header_bool(hdr, "EMISSION", path, error=E)
                wingtol = _header_number(hdr, "WINGTOL", path, error=E, positive=True)
                if not wingtol < 1.0:
                    raise CloneFileError(f"{path}: WINGTOL must be in (0, 1), got {wingtol!r}")
                farfield = _header_bool(hdr, "FARFIELD", path, error=E, default=True)
                tune_raw = hdr.get("TUNE", "")
                if not isinstance(tune_raw, str):
                    raise CloneFileError(f"{path}: TUNE must be a string of names such as 'amplitude,sigma', got {tune_raw!r}")
                tune = [t for t in tune_raw.split(",") if t]
                unknown = [t for t in tune if t not in TUNABLE]
                if unknown:
                    raise CloneFileError(f"{path}: TUNE names unknown parameters {unknown}; known: {list(TUNABLE)}")
                band = None
                if "BANDLO" in hdr or "BANDHI" in hdr:
                    band = (_header_number(hdr, "BANDLO", path, error=E, positive=True),
                            _header_number(hdr, "BANDHI", path, error=E, positive=True))
                    if not band[0] < band[1]:
                        raise CloneFileError(f"{path}: BANDLO ({band[0]}) must be below BANDHI ({band[1]})")
                skip = {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "BLFORMAT", "BLFMTVER", "BLVERSN", "MODE",
                        "PROFILE", "EMISSION", "WINGTOL", "TUNE", "NLINES", "BANDLO", "BANDHI", "FARFIELD"}
                meta = {k.lower(): hdr[k] for k in hdr if k not in skip and k}
        except CloneFileError:
            raise
        except Exception as err:  # astropy/numpy raise many types for damaged files
            raise CloneFileError(f"could not read a clone from {path}: the file is corrupt or not a clone ({err})") from err
        dev = resolve_device(device)
        try:
            model = LineCloneModel(*cols, mode=mode, profile=profile, emission=emission, tune=tune,
                                   wing_tolerance=wingtol, far_field=farfield, broad_lines=broad.tolist(),
                                   device=dev)
        except ValueError as err:
            raise CloneFileError(f"{path}: the line parameters do not make a clone ({err}); the file is damaged") from err
        with torch.no_grad():
            model.wing_alpha.copy_(torch.as_tensor(wing[0]))
            model.wing_log_lt.copy_(torch.as_tensor(wing[1]))
            model.wing_log_b.copy_(torch.as_tensor(wing[2]))
        return cls(model, target=target, band=band, meta=meta, line_pass=line_pass)


def _equivalent_widths(a, s, g, mode, sign, profile) -> np.ndarray:
    """Single-line equivalent widths ∫(1 - S_line) dλ (Å)."""
    if mode == "linear":
        return sign * a
    # log mode: integrate 1 - exp(-aV) numerically on a per-line grid in units of the FWHM
    st, gt = torch.as_tensor(s), torch.as_tensor(g)
    fwhm = pseudo_voigt_fwhm(st, gt)
    u_ = torch.linspace(-60.0, 60.0, 4801, dtype=torch.float64)
    ew = np.empty(a.size)
    for i in range(0, a.size, 2048):
        sl = slice(i, i + 2048)
        x = u_[None, :] * fwhm[sl, None]
        v = PROFILES[profile](x, st[sl, None], gt[sl, None])
        integrand = -torch.expm1(-sign * torch.as_tensor(a[sl])[:, None] * v)
        body = torch.trapezoid(integrand, x, dim=1)
        # Lorentzian tails beyond ±60 FWHM (first order in a)
        eta = pseudo_voigt_eta(st[sl], gt[sl])
        tail = sign * torch.as_tensor(a[sl]) * eta * 2.0 / math.pi * torch.atan(gt[sl] / (60.0 * fwhm[sl]))
        ew[sl] = (body + tail).numpy()
    return ew


class EdgeWingWarning(UserWarning):
    """The spectrum ends inside the wing of a line whose centre is outside it."""


def _warn_if_edge_in_wing(arr, prominence: float, emission: bool, guess) -> None:
    n = max(5, arr.wavelength.size // 200)
    for side, sl in (("blue", slice(0, n)), ("red", slice(-n, None))):
        f = arr.flux[sl][arr.good[sl]]
        if f.size == 0:
            continue
        level = float(np.median(f))
        deficit = (level - 1.0) if emission else (1.0 - level)
        edge = arr.wavelength[0] if side == "blue" else arr.wavelength[-1]
        # a detected line whose core reaches the edge explains the deficit: nothing to warn about
        explained = np.any(np.abs(guess.lam_centers - edge) < 2.0 * guess.fwhm)
        if deficit > 2 * prominence and not explained:
            warnings.warn(
                f"the {side} end of the spectrum ({edge:.2f} Å) sits {100 * deficit:.1f} % off the continuum: "
                "it probably cuts through the wing of a broad line whose centre lies outside. That line cannot "
                "be cloned and the continuum there is unreliable; widen the band or the buffer to include it.",
                EdgeWingWarning,
                stacklevel=3,
            )


def _fill_gaps(wl: np.ndarray, flux: np.ndarray, good: np.ndarray) -> np.ndarray:
    if good.all():
        return flux
    return np.interp(wl, wl[good], flux[good])


def _lsf_kind(spectrum: Spectrum) -> str:
    """``"instrument"`` when the spectrum's ``meta["lsf"]`` says its lines carry an instrument's
    line-spread function, else ``"native"``; any other value is refused."""
    value = str((getattr(spectrum, "meta", None) or {}).get("lsf", "native")).strip().lower()
    if value not in ("native", "instrument"):
        raise ValueError(f"meta['lsf'] must be 'native' (lines at the model's own resolution) or 'instrument' "
                         f"(lines already broadened by an instrument's line-spread function), got {value!r}")
    return value


def clone_spectrum(
    spectrum: Spectrum,
    *,
    prominence: float = 0.01,
    band=None,
    buffer: u.Quantity = DEFAULT_BUFFER,
    teff: u.Quantity | float | None = None,
    flatten: bool = True,
    continuum_bins: int = 40,
    continuum_order: int = 3,
    mode: str = "linear",
    profile: str = "pseudo-voigt",
    emission: bool = False,
    tune: Iterable[str] = ("amplitude", "sigma", "gamma", "center"),
    n_broad: int | str = "auto",
    epochs: int = 800,
    lr: float = 0.05,
    patience: int | None = 50,
    wing_tolerance: float = 1e-7,
    train_tolerance: float = 1e-6,
    far_field: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    seed: int | None = 0,
    progress: bool = True,
    likelihood=None,
    plan: bool | str = "auto",
    residual_passes: int = 3,
    air: bool | None = None,
    powers: Sequence[float] | None = None,
) -> SpectralClone:
    """Clone a precomputed synthetic spectrum into tunable lines (paper Sections 2-3).

    Preprocess (Eq. 1: trim to ``band`` ± ``buffer``, divide by B(T_eff), flatten with a
    polynomial P), find lines by prominence, then tune ln a, ln σ, ln γ and λc with full-batch
    Adam to minimise Σ (S - S_clone)² over the usable pixels; then find the lines still missing
    in the residual, add them and tune again, while that pays (``residual_passes``).

    Parameters
    ----------
    spectrum : Spectrum
        Any 1-D spectrum (Å, nm, µm, wavenumber; ascending or descending; NaN/masked pixels are
        left out of the loss). Not modified.
    prominence : float
        Prom in (0, 1): lines shallower than this are not cloned.
    band : (Quantity, Quantity), optional
        Region of interest; the spectrum is trimmed to it ± ``buffer`` and lines are kept
        within it ± ``buffer``.
    buffer : Quantity
        Δλ_buffer (default 30 Å).
    teff : Quantity or float, optional
        Divide by a blackbody of this T_eff (K). Leave out for spectra that are not absolute
        fluxes (telluric transmission, already normalised spectra).
    flatten : bool
        Divide by a polynomial through the continuum peaks.
    continuum_bins, continuum_order : int
        Settings of that polynomial.
    mode : {"linear", "log"}
        Eq. 2 or Eq. A2 (log suits saturated telluric bands).
    profile : {"pseudo-voigt", "voigt"}
    emission : bool
        Clone emission lines instead of absorption lines.
    tune : iterable of str
        Parameters to tune (default ln a, ln σ, ln γ and λc; ``"wing"`` is added for broad lines).
        Centres are tuned by default: a detected minimum sits on the pixel grid and, in a blend,
        off the true centre of its strongest component; letting it move lowered the RMS residual
        of a line-rich 4250 K synthesis from 1.45 % to 1.26 % at equal epochs
        (``benchmarks/RESULTS.md``). Each centre moves at most lr/10 of a pixel per epoch.
    n_broad : int or "auto"
        Number of broadest lines that get the Appendix C.4 wing correction (auto: lines wider
        than 25× the median FWHM, at most 40). Their wing parameters are tuned.
    epochs, lr, patience : int, float, int
        Adam settings and early-stopping patience (epochs without 0.01 % improvement). ``epochs``
        is the budget of the whole run, residual passes included: the first stage gets a quarter
        of it but at least 100 epochs (all of it with ``residual_passes=0``), each pass an equal
        share of the rest but at least 50 (budgets under 150 run no pass), and epochs a stage
        leaves unused go to the next.
    wing_tolerance : float
        Truncation tolerance of the evaluated clone (per-line windows end where the line's
        windowed term falls below it).
    train_tolerance : float
        Looser tolerance used while training (speed); the result is evaluated with
        ``wing_tolerance``.
    far_field : bool
        Near-field/far-field split of the line wings (default; faster and more exact), or plain
        truncated windows.
    device : str
        'cpu', 'cuda', or 'auto'.
    dtype : torch.dtype
        torch.float64 (default) or torch.float32.
    seed : int or None
        Random seed (the method is deterministic given its inputs; the seed makes any randomness
        in torch reproducible).
    progress : bool
        Show a progress bar.
    likelihood : None, "gp" or dict
        None (default): minimise Σ (S − S_clone)². ``"gp"``: the Gaussian-process likelihood of
        Appendix C.2 (Eq. C4; needs ``pip install 'blase_specutils[gp]'``): the residual is a
        smooth GP over wavelength (the pseudo-continuum error left by the flattening) plus white
        noise, and the lines are tuned together with the GP's amplitude and length scale. A
        synthetic spectrum has no noise: the white-noise level ``noise`` = 0.005 (the typical
        clone residual) stands for what the lines cannot be asked to explain (lines below the
        prominence threshold, profile mismatch), so the GP takes only smooth structure above it.
        A dict sets options: ``"noise"`` and any keyword of
        :class:`blase_specutils.gp.GPContinuumLikelihood` (e.g. ``{"kernel": "rbf",
        "length_scale": 10.0}``; ``{"learn_noise_scale": True}`` tunes a factor on the noise,
        which then tends to hand line-scale residuals to the GP). The GP's conditional mean is
        returned as :attr:`SpectralClone.pseudo_continuum`.
    plan : bool or "auto"
        Train through a window plan of the clone (``LineCloneModel.make_plan``): on a GPU every
        epoch is then one replay of a CUDA graph (:func:`~blase_specutils.core.train` with
        ``plans``; not with a GP likelihood, whose epochs run eagerly). The result is that of
        training without a plan. ``"auto"``: on CUDA devices when the clone's
        ``EngineOptions.plans_on_cuda`` is set (off until this path has been timed on a GPU);
        never on CPUs, where a plan brings no speed.

    residual_passes : int
        Largest number of residual passes (paper Section 8.4, applied while cloning; default 3,
        0 turns them off). After each training stage, lines missing from the clone are found in
        the ratio S / S_clone at the same prominence Prom (blends merged by the first detection,
        shoulders, lines in the wings of others: :func:`~blase_specutils.core.detection.residual_lines`),
        added, and all lines are tuned again. Passes stop when the residual holds no line above
        Prom or after a pass that lowers the RMS residual by less than 5 % (a pass that does not
        lower it at all is undone). The line table's ``residual_pass`` column and
        :attr:`SpectralClone.passes` record what each pass added.
    air : bool or None
        Whether the spectrum's wavelengths are in air. None (default): as the spectrum says (a FITS
        WCS ``CTYPE1 = 'AWAV'``, ``AIRORVAC = 'air'`` in its header or ``meta``, ``meta['air']``;
        vacuum where nothing says air). True: in air, whatever it says; False: in vacuum. Air
        wavelengths are converted to vacuum first (:func:`~blase_specutils.spectra.to_vacuum`, the
        Morton 2000 refractive index of standard air), so the clone's centres are always vacuum
        wavelengths, like every template and clone of this package. A spectrum already converted
        by :func:`~blase_specutils.read_spectrum` is not converted twice.
    powers : sequence of float, optional
        Train the clone for :math:`S^X` at each of these powers X > 0 (Beer's law): the loss is
        :math:`\\sum_X \\sum_i (S_i^X - S_{\\mathrm{clone},i}^X)^2`. For telluric templates that a fit
        raises to a power (:func:`~blase_specutils.fit_spectrum` fits X): a clone trained on S alone
        is blind inside saturated bands, where S ≈ 0 whatever its depth, and the error shows when
        X ≪ 1 (a drier night than the template). On the PSG water column near 1.77 µm, the RMS error
        of :math:`S_\\mathrm{clone}^{0.04}` was 0.110 trained on S and 0.015 with
        ``powers=(0.02, 0.05, 0.15, 0.4, 1.0)``, at the same 0.0016 for X = 1. Log mode only (then
        :math:`S^X` of the clone is exactly a clone with X times the amplitudes). None (default):
        the loss on S alone. The line search and the residual passes still look at S.

    Returns
    -------
    SpectralClone
    """
    if not isinstance(spectrum, Spectrum):
        raise TypeError(f"expected a specutils Spectrum, got {type(spectrum).__name__}")
    spectrum = to_vacuum(spectrum, air)  # air wavelengths become vacuum once, here (the input is not modified)
    if not (isinstance(prominence, numbers.Real) and not isinstance(prominence, bool)
            and 0.0 < float(prominence) < 1.0):
        raise ValueError(f"prominence must be a number in (0, 1), got {prominence!r}")
    epochs = check_integer(epochs, "epochs", minimum=0)
    residual_passes = check_integer(residual_passes, "residual_passes", minimum=0)
    lr = check_real(lr, "lr", positive=True)
    wing_tolerance = check_real(wing_tolerance, "wing_tolerance", positive=True)
    train_tolerance = check_real(train_tolerance, "train_tolerance", positive=True)
    continuum_bins = check_integer(continuum_bins, "continuum_bins", minimum=1)
    continuum_order = check_integer(continuum_order, "continuum_order", minimum=0)
    if not (isinstance(n_broad, str) and n_broad == "auto"):
        try:
            n_broad = check_integer(n_broad, "n_broad", minimum=0)
        except TypeError:
            raise TypeError(f"n_broad must be 'auto' or an integer >= 0, got {n_broad!r}") from None
    tune = (tune,) if isinstance(tune, str) else tuple(tune)
    teff_k = _teff_kelvin(teff) if teff is not None else 0.0
    if mode not in ("linear", "log"):
        raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
    if powers is not None:
        powers = tuple(check_real(x, "powers", positive=True) for x in
                       ((powers,) if isinstance(powers, numbers.Real) else powers))
        if not powers:
            raise ValueError("powers must hold at least one power X > 0 (or be None)")
        if mode != "log":
            raise ValueError("powers= trains S^X, which is Beer's law only for a log-mode clone: pass mode='log'")
        if likelihood is not None:
            raise ValueError("powers= and likelihood= cannot be combined: the likelihood replaces the loss")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError("dtype must be torch.float32 or torch.float64")
    dev = resolve_device(device)
    want_plan = use_plans(plan, dev)
    seed_everything(seed)
    b = _as_band(band) if band is not None else None
    buf = _buffer_angstrom(buffer)
    spectrum_to_arrays(spectrum)  # validates units, NaNs, duplicates before any work
    s = trim(spectrum, band, buffer) if band is not None else spectrum
    if teff is not None:
        s = divide_blackbody(s, teff)
    if flatten:
        s = flatten_continuum(s, n_bins=continuum_bins, order=continuum_order)
    arr = spectrum_to_arrays(s)
    if arr.good.sum() < 3:
        raise ValueError("fewer than 3 usable pixels after preprocessing")
    target = arrays_to_spectrum(arr.wavelength, arr.flux, mask=~arr.good,
                                meta={"preprocessed": True})
    guess = find_lines(arr.wavelength, _fill_gaps(arr.wavelength, arr.flux, arr.good), float(prominence),
                       region=b, buffer=buf, mode=mode, emission=emission)
    _warn_if_edge_in_wing(arr, float(prominence), emission, guess)
    broad_fwhm = BROAD_FWHM_FACTOR * float(np.median(guess.fwhm))
    if n_broad == "auto":
        cand = np.flatnonzero(guess.fwhm > broad_fwhm)
        broad = cand[np.argsort(guess.fwhm[cand])[::-1][:40]]
    else:
        broad = np.argsort(guess.fwhm)[::-1][:n_broad]
    if len(broad) and "wing" not in tune:
        tune = tune + ("wing",)
    model = LineCloneModel(
        guess.lam_centers, guess.log_amplitudes, guess.log_sigmas, guess.log_gammas,
        mode=mode, profile=profile, emission=emission, tune=tune,
        wing_tolerance=train_tolerance, far_field=bool(far_field), broad_lines=np.sort(broad).tolist(),
        dtype=dtype, device=dev,
    )
    wl_t = torch.as_tensor(arr.wavelength, dtype=torch.float64, device=dev)  # grids stay float64
    flux_t = torch.as_tensor(np.where(arr.good, arr.flux, 1.0), dtype=dtype, device=dev)
    w_t = torch.as_tensor(arr.good, dtype=dtype, device=dev)
    lik, gp_noise = _clone_likelihood(likelihood, arr, dev)
    # centres move in Å: a step of lr/10 of the median pixel size, not lr in log units
    dlam = float(np.median(np.diff(arr.wavelength)))
    stage = _Stage(wl_t, flux_t, w_t, lik, want_plan, dict(lr=lr, patience=patience, progress=progress,
                                                            lr_overrides={"lam_centers": lr * dlam}), powers=powers)
    model, hist, line_pass, passes = _train_with_residual_passes(
        model, stage, arr, epochs=epochs, residual_passes=residual_passes, prominence=float(prominence),
        region=b, buffer=buf, max_fwhm=broad_fwhm)
    model.wing_tolerance = float(wing_tolerance)
    pseudo = None
    gp_meta = {}
    if lik is not None:
        with torch.no_grad():
            mean = lik.conditional_mean(flux_t - model(wl_t)).cpu().numpy()
            gp_meta = {"gpkernel": lik.kernel_name, "gpamp": float(lik.amplitude[0]),
                       "gplength": float(lik.length_scale[0]), "gpnoise": float(lik.noise_scale) * gp_noise}
        pseudo = arrays_to_spectrum(arr.wavelength, mean, meta={"blase_specutils": "pseudo-continuum"})
    meta = {
        "prom": float(prominence),
        "teff": teff_k,
        "buffer": buf,
        "flatten": bool(flatten),
        "epochs": hist.epochs_run,
        "lr": float(lr),
        "seconds": round(hist.seconds, 3),
        "stop": hist.stop_reason,
        "npasses": len(passes) - 1,
        "nadded": int(np.count_nonzero(line_pass)),
        "source": str(spectrum.meta.get("template", "")) if hasattr(spectrum, "meta") and spectrum.meta else "",
        "lsf": _lsf_kind(spectrum),
        **({"powers": ",".join(f"{x:g}" for x in powers)} if powers is not None else {}),
    } | gp_meta
    return SpectralClone(model, target=target, band=b, history=hist, meta=meta, pseudo_continuum=pseudo,
                         line_pass=line_pass, passes=passes)


class _Stage:
    """What every training stage of a cloning run shares: the data, the likelihood and the Adam settings."""

    def __init__(self, wl_t, flux_t, w_t, lik, want_plan: bool, train_kwargs: dict, powers=None) -> None:
        self.wl_t, self.flux_t, self.w_t, self.lik = wl_t, flux_t, w_t, lik
        self.want_plan = want_plan
        self.train_kwargs = train_kwargs
        self.powers = None if powers is None else tuple(float(x) for x in powers)
        if self.powers is not None:  # the targets S^X, from ln S (S = 0 counts as e^-690)
            log_s = torch.log(torch.clamp(flux_t, min=1e-300))
            self.power_targets = [torch.exp(x * log_s) for x in self.powers]

    def train(self, model: LineCloneModel, epochs: int, desc: str) -> TrainingHistory:
        """Tune ``model`` for at most ``epochs`` epochs (plateau rule as in :func:`clone_spectrum`)."""
        planned = model.make_plan(self.wl_t) if self.want_plan else None
        lik, wl_t, flux_t, w_t = self.lik, self.wl_t, self.flux_t, self.w_t

        def loss_fn():
            if lik is not None:
                return lik(flux_t - model(wl_t, plan=planned))
            if self.powers is not None:
                log_c = model.log_flux(wl_t, plan=planned)
                return sum((((torch.exp(x * log_c) - target) * w_t) ** 2).sum()
                           for x, target in zip(self.powers, self.power_targets))
            r = (model(wl_t, plan=planned) - flux_t) * w_t
            return (r * r).sum()

        return train(model, loss_fn, epochs=epochs, desc=desc, extra=lik, plans=planned,
                     graph=None if lik is None else False, **self.train_kwargs)

    def rms(self, model: LineCloneModel) -> tuple[float, np.ndarray]:
        """RMS of S − S_clone over the usable pixels, and the clone on the grid."""
        with torch.no_grad():
            m = model(self.wl_t).double().cpu().numpy()
        good = self.w_t.cpu().numpy() > 0
        r = (self.flux_t.double().cpu().numpy() - m)[good]
        return float(np.sqrt(np.mean(r * r))), m


#: Lines wider than this many times the median FWHM of the first detection are broad: they get the
#: Appendix C.4 wing correction (``n_broad="auto"``), and residual passes add no line that wide.
BROAD_FWHM_FACTOR = 25.0
#: Residual passes go on only while each lowers the RMS residual by at least this fraction.
RESIDUAL_PASS_MIN_GAIN = 0.05
#: Share of the epoch budget given to the first training stage when residual passes follow.
FIRST_STAGE_SHARE = 0.25
#: The first stage trains at least this many epochs (or the whole budget, if smaller) before any
#: residual pass: a residual read off a barely trained clone shows its start, not missing lines.
MIN_FIRST_STAGE_EPOCHS = 100
#: Fewest epochs of a residual pass; a budget too small for one pass runs none.
MIN_PASS_EPOCHS = 50


def _train_with_residual_passes(model, stage: _Stage, arr, *, epochs: int, residual_passes: int, prominence: float,
                                region, buffer: float, max_fwhm: float):
    """Train, then repeat (find lines in the residual, add them, train) while it pays (paper Section 8.4).

    The epoch budget ``epochs`` is shared: the first stage gets :data:`FIRST_STAGE_SHARE` of it,
    but at least :data:`MIN_FIRST_STAGE_EPOCHS` (all of it without passes), each pass an equal part
    of the rest, at least :data:`MIN_PASS_EPOCHS` (fewer passes run if the budget is short), and
    epochs a stage leaves unused (plateau stop) go to the stages after it. Passes end early when
    the residual holds no line above Prom, or after a pass that lowers the RMS by less than
    :data:`RESIDUAL_PASS_MIN_GAIN` (a pass that does not lower it at all is undone).

    Returns
    -------
    model, history (all stages joined), line_pass (per line: 0 = first detection, k = added by
    pass k), passes (one dict per stage: lines added, lines, epochs, RMS after it)
    """
    first = max(int(round(FIRST_STAGE_SHARE * epochs)), min(epochs, MIN_FIRST_STAGE_EPOCHS))
    residual_passes = min(residual_passes, (epochs - first) // MIN_PASS_EPOCHS)
    if residual_passes == 0:
        first = epochs
    hist = stage.train(model, first, f"cloning {model.n_lines} lines")
    histories = [hist]
    rms, m = stage.rms(model)
    line_pass = np.zeros(model.n_lines, dtype=np.int64)
    passes = [dict(added=model.n_lines, lines=model.n_lines, epochs=hist.epochs_run, rms=rms)]
    used = hist.epochs_run
    for k in range(1, residual_passes + 1):
        if used >= epochs:
            break
        guess = residual_lines(arr.wavelength, arr.flux, m, prominence, good=arr.good, region=region, buffer=buffer,
                               mode=model.mode, emission=model.emission, max_fwhm=max_fwhm)
        if guess is None:
            break
        candidate, order = model.with_lines(guess.lam_centers, guess.log_amplitudes, guess.log_sigmas,
                                            guess.log_gammas)
        budget = (epochs - used) // (residual_passes - k + 1)
        h = stage.train(candidate, budget, f"pass {k}: {candidate.n_lines} lines (+{len(guess)})")
        new_rms, new_m = stage.rms(candidate)
        used += h.epochs_run
        if not new_rms < rms:  # the pass made the clone no better: undo it
            break
        paid = new_rms <= (1.0 - RESIDUAL_PASS_MIN_GAIN) * rms
        model, rms, m = candidate, new_rms, new_m
        line_pass = np.concatenate([line_pass, np.full(len(guess), k, dtype=np.int64)])[order.cpu().numpy()]
        histories.append(h)
        passes.append(dict(added=len(guess), lines=model.n_lines, epochs=h.epochs_run, rms=rms))
        if not paid:
            break
    return model, _join_histories(histories), line_pass, passes


def _join_histories(histories: list) -> TrainingHistory:
    """One history for consecutive training stages: losses joined, epochs and seconds added, the last
    stage's stop reason and best loss."""
    last = histories[-1]
    out = TrainingHistory(loss=[x for h in histories for x in h.loss], best_loss=last.best_loss,
                          epochs_run=sum(h.epochs_run for h in histories), stop_reason=last.stop_reason,
                          seconds=sum(h.seconds for h in histories))
    out.best_epoch = sum(h.epochs_run for h in histories[:-1]) + last.best_epoch
    return out


#: White-noise level of the GP likelihood in cloning (the typical clone residual).
CLONE_GP_NOISE = 0.005


def _clone_likelihood(likelihood, arr, device):
    """The GP likelihood of a cloning run and its white-noise level (None for the plain sum of squares)."""
    if likelihood is None:
        return None, None
    from .gp import build_likelihood  # optional extra: a clear ImportError names it

    options = dict(likelihood) if isinstance(likelihood, dict) else likelihood
    noise = CLONE_GP_NOISE
    if isinstance(options, dict):
        noise = float(options.pop("noise", CLONE_GP_NOISE))
        if not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"the GP 'noise' must be finite and > 0, got {noise}")
    n = arr.wavelength.size
    lik = build_likelihood(options, arr.wavelength, np.full(n, noise), arr.good, np.zeros(n, dtype=np.int64),
                           device=device)
    return lik, noise


def load_blase03(
    path: str | Path,
    *,
    mode: str = "linear",
    profile: str = "pseudo-voigt",
    wing_tolerance: float = 1e-7,
    far_field: bool = True,
    device: str | torch.device = "cpu",
) -> SpectralClone:
    """Read a pre-trained clone of the original blasé 0.3 (a PyTorch state dict).

    The file is loaded with ``torch.load(..., weights_only=True)``: no arbitrary unpickling, so a
    ``.pt`` file carrying a pickle that would run code is refused and runs nothing. It must hold
    ``lam_centers`` (Å), ``amplitudes`` (ln a), ``sigma_widths`` (ln σ) and ``gamma_widths``
    (ln γ), each a floating-point tensor with one value per line (the same number for all four);
    centres must be finite and > 0, the logs finite and within ±45
    (:data:`blase_specutils.io.LOG_PARAMETER_LIMIT`). Other entries (``a_coeff``…,
    ``radial_velocity``) are ignored.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a readable blasé 0.3 state dict (corrupt, a refused pickle, missing keys, values that
        are not tensors, tensors of different lengths, or values out of range); the message names
        the file and the key.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no blasé 0.3 clone at {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt archives and refused pickles
        raise ValueError(f"could not read {path} as a PyTorch state dict (corrupt or not a blasé 0.3 clone): {err}") from err
    need = ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")
    if not isinstance(sd, dict) or any(k not in sd for k in need):
        raise ValueError(f"{path} is not a blasé 0.3 clone: it needs the keys {need}")
    for k in need:
        v = sd[k]
        if not torch.is_tensor(v):
            raise ValueError(f"{path}: {k} must be a tensor (one value per line), got a {type(v).__name__}; "
                             "the file is not a blasé 0.3 state dict")
        if not (v.dtype.is_floating_point and not v.is_complex()):
            raise ValueError(f"{path}: {k} must be a floating-point tensor, got {v.dtype}")
        if v.ndim != 1:
            raise ValueError(f"{path}: {k} must be a 1-D tensor (one value per line), got shape {tuple(v.shape)}")
    sizes = {k: int(sd[k].numel()) for k in need}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{path}: the line parameters have different lengths {sizes}; each needs one value per line")
    raw = [sd[k].detach().to(torch.float64).cpu().numpy() for k in need]
    arrays = [_checked_array(raw[0], path, "lam_centers", error=ValueError, positive=True)]
    arrays += [_checked_array(a, path, k, error=ValueError, log_limit=LOG_PARAMETER_LIMIT) for a, k in zip(raw[1:], need[1:])]
    order = np.argsort(arrays[0], kind="stable")
    arrays = [a[order] for a in arrays]
    model = LineCloneModel(*arrays, mode=mode, profile=profile, wing_tolerance=wing_tolerance, far_field=far_field,
                           device=resolve_device(device))
    return SpectralClone(model, meta={"source": f"blase03:{path.name}"})
