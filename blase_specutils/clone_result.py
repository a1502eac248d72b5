"""The result of cloning: :class:`SpectralClone`, a tuned clone of a spectrum, and its line table.

The procedure that makes one is :func:`~blase_specutils.clone_spectrum` (:mod:`.cloning`); saving
and loading live beside it in :mod:`.clone_file`, the residual diagnostics in
:mod:`.clone_diagnostics` and the figure in :mod:`.clone_plots`.
"""

from __future__ import annotations

import math
from pathlib import Path

import astropy.units as u
import numpy as np
import torch
from astropy.table import QTable
from specutils import Spectrum

from .clone_diagnostics import CloneDiagnostics
from .clone_file import load_clone, save_clone
from .clone_plots import plot_clone
from .core.clone import LineCloneModel
from .core.profiles import PROFILES, profile_fwhm, pseudo_voigt_eta, pseudo_voigt_fwhm
from .core.training import TrainingHistory, resolve_device
from .preprocessing import _velocity_kms
from .spectra import wavelength_to_angstrom

__all__ = ["SpectralClone"]


class SpectralClone(CloneDiagnostics):
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
        wl, axis = _evaluation_axis(spectral_axis, self.target)
        flux = self._eval_angstrom(wl, dense, radial_velocity)
        return Spectrum(spectral_axis=axis, flux=flux * u.dimensionless_unscaled,
                        meta={"blase_specutils": "clone", "n_lines": self.n_lines})

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
        return line_table(self.model, self.line_pass)

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
        return plot_clone(self, band=band, ax=ax, fig=fig, title=title, n_zoom=n_zoom, zoom_width=zoom_width)

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
        return save_clone(self, path, overwrite=overwrite, include_target=include_target)

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
        return load_clone(cls, path, device=device)


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


def line_table(m: LineCloneModel, line_pass: np.ndarray) -> QTable:
    """The line table of :attr:`SpectralClone.lines` for the lines of ``m``."""
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
    t["residual_pass"] = line_pass
    t.meta.update({"mode": m.mode, "profile": m.profile, "emission": m.emission})
    return t


def _evaluation_axis(spectral_axis, target: Spectrum | None) -> tuple[np.ndarray, u.Quantity]:
    """The evaluation grid in Å, and a copy of the axis as given (its unit and order)."""
    if spectral_axis is None:
        if target is None:
            raise ValueError("this clone has no native grid stored; pass spectral_axis=...")
        spectral_axis = target.spectral_axis
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
