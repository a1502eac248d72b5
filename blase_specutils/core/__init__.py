"""The numerical core of blase_specutils: torch, numpy and scipy only.

Fixed internal units: wavelength in Å (vacuum), velocity in km/s, dimensionless flux.
"""

from .backends import Backend, select_backend
from .clone import SPEED_OF_LIGHT_KMS, TUNABLE, LineCloneModel
from .continuum import continuum_polynomial
from .detection import LineGuess, find_lines, initial_widths
from .engine import dense_log_flux, line_terms, window_half_widths, windowed_log_flux
from .extrinsic import (
    InstrumentalBroadening,
    PixelResampler,
    RotationalBroadening,
    gaussian_lsf_kernel,
    instrumental_broaden,
    log_lambda_grid,
    pixel_edges,
    resample_to_pixels,
    resolving_power_to_sigma,
    rotational_kernel,
    rotational_kernel_variance,
    rotationally_broaden,
)
from .farfield import FarFieldSettings, far_field
from .graphs import GraphedEpoch
from .options import EngineOptions
from .plan import WindowPlan
from .profiles import PROFILES, faddeeva, gaussian, lorentzian, pseudo_voigt, pseudo_voigt_eta, pseudo_voigt_fwhm, voigt
from .training import NonFiniteLossWarning, TrainingHistory, resolve_device, seed_everything, train
from .transfer import (
    FitBounds,
    FitFlag,
    TransferFit,
    TransferModel,
    check_fit,
    chi2_curvature,
    fit_transfer,
    transfer_loss,
)

__all__ = [
    "LineCloneModel", "SPEED_OF_LIGHT_KMS", "TUNABLE",
    "continuum_polynomial",
    "LineGuess", "find_lines", "initial_widths",
    "windowed_log_flux", "dense_log_flux", "window_half_widths", "line_terms",
    "PROFILES", "pseudo_voigt", "pseudo_voigt_eta", "pseudo_voigt_fwhm", "voigt", "faddeeva", "gaussian", "lorentzian",
    "train", "TrainingHistory", "NonFiniteLossWarning", "seed_everything", "resolve_device",
    "FarFieldSettings", "far_field", "WindowPlan", "GraphedEpoch", "EngineOptions", "Backend", "select_backend",
    "log_lambda_grid", "rotational_kernel", "rotational_kernel_variance", "rotationally_broaden",
    "resolving_power_to_sigma", "gaussian_lsf_kernel", "instrumental_broaden", "pixel_edges",
    "resample_to_pixels", "RotationalBroadening", "InstrumentalBroadening", "PixelResampler",
    "TransferModel", "transfer_loss", "fit_transfer", "TransferFit", "FitBounds", "FitFlag", "check_fit",
    "chi2_curvature",
]
