"""The numerical core of blase_specutils: torch, numpy and scipy only.

Fixed internal units: wavelength in Å (vacuum), velocity in km/s, dimensionless flux.
"""

from .clone import SPEED_OF_LIGHT_KMS, TUNABLE, LineCloneModel
from .continuum import continuum_polynomial, planck
from .detection import LineGuess, find_lines, initial_widths
from .engine import dense_log_flux, line_terms, window_half_widths, windowed_log_flux
from .profiles import PROFILES, faddeeva, gaussian, lorentzian, pseudo_voigt, pseudo_voigt_eta, pseudo_voigt_fwhm, voigt
from .training import NonFiniteLossWarning, TrainingHistory, resolve_device, seed_everything, train

__all__ = [
    "LineCloneModel", "SPEED_OF_LIGHT_KMS", "TUNABLE",
    "planck", "continuum_polynomial",
    "LineGuess", "find_lines", "initial_widths",
    "windowed_log_flux", "dense_log_flux", "window_half_widths", "line_terms",
    "PROFILES", "pseudo_voigt", "pseudo_voigt_eta", "pseudo_voigt_fwhm", "voigt", "faddeeva", "gaussian", "lorentzian",
    "train", "TrainingHistory", "NonFiniteLossWarning", "seed_everything", "resolve_device",
]
