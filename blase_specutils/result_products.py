"""The products of a transfer-learning fit: its spectra, templates, clones and line tables.

:class:`ResultProducts` is a mixin of :class:`~blase_specutils.transfer_result.TransferResult`;
it turns the fitted model and the data the result holds into specutils spectra on the user's own
axis and class, clones and tables.
"""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import torch
from astropy.table import QTable
from specutils import Spectrum, SpectrumList

from .cloning import SpectralClone, _equivalent_widths
from .core.clone import LineCloneModel
from .core.training import check_real
from .spectra import SpectrumArrays, arrays_to_spectrum, wavelength_to_angstrom

__all__ = ["ResultProducts"]

#: Names of the per-line log parameters kept as the clone's starting values (the L1 pull's centre).
_LOG_PARAMS = ("log_amplitudes", "log_sigmas", "log_gammas")


def _line_table(clone: LineCloneModel, prior: dict) -> QTable:
    """Clone (``prior``) and fitted values of each line of ``clone``, with equivalent widths and the change."""
    with torch.no_grad():
        c = clone.lam_centers.detach().cpu().numpy()
        fit = {k: getattr(clone, k).detach().exp().cpu().numpy() for k in _LOG_PARAMS}
        clo = {k: prior[k].detach().exp().cpu().numpy() for k in _LOG_PARAMS}
    m = clone
    ew_fit = _equivalent_widths(fit["log_amplitudes"], fit["log_sigmas"], fit["log_gammas"], m.mode, m.sign, m.profile)
    ew_clo = _equivalent_widths(clo["log_amplitudes"], clo["log_sigmas"], clo["log_gammas"], m.mode, m.sign, m.profile)
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


def _user_axis(arr: SpectrumArrays, spec: Spectrum) -> np.ndarray:
    """The wavelengths (Å, ascending) that ``spec``, the user's order, had before the boundary
    moved them (air to vacuum, barycentric to observatory), so that outputs come back on the
    user's own axis; ``arr.wavelength`` where ``spec`` is not that order's spectrum."""
    axis = spec.spectral_axis
    if axis.ndim != 1 or axis.size != arr.wavelength.size:
        return arr.wavelength
    try:
        wl = wavelength_to_angstrom(axis)
    except (TypeError, u.UnitsError):
        return arr.wavelength
    return wl[::-1] if wl.size > 1 and wl[0] > wl[-1] else wl


def _as_list_class(out: list, list_class: type | None):
    """The outputs of the orders as the input came: a ``SpectrumList`` of the user's class in, the
    same class out, whatever the number of orders (muler's ``HPFSpectrumList`` and
    ``EchelleSpectrumList`` keep ``.stitch()``; a plain ``SpectrumList`` where that class cannot be
    built from a list); a Spectrum, or a plain list or tuple of one order: that order's spectrum;
    a plain list or tuple of several: a ``SpectrumList``."""
    is_list_class = isinstance(list_class, type) and issubclass(list_class, SpectrumList)
    if not is_list_class and len(out) == 1:
        return out[0]
    if is_list_class and list_class is not SpectrumList:
        try:
            return list_class(out)
        except Exception:  # a list class that needs other arguments: the plain one
            pass
    return SpectrumList(out)



