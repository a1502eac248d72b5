"""Saving and loading a transfer-learning result: the FITS tables of its lines and their
starting values, and the methods :meth:`TransferResult.save` and :meth:`TransferResult.load`.

The file's layout and its reading and writing are in :mod:`blase_specutils.results_file`; this
module holds the pieces of it that are line models (one ``LINES``/``WING`` pair per clone, one
``PRIOR`` table of starting values) and :class:`ResultFile`, the mixin of
:class:`~blase_specutils.transfer_result.TransferResult` that calls it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from astropy.io import fits

from .core.clone import LineCloneModel
from .result_products import _LOG_PARAMS

__all__ = ["ResultFile"]


def _clone_at(fitted: LineCloneModel, prior: dict, centers: np.ndarray | None = None) -> LineCloneModel:
    """A copy of ``fitted`` holding the starting values ``prior`` (and ``centers``, if given)."""
    m = fitted.subset(torch.arange(fitted.n_lines, device=fitted.lam_centers.device))
    with torch.no_grad():
        for k in _LOG_PARAMS:
            getattr(m, k).copy_(prior[k])
        if centers is not None:
            m.lam_centers.copy_(torch.as_tensor(centers, dtype=torch.float64))
    return m


def _lines_hdus(model: LineCloneModel, prefix: str) -> list:
    """``{prefix}LINES`` and ``{prefix}WING`` tables of a line model (the clone file's layout)."""
    cpu = lambda t: t.detach().cpu().numpy().astype(np.float64)  # noqa: E731
    lines = fits.BinTableHDU.from_columns(
        [fits.Column("lam_center", "D", unit="Angstrom", array=cpu(model.lam_centers)),
         fits.Column("log_amp", "D", array=cpu(model.log_amplitudes)),
         fits.Column("log_sigma", "D", array=cpu(model.log_sigmas)),
         fits.Column("log_gamma", "D", array=cpu(model.log_gammas))],
        name=f"{prefix}LINES",
    )
    h = lines.header
    h["MODE"], h["PROFILE"], h["EMISSION"] = model.mode, model.profile, model.emission
    h["WINGTOL"], h["FARFIELD"] = model.wing_tolerance, bool(model.far_field)
    h["TUNE"], h["NLINES"] = ",".join(model.tuned), model.n_lines
    wing = fits.BinTableHDU.from_columns(
        [fits.Column("line", "K", array=model.broad_lines.cpu().numpy().astype(np.int64)),
         fits.Column("alpha", "D", array=cpu(model.wing_alpha)),
         fits.Column("log_lt", "D", array=cpu(model.wing_log_lt)),
         fits.Column("log_b", "D", array=cpu(model.wing_log_b))],
        name=f"{prefix}WING",
    )
    return [lines, wing]


def _model_from_hdus(lines, wing, device) -> LineCloneModel:
    """The inverse of :func:`_lines_hdus`."""
    h, ld, wd = lines.header, lines.data, wing.data
    cols = [np.array(ld[c], dtype=np.float64) for c in ("lam_center", "log_amp", "log_sigma", "log_gamma")]
    broad = np.array(wd["line"], dtype=np.int64) if wd is not None else np.zeros(0, np.int64)
    model = LineCloneModel(*cols, mode=h["MODE"], profile=h["PROFILE"], emission=bool(h["EMISSION"]),
                           tune=[t for t in str(h.get("TUNE", "")).split(",") if t],
                           wing_tolerance=float(h["WINGTOL"]), far_field=bool(h.get("FARFIELD", True)),
                           broad_lines=broad.tolist(), device=device)
    if wd is not None and len(wd):
        with torch.no_grad():
            model.wing_alpha.copy_(torch.as_tensor(np.array(wd["alpha"], dtype=np.float64)))
            model.wing_log_lt.copy_(torch.as_tensor(np.array(wd["log_lt"], dtype=np.float64)))
            model.wing_log_b.copy_(torch.as_tensor(np.array(wd["log_b"], dtype=np.float64)))
    return model


def _prior_hdu(prior: dict, centers: np.ndarray, name: str):
    cols = [fits.Column("lam_center", "D", unit="Angstrom", array=np.asarray(centers, dtype=np.float64))]
    cols += [fits.Column(k, "D", array=prior[k].detach().cpu().numpy()) for k in _LOG_PARAMS]
    return fits.BinTableHDU.from_columns(cols, name=name)


def _prior_from_hdu(hdu, device) -> tuple[dict, np.ndarray | None]:
    d = hdu.data
    prior = {k: torch.as_tensor(np.array(d[k], dtype=np.float64), device=device) for k in _LOG_PARAMS}
    centers = np.array(d["lam_center"], dtype=np.float64) if "lam_center" in d.columns.names else None
    return prior, centers



class ResultFile:
    """Saving and loading of a fit (a mixin of :class:`~blase_specutils.transfer_result.TransferResult`)."""

    def _start_centers(self, fitted: LineCloneModel) -> np.ndarray:
        """Line centres of ``fitted`` before the fit (they differ only if centres were tuned)."""
        key = "stellar" if fitted is self.model.stellar else "telluric"
        c = (self.prior_centers or {}).get(key)
        return fitted.lam_centers.detach().cpu().numpy() if c is None else np.asarray(c, dtype=np.float64)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fit to one FITS file that :meth:`load` reads back (no pickle).

        HDUs: the fitted lines in the clone layout (primary header, ``LINES``, ``WING``: the
        stellar clone, or the telluric clone for a telluric-only fit, so that
        :meth:`SpectralClone.load` reads them); ``PRIOR`` (those lines' starting centres, ln a,
        ln σ, ln γ); ``DATA`` (wavelength in Å, flux, sigma, good, unmasked, model, order, and
        ``pseudo_continuum`` with a GP likelihood); with a telluric clone ``TLINES``, ``TWING``
        and ``TPRIOR`` (the same for the tuned telluric lines); ``CONTINUUM`` (image: the
        per-order polynomial coefficients); ``TRANSFER`` (one row: RV, ln v sin i, ln R, ln X,
        the fixed settings of the forward model, the σ of RV, v sin i and X, the template-matching
        numbers and the stage χ²; the fit settings and the flags as JSON in its ``SETTINGS`` and
        ``FLAGS`` keywords); ``ORDERS`` (user order index,
        pixels, spectral and flux units per order). The primary header also carries RV (km/s),
        v sin i, R, X (``TELPOWER``) and χ², ``FITKIND = 'transfer'`` and ``TRFMTVER``. With a GP
        likelihood the header holds its kernel (``GPKERNEL``), amplitude (``GPAMP``) and length
        scale in Å (``GPLENGTH``) when shared by all orders. Float64 values round-trip exactly.

        Layout 3 (``TRFMTVER = 3``, see :mod:`blase_specutils.results_file`) adds the frames of the
        fit (``TRANSFER`` keyword ``FRAMES``), the masked flux outliers (``DATA`` column
        ``outlier``, keyword ``OUTLIERS``), ``TELINST`` and the wavelength correction (``CALIB``).
        The file is written under a temporary name in the same folder and moved onto ``path`` when
        complete (:func:`blase_specutils.io.atomic_write`): a failed save (disk full, Ctrl-C)
        leaves a previous file at ``path`` as it was.

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is False.
        """
        from .results_file import save_result

        return save_result(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu"):
        """Read a result written by :meth:`save` (layout 3, or 2 from an earlier version) and
        rebuild its forward model, checking every field it reads.

        The lines, RV, v sin i, R, telluric power, continuum and the data come back exactly, so
        :attr:`rv`, :attr:`vsini`, :attr:`resolving_power`, :attr:`chi2`, :attr:`lines`,
        :attr:`telluric_lines`, :attr:`model_spectrum`, :attr:`residual`,
        :meth:`semi_empirical_template`, :meth:`telluric_template`, :meth:`plot` and
        :meth:`summary` work as before saving, and so do the frames (:attr:`frames`,
        :attr:`rv_total`, :attr:`rv_barycentric`; a layout-2 file's frame is ``"unstated"``).
        Differences: each order comes back as a plain ``Spectrum`` on the fit's axis (vacuum,
        observatory frame; the input's class, list class and axis are not stored),
        ``model_flux`` is the saved model (the rebuilt model is checked against it; a warning if
        they differ by more than 1e-8), ``fit`` keeps only the χ² of the stages (no loss
        histories), and a GP likelihood is not restored (``likelihood`` and
        :attr:`gp_hyperparameters` are None; the pseudo-continuum is kept). The "clone" curves of
        :meth:`plot` use the saved starting values of the fitted lines.

        Raises
        ------
        FileNotFoundError
            No such file.
        blase_specutils.io.SavedFileError
            (a ValueError) Not a transfer-learning result; a layout-1 result (no ``TRANSFER``
            table: refit and save); a newer layout; or a damaged file: a missing table or column,
            a value out of range (non-finite, a natural log beyond ±45), ``ORDERS.n_pixels`` that
            do not add up to the ``DATA`` rows, JSON that does not parse. The message names the
            file and the field (also in the error's ``path`` and ``field``).
        """
        from .results_file import load_result

        return load_result(cls, path, device=device)
