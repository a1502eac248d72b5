"""The outcome of a transfer-learning fit: :class:`TransferResult`.

The result holds the fitted model, the data and the record of the fit, and reads numbers off them;
what it makes from them (spectra, templates, tables), its report and its file are in the mixins
:class:`~blase_specutils.result_products.ResultProducts`,
:class:`~blase_specutils.result_report.ResultReport` and
:class:`~blase_specutils.transfer_result_file.ResultFile`. :func:`~blase_specutils.fitting.fit_spectrum`
makes one; :meth:`TransferResult.load` reads one back.
"""

from __future__ import annotations

import math

import astropy.units as u
import numpy as np

from .core.diagnostics import FitFlag
from .frames import FitFrames
from .result_products import ResultProducts
from .result_report import ResultReport
from .transfer_result_file import ResultFile

__all__ = ["TransferResult"]


def _power_value(model) -> float | dict[str, float]:
    """The fitted Beer's-law power X, or a dict of the powers X_k by component name."""
    x = model.telluric_power.detach().cpu()
    if x.ndim == 0:
        return float(x)
    return {n: float(v) for n, v in zip(model.telluric_names, x)}


def _pm(sigma) -> str:
    """" ± σ" for the repr ("" without one, " ± inf" where χ² has no minimum)."""
    if sigma is None:
        return ""
    return f" ± {sigma:.2g}" if math.isfinite(sigma) else " ± inf"



