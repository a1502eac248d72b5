"""Transfer-learn a clone against observed spectra given as specutils/muler objects (Sect. 5-6)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits
from astropy.table import QTable
from specutils import Spectrum, SpectrumList

from .cloning import SpectralClone, _equivalent_widths
from .core.clone import SPEED_OF_LIGHT_KMS
from .core.training import resolve_device
from .core.transfer import TransferModel, fit_transfer
from .spectra import arrays_to_spectrum, spectrum_to_arrays

__all__ = ["fit_spectrum", "TransferResult", "MissingUncertaintyWarning"]


class MissingUncertaintyWarning(UserWarning):
    """The data carry no uncertainties; a constant noise level was estimated from the flux."""


def _orders(data) -> list[Spectrum]:
    if isinstance(data, Spectrum):
        if data.flux.ndim != 1:
            raise ValueError("pass a 1-D Spectrum per order (or a SpectrumList / list of orders)")
        return [data]
    if isinstance(data, (SpectrumList, list, tuple)):
        orders = list(data)
        if not orders or not all(isinstance(s, Spectrum) for s in orders):
            raise TypeError("data must be a Spectrum, a SpectrumList, or a list of Spectrum orders")
        return orders
    raise TypeError(f"data must be a specutils Spectrum or a list of them, got {type(data).__name__}")


def _noise_from_flux(flux: np.ndarray) -> float:
    """DER_SNR noise estimate (Stoehr et al. 2008): 1.482602/√6 · median|2f_i − f_(i−2) − f_(i+2)|."""
    f = flux[np.isfinite(flux)]
    if f.size < 5:
        raise ValueError("too few finite pixels to estimate the noise; give uncertainties")
    return float(1.482602 / math.sqrt(6.0) * np.median(np.abs(2.0 * f[2:-2] - f[:-4] - f[4:])))


def _gather(orders: list[Spectrum]):
    """Concatenate orders (sorted by wavelength) into arrays; returns arrays and bookkeeping."""
    pieces = []
    for k, spec in enumerate(orders):
        arr = spectrum_to_arrays(spec, require_finite=False)
        pieces.append((arr.wavelength[0], k, arr))
    pieces.sort(key=lambda p: p[0])
    wl, flux, sigma, good, oid = [], [], [], [], []
    missing = False
    for _, k, arr in pieces:
        if wl and arr.wavelength[0] <= wl[-1][-1]:
            raise ValueError(
                "échelle orders overlap in wavelength; trim the overlapping ends (or fit the orders separately)"
            )
        s = arr.uncertainty
        if s is None:
            missing = True
            level = _noise_from_flux(arr.flux[arr.good]) if arr.good.sum() >= 5 else np.nan
            s = np.full(arr.flux.size, level)
        bad_sigma = np.isfinite(s) & (s <= 0) & arr.good
        if bad_sigma.any():
            raise ValueError(
                f"order {k} has {int(bad_sigma.sum())} pixels with zero or negative uncertainty; mask them "
                "or give positive 1-sigma uncertainties"
            )
        g = arr.good & np.isfinite(s)
        wl.append(arr.wavelength)
        flux.append(arr.flux)
        sigma.append(s)
        good.append(g)
        oid.append(np.full(arr.flux.size, k))
    out = [np.concatenate(x) for x in (wl, flux, sigma, good, oid)]
    if not out[3].any():
        raise ValueError("every pixel of the data is masked or non-finite: nothing to fit")
    return (*out, missing, [p[1] for p in pieces], [p[2] for p in pieces])


def fit_spectrum(
    data,
    stellar: SpectralClone,
    *,
    telluric: SpectralClone | None = None,
    resolving_power: float = 55000.0,
    rv: u.Quantity | float | None = None,
    rv_range: u.Quantity | float = 150.0,
    vsini: u.Quantity | float = 3.0,
    limb_darkening: float = 0.6,
    continuum_degree: int = 2,
    tune_lines: Iterable[str] = ("amplitude", "sigma", "gamma", "center"),
    tune_resolving_power: bool = False,
    regularization: float | None = 5.0,
    width_regularization: float | None = None,
    template_epochs: int = 300,
    line_epochs: int = 4000,
    lr: float = 0.03,
    buffer: u.Quantity = 30 * u.AA,
    device: str = "cpu",
    progress: bool = True,
    likelihood=None,
) -> "TransferResult":
    r"""Fit an observed spectrum with a stellar clone (and optionally a telluric clone).

    The forward model is Eq. 10: RV-shifted, rotationally broadened clone, times the telluric
    clone, convolved with a Gaussian LSF of resolving power R, averaged over each data pixel,
    times a per-order polynomial. Fitting proceeds as users need: a χ² scan in RV, then template
    matching (RV, v sin i, continuum; R if asked), then the lines with the L1 pull of Eq. 11.

    Parameters
    ----------
    data : Spectrum, SpectrumList or list of Spectrum
        One or more échelle orders (muler's ``HPFSpectrum``/``IGRINSSpectrum`` included), after the
        user's own reduction chain (e.g. ``.remove_nans().deblaze().normalize()``). NaN and masked
        pixels are left out of χ² (not out of the model). Missing uncertainties: a constant noise
        level per order is estimated with the DER_SNR estimator (Stoehr et al. 2008) and a
        :class:`MissingUncertaintyWarning` is issued. DER_SNR counts unresolved line structure as
        noise, so for sharp-lined, line-rich spectra it overestimates (3.8× on the WASP 69 HPF
        order) and χ² is then too small: give uncertainties when you have them.
    stellar : SpectralClone
        The stellar clone; only its lines within the data range (± buffer and the RV range) are used.
    telluric : SpectralClone, optional
        Telluric clone (not Doppler shifted).
    resolving_power : float
        R (HPF ≈ 55,000; IGRINS ≈ 45,000).
    rv : Quantity or float (km/s), optional
        Starting RV; if None, the best of a χ² scan over ± ``rv_range`` in 1 km/s steps.
    vsini : Quantity or float (km/s)
        Starting v sin i.
    limb_darkening : float
        ε of the rotation kernel.
    continuum_degree : int
        Degree of the per-order polynomial.
    tune_lines : iterable of str
        Line parameters tuned in the line stage (empty: template matching only). When widths are
        tuned, v sin i is held at its template-matching value during the line stage (widths and
        v sin i are nearly degenerate); otherwise it stays free.
    tune_resolving_power : bool
        Also tune R.
    regularization, width_regularization : float or None
        Λ of the L1 pulls of ln a and of ln σ, ln γ towards the clone (None: no pull).
    template_epochs, line_epochs : int
        Largest numbers of Adam epochs of the two stages (both stop early on a plateau;
        ``line_epochs=0``: pure template matching).
    lr : float
        Adam learning rate.
    buffer : Quantity
        Lines within this distance outside the data (plus the RV range) are kept.
    device : str
        'cpu', 'cuda' or 'auto'.
    progress : bool
        Progress bars.
    likelihood : None, "gp", dict or GPContinuumLikelihood
        The noise model of the loss. None (default): χ² with the data uncertainties. ``"gp"``:
        the Gaussian-process pseudo-continuum likelihood of Appendix C.2 (Eq. C4;
        :class:`blase_specutils.gp.GPContinuumLikelihood`, needs ``pip install
        'blase_specutils[gp]'``): a smooth per-order GP over wavelength (Matérn-3/2, initial
        amplitude 1 %, length scale 5 Å) on top of the per-pixel noise, its amplitude and length
        scale tuned with the model in both stages, in place of χ² (on the same scale, so Λ keeps
        its meaning). A dict gives keyword options of that class (e.g. ``{"kernel": "rbf",
        "length_scale": 10.0}``); a ready-made likelihood must cover the concatenated, wavelength-
        sorted pixels of the data. The result's :attr:`TransferResult.pseudo_continuum` is the
        GP's conditional mean, the inferred continuum error.

    Returns
    -------
    TransferResult
    """
    if not isinstance(stellar, SpectralClone):
        raise TypeError("stellar must be a SpectralClone (clone_spectrum, SpectralClone.load or load_blase03)")
    if telluric is not None and not isinstance(telluric, SpectralClone):
        raise TypeError("telluric must be a SpectralClone or None")
    orders = _orders(data)
    wl, flux, sigma, good, oid, missing, order_ids, arrs = _gather(orders)
    if missing:
        warnings.warn(
            "the data have no uncertainties: using a constant noise level per order from the DER_SNR "
            "estimator, which counts line structure as noise (an overestimate for line-rich spectra)",
            MissingUncertaintyWarning,
            stacklevel=2,
        )
    to_kms = lambda q: float(u.Quantity(q, u.km / u.s).value) if isinstance(q, u.Quantity) else float(q)  # noqa: E731
    rv_range_k = to_kms(rv_range)
    vsini_k = to_kms(vsini)
    if not (resolving_power > 0):
        raise ValueError(f"resolving_power must be > 0, got {resolving_power}")
    if vsini_k < 0:
        raise ValueError(f"vsini must be >= 0 km/s, got {vsini_k}")
    dev = resolve_device(device)
    buf = float(u.Quantity(buffer, u.AA).value)
    lo = wl[0] * (1 - rv_range_k / SPEED_OF_LIGHT_KMS) - buf
    hi = wl[-1] * (1 + rv_range_k / SPEED_OF_LIGHT_KMS) + buf
    centers = stellar.model.lam_centers.detach().cpu().numpy()
    sel = (centers > lo) & (centers < hi)
    if not sel.any():
        raise ValueError(
            f"the stellar clone has no lines within the data range {wl[0]:.1f}-{wl[-1]:.1f} Å (± buffer and RV "
            f"range); its lines span {centers.min():.1f}-{centers.max():.1f} Å. Use a clone of this band."
        )
    st = stellar.model.subset(torch.as_tensor(sel)).to(dev)
    tel = None
    if telluric is not None:
        tc = telluric.model.lam_centers.detach().cpu().numpy()
        tsel = (tc > wl[0] - buf) & (tc < wl[-1] + buf)
        tel = telluric.model.subset(torch.as_tensor(tsel)).to(dev)
        tel.set_tuned(())
    model = TransferModel(st, wl, order_index=oid, telluric=tel, rv=0.0 if rv is None else to_kms(rv),
                          vsini=max(vsini_k, 0.05), resolving_power=resolving_power,
                          limb_darkening=limb_darkening, continuum_degree=continuum_degree,
                          max_vsini=max(2.0 * vsini_k, vsini_k + 20.0), max_rv=rv_range_k).to(dev)
    data_t = torch.as_tensor(np.where(good, flux, 0.0), dtype=st.dtype, device=dev)
    w_t = torch.as_tensor(np.where(good, 1.0 / np.where(good, sigma, 1.0) ** 2, 0.0), dtype=st.dtype, device=dev)
    lik = None
    if likelihood is not None:
        from .gp import build_likelihood  # optional extra: a clear ImportError names it

        lik = build_likelihood(likelihood, wl, sigma, good, oid, device=dev)
    scan = None if rv is not None else np.arange(-rv_range_k, rv_range_k + 0.5, 1.0)
    prior = {k: getattr(st, k).detach().clone() for k in ("log_amplitudes", "log_sigmas", "log_gammas")}
    fit = fit_transfer(model, data_t, w_t, rv_scan=scan, template_epochs=template_epochs, line_epochs=0,
                       tune_resolving_power=tune_resolving_power, lr=lr, progress=progress, likelihood=lik)
    n_good = int(good.sum())
    template = dict(chi2=fit.chi2["template"], chi2_reduced=fit.chi2["template"] / max(n_good - 3, 1),
                    rv=float(model.rv.detach()), vsini=float(model.vsini.detach()),
                    resolving_power=float(model.resolving_power.detach()))
    tune_lines = tuple(tune_lines)
    if line_epochs and tune_lines:
        fit2 = fit_transfer(model, data_t, w_t, rv_scan=None, template_epochs=0, line_epochs=line_epochs,
                            tune_lines=tune_lines, tune_resolving_power=tune_resolving_power,
                            regularization=regularization, width_regularization=width_regularization, lr=lr,
                            progress=progress, likelihood=lik)
        fit.stages.update(fit2.stages)
        fit.chi2["lines"] = fit2.chi2["lines"]
    pseudo = None
    with torch.no_grad():
        model_flux = model().cpu().numpy()
        if lik is not None:
            pseudo = lik.conditional_mean(data_t - model()).cpu().numpy()
    return TransferResult(
        model=model, orders=orders, order_ids=order_ids, arrays=arrs, wavelength=wl, flux=flux, sigma=sigma,
        good=good, order_of_pixel=oid, model_flux=model_flux, prior=prior, template=template, fit=fit,
        settings=dict(regularization=regularization, width_regularization=width_regularization,
                      tune_lines=",".join(tune_lines), line_epochs=line_epochs, template_epochs=template_epochs),
        stellar_clone=stellar, telluric_clone=telluric, likelihood=lik, pseudo_continuum_flux=pseudo,
    )


class TransferResult:
    """The outcome of :func:`fit_spectrum`.

    Attributes
    ----------
    model : blase_specutils.core.TransferModel
        The fitted forward model (torch).
    template : dict
        Template-matching stage: χ², reduced χ², RV, v sin i, R.
    fit : blase_specutils.core.TransferFit
        Loss histories of the stages.
    likelihood : blase_specutils.gp.GPContinuumLikelihood or None
        The fitted GP likelihood (``likelihood="gp"``), or None for χ².
    pseudo_continuum_flux : ndarray or None
        The GP's conditional mean at the data pixels (see :attr:`pseudo_continuum`).
    """

    def __init__(self, *, model, orders, order_ids, arrays, wavelength, flux, sigma, good, order_of_pixel,
                 model_flux, prior, template, fit, settings, stellar_clone, telluric_clone,
                 likelihood=None, pseudo_continuum_flux=None) -> None:
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
        self.template = template
        self.fit = fit
        self.settings = settings
        self._stellar_clone = stellar_clone
        self._telluric_clone = telluric_clone
        self.likelihood = likelihood
        self.pseudo_continuum_flux = pseudo_continuum_flux

    # -------------------------------------------------------------- scalars
    @property
    def rv(self) -> u.Quantity:
        """Radial velocity."""
        return float(self.model.rv.detach()) * u.km / u.s

    @property
    def vsini(self) -> u.Quantity:
        """Projected rotational velocity v sin i."""
        return float(self.model.vsini.detach()) * u.km / u.s

    @property
    def resolving_power(self) -> float:
        """Instrumental resolving power R."""
        return float(self.model.resolving_power.detach())

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

    # -------------------------------------------------------------- spectra
    def _per_order(self, values: np.ndarray):
        out = []
        start = 0
        for arr, spec in zip(self._arrays, [self._orders[i] for i in self._order_ids]):
            n = arr.wavelength.size
            v = values[start : start + n]
            start += n
            out.append(arrays_to_spectrum(arr.wavelength, v, flux_unit=arr.flux_unit, mask=~arr.good, like=spec))
        # back to the user's order sequence
        inv = np.argsort(self._order_ids)
        out = [out[i] for i in inv]
        return out[0] if len(out) == 1 else SpectrumList(out)

    @property
    def model_spectrum(self):
        """M(λ_D) at the data sampling, as the input's own class (or a SpectrumList of orders)."""
        return self._per_order(self.model_flux)

    @property
    def residual(self):
        """Data − model, like :attr:`model_spectrum`."""
        return self._per_order(self.flux - self.model_flux)

    @property
    def pseudo_continuum(self):
        r"""The inferred continuum error :math:`\mathrm{E}[f \mid R] = K_* C^{-1} R` of the GP
        likelihood (Eq. C4), in the data's flux and spectral units, like :attr:`model_spectrum`
        (predicted at masked pixels too); None when the fit used χ². Data − model − this is what
        the lines and the noise have to explain."""
        if self.pseudo_continuum_flux is None:
            return None
        return self._per_order(self.pseudo_continuum_flux)

    @property
    def gp_hyperparameters(self) -> dict | None:
        """Fitted GP amplitude (data flux units), length scale and noise scale, or None for χ²."""
        if self.likelihood is None:
            return None
        with torch.no_grad():
            amp = self.likelihood.amplitude.cpu().numpy()
            ell = self.likelihood.length_scale.cpu().numpy()
            beta = float(self.likelihood.noise_scale)
        unit = self._arrays[0].flux_unit
        if amp.size == 1:  # hyperparameters shared by all orders
            amp, ell = amp[0], ell[0]
        return {"kernel": self.likelihood.kernel_name, "amplitude": amp * unit, "length_scale": ell * u.AA,
                "noise_scale": beta}

    def stellar_clone(self) -> SpectralClone:
        """The transfer-learned stellar clone (the fitted lines only), for evaluation anywhere."""
        m = self.model.stellar.subset(torch.arange(self.model.stellar.n_lines))
        return SpectralClone(m, meta={"source": "transfer-learned"})

    def semi_empirical_template(self, spectral_axis: u.Quantity | None = None) -> Spectrum:
        """The transfer-learned clone at native resolution, without RV, v sin i or instrument (the
        paper's "super-resolution" product), on ``spectral_axis`` (default: the model grid λ_Z)."""
        axis = self.model.lam_z.cpu().numpy() * u.AA if spectral_axis is None else spectral_axis
        return self.stellar_clone().evaluate(axis)

    def telluric_template(self, spectral_axis: u.Quantity | None = None) -> Spectrum | None:
        """The telluric clone on ``spectral_axis`` (default λ_Z), or None without one."""
        if self.model.telluric is None:
            return None
        axis = self.model.lam_z.cpu().numpy() * u.AA if spectral_axis is None else spectral_axis
        return SpectralClone(self.model.telluric).evaluate(axis)

    @property
    def lines(self) -> QTable:
        """Clone and fitted values per line: amplitude a, σ, γ, equivalent width, and the change."""
        st = self.model.stellar
        with torch.no_grad():
            c = st.lam_centers.cpu().numpy()
            fit = {k: getattr(st, k).exp().cpu().numpy() for k in ("log_amplitudes", "log_sigmas", "log_gammas")}
            clo = {k: v.exp().cpu().numpy() for k, v in self.prior.items()}
        ew_fit = _equivalent_widths(fit["log_amplitudes"], fit["log_sigmas"], fit["log_gammas"], st.mode, st.sign, st.profile)
        ew_clo = _equivalent_widths(clo["log_amplitudes"], clo["log_sigmas"], clo["log_gammas"], st.mode, st.sign, st.profile)
        t = QTable()
        t["center"] = c * u.AA
        t["amplitude_clone"] = clo["log_amplitudes"] * u.AA
        t["amplitude_fit"] = fit["log_amplitudes"] * u.AA
        t["sigma_clone"] = clo["log_sigmas"] * u.AA
        t["sigma_fit"] = fit["log_sigmas"] * u.AA
        t["gamma_clone"] = clo["log_gammas"] * u.AA
        t["gamma_fit"] = fit["log_gammas"] * u.AA
        t["equivalent_width_clone"] = ew_clo * u.AA
        t["equivalent_width_fit"] = ew_fit * u.AA
        t["delta_ln_amplitude"] = np.log(fit["log_amplitudes"] / clo["log_amplitudes"])
        t["changed"] = np.abs(t["delta_ln_amplitude"]) > 0.01
        return t

    def summary(self) -> dict:
        """Numbers for reports and ``--json``."""
        return {
            "template_matching": {k: float(v) for k, v in self.template.items()},
            "rv_kms": float(self.rv.value),
            "vsini_kms": float(self.vsini.value),
            "resolving_power": self.resolving_power,
            "chi2": self.chi2,
            "chi2_reduced": self.chi2_reduced,
            "rms_residual": self.rms_residual,
            "n_pixels": self.n_pixels,
            "n_lines": int(self.model.stellar.n_lines),
            "n_lines_changed": int(np.sum(self.lines["changed"])),
        } | self._gp_summary()

    def _gp_summary(self) -> dict:
        hp = self.gp_hyperparameters
        if hp is None:
            return {}
        return {"gp": {"kernel": hp["kernel"], "amplitude": np.asarray(hp["amplitude"].value).tolist(),
                       "length_scale_angstrom": np.asarray(hp["length_scale"].to_value(u.AA)).tolist(),
                       "noise_scale": hp["noise_scale"]}}

    # -------------------------------------------------------------- plot
    def plot(self, *, band=None, title: str | None = None):
        """Data, model and residual (with the GP pseudo-continuum when fitted with one), and the
        stellar (and telluric) templates (cf. paper Fig. 9)."""
        import matplotlib.pyplot as plt

        ntop = 3 if self.model.telluric is not None else 2
        fig, ax = plt.subplots(ntop + 1, 1, figsize=(11, 2.2 * (ntop + 1)), sharex=True)
        w = self.wavelength
        sel = np.ones(w.size, bool) if band is None else (w >= band[0].to_value(u.AA)) & (w <= band[1].to_value(u.AA))
        lz = self.model.lam_z.cpu().numpy()
        zsel = (lz >= w[sel].min()) & (lz <= w[sel].max())
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
        ax[1].text(0.01, 0.9, f"χ²_red {self.chi2_reduced:.2f}, RV {self.rv.value:.3f} km/s, "
                   f"v sin i {self.vsini.value:.2f} km/s", transform=ax[1].transAxes, fontsize=8, va="top")
        st = self.semi_empirical_template(lz[zsel] * u.AA).flux.value
        cl = self._stellar_clone.evaluate(lz[zsel] * u.AA).flux.value
        ax[2].plot(lz[zsel], cl, lw=0.6, color="0.6", label="clone")
        ax[2].plot(lz[zsel], st, lw=0.7, color="C2", label="transfer-learned")
        ax[2].set_ylabel("stellar")
        ax[2].legend(loc="lower left", fontsize=8)
        if ntop == 3:
            ax[3].plot(lz[zsel], self.telluric_template(lz[zsel] * u.AA).flux.value, lw=0.6, color="C4")
            ax[3].set_ylabel("telluric")
        ax[-1].set_xlabel("wavelength (Å)")
        if title:
            ax[0].set_title(title)
        fig.tight_layout()
        return fig

    # -------------------------------------------------------------- save
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fit to FITS: the fitted lines (the clone layout), the clone's starting values
        (``PRIOR``), the data and model (``DATA``), and RV, v sin i, R and χ² in the header. With a
        GP likelihood, ``DATA`` also holds ``pseudo_continuum`` and the header the GP's kernel
        (``GPKERNEL``), amplitude (``GPAMP``) and length scale in Å (``GPLENGTH``) when they are
        shared by all orders."""
        path = Path(path)
        clone = self.stellar_clone()
        clone.meta.update({"rv_kms": float(self.rv.value), "vsini": float(self.vsini.value),
                           "r": self.resolving_power, "chi2": self.chi2, "chi2red": self.chi2_reduced})
        tmp = clone.save(path, overwrite=overwrite, include_target=False)
        with fits.open(tmp, mode="update") as hdul:
            hdr = hdul[0].header
            hdr["FITKIND"] = ("transfer", "blase_specutils transfer-learning result")
            hdul.append(fits.BinTableHDU.from_columns(
                [fits.Column(k, "D", array=v.cpu().numpy()) for k, v in self.prior.items()], name="PRIOR"))
            columns = [
                fits.Column("wavelength", "D", unit="Angstrom", array=self.wavelength),
                fits.Column("flux", "D", array=self.flux),
                fits.Column("sigma", "D", array=self.sigma),
                fits.Column("good", "L", array=self.good),
                fits.Column("model", "D", array=self.model_flux),
                fits.Column("order", "K", array=self.order_of_pixel.astype(np.int64)),
            ]
            if self.pseudo_continuum_flux is not None:
                columns.append(fits.Column("pseudo_continuum", "D", array=self.pseudo_continuum_flux))
                hp = self.gp_hyperparameters
                hdr["GPKERNEL"] = (hp["kernel"], "GP pseudo-continuum likelihood kernel")
                if np.ndim(hp["amplitude"]) == 0:
                    hdr["GPAMP"] = (float(hp["amplitude"].value), "GP amplitude, data flux units")
                    hdr["GPLENGTH"] = (float(hp["length_scale"].to_value(u.AA)), "GP length scale, Angstrom")
            hdul.append(fits.BinTableHDU.from_columns(columns, name="DATA"))
        return path
