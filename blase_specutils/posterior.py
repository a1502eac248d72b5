"""The posterior of a transfer-learning fit as a result: :class:`PosteriorFit`, its summaries
(:class:`Measurement`, :class:`ModelBand`) and its line table.

:func:`~blase_specutils.bayes.sample_posterior` makes it; this module holds no Pyro code, so a
saved posterior reads back (:meth:`PosteriorFit.load`, in :mod:`~blase_specutils.posterior_file`)
with numpy and astropy alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import astropy.units as u
import numpy as np
from astropy.table import QTable

from .cloning import _equivalent_widths
from .constants import POSTERIOR_CONSTRAINED_FRACTION, POSTERIOR_EW_DRAWS, POSTERIOR_FINAL_ELBO_STEPS
from .posterior_plots import PosteriorPlots
from .spectra import arrays_to_spectrum

if TYPE_CHECKING:
    from .bayes import TransferPosteriorModel
    from .fitting import TransferResult

__all__ = ["Measurement", "ModelBand", "PosteriorFit"]

#: Half-width of the central 68.27 % interval of a Laplace distribution, in units of its scale.
_LAPLACE_68 = math.log(1.0 / (1.0 - 0.6827))

@dataclass(frozen=True)
class Measurement:
    """A posterior summary: the median and the 16th and 84th percentiles, as Quantities.

    ``str(m)`` gives e.g. ``"-9.612 +0.011/-0.012 km / s"``.
    """

    value: u.Quantity
    lower: u.Quantity
    upper: u.Quantity

    @property
    def plus(self) -> u.Quantity:
        """84th percentile − median."""
        return self.upper - self.value

    @property
    def minus(self) -> u.Quantity:
        """Median − 16th percentile."""
        return self.value - self.lower

    @property
    def error(self) -> u.Quantity:
        """Half the 68 % interval, (upper − lower)/2."""
        return 0.5 * (self.upper - self.lower)

    @property
    def unit(self):
        return self.value.unit

    def to(self, unit) -> Measurement:
        """The same measurement in another unit."""
        return Measurement(self.value.to(unit), self.lower.to(unit), self.upper.to(unit))

    def __str__(self) -> str:
        v, lo, hi = (float(q.value) for q in (self.value, self.lower, self.upper))
        err = min(v - lo, hi - v)
        digits = 3 if not (err > 0 and math.isfinite(err)) else max(0, 1 - math.floor(math.log10(err)))
        unit = "" if self.unit == u.dimensionless_unscaled else f" {self.unit}"
        return f"{v:.{digits}f} +{hi - v:.{digits}f}/-{v - lo:.{digits}f}{unit}"


class ModelBand(NamedTuple):
    """Posterior median of M(λ_D) and the lower/upper percentiles, as spectra."""

    median: object
    lower: object
    upper: object


def _percentiles(x: np.ndarray, q=(16.0, 50.0, 84.0)) -> np.ndarray:
    """Percentiles that are draws themselves (no interpolation), so they commute with monotonic
    maps: exp of the ln a percentiles is the a percentiles."""
    return np.percentile(x, q, axis=0, method="inverted_cdf")


class PosteriorFit(PosteriorPlots):
    r"""Posterior of a transfer-learning fit: samples, summaries, the model band, plots, FITS I/O.

    Made by :func:`sample_posterior` (or :meth:`load`); do not build it by hand.

    Attributes
    ----------
    samples : dict of numpy arrays
        Posterior draws in physical units, first axis the draw: ``rv`` (km/s), ``vsini`` (km/s),
        ``resolving_power``, ``ln_amplitude`` (ln a, Å) and ``ln_sigma``/``ln_gamma`` (Å) when latent,
        ``continuum`` (draw, order, coefficient), ``ln_telluric_power`` (ln X; draw, or draw and
        component, in the order of :attr:`telluric_names`) with a telluric clone. Parameters held
        fixed repeat their value. A telluric-only fit has no ``rv``, ``vsini`` or line draws.
    predictive : ndarray
        M(λ_D) for the first draws (draw, pixel): the posterior of the noiseless model.
    elbo_history : ndarray
        ELBO estimate at each SVI step (higher is better).
    guide : str
        Guide kind (``"delta"``, ``"normal"``, ``"lowrank"``).
    settings : dict
        Options of the run (guide, rank, steps, learning rate, Λ, tuned parameters, seconds, ...).
    result : TransferResult or None
        The fit the posterior was started from (None after :meth:`load`).
    posterior_model : TransferPosteriorModel or None
        The Pyro model (None after :meth:`load`).
    guide_module : pyro.infer.autoguide.AutoGuide or None
        The trained guide (None after :meth:`load`).
    telluric_names : tuple of str
        Names of the telluric components (molecules), one per power, when the fit was given several
        named telluric clones; empty for one power or none.

    Notes
    -----
    Telluric powers are read with :meth:`measurement`: ``"telluric_power"`` for the one power of
    a telluric clone, ``"telluric_power:H2O"`` (the component's name after a colon) for each power
    of several named clones; :attr:`telluric_power` gives the same as one Measurement or a dict by
    name. A posterior of a telluric-only fit (:attr:`has_stellar` False) has no RV, v sin i or
    line table: :attr:`rv`, :attr:`vsini`, their errors and :attr:`lines` are None, and
    ``measurement("rv")`` raises a ValueError that says so.
    """

    def __init__(self, *, samples: dict, fit_values: dict, clone_values: dict, line_info: dict, data: dict,
                 predictive: np.ndarray, elbo_history: np.ndarray, settings: dict,
                 result: TransferResult | None = None, lines: QTable | None = None,
                 posterior_model: TransferPosteriorModel | None = None, guide_module=None,
                 telluric_names: Sequence[str] = ()) -> None:
        self.samples = samples
        self.fit_values = fit_values
        self.clone_values = clone_values
        self._line_info = line_info
        self._data = data
        self.predictive = predictive
        self.elbo_history = np.asarray(elbo_history, dtype=float)
        self.settings = settings
        self.guide = settings["guide"]
        self.result = result
        self.posterior_model = posterior_model
        self.guide_module = guide_module
        self.telluric_names = tuple(str(n) for n in telluric_names)
        power = samples.get("ln_telluric_power")
        n_power = 0 if power is None or np.ndim(power) < 2 else np.shape(power)[1]
        if n_power != len(self.telluric_names):
            raise ValueError(f"telluric_names must name each of the {n_power} telluric powers, got "
                             f"{list(self.telluric_names)}")
        if lines is None and line_info is not None:
            lines = _line_table(self)
        self._lines = lines

    # ------------------------------------------------------------------ scalars
    @property
    def has_stellar(self) -> bool:
        """Whether the fit had a stellar clone (False: a telluric-only fit, no RV, v sin i or lines)."""
        return self._line_info is not None

    @property
    def has_telluric(self) -> bool:
        """Whether the fit had a telluric clone (the draws then hold its power(s), ``ln_telluric_power``)."""
        return "ln_telluric_power" in self.samples

    def _scalar_names(self) -> list[str]:
        """The names :meth:`measurement` accepts, in the order :attr:`measurements` lists them."""
        names = ["rv", "vsini"] if self.has_stellar else []
        names.append("resolving_power")
        if self.has_telluric:
            names += [f"telluric_power:{n}" for n in self.telluric_names] if self.telluric_names else ["telluric_power"]
        return names

    def measurement(self, name: str) -> Measurement:
        """Median and 16th/84th percentiles of one parameter.

        Parameters
        ----------
        name : str
            ``"rv"``, ``"vsini"`` (km/s; fits with a stellar clone), ``"resolving_power"``,
            ``"telluric_power"`` (the Beer's-law power X of one telluric clone, dimensionless) or
            ``"telluric_power:H2O"`` (the power of the component named after the colon, when the
            fit was given several named telluric clones).

        Returns
        -------
        Measurement

        Raises
        ------
        ValueError
            An unknown name (the message lists those this posterior has); RV or v sin i of a
            telluric-only fit; a telluric power the fit has not (no telluric clone, or a plain
            ``"telluric_power"`` where there is one per component).
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        valid = self._scalar_names()
        if name not in valid:
            if name in ("rv", "vsini"):
                raise ValueError(f"this posterior is of a telluric-only fit (no stellar clone): it has no {name}; "
                                 f"choose from {valid}")
            if name.startswith("telluric_power"):
                if not self.has_telluric:
                    problem = "the fit had no telluric clone"
                elif self.telluric_names:
                    problem = f"the fit has one power per telluric component {list(self.telluric_names)}"
                else:
                    problem = "the fit has one telluric power, 'telluric_power'"
                raise ValueError(f"no telluric power {name!r}: {problem}; choose from {valid}")
            raise ValueError(f"unknown parameter {name!r}; choose from {valid}")
        if name.startswith("telluric_power"):
            ln_x = self.samples["ln_telluric_power"]
            if self.telluric_names:
                ln_x = ln_x[:, self.telluric_names.index(name.split(":", 1)[1])]
            lo, med, hi = np.exp(_percentiles(ln_x))  # draws themselves: exp commutes with them
            unit = u.dimensionless_unscaled
        else:
            unit = {"rv": u.km / u.s, "vsini": u.km / u.s, "resolving_power": u.dimensionless_unscaled}[name]
            lo, med, hi = _percentiles(self.samples[name])
        return Measurement(med * unit, lo * unit, hi * unit)

    @property
    def measurements(self) -> dict[str, Measurement]:
        """Every scalar parameter as a :class:`Measurement`, by the name :meth:`measurement` takes:
        RV and v sin i (with a stellar clone), R, and the telluric power(s) (with a telluric
        clone: ``"telluric_power"`` or ``"telluric_power:<name>"`` per component)."""
        return {k: self.measurement(k) for k in self._scalar_names()}

    @property
    def telluric_power(self) -> Measurement | dict[str, Measurement] | None:
        """Posterior of the telluric Beer's-law power X: one :class:`Measurement`, a dict of them by
        component name when the fit was given several named telluric clones, or None without a
        telluric clone."""
        if not self.has_telluric:
            return None
        if not self.telluric_names:
            return self.measurement("telluric_power")
        return {n: self.measurement(f"telluric_power:{n}") for n in self.telluric_names}

    @property
    def rv(self) -> u.Quantity | None:
        """Posterior median of the radial velocity: the forward model's, the measured RV on the
        data's axis (a velocity tagged on that axis included, as
        :attr:`TransferResult.rv_total`, not :attr:`TransferResult.rv`). None for a telluric-only
        fit."""
        return self.measurement("rv").value if self.has_stellar else None

    @property
    def rv_err(self) -> tuple[u.Quantity, u.Quantity] | None:
        """(median − 16th, 84th − median) percentiles of RV (None for a telluric-only fit)."""
        if not self.has_stellar:
            return None
        m = self.measurement("rv")
        return m.minus, m.plus

    @property
    def vsini(self) -> u.Quantity | None:
        """Posterior median of v sin i (None for a telluric-only fit)."""
        return self.measurement("vsini").value if self.has_stellar else None

    @property
    def vsini_err(self) -> tuple[u.Quantity, u.Quantity] | None:
        """(median − 16th, 84th − median) percentiles of v sin i (None for a telluric-only fit)."""
        if not self.has_stellar:
            return None
        m = self.measurement("vsini")
        return m.minus, m.plus

    @property
    def resolving_power(self) -> u.Quantity:
        """Posterior median of R (dimensionless Quantity)."""
        return self.measurement("resolving_power").value

    @property
    def resolving_power_err(self) -> tuple[u.Quantity, u.Quantity]:
        """(median − 16th, 84th − median) percentiles of R."""
        m = self.measurement("resolving_power")
        return m.minus, m.plus

    @property
    def n_samples(self) -> int:
        """Number of posterior draws."""
        return int(self.samples["resolving_power"].shape[0])


    # ------------------------------------------------------------------ lines
    @property
    def lines(self) -> QTable | None:
        """Per stellar line: clone and fitted a, σ, γ, equivalent width; for each latent parameter its
        posterior median and 16th/84th percentiles (``amplitude_median``, ``amplitude_p16``,
        ``amplitude_p84``, ..., ``equivalent_width_median``, ...); ``delta_ln_amplitude`` (median
        ln a − clone ln a); ``data_constrained`` (the data narrow ln a's 68 % interval to under half
        the prior's; normal guides only). None for a telluric-only fit (its lines are held at the
        fit: see :attr:`TransferResult.telluric_lines <blase_specutils.fitting.TransferResult.telluric_lines>`)."""
        return self._lines

    # ------------------------------------------------------------------ spectra
    def _spectra(self, values: np.ndarray):
        if self.result is not None:
            return self.result._per_order(values)
        d = self._data
        oid = d["order"]
        out = []
        for k in np.unique(oid):
            sel = oid == k
            out.append(arrays_to_spectrum(d["wavelength"][sel], values[sel], flux_unit=d["flux_unit"],
                                          mask=~d["good"][sel]))
        from specutils import SpectrumList

        return out[0] if len(out) == 1 else SpectrumList(out)

    def _band_arrays(self, q=(16.0, 84.0), noise: bool = False):
        q = tuple(float(x) for x in q)
        if len(q) != 2 or not (0.0 <= q[0] < q[1] <= 100.0):
            raise ValueError(f"q must be two increasing percentiles in [0, 100], got {q}")
        draws = self.predictive
        if noise:
            gen = np.random.default_rng(0)
            eps = self._data["sigma"] * float(self.settings.get("noise_scale", 1.0))
            draws = draws + gen.normal(0.0, 1.0, draws.shape) * np.where(np.isfinite(eps), eps, 0.0)
        lo, med, hi = _percentiles(draws, (q[0], 50.0, q[1]))
        return lo, med, hi

    def model_band(self, q: Sequence[float] = (16, 84), *, noise: bool = False) -> ModelBand:
        """Posterior median of M(λ_D) and the ``q`` percentiles, each as a spectrum (the input's class;
        a SpectrumList for several orders).

        Parameters
        ----------
        q : (float, float)
            Lower and upper percentiles of the band.
        noise : bool
            Add the data noise to each draw: the band of the posterior predictive of the data
            rather than of the noiseless model.
        """
        lo, med, hi = self._band_arrays(q, noise)
        return ModelBand(self._spectra(med), self._spectra(lo), self._spectra(hi))

    @property
    def model_spectrum(self):
        """Posterior median of M(λ_D) as a spectrum."""
        return self.model_band().median

    # ------------------------------------------------------------------ summary and I/O
    # ------------------------------------------------------------------ summary and I/O
    def summary(self) -> dict:
        """Numbers for reports: RV, v sin i, R and the telluric power(s) with percentiles (keys as
        :attr:`measurements`; RV and v sin i None for a telluric-only fit), the guide and the run
        settings."""
        out = {} if self.has_stellar else {"rv": None, "vsini": None}
        for k, m in self.measurements.items():
            out[k] = {"median": float(m.value.value), "p16": float(m.lower.value), "p84": float(m.upper.value)}
        out["guide"] = self.guide
        out["n_samples"] = self.n_samples
        out["n_lines"] = 0 if self._lines is None else len(self._lines)
        if self._lines is not None and "data_constrained" in self._lines.colnames:
            out["n_lines_data_constrained"] = int(np.sum(self._lines["data_constrained"]))
        last = self.elbo_history[-POSTERIOR_FINAL_ELBO_STEPS:]
        out["final_elbo"] = float(np.mean(last)) if last.size else None
        out["settings"] = dict(self.settings)
        return out

    def _scalar_text(self) -> str:
        """"RV=... vsini=..." and the telluric power(s) "X=..." or "X(H2O)=... X(CO2)=..."."""
        parts = []
        for k, m in self.measurements.items():
            if k in ("rv", "vsini"):
                parts.append(f"{'RV' if k == 'rv' else 'vsini'}={m}")
            elif k == "telluric_power":
                parts.append(f"X={m}")
            elif k.startswith("telluric_power:"):
                parts.append(f"X({k.split(':', 1)[1]})={m}")
        return " ".join(parts)

    def __repr__(self) -> str:
        n_lines = 0 if self._lines is None else len(self._lines)
        kind = "" if self.has_stellar else " telluric-only"
        return (f"<PosteriorFit{kind} guide={self.guide!r} n_samples={self.n_samples} n_lines={n_lines} "
                f"{self._scalar_text()}>")

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write samples, the line table, the data, the model draws and the ELBO history to FITS.

        HDUs: primary (header: guide, settings, RV/v sin i/R/telluric power percentiles, the
        telluric component names), ``LINES`` (the line table with units), ``SAMPLES`` (one row per
        draw), ``VALUES`` (the fit's and the clone's line parameters), ``DATA`` (λ_D, flux, ε,
        mask, order), ``PREDICT`` (model draws), ``ELBO``. A telluric-only posterior has no
        ``LINES`` or ``VALUES``.
        Saved atomically (:func:`blase_specutils.io.atomic_write`): if the write fails, a previous
        file at ``path`` stays as it was.

        Raises
        ------
        FileExistsError
            A file exists at ``path`` and ``overwrite`` is not set.
        """
        from .posterior_file import save_posterior

        return save_posterior(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> PosteriorFit:
        """Read a file written by :meth:`save` (summaries, samples, model draws; not the torch model).

        Every field is checked as it is read: the header's guide, line mode, profile, line sign
        and settings have their types; samples of RV, v sin i and R are finite; line parameters
        are finite (logs within ±45, :data:`blase_specutils.io.LOG_PARAMETER_LIMIT`) with one
        value per line in every table; the model draws cover the data's pixels.

        Raises
        ------
        FileNotFoundError
            No such file.
        blase_specutils.io.SavedFileError
            (a ValueError) The file is not a readable posterior file (corrupt, truncated, another
            format, or a field out of range); the message names the file and the field, and
            ``err.path`` and ``err.field`` hold them.
        """
        from .posterior_file import load_posterior

        return load_posterior(cls, path)


# ------------------------------------------------------------------ the line table
def _line_table(fit: PosteriorFit) -> QTable:
    """The table of :attr:`PosteriorFit.lines`: each line's clone and fitted values, the posterior
    percentiles of its latent parameters and equivalent width, and whether the data constrain it."""
    info, s = fit._line_info, fit.samples
    fitv, clov = fit.fit_values, fit.clone_values
    t = QTable()
    t["center"] = info["center"] * u.AA
    for key, name in (("ln_amplitude", "amplitude"), ("ln_sigma", "sigma"), ("ln_gamma", "gamma")):
        t[f"{name}_clone"] = np.exp(clov[key]) * u.AA
        t[f"{name}_fit"] = np.exp(fitv[key]) * u.AA
        if key in s:
            lo, med, hi = np.exp(_percentiles(s[key]))
            t[f"{name}_median"] = med * u.AA
            t[f"{name}_p16"] = lo * u.AA
            t[f"{name}_p84"] = hi * u.AA
    ew = _width_function(info)
    t["equivalent_width_clone"] = ew(clov["ln_amplitude"], clov["ln_sigma"], clov["ln_gamma"]) * u.AA
    t["equivalent_width_fit"] = ew(fitv["ln_amplitude"], fitv["ln_sigma"], fitv["ln_gamma"]) * u.AA
    if "ln_amplitude" in s or "ln_sigma" in s or "ln_gamma" in s:
        lo, med, hi = _equivalent_width_percentiles(s, fitv, info)
        t["equivalent_width_median"] = med * u.AA
        t["equivalent_width_p16"] = lo * u.AA
        t["equivalent_width_p84"] = hi * u.AA
    if "ln_amplitude" in s:
        lo, med, hi = _percentiles(s["ln_amplitude"])
        t["delta_ln_amplitude"] = med - clov["ln_amplitude"]
        if fit.guide != "delta":
            # the data narrow the 68 % interval of ln a to under a fraction of the prior's
            prior68 = 2.0 * _LAPLACE_68 * 2.0 * float(fit.settings["regularization"])
            t["data_constrained"] = (hi - lo) < POSTERIOR_CONSTRAINED_FRACTION * prior68
    t.meta.update({"mode": info["mode"], "profile": info["profile"], "guide": fit.guide})
    return t


def _width_function(info: dict):
    """Equivalent widths (Å) of lines given ln a, ln σ, ln γ, in the clone's mode, sign and profile."""
    mode, sign, profile = info["mode"], info["sign"], info["profile"]

    def ew(lna, lns, lng):
        return _equivalent_widths(np.exp(lna), np.exp(lns), np.exp(lng), mode, sign, profile)

    return ew


def _equivalent_width_percentiles(s: dict, fitv: dict, info: dict) -> tuple:
    """16th, 50th and 84th percentiles of each line's equivalent width over the posterior draws."""
    n, mode, sign = info["center"].size, info["mode"], info["sign"]
    ew = _width_function(info)
    ln_draws = {k: s[k] if k in s else np.broadcast_to(fitv[k], (1, n)) for k in ("ln_amplitude", "ln_sigma",
                                                                                   "ln_gamma")}
    widths_latent = "ln_sigma" in s or "ln_gamma" in s
    if mode == "linear":  # EW = sign · a for a unit-area profile
        return _percentiles(sign * np.exp(ln_draws["ln_amplitude"]))
    if not widths_latent:  # EW is monotonic in a at fixed widths: map the percentiles
        q = (16.0, 50.0, 84.0) if sign > 0 else (84.0, 50.0, 16.0)
        return ew(_percentiles(s["ln_amplitude"], q).ravel(), np.tile(fitv["ln_sigma"], 3),
                  np.tile(fitv["ln_gamma"], 3)).reshape(3, n)
    # a numerical integral per draw (thinned: it costs a 4801-point integral per line)
    m = max(x.shape[0] for x in ln_draws.values())
    idx = np.unique(np.linspace(0, m - 1, min(m, POSTERIOR_EW_DRAWS)).astype(int))
    pick = lambda x: x[idx] if x.shape[0] > 1 else np.broadcast_to(x, (idx.size, n))
    a_, s_, g_ = (pick(ln_draws[k]) for k in ("ln_amplitude", "ln_sigma", "ln_gamma"))
    return _percentiles(ew(a_.ravel(), s_.ravel(), g_.ravel()).reshape(idx.size, n))