class ResultProducts:
    """Spectra, templates, clones and line tables of a fit (a mixin of
    :class:`~blase_specutils.transfer_result.TransferResult`)."""

    def _per_order(self, values: np.ndarray, *, uncertainty: np.ndarray | None = None,
                   mask: np.ndarray | None = None):
        out = []
        start = 0
        for arr, spec in zip(self._arrays, [self._orders[i] for i in self._order_ids]):
            n = arr.wavelength.size
            sl = slice(start, start + n)
            start += n
            bad = ~arr.good if mask is None else (~arr.good | mask[sl])
            out.append(arrays_to_spectrum(_user_axis(arr, spec), values[sl], flux_unit=arr.flux_unit, mask=bad, like=spec,
                                          uncertainty=None if uncertainty is None else uncertainty[sl]))
        # back to the user's order sequence
        inv = np.argsort(self._order_ids)
        out = [out[i] for i in inv]
        return _as_list_class(out, self._list_class)

    @property
    def model_spectrum(self):
        """M(λ_D) at the data sampling, as the input's own class (or a SpectrumList of orders;
        a plain ``Spectrum`` per order after :meth:`load`)."""
        return self._per_order(self.model_flux)

    @property
    def residual(self):
        """Data − model, like :attr:`model_spectrum`."""
        return self._per_order(self.flux - self.model_flux)

    @property
    def wavelength_correction(self) -> QTable | None:
        """The fitted per-order wavelength correction (``calibration_degree``), or None without one.

        A table with one row per order: ``order`` (the user's order index), ``coefficients``
        c_0 … c_K of δv(x) = Σ_k c_k x^k in m/s (x from −1 at the order's blue end to 1 at its red
        end), ``mean`` and ``max_abs`` of δv over the order's pixels (m/s). The model at pixel λ
        is evaluated at λ (1 + δv/c): a positive δv means the pixel's true wavelength is redder
        than its label."""
        m = self.model
        if m.calibration_degree is None:
            return None
        coeffs = m.calibration_coeffs.detach().cpu().numpy() * 1000.0
        with torch.no_grad():
            dv = m.velocity_correction().cpu().numpy() * 1000.0
        oid = np.asarray(self.order_of_pixel)
        mean = np.array([dv[oid == k].mean() for k in range(coeffs.shape[0])])
        peak = np.array([np.abs(dv[oid == k]).max() for k in range(coeffs.shape[0])])
        return QTable({"order": np.arange(coeffs.shape[0], dtype=np.int64), "coefficients": coeffs * (u.m / u.s),
                       "mean": mean * (u.m / u.s), "max_abs": peak * (u.m / u.s)})

    def telluric_transmission(self) -> np.ndarray | None:
        """The fitted telluric transmission T^X at the data pixels and the data's resolution
        (resample[T^X * g(R)], or resample[T^X] for a clone at the instrument's resolution), with
        the wavelength correction; None without a telluric clone."""
        if not self.has_telluric:
            return None
        with torch.no_grad():
            return self.model.transmission_at_pixels().cpu().numpy()

    def telluric_corrected(self, *, min_transmission: float = 0.2):
        r"""The data divided by the fitted telluric transmission: the telluric-corrected spectrum.

        :math:`F / T_\mathrm{fit}`, with :math:`T_\mathrm{fit}` the transmission at the data's
        resolution (:meth:`telluric_transmission`) and uncertainties :math:`\sigma / T_\mathrm{fit}`
        (the transmission's own error is not propagated). Pixels where :math:`T_\mathrm{fit}` is
        below ``min_transmission`` are masked: division there amplifies the noise and any error of
        the telluric model. The continuum polynomial and the star stay in, so an A0V standard comes
        back as its own stellar spectrum and a science target as the star alone.

        Dividing by a transmission convolved with the LSF is exact only where the star is smooth
        across a telluric line (the usual assumption of telluric correction); the residual of a
        fit with a stellar clone shows where it is not.

        Parameters
        ----------
        min_transmission : float
            Pixels with a fitted transmission below this (0-1, default 0.2) are masked.

        Returns
        -------
        Spectrum or SpectrumList
            Like :attr:`model_spectrum`: the input's own class per order, with its ``meta``, units,
            the propagated uncertainty and the mask (the input's mask or'ed with the low-transmission
            pixels).

        Raises
        ------
        ValueError
            The fit has no telluric clone, or ``min_transmission`` is not within [0, 1).
        """
        if not self.has_telluric:
            raise ValueError("this fit has no telluric clone: there is no transmission to divide by "
                             "(fit with telluric=...)")
        t_min = check_real(min_transmission, "min_transmission")
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"min_transmission must be within [0, 1), got {min_transmission}")
        trans = self.telluric_transmission()
        low = ~(trans >= t_min)  # NaN counts as low
        safe = np.where(low, 1.0, trans)
        return self._per_order(self.flux / safe, uncertainty=self.sigma / safe, mask=low)

    def save_corrected(self, path: str | Path, *, min_transmission: float = 0.2, overwrite: bool = False) -> Path:
        """Write :meth:`telluric_corrected` to a FITS table (atomically): one row per data pixel,
        columns ``wavelength`` (the data's spectral unit), ``flux`` (the data's flux unit),
        ``uncertainty``, ``transmission`` (the fitted T at the data's resolution), ``mask`` (True:
        input mask or transmission below ``min_transmission``) and ``order`` (the user's order
        index), orders one after another in the input's sequence. Read it back with
        ``astropy.table.Table.read``."""
        from astropy.table import Table, vstack

        from .io import atomic_write

        corrected = self.telluric_corrected(min_transmission=min_transmission)
        transmission = self._per_order(self.telluric_transmission())  # in the same sequence and axis order
        pairs = zip(*(list(x) if isinstance(x, SpectrumList) else [x] for x in (corrected, transmission)))
        tables = []
        for k, (spec, trans) in enumerate(pairs):
            tables.append(Table({"wavelength": spec.spectral_axis, "flux": spec.flux,
                                 "uncertainty": spec.uncertainty.array * spec.flux.unit,
                                 "transmission": np.asarray(trans.flux.value, dtype=np.float64),
                                 "mask": np.asarray(spec.mask, dtype=bool),
                                 "order": np.full(spec.flux.size, k, dtype=np.int64)}))
        table = vstack(tables)
        table.meta["MINTRANS"] = float(min_transmission)
        return atomic_write(path, lambda tmp: table.write(tmp, format="fits"), overwrite=overwrite)

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
        """Fitted GP amplitude (data flux units), length scale and noise scale, or None for χ²
        (and after :meth:`load`)."""
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

    def stellar_clone(self) -> SpectralClone | None:
        """The transfer-learned stellar clone (the fitted lines only), for evaluation anywhere;
        None for a telluric-only fit."""
        if not self.has_stellar:
            return None
        m = self.model.stellar.subset(torch.arange(self.model.stellar.n_lines))
        return SpectralClone(m, meta={"source": "transfer-learned"})

    def telluric_clone(self) -> SpectralClone | None:
        """The (transfer-learned) telluric clone, fitted lines only, *without* the power X (its
        ``meta["telpower"]`` holds X); None without a telluric clone."""
        if not self.has_telluric:
            return None
        m = self.model.telluric.subset(torch.arange(self.model.telluric.n_lines))
        meta = {"source": "transfer-learned telluric", "lsf": "instrument" if self.model.telluric_instrumental else "native"}
        x = self.telluric_power
        meta |= ({"telpower": x} if not isinstance(x, dict) else {"components": ",".join(x)})
        return SpectralClone(m, meta=meta)

    def semi_empirical_template(self, spectral_axis: u.Quantity | None = None) -> Spectrum | None:
        """The transfer-learned clone at native resolution, without RV, v sin i or instrument (the
        paper's "super-resolution" product), on ``spectral_axis`` (default: the model grid λ_Z);
        None for a telluric-only fit (see :meth:`telluric_template`).

        Its axis is the star's rest frame, so its specutils velocity tag is 0; its ``meta`` holds
        the velocities that take it to the data: ``rv_total_kms`` (the measured RV, observatory
        frame), ``rv_tagged_kms``, ``rv_kms`` and ``rv_barycentric_kms`` (None without a
        correction). ``template.shift_spectrum_to(radial_velocity=result.rv_total)`` moves it
        to the observatory's axis (relativistic Doppler; the fit's optical convention differs by
        v²/2c)."""
        if not self.has_stellar:
            return None
        axis = self.model.lam_z.cpu().numpy() * u.AA if spectral_axis is None else spectral_axis
        spec = self.stellar_clone().evaluate(axis)
        bary = self.rv_barycentric
        spec.meta.update({"rv_total_kms": float(self.rv_total.value), "rv_tagged_kms": self.frames.rv_tagged,
                          "rv_kms": float(self.rv.value), "frame": "stellar rest frame",
                          "rv_barycentric_kms": None if bary is None else float(bary.value)})
        return spec

    def telluric_template(self, spectral_axis: u.Quantity | None = None, *, power: bool = True) -> Spectrum | None:
        """The fitted telluric transmission T^X at native resolution on ``spectral_axis`` (default
        λ_Z), or None without a telluric clone.

        Parameters
        ----------
        spectral_axis : Quantity, optional
            Where to evaluate (any spectral unit).
        power : bool
            Raise the (tuned) telluric clone to the fitted power X (default); False: the clone alone.
        """
        if not self.has_telluric:
            return None
        axis = self.model.lam_z.cpu().numpy() * u.AA if spectral_axis is None else spectral_axis
        spec = SpectralClone(self.model.telluric).evaluate(axis)
        if not power:
            return spec
        m = self.model
        if m.telluric_masks is None:
            flux = np.power(spec.flux.value, self.telluric_power)
        else:  # exp(Σ_k X_k ln T_k), each component on the same axis
            lam = torch.as_tensor(wavelength_to_angstrom(spec.spectral_axis), dtype=torch.float64,
                                  device=m.lam_z.device)
            order = torch.argsort(lam)
            with torch.no_grad():
                log_t = sum(float(x) * m.telluric.log_flux(lam[order], lines=mask)
                            for x, mask in zip(m.telluric_power, m.telluric_masks))
            flux = np.empty(lam.numel())
            flux[order.cpu().numpy()] = torch.exp(log_t).cpu().numpy()
        return Spectrum(spectral_axis=spec.spectral_axis, flux=flux * u.one,
                        meta=dict(spec.meta, telluric_power=self.telluric_power))

    @property
    def lines(self) -> QTable:
        """Clone and fitted values per line: amplitude a, σ, γ, equivalent width, and the change.

        The stellar lines; for a telluric-only fit, the telluric lines (see also
        :attr:`telluric_lines`)."""
        if not self.has_stellar:
            return self.telluric_lines
        return _line_table(self.model.stellar, self.prior)

    @property
    def telluric_lines(self) -> QTable | None:
        """The line table (as :attr:`lines`) of the telluric clone; None without one."""
        if not self.has_telluric:
            return None
        t = _line_table(self.model.telluric, self.telluric_prior)
        t.meta["telluric_power"] = self.telluric_power
        masks = self.model.telluric_masks
        if masks is not None:
            comp = np.zeros(len(t), dtype=np.int64)
            for k, mask in enumerate(masks):
                comp[mask.cpu().numpy()] = k
            t["component"] = np.asarray(self.model.telluric_names)[comp]
        return t
