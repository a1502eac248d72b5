"""A smooth continuum for preprocessing (paper Eq. 1): the polynomial P (the blackbody B is astropy's,
in :mod:`blase_specutils.preprocessing`)."""

from __future__ import annotations

import numpy as np

__all__ = ["continuum_polynomial"]


def continuum_polynomial(
    wavelength: np.ndarray,
    flux: np.ndarray,
    *,
    n_bins: int = 40,
    order: int = 3,
    n_iter: int = 10,
    reject_below: float = 1.0,
) -> np.ndarray:
    """A smooth polynomial P(λ) through the continuum peaks of a spectrum.

    The band is cut into ``n_bins`` equal wavelength bins and the highest flux of each bin is a
    continuum candidate. A polynomial of degree ``order`` (in a scaled wavelength) is fitted to
    the candidates; candidates that fall more than ``reject_below`` robust standard deviations
    below the fit (bins whose highest point sits in a broad line wing) are dropped and the fit
    repeated, so the polynomial rides on the upper envelope.

    Parameters
    ----------
    wavelength, flux : ndarray
        Increasing wavelengths and finite fluxes (NaNs are ignored).
    n_bins : int
        Number of bins (continuum candidates).
    order : int
        Polynomial degree.
    n_iter : int
        Rejection iterations.
    reject_below : float
        Rejection threshold in robust standard deviations.

    Returns
    -------
    ndarray
        P evaluated at ``wavelength``.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    good = np.isfinite(flux) & np.isfinite(wavelength)
    if good.sum() < order + 2:
        raise ValueError("too few finite pixels to fit a continuum")
    w, f = wavelength[good], flux[good]
    n_bins = int(max(order + 2, min(n_bins, w.size // 3)))
    edges = np.linspace(w[0], w[-1], n_bins + 1)
    which = np.clip(np.searchsorted(edges, w, side="right") - 1, 0, n_bins - 1)
    px, py = [], []
    for b in range(n_bins):
        sel = np.flatnonzero(which == b)
        if sel.size:
            j = sel[np.argmax(f[sel])]
            px.append(w[j])
            py.append(f[j])
    px, py = np.asarray(px), np.asarray(py)
    centre, scale = 0.5 * (w[0] + w[-1]), max(0.5 * (w[-1] - w[0]), 1e-12)
    keep = np.ones(px.size, dtype=bool)
    deg = min(order, px.size - 1)
    coef = np.polyfit((px - centre) / scale, py, deg)
    for _ in range(n_iter):
        fit = np.polyval(coef, (px - centre) / scale)
        resid = py - fit
        mad = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep]))) + 1e-12 * np.abs(fit).mean()
        new_keep = resid > -reject_below * mad
        if new_keep.sum() < deg + 2 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
        coef = np.polyfit((px[keep] - centre) / scale, py[keep], deg)
    return np.polyval(coef, (wavelength - centre) / scale)
