"""Line detection by topographic prominence (paper Section 2.2) and initial line guesses."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from scipy.signal import find_peaks, peak_widths

from .profiles import FWHM_GAUSSIAN_PER_SIGMA, pseudo_voigt

__all__ = ["LineGuess", "find_lines", "initial_widths", "residual_lines"]

@dataclass
class LineGuess:
    """Initial line list, arrays of length N_lines sorted by centre.

    Attributes
    ----------
    lam_centers : ndarray
        Centres λc (Å).
    log_amplitudes, log_sigmas, log_gammas : ndarray
        ln a (a: line area, Å), ln σ, ln γ (Å).
    prominence : ndarray
        Topographic prominence of each flux minimum.
    depth : ndarray
        Flux deficit 1 - S at the minimum.
    fwhm : ndarray
        Measured full width at half prominence (Å).
    """

    lam_centers: np.ndarray
    log_amplitudes: np.ndarray
    log_sigmas: np.ndarray
    log_gammas: np.ndarray
    prominence: np.ndarray
    depth: np.ndarray
    fwhm: np.ndarray

    def __len__(self) -> int:
        return int(self.lam_centers.shape[0])


def initial_widths(fwhm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """σ and γ that split a measured FWHM equally between Gaussian and Lorentzian.

    With f_G = 2.3548 σ = f_L = 2γ = FWHM, both components are at half maximum at ±FWHM/2, so
    the blasé pseudo-Voigt (each component with its own width) has exactly the measured FWHM.
    """
    x = np.asarray(fwhm, dtype=np.float64)
    return x / FWHM_GAUSSIAN_PER_SIGMA, x / 2.0


def find_lines(
    wavelength: np.ndarray,
    flux: np.ndarray,
    prominence: float = 0.01,
    *,
    region: tuple[float, float] | None = None,
    buffer: float = 0.0,
    mode: str = "linear",
    emission: bool = False,
    min_fwhm: float | None = None,
) -> LineGuess:
    r"""Find lines as flux minima (or maxima for emission) above a prominence threshold.

    ``scipy.signal.find_peaks`` runs on the flux deficit :math:`-S` with the topographic
    prominence threshold Prom; ``peak_widths`` at half prominence gives each line's FWHM,
    split equally between Gaussian and Lorentzian widths; the area :math:`a` is set so that
    the single line reproduces the observed depth (:math:`1 - aV(0) = S_\mathrm{min}` in
    linear mode, :math:`e^{-aV(0)}` in log mode).

    Parameters
    ----------
    wavelength : ndarray
        Strictly increasing wavelengths (Å).
    flux : ndarray
        Continuum-normalised flux S (finite).
    prominence : float
        Prom, in (0, 1).
    region : (float, float), optional
        Region of interest (Å); lines are kept only inside it ± ``buffer``.
    buffer : float
        Δλ_buffer (Å).
    mode : {"linear", "log"}
        Clone mode the amplitudes are initialised for.
    emission : bool
        Look for emission peaks instead of absorption minima.
    min_fwhm : float, optional
        Smallest initial FWHM (Å); defaults to one median pixel.

    Returns
    -------
    LineGuess
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    if not (0.0 < prominence < 1.0):
        raise ValueError(f"prominence must be in (0, 1), got {prominence}")
    if wavelength.ndim != 1 or wavelength.shape != flux.shape:
        raise ValueError("wavelength and flux must be 1-D arrays of the same length")
    if wavelength.size < 3:
        raise ValueError("need at least 3 pixels to find lines")
    if not np.all(np.diff(wavelength) > 0):
        raise ValueError("wavelength must be strictly increasing with no duplicates")
    if not np.all(np.isfinite(flux)):
        raise ValueError("flux must be finite (mask or remove NaNs first)")
    signal = flux - 1.0 if emission else 1.0 - flux
    peaks, props = find_peaks(signal, prominence=prominence)
    if region is not None:
        lo, hi = region
        keep = (wavelength[peaks] >= lo - buffer) & (wavelength[peaks] <= hi + buffer)
        peaks = peaks[keep]
        props = {k: v[keep] for k, v in props.items()}
    if peaks.size == 0:
        raise ValueError(
            f"no lines deeper than prominence {prominence} were found; the spectrum may be flat or "
            "not continuum-normalised. Lower the prominence or check the preprocessing."
        )
    widths = peak_widths(signal, peaks, rel_height=0.5, prominence_data=(props["prominences"], props["left_bases"], props["right_bases"]))
    pix = np.arange(wavelength.size, dtype=np.float64)
    fwhm = np.interp(widths[3], pix, wavelength) - np.interp(widths[2], pix, wavelength)
    dlam = float(np.median(np.diff(wavelength)))
    fwhm = np.maximum(fwhm, dlam if min_fwhm is None else min_fwhm)
    sigma, gamma = initial_widths(fwhm)
    depth = np.clip(signal[peaks], 1e-4, 0.98)
    v0 = pseudo_voigt(torch.zeros(1, dtype=torch.float64), torch.from_numpy(sigma), torch.from_numpy(gamma)).numpy()
    if mode == "log" and not emission:
        area = -np.log1p(-depth) / v0
    elif mode == "log":
        area = np.log1p(depth) / v0
    elif mode == "linear":
        area = depth / v0
    else:
        raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
    return LineGuess(
        lam_centers=wavelength[peaks].copy(),
        log_amplitudes=np.log(area),
        log_sigmas=np.log(sigma),
        log_gammas=np.log(gamma),
        prominence=np.asarray(props["prominences"], dtype=np.float64),
        depth=signal[peaks].copy(),
        fwhm=fwhm,
    )