class TransferResult(ResultProducts, ResultReport, ResultFile):
    """The outcome of :func:`fit_spectrum` (or of :meth:`TransferResult.load`).

    Attributes
    ----------
    model : blase_specutils.core.TransferModel
        The fitted forward model (torch). ``model.stellar`` is None for a telluric-only fit.
    template : dict
        Template-matching stage: χ², reduced χ², RV, v sin i, R and the telluric power X (RV and
        v sin i are None for a telluric-only fit; X is None without a telluric clone).
    fit : blase_specutils.core.TransferFit
        Loss histories of the stages (after :meth:`load`: only the χ² values, no histories).
    prior : dict of Tensor
        ln a, ln σ, ln γ of the stellar clone's lines before the fit (empty for a telluric-only fit).
    telluric_prior : dict of Tensor or None
        The same for the telluric clone's lines (None without one).
    prior_centers : dict of ndarray or None
        Line centres (Å) before the fit, keys ``"stellar"`` and ``"telluric"`` (they differ from
        the fitted ones only when centres are tuned).
    likelihood : blase_specutils.gp.GPContinuumLikelihood or None
        The fitted GP likelihood (``likelihood="gp"``), or None for χ² (and always after
        :meth:`load`).
    pseudo_continuum_flux : ndarray or None
        The GP's conditional mean at the data pixels (see :attr:`pseudo_continuum`).
    flags : list of FitFlag
        What to doubt in this fit (empty: nothing flagged): each has a short ``code`` (e.g.
        ``"vsini_at_bound"``, ``"rv_scan_edge"``, ``"vsini_unconstrained"``; the list is in
        :class:`~blase_specutils.core.transfer.FitBounds`), a ``message`` with the numbers and the
        ``parameter`` concerned. Shown by ``repr``, :meth:`summary` and ``fit --json``.
    uncertainties : dict of float
        1σ of ``"rv"`` (km/s), ``"vsini"`` (km/s) and ``"telluric_power"`` from the curvature of χ²
        at the fit (:func:`~blase_specutils.core.transfer.chi2_curvature`: continuum profiled out,
        lines fixed, scaled by √χ²_red when that exceeds 1); ``inf`` where χ² has no minimum. With a
        stellar clone also ``"rv_continuum"`` (km/s): how far the RV of least χ² moves, after template
        matching, when the continuum polynomial's degree is raised by 2 and 4
        (:func:`~blase_specutils.core.systematics.rv_by_continuum_degree`), a systematic the
        curvature does not include; where v sin i was fitted also ``"vsini_halves"`` (km/s): how far
        the v sin i of least χ² differs between the blue and the red halves of the orders
        (:func:`~blase_specutils.core.systematics.vsini_by_order_half`).
    frames : blase_specutils.frames.FitFrames
        The frames of the data (``"observatory"``, ``"barycentric"`` or ``"unstated"``), how
        their wavelengths became vacuum ones, the tagged velocity and the barycentric correction
        with its source: :attr:`rv_tagged`, :attr:`rv_total`, :attr:`rv_barycentric` and
        :attr:`barycentric_correction` read it. Spectra out come back on the user's own axis, in
        the user's class and list class, with its ``meta`` and velocity tag.
    outlier_mask : ndarray of bool
        Pixels (of :attr:`wavelength`) left out of χ² as flux outliers.
    outliers : dict or None
        ``{"count", "threshold_sigma", "pixels"}``: ``pixels`` maps each order with outliers to
        their positions along that order's own spectral axis.

    Notes
    -----
    A telluric-only fit (``stellar=None``) fits no RV and no v sin i: :attr:`rv` and
    :attr:`vsini` are NaN km/s, the summary's ``rv_kms`` and ``vsini_kms`` are None,
    :attr:`lines` is the telluric line table, and :meth:`stellar_clone` and
    :meth:`semi_empirical_template` return None.
    """

    def __init__(self, *, model, orders, order_ids, arrays, wavelength, flux, sigma, good, order_of_pixel,
                 model_flux, prior, template, fit, settings, stellar_clone, telluric_clone,
                 likelihood=None, pseudo_continuum_flux=None, telluric_prior=None, prior_centers=None,
                 flags=None, uncertainties=None, frames: FitFrames | None = None,
                 list_class: type | None = None, outlier_mask: np.ndarray | None = None,
                 outliers: dict | None = None) -> None:
        self.model = model
        self._orders = orders
        self._order_ids = order_ids
        self._arrays = arrays
        self.wavelength = wavelength
        self.flux = flux
        self.sigma = sigma
        self.good = good
        self.order_of_pixel = order_of_pixel
        self.model_flux = model_flux
        self.prior = prior
        self.telluric_prior = telluric_prior
        self.prior_centers = prior_centers
        self.template = template
        self.fit = fit
        self.settings = settings
        self._stellar_clone = stellar_clone
        self._telluric_clone = telluric_clone
        self.likelihood = likelihood
        self.pseudo_continuum_flux = pseudo_continuum_flux
        self.flags: list[FitFlag] = list(flags or [])
        self.uncertainties: dict[str, float] = dict(uncertainties or {})
        self.frames: FitFrames = frames if frames is not None else FitFrames()
        self._list_class = list_class
        #: Pixels left out of χ² as flux outliers (see fit_spectrum), and their record (None: no check ran).
        self.outlier_mask = np.zeros(np.asarray(good).size, dtype=bool) if outlier_mask is None else \
            np.asarray(outlier_mask, dtype=bool)
        self.outliers: dict | None = outliers

    def __repr__(self) -> str:
        kind = "+".join(k for k, has in (("stellar", self.has_stellar), ("telluric", self.has_telluric)) if has)
        parts = []
        if self.has_stellar:
            parts.append(f"RV {self.rv.value:.3f}{_pm(self.uncertainties.get('rv'))} km/s")
            if self.frames.rv_tagged:
                parts.append(f"+ tagged {self.rv_tagged.value:.3f} = total {self.rv_total.value:.3f} km/s")
            if self.rv_barycentric is not None:
                parts.append(f"barycentric RV {self.rv_barycentric.value:.3f} km/s "
                             f"(correction {self.frames.barycentric_correction:+.3f})")
            parts.append(f"v sin i {self.vsini.value:.2f}{_pm(self.uncertainties.get('vsini'))} km/s")
        if self.has_telluric:
            parts.append(self._power_text())
        parts.append(f"R {self.resolving_power:.0f}")
        parts.append(f"chi2_red {self.chi2_reduced:.3f}")
        parts.append(f"{self.frames.frame} frame, {self.frames.wavelength_frame}")
        if self.outliers and self.outliers.get("count"):
            parts.append(f"{self.outliers['count']} flux outlier(s) masked")
        head = f"<TransferResult ({kind}, {self.n_pixels} px): " + ", ".join(parts)
        if not self.flags:
            return head + "; no flags>"
        lines = "\n".join(f"  [{f.code}] {f.message}" for f in self.flags)
        return head + f"; {len(self.flags)} flag(s):\n{lines}>"

    @property
    def flagged(self) -> bool:
        """Whether the fit has any flag (see :attr:`flags`)."""
        return bool(self.flags)

    @property
    def has_stellar(self) -> bool:
        """Whether the fit has a stellar clone (False: telluric-only)."""
        return self.model.stellar is not None

    @property
    def has_telluric(self) -> bool:
        """Whether the fit has a telluric clone."""
        return self.model.telluric is not None

    @property
    def rv(self) -> u.Quantity:
        """The fitted radial velocity: the star's velocity relative to the observer of the data's
        axis, less a velocity tagged on that axis (:attr:`rv_tagged`; without a tag this is the
        whole measured RV, :attr:`rv_total`). NaN km/s for a telluric-only fit, which fits none."""
        if not self.has_stellar:
            return np.nan * u.km / u.s
        return (float(self.model.rv.detach()) - self.frames.rv_tagged) * u.km / u.s

    @property
    def rv_tagged(self) -> u.Quantity:
        """c z (km/s) of the velocity tagged on the input's spectral axis (specutils'
        ``radial_velocity``/``redshift``: the velocity of the target relative to the observer for
        the axis as given); 0 km/s without a tag. :attr:`rv` + this = :attr:`rv_total`."""
        return self.frames.rv_tagged * u.km / u.s

    @property
    def rv_total(self) -> u.Quantity:
        """The measured RV: :attr:`rv_tagged` + :attr:`rv`, the star's velocity relative to the
        observatory (the fit's frame; data given in the barycentric frame were shifted back to it).
        NaN km/s for a telluric-only fit."""
        if not self.has_stellar:
            return np.nan * u.km / u.s
        return self.frames.rv_total(self.rv.value) * u.km / u.s

    @property
    def rv_barycentric(self) -> u.Quantity | None:
        """The barycentric RV, :math:`v + v_\\mathrm{corr} + v\\,v_\\mathrm{corr}/c` of the measured RV v
        (:attr:`rv_total`) and :attr:`barycentric_correction`; None without a correction (a file
        without time, target or site, and none given) or for a telluric-only fit."""
        bary = self.frames.rv_barycentric(self.rv.value) if self.has_stellar else None
        return None if bary is None else bary * u.km / u.s

    @property
    def barycentric_correction(self) -> u.Quantity | None:
        """The barycentric correction used (km/s; add it to a measured RV), from the file's time,
        target and site (:func:`blase_specutils.frames.barycentric_correction`) or given by the
        user; None where neither was available (``frames.barycentric_source`` says why)."""
        bc = self.frames.barycentric_correction
        return None if bc is None else bc * u.km / u.s

    @property
    def vsini(self) -> u.Quantity:
        """Projected rotational velocity v sin i (NaN km/s for a telluric-only fit)."""
        if not self.has_stellar:
            return np.nan * u.km / u.s
        return float(self.model.vsini.detach()) * u.km / u.s

    @property
    def resolving_power(self) -> float:
        """Instrumental resolving power R."""
        return float(self.model.resolving_power.detach())

    @property
    def telluric_power(self) -> float | dict[str, float] | None:
        """Beer's-law exponent X of the telluric transmission T^X (None without a telluric clone);
        with several telluric components (``telluric={"H2O": ..., "CO2": ...}``) a dict of the
        powers X_k by component name."""
        if not self.has_telluric:
            return None
        return _power_value(self.model)

    def _power_text(self, spec: str = ".4g") -> str:
        """X, or "X(H2O) 0.81, X(CO2) 1.02" with components, with σ where known."""
        x = self.telluric_power
        if not isinstance(x, dict):
            return f"X {x:{spec}}{_pm(self.uncertainties.get('telluric_power'))}"
        return ", ".join(f"X({n}) {v:{spec}}{_pm(self.uncertainties.get(f'telluric_power_{n}'))}" for n, v in x.items())

    @property
    def n_pixels(self) -> int:
        """Number of pixels in χ²."""
        return int(self.good.sum())

    @property
    def chi2(self) -> float:
        """χ² of the final model."""
        r = (self.flux - self.model_flux)[self.good] / self.sigma[self.good]
        return float(np.sum(r * r))

    @property
    def chi2_reduced(self) -> float:
        """χ² per pixel (the free line parameters are regularised, so they are not subtracted)."""
        return self.chi2 / max(self.n_pixels - 3, 1)

    @property
    def rms_residual(self) -> float:
        """RMS of data − model over the good pixels (flux units of the data)."""
        r = (self.flux - self.model_flux)[self.good]
        return float(np.sqrt(np.mean(r * r)))
