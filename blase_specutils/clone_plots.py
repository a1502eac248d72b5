"""The figure of :meth:`SpectralClone.plot <blase_specutils.SpectralClone.plot>`: an overview strip
(spectrum, clone, residual) above zoom panels on the weakest windows and a typical one."""

from __future__ import annotations

import astropy.units as u
import numpy as np

from .constants import MAX_ZOOM_WIDTH_AA
from .core.training import check_integer
from .preprocessing import _as_band, _buffer_angstrom

__all__ = ["plot_clone"]


def plot_clone(clone, *, band=None, ax=None, fig=None, title: str | None = None, n_zoom: int = 3,
               zoom_width: u.Quantity = 20 * u.AA):
    """Draw ``clone`` against its target (the arguments of :meth:`SpectralClone.plot`); returns the figure."""
    import matplotlib.pyplot as plt

    n_zoom = check_integer(n_zoom, "n_zoom", minimum=0)
    width = _buffer_angstrom(zoom_width)
    if not 0 < width <= MAX_ZOOM_WIDTH_AA:
        raise ValueError(f"zoom_width must be > 0 and at most {MAX_ZOOM_WIDTH_AA:g} Å, got {zoom_width}")
    arr = clone._target_arrays()
    model = clone._eval_angstrom(arr.wavelength, False, None)
    sel = np.ones(arr.wavelength.size, dtype=bool)
    if band is not None:
        lo, hi = _as_band(band)
        sel = (arr.wavelength >= lo) & (arr.wavelength <= hi)
    w = arr.wavelength[sel]
    zooms = zoom_windows(clone, band, n_zoom, width) if ax is None and w.size > 1 else []
    outer = None
    if ax is None:
        fig = plt.figure(figsize=(12, 7.5 if zooms else 5.5)) if fig is None else fig
        fig.clear()
        ax, outer = _overview_axes(fig, bool(zooms))
    else:
        fig = ax[0].figure
    _draw_overview(ax, clone, arr, model, sel)
    _shade_windows(ax, clone, band, zooms, many=w.size > 1)
    ax[0].legend(loc="lower left", fontsize=8)
    if title:
        ax[0].set_title(title)
    if zooms:
        draw_zooms(clone, fig, outer[1], zooms, arr, model)
    else:
        fig.tight_layout()
    return fig


def _overview_axes(fig, with_zooms: bool):
    """The two overview axes (spectrum and clone over the residual) and the figure's outer grid."""
    outer = fig.add_gridspec(2 if with_zooms else 1, 1, height_ratios=[1.0, 1.05] if with_zooms else [1.0],
                             hspace=0.35)
    top = outer[0].subgridspec(2, 1, height_ratios=[3, 1.3], hspace=0.05)
    ax = [fig.add_subplot(top[0])]
    ax.append(fig.add_subplot(top[1], sharex=ax[0]))
    return ax, outer


def _draw_overview(ax, clone, arr, model: np.ndarray, sel: np.ndarray) -> None:
    """Spectrum, clone and masked pixels in ``ax[0]``; the residual and its RMS in ``ax[1]``."""
    w = arr.wavelength[sel]
    resid = arr.flux - model
    ax[0].plot(w, arr.flux[sel], lw=0.6, color="k", label="native S")
    ax[0].plot(w, model[sel], lw=0.6, color="C1", label=f"clone ({clone.n_lines} lines)")
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


def _shade_windows(ax, clone, band, zooms: list, *, many: bool) -> None:
    """Shade the five weakest windows (tiled as the zoom panels) and the typical zoom window."""
    try:
        weak = clone.worst_windows(5, band=band) if many else []
    except ValueError:
        weak = []
    for k, row in enumerate(weak):
        for a in ax:
            a.axvspan(row["start"].value, row["end"].value, color="C3", alpha=0.12, lw=0,
                      label="weakest windows" if (k == 0 and a is ax[0]) else None)
    for lo_z, hi_z, label in zooms:
        if label == "typical":
            for a in ax:
                a.axvspan(lo_z, hi_z, color="C2", alpha=0.12, lw=0, label="typical window" if a is ax[0] else None)


def zoom_windows(clone, band, n_zoom: int, width: float) -> list[tuple[float, float, str]]:
    """(start, end, label) of the zoom panels inside ``band`` (default: the band of interest, without
    the buffer): the weakest windows and a typical (median) one."""
    if n_zoom == 0:
        return []
    try:
        table = clone.worst_windows(10_000, width=width * u.AA, band=band)
    except ValueError:
        return []
    rows = [(float(r["start"].value), float(r["end"].value)) for r in table]
    n_worst = n_zoom if n_zoom == 1 or len(rows) <= n_zoom else n_zoom - 1
    out = [(lo, hi, f"weakest {k + 1}") for k, (lo, hi) in enumerate(rows[:n_worst])]
    if n_worst < n_zoom and len(rows) > n_worst:
        lo, hi = rows[n_worst + (len(rows) - n_worst) // 2]
        out.append((lo, hi, "typical"))
    return out


def draw_zooms(clone, fig, spec, zooms, arr, model) -> None:
    """Zoom panels (spectrum and clone over S − clone) in the gridspec cell ``spec``."""
    grid = spec.subgridspec(2, len(zooms), height_ratios=[3, 1.3], hspace=0.05, wspace=0.28)
    centres = clone.model.lam_centers.detach().cpu().numpy()
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