def residual_lines(
    wavelength: np.ndarray,
    flux: np.ndarray,
    model_flux: np.ndarray,
    prominence: float = 0.01,
    *,
    good: np.ndarray | None = None,
    region: tuple[float, float] | None = None,
    buffer: float = 0.0,
    mode: str = "linear",
    emission: bool = False,
    max_fwhm: float | None = None,
) -> LineGuess | None:
    r"""Lines the clone is missing: a second detection pass on the residual (paper Section 8.4).

    Both modes of the clone multiply line factors (Eq. 2: :math:`\prod_j (1 - a_j V_j)`; Eq. A2:
    :math:`\prod_j e^{-a_j V_j}`), so a line the clone lacks shows up as the ratio
    :math:`S / S_\mathrm{clone}` dipping below 1 (rising above it for emission). The ratio is
    searched with :func:`find_lines` at the same prominence threshold Prom as the first pass, so
    a missing line is added on the same criterion as any detected one, and a clone that fits to
    within Prom everywhere gets no new line. Blends that the first pass merged into one minimum,
    shoulders of strong lines and lines hidden in the wings of others are found this way.

    Parameters
    ----------
    wavelength, flux : ndarray
        The spectrum S the clone is trained on (Å, continuum-normalised).
    model_flux : ndarray
        The clone :math:`S_\mathrm{clone}` on the same grid.
    prominence : float
        Prom in (0, 1), applied to the ratio.
    good : ndarray of bool, optional
        Usable pixels; the others (and pixels where the clone is nearly black, below 5 % of
        the continuum, where no ratio is meaningful) are set to a ratio of 1.
    region, buffer, mode, emission
        As in :func:`find_lines`.
    max_fwhm : float, optional
        Widest line added (Å). A dip in the ratio much wider than the clone's lines is the error of
        a broad line's wing or of the continuum, which lines should not absorb;
        :func:`~blase_specutils.clone_spectrum` uses the threshold of its broad lines, 25 times
        the median FWHM of the first detection.

    Returns
    -------
    LineGuess or None
        The new lines with starting parameters for the clone's mode, or None if there are none.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    model_flux = np.asarray(model_flux, dtype=np.float64)
    if model_flux.shape != flux.shape:
        raise ValueError("model_flux must have the shape of flux")
    usable = np.isfinite(flux) & np.isfinite(model_flux) & (model_flux > 0.05)
    if good is not None:
        usable &= np.asarray(good, dtype=bool)
    ratio = np.ones_like(flux)
    ratio[usable] = flux[usable] / model_flux[usable]
    try:
        found = find_lines(wavelength, ratio, prominence, region=region, buffer=buffer, mode=mode, emission=emission)
    except ValueError:  # no dip reaches the threshold: the clone is complete at this prominence
        return None
    # a dip wider than max_fwhm is the error of a broad line's wing or of the continuum, not a line
    keep = np.ones(len(found), dtype=bool) if max_fwhm is None else found.fwhm <= max_fwhm
    if not keep.any():
        return None
    return LineGuess(**{f.name: getattr(found, f.name)[keep] for f in fields(LineGuess)})
