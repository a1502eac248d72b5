"""The report of a transfer-learning fit: its summary (for ``--json``) and its figure.

:class:`ResultReport` is a mixin of :class:`~blase_specutils.transfer_result.TransferResult`.
"""

from __future__ import annotations

import math

import astropy.units as u
import numpy as np

from .preprocessing import _as_band

__all__ = ["ResultReport"]


def _finite_or_none(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


class ResultReport:
    """Numbers for reports and JSON, and the figure of a fit (a mixin of
    :class:`~blase_specutils.transfer_result.TransferResult`)."""

    def summary(self) -> dict:
        """Numbers for reports and ``--json`` (RV and v sin i are None for a telluric-only fit).

        Keys include ``rv_kms``, ``vsini_kms`` and their σ ``rv_sigma_kms``, ``vsini_sigma_kms``
        (and ``telluric_power_sigma``; None where χ² has no minimum or the parameter is absent),
        ``rv_continuum_spread_kms`` (how far the RV moves with the continuum's degree, the
        ``rv_depends_on_continuum`` test; None without a stellar clone),
        ``vsini_halves_spread_kms`` (how far v sin i differs between the blue and the red halves of
        the orders, the ``vsini_differs_between_halves`` test; None where v sin i was not fitted),
        ``flags`` (a list of ``{"code", "message", "parameter"}``) and ``flag_codes`` (the codes,
        comma-separated, "" when none). The frames: ``rv_kms`` is the fitted RV, ``rv_tagged_kms``
        the velocity tagged on the input's axis (0 without one) and ``rv_total_kms`` their sum, the
        measured RV, also given as ``rv_observatory_kms``; ``rv_barycentric_kms`` with
        ``barycentric_correction_kms`` and ``barycentric_source`` (None and the reason where no
        correction was found or given); ``frame`` (``"observatory"`` or ``"barycentric"``, as the
        data were given), ``wavelength_frame`` (e.g. ``"vacuum (converted from air)"``) and ``air``;
        ``engine``: what computed the fit (``{"backend", "device", "dtype"}``)."""
        lines = self.lines
        out = {
            "components": "+".join(k for k, has in (("stellar", self.has_stellar), ("telluric", self.has_telluric)) if has),
            "template_matching": {k: None if v is None else (v if isinstance(v, dict) else float(v))
                                  for k, v in self.template.items()},
            "rv_kms": float(self.rv.value) if self.has_stellar else None,
            **self._frames_summary(),
            "vsini_kms": float(self.vsini.value) if self.has_stellar else None,
            "rv_sigma_kms": _finite_or_none(self.uncertainties.get("rv")),
            "vsini_sigma_kms": _finite_or_none(self.uncertainties.get("vsini")),
            "rv_continuum_spread_kms": _finite_or_none(self.uncertainties.get("rv_continuum")),
            "vsini_halves_spread_kms": _finite_or_none(self.uncertainties.get("vsini_halves")),
            "resolving_power": self.resolving_power,
            "chi2": self.chi2,
            "chi2_reduced": self.chi2_reduced,
            "rms_residual": self.rms_residual,
            "n_pixels": self.n_pixels,
            "n_lines": len(lines),
            "n_lines_changed": int(np.sum(lines["changed"])),
            "engine": self.model.engine_info(),
        }
        if self.has_telluric:
            tl = lines if not self.has_stellar else self.telluric_lines
            x = self.telluric_power
            sigma = (_finite_or_none(self.uncertainties.get("telluric_power")) if not isinstance(x, dict) else
                     {n: _finite_or_none(self.uncertainties.get(f"telluric_power_{n}")) for n in x})
            out |= {"telluric_power": x, "telluric_power_sigma": sigma,
                    "n_telluric_lines": len(tl), "n_telluric_lines_changed": int(np.sum(tl["changed"])),
                    "telluric_lsf": "instrument" if self.model.telluric_instrumental else "native"}
        wc = self.wavelength_correction
        if wc is not None:
            out["wavelength_correction_ms"] = {str(k): [float(c) for c in row.value] for k, row in zip(wc["order"], wc["coefficients"])}
        out |= {"flags": [f.to_dict() for f in self.flags], "flag_codes": ",".join(f.code for f in self.flags)}
        return out | self._gp_summary()

    def _frames_summary(self) -> dict:
        """The frames of the fit for :meth:`summary`: the tagged, total (measured, observatory) and
        barycentric RV, the correction and where it came from, the data's frame and wavelengths."""
        st = self.has_stellar
        f = self.frames
        bary = self.rv_barycentric
        return {"rv_tagged_kms": f.rv_tagged, "rv_total_kms": float(self.rv_total.value) if st else None,
                "rv_observatory_kms": float(self.rv_total.value) if st else None,
                "rv_barycentric_kms": None if bary is None else float(bary.value),
                "barycentric_correction_kms": f.barycentric_correction, "barycentric_source": f.barycentric_source,
                "frame": f.frame, "wavelength_frame": f.wavelength_frame, "air": f.air,
                "n_outliers": 0 if self.outliers is None else int(self.outliers.get("count", 0)),
                "outliers": self.outliers}

    def _gp_summary(self) -> dict:
        hp = self.gp_hyperparameters
        if hp is None:
            return {}
        return {"gp": {"kernel": hp["kernel"], "amplitude": np.asarray(hp["amplitude"].value).tolist(),
                       "length_scale_angstrom": np.asarray(hp["length_scale"].to_value(u.AA)).tolist(),
                       "noise_scale": hp["noise_scale"]}}

    def plot(self, *, band=None, title: str | None = None):
        """Data, model and residual (with the GP pseudo-continuum when fitted with one), and the
        stellar and/or telluric templates, clone and transfer-learned (cf. paper Fig. 9).

        Parameters
        ----------
        band : (Quantity, Quantity), optional
            Spectral range to show, in any spectral unit (e.g. ``(8670, 8680) * u.AA`` or a pair
            of wavenumbers); default: all the data.
        title : str, optional

        Returns
        -------
        matplotlib.figure.Figure

        Raises
        ------
        TypeError
            ``band`` is not a pair of Quantities (plain numbers have no unit).
        ValueError
            ``band`` holds fewer than two data pixels.
        """
        import matplotlib.pyplot as plt

        w = self.wavelength
        sel = np.ones(w.size, bool)
        if band is not None:
            lo, hi = _as_band(band)
            sel = (w >= lo) & (w <= hi)
            if sel.sum() < 2:
                raise ValueError(f"band {lo:.6g}-{hi:.6g} Å holds {int(sel.sum())} data pixel(s), too few to plot; "
                                 f"the data cover {w.min():.6g}-{w.max():.6g} Å: choose a band within that range")
        n = 2 + int(self.has_stellar) + int(self.has_telluric)
        fig, ax = plt.subplots(n, 1, figsize=(11, 2.2 * n), sharex=True)
        lz = self.model.lam_z.cpu().numpy()
        zsel = (lz >= w[sel].min()) & (lz <= w[sel].max())
        axis = lz[zsel] * u.AA
        ax[0].plot(w[sel], np.where(self.good, self.flux, np.nan)[sel], ".", ms=2, color="k", label="data")
        ax[0].plot(w[sel], self.model_flux[sel], lw=0.8, color="C1", label="model M(λ_D)")
        ax[0].legend(loc="lower left", fontsize=8)
        ax[0].set_ylabel("flux")
        res = np.where(self.good, self.flux - self.model_flux, np.nan)
        ax[1].plot(w[sel], res[sel], lw=0.6, color="C0")
        if self.pseudo_continuum_flux is not None:
            ax[1].plot(w[sel], self.pseudo_continuum_flux[sel], lw=1.0, color="C3", label="GP pseudo-continuum")
            ax[1].legend(loc="lower right", fontsize=8)
        ax[1].axhline(0, color="0.5", lw=0.5)
        ax[1].set_ylabel("data − model")
        text = f"χ²_red {self.chi2_reduced:.2f}"
        if self.has_stellar:
            text += f", RV {self.rv.value:.3f} km/s, v sin i {self.vsini.value:.2f} km/s"
        if self.has_telluric:
            text += f", telluric power {self._power_text('.3f')}"
        ax[1].text(0.01, 0.9, text, transform=ax[1].transAxes, fontsize=8, va="top")
        k = 2
        if self.has_stellar:
            ax[k].plot(lz[zsel], self._stellar_clone.evaluate(axis).flux.value, lw=0.6, color="0.6", label="clone")
            ax[k].plot(lz[zsel], self.semi_empirical_template(axis).flux.value, lw=0.7, color="C2",
                       label="transfer-learned")
            ax[k].set_ylabel("stellar")
            ax[k].legend(loc="lower left", fontsize=8)
            k += 1
        if self.has_telluric:
            ax[k].plot(lz[zsel], self._telluric_clone.evaluate(axis).flux.value, lw=0.6, color="0.6",
                       label="clone (X = 1)")
            ax[k].plot(lz[zsel], self.telluric_template(axis).flux.value, lw=0.7, color="C4",
                       label=f"transfer-learned, {self._power_text('.3f')}")
            ax[k].set_ylabel("telluric")
            ax[k].legend(loc="lower left", fontsize=8)
        ax[-1].set_xlabel("wavelength (Å)")
        if title:
            ax[0].set_title(title)
        fig.tight_layout()
        return fig
