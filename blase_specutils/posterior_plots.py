"""The plots of a posterior (:class:`PosteriorPlots`, a part of
:class:`~blase_specutils.posterior.PosteriorFit`): the data with the posterior model band, and a
corner plot of the draws."""

from __future__ import annotations

from collections.abc import Sequence

import astropy.units as u
import numpy as np

__all__ = ["PosteriorPlots"]


class PosteriorPlots:
    """The plotting methods of :class:`~blase_specutils.posterior.PosteriorFit` (they read its
    ``_data``, ``samples``, ``settings``, ``guide``, ``telluric_names``, ``_scalar_text`` and
    ``_band_arrays``)."""

    def plot(self, *, band=None, q: Sequence[float] = (16, 84), title: str | None = None):
        """Data with the posterior median model and its band (top), residual with the band (bottom).

        Parameters
        ----------
        band : (Quantity, Quantity), optional
            Wavelength range to show.
        q : (float, float)
            Percentiles of the band.
        """
        import matplotlib.pyplot as plt

        d = self._data
        w = d["wavelength"]
        sel = np.ones(w.size, bool) if band is None else (
            (w >= u.Quantity(band[0]).to_value(u.AA, u.spectral())) & (w <= u.Quantity(band[1]).to_value(u.AA, u.spectral())))
        lo, med, hi = self._band_arrays(q)
        fig, ax = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        flux = np.where(d["good"], d["flux"], np.nan)
        for k in np.unique(d["order"]):
            s = sel & (d["order"] == k)
            first = k == np.unique(d["order"])[0]
            ax[0].plot(w[s], flux[s], ".", ms=2, color="k", label="data" if first else None)
            ax[0].fill_between(w[s], lo[s], hi[s], color="C1", alpha=0.35, lw=0,
                               label=f"posterior {q[0]:g}-{q[1]:g} %" if first else None)
            ax[0].plot(w[s], med[s], lw=0.8, color="C1", label="posterior median" if first else None)
            ax[1].plot(w[s], (flux - med)[s], lw=0.6, color="C0", label="data − median" if first else None)
            ax[1].fill_between(w[s], (lo - med)[s], (hi - med)[s], color="C1", alpha=0.5, lw=0,
                               label="model band" if first else None)
            sig = d["sigma"][s] * float(self.settings.get("noise_scale", 1.0))
            ax[1].fill_between(w[s], -sig, sig, color="0.5", alpha=0.2, lw=0, label="±ε" if first else None)
        ax[0].set_ylabel("flux")
        ax[0].legend(loc="lower left", fontsize=8)
        ax[1].axhline(0, color="0.5", lw=0.5)
        ax[1].set_ylabel("residual")
        ax[1].set_xlabel("wavelength (Å)")
        ax[1].legend(loc="lower left", fontsize=7, ncol=3)
        ax[1].text(0.01, 0.95, f"{self._scalar_text()} ({self.guide} guide)",
                   transform=ax[1].transAxes, fontsize=8, va="top")
        if title:
            ax[0].set_title(title)
        fig.tight_layout()
        return fig

    def corner(self, params: Sequence[str] | None = None, *, lines: Sequence[int] = (), **kwargs):
        """Corner plot (the ``corner`` package) of RV, v sin i, R, the telluric power(s) and,
        optionally, ln a of some lines.

        Parameters
        ----------
        params : sequence of str, optional
            Among ``"rv"``, ``"vsini"``, ``"resolving_power"`` and ``"telluric_power"`` (all the
            telluric powers, one panel per component); default: those that were latent.
        lines : sequence of int
            Line indices (rows of :attr:`lines`) whose ln a to add.
        **kwargs
            Passed to ``corner.corner``.
        """
        try:
            import corner as _corner
        except ImportError as err:
            raise ImportError('corner plots need the corner package, part of the [pyro] extra: '
                              'pip install "blase_specutils[pyro]" (or pip install corner)') from err
        tuned = self.settings["tuned"].split(",")
        avail = ("rv", "vsini", "resolving_power", "telluric_power")
        if params is None:
            params = [p for p in avail if p in tuned]
        cols, labels = [], []
        names = {"rv": "RV (km/s)", "vsini": "v sin i (km/s)", "resolving_power": "R"}
        for p in params:
            if p not in avail:
                raise ValueError(f"unknown parameter {p!r}; choose from {sorted(avail)}")
            if p not in tuned:
                raise ValueError(f"{p} was held fixed in this posterior: nothing to plot")
            if p == "telluric_power":
                x = np.exp(self.samples["ln_telluric_power"])
                if x.ndim == 1:
                    cols.append(x)
                    labels.append("X")
                else:
                    cols += list(x.T)
                    labels += [f"X({n})" for n in self.telluric_names]
                continue
            cols.append(self.samples[p])
            labels.append(names[p])
        for j in lines:
            if "ln_amplitude" not in self.samples:
                raise ValueError("line amplitudes were held fixed in this posterior")
            cols.append(self.samples["ln_amplitude"][:, int(j)])
            labels.append(f"ln a [{int(j)}]")
        if len(cols) < 1:
            raise ValueError("nothing to plot")
        if self.guide == "delta":
            raise ValueError("a MAP (delta) guide has no posterior spread to plot; use guide='normal' or 'lowrank'")
        kw = {"labels": labels, "quantiles": [0.16, 0.5, 0.84], "show_titles": True, "title_fmt": ".3g"}
        kw.update(kwargs)
        return _corner.corner(np.column_stack(cols), **kw)

