r"""Posterior uncertainties for transfer learning with Pyro (the optional ``[pyro]`` extra).

The fitted forward model of Eq. 10 is wrapped, unchanged, in a probabilistic model:

.. math::
    p(\theta \mid D) \propto
    \prod_i \mathcal{N}\!\left(D_i \mid M(\lambda_{D,i}; \theta), \epsilon_i^2\right)\;
    \prod_j \mathrm{Laplace}\!\left(\ln a_j \mid \ln\hat a_j, 2\Lambda\right)\;
    p(RV)\, p(\ln v\sin i)\, p(\ln R)\, p(P_\mathrm{data}),

with :math:`\epsilon_i` the data uncertainties (masked pixels left out) and :math:`\hat a_j` the
cloned amplitudes.

**Why the Laplace scale is 2Λ.** The Gaussian likelihood is :math:`\ln p(D\mid\theta) = -\chi^2/2 +
\mathrm{const}` and the Laplace log-density is :math:`-|x-\mu|/b - \ln 2b`. So

.. math::
    -2 \ln p(\theta \mid D) = \chi^2 + \sum_j \frac{2\,|\ln a_j - \ln\hat a_j|}{b} + \mathrm{const},

which is the loss of Eq. 11, :math:`\chi^2 + \sum_j |\ln a_j - \ln\hat a_j|/\Lambda`, exactly when
:math:`b = 2\Lambda`. With this choice the maximum a posteriori (MAP) point is the minimum of the
loss that :func:`~blase_specutils.fitting.fit_spectrum` minimises with Adam, and the two agree to
the optimiser's tolerance. The same holds for the optional pulls on :math:`\ln\sigma` and
:math:`\ln\gamma` (Laplace scale :math:`2\Lambda_w`). The paper's Λ ≈ 5 is therefore a weak prior
(a Laplace of scale 10 in ln a): lines the data do not constrain keep very wide posteriors.

The other priors are weakly informative and centred on the point estimate of the fit, so that
their gradient vanishes there and they do not move the MAP away from the Adam fit (which has no
prior on these): a normal prior on RV (default width 10 km/s), log-normal priors on
:math:`v\sin i` (width 1 in ln) and R (0.1 in ln), and a normal prior on each continuum
coefficient (width 10 % of the order's continuum level). They are tens to thousands of times
wider than the posteriors they produce on real data.

Each latent block :math:`x` (ln a, RV, ...) is sampled in standardised form
:math:`u = (x - \hat x)/s` around the fitted value :math:`\hat x`, with :math:`s` the approximate
conditional posterior width: :math:`s^{-2}` is the diagonal of the Gauss-Newton curvature
:math:`\sum_i \epsilon_i^{-2} (\partial M_i/\partial x)^2` (estimated with random ±1 probes,
one backward pass each) plus the prior's curvature. This is an affine change of variables with a
constant Jacobian, so the posterior and its MAP are unchanged, while all latents become O(1) and
one learning rate suits all of them. For the normal guides, ln a is standardised with
:class:`AmplitudeWarp` instead: logarithmic below the fitted amplitude, linear in a above it,
where χ² rises steeply. A normal guide in plain ln a keeps throwing draws of weak lines into that
wall (on the WASP 69 order: ELBO spikes of 10⁸ and a worse optimum). The prior density carries the
Jacobian of the warp, so the posterior is unchanged, but a MAP is not invariant under a non-linear
change of variables: the ``"map"`` guide keeps the affine map. The guides live in :math:`u`;
samples are reported in physical units.

Guides (:data:`GUIDES`): ``"map"`` (Pyro ``AutoDelta``: the MAP point), ``"normal"``
(``AutoNormal``: mean-field normal) and ``"lowrank"`` (``AutoLowRankMultivariateNormal``: a normal
with a low-rank plus diagonal covariance, for blended lines whose amplitudes are correlated).
All start at the fit (:math:`u = 0`).

What the uncertainties mean:

- Parameters that are not latent (by default the widths ln σ, ln γ, the centres λc and R) are
  held at the fit: the posterior is conditional on them. v sin i is nearly degenerate with the
  line widths, so after a fit that tuned the widths its error bar is conditional on them (an
  underestimate); make the widths latent (``tune_lines=("amplitude", "sigma", "gamma")`` with a
  ``width_regularization``) for a marginal one.
- With the paper's Λ ≈ 5 the prior on ln a has scale 10. For a line the data cannot see, the
  data only cut off the upper side of that prior, so most of the remaining mass lies far below
  the clone value: its posterior median is tiny and its 84th percentile is an upper limit. The
  ``data_constrained`` column of :attr:`PosteriorFit.lines` picks out the lines the data
  actually measure. Smaller Λ (a stronger belief in the clone) gives tighter posteriors.
- χ² assumes the model is right. If χ²_red of the fit is well above 1, the error bars are too
  small by about √χ²_red; ``noise_scale="chi2"`` inflates the data uncertainties by that factor.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import astropy.units as u
import numpy as np
import torch
from astropy.io import fits
from astropy.table import QTable
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.transforms import AffineTransform, Transform
from torch.func import functional_call

try:
    import pyro
    import pyro.distributions as dist
    from pyro import poutine
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import (
        AutoDelta,
        AutoLowRankMultivariateNormal,
        AutoNormal,
    )
    from pyro.infer.autoguide.initialization import init_to_value
except ImportError as _err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "blase_specutils.bayes (posterior sampling with Pyro guides) needs the optional Pyro "
        "dependency, which is not installed: pip install 'blase_specutils[pyro]'"
    ) from _err

from .cloning import _equivalent_widths
from .core.transfer import TransferModel
from .fitting import TransferResult
from .io import (LOG_PARAMETER_LIMIT, SavedFileError, _checked_array, _header_choice, _header_number,
                 atomic_write)
from .spectra import arrays_to_spectrum

__all__ = [
    "GUIDES",
    "AmplitudeWarp",
    "Measurement",
    "ModelBand",
    "PosteriorFit",
    "TransferPosteriorModel",
    "make_guide",
    "sample_posterior",
]

#: Guide names accepted by :func:`sample_posterior`, and the guide each one selects.
GUIDES = {
    "map": "delta",
    "delta": "delta",
    "normal": "normal",
    "meanfield": "normal",
    "mean-field": "normal",
    "lowrank": "lowrank",
    "low-rank": "lowrank",
}

#: Line parameters that can be latent: name used in ``tune_lines`` → TransferModel parameter.
_LINE_PARAMS = {
    "amplitude": "stellar.log_amplitudes",
    "sigma": "stellar.log_sigmas",
    "gamma": "stellar.log_gammas",
}

#: Sample keys (physical units) of each latent block.
_SAMPLE_KEYS = {
    "amplitude": "ln_amplitude",
    "sigma": "ln_sigma",
    "gamma": "ln_gamma",
    "rv": "rv",
    "vsini": "ln_vsini",
    "resolving_power": "ln_resolving_power",
    "continuum": "continuum",
}

#: Half-width of the central 68.27 % interval of a Laplace distribution, in units of its scale.
_LAPLACE_68 = math.log(1.0 / (1.0 - 0.6827))

FORMAT_NAME = "BLASE-SPECUTILS-POSTERIOR"
FORMAT_VERSION = 1


@contextmanager
def _local_params():
    """Keep guide parameters inside their module (no sharing through Pyro's global param store)."""
    with pyro.settings.context(module_local_params=True):
        yield


# ====================================================================== the Pyro model


class AmplitudeWarp(Transform):
    r"""Standardised line amplitude: :math:`x = \ln a \mapsto u`, with

    .. math::
        x = \hat x + s\,u \quad (u \le 0), \qquad x = \hat x + \ln(1 + s\,u) \quad (u > 0),

    i.e. :math:`a = \hat a\, e^{s u}` below the fitted amplitude :math:`\hat a` and
    :math:`a = \hat a (1 + s u)` above it (continuous with its first derivative at :math:`u = 0`).
    In linear mode (Eq. 2) the flux is linear in each a, so χ² grows quadratically in u upwards: a
    line too weak to matter at :math:`\hat a` meets the data at u ≈ 1 instead of a few e-folds up,
    where a normal guide in ln a would throw occasional draws far past it (huge, heavy-tailed ELBO
    gradients). Downwards, ln a keeps its Laplace tail. Elementwise; the map is x → u.

    Parameters
    ----------
    x0 : Tensor
        Fitted :math:`\ln \hat a`.
    s : Tensor
        Standardisation scale (> 0), same shape.
    """

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, x0: Tensor, s: Tensor, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.x0 = x0
        self.s = s

    def __eq__(self, other) -> bool:
        return other is self

    def _call(self, x: Tensor) -> Tensor:
        d = x - self.x0
        up = torch.expm1(d.clamp(min=0.0, max=700.0)) / self.s
        return torch.where(d > 0, up, d / self.s)

    def _inverse(self, u: Tensor) -> Tensor:
        up = self.x0 + torch.log1p(self.s * u.clamp(min=0.0))
        return torch.where(u > 0, up, self.x0 + self.s * u)

    def log_abs_det_jacobian(self, x: Tensor, u: Tensor) -> Tensor:
        """ln |du/dx|."""
        return torch.relu(x - self.x0).clamp(max=700.0) - torch.log(self.s)


@dataclass
class _Block:
    """One latent block: x ↦ u = to_u(x) (affine, (x − x0)/s, or :class:`AmplitudeWarp`), prior on x."""

    key: str  # "amplitude", "rv", ...
    param: str  # TransferModel parameter name
    site: str  # Pyro site name (standardised u)
    x0: Tensor  # fitted value, flattened
    shape: tuple  # shape of the TransferModel parameter
    prior: str  # "laplace" or "normal"
    loc: Tensor  # prior location of x (flattened)
    scale: Tensor  # prior scale of x (flattened)
    s: Tensor | None = None  # standardisation scale (flattened)
    to_u: Transform | None = None  # x ↦ u


class TransferPosteriorModel:
    r"""The Pyro model :math:`p(\theta, D)` around a fitted :class:`~blase_specutils.core.TransferModel`.

    Latent sites hold standardised offsets :math:`u = (x - \hat x)/s` of each block (see the module
    docstring); :meth:`physical` turns them into the TransferModel's parameters, which are pushed
    through the unchanged forward model with :func:`torch.func.functional_call`.

    Parameters
    ----------
    model : TransferModel
        The fitted forward model; it is not modified.
    flux, sigma : array_like
        Data D and 1-σ uncertainties ε at λ_D.
    good : array_like of bool
        Pixels in the likelihood.
    prior : dict
        The clone's ``log_amplitudes``, ``log_sigmas``, ``log_gammas`` (prior locations).
    regularization : float
        Λ of Eq. 11: the Laplace prior on ln a has scale 2Λ.
    width_regularization : float, optional
        Λ_w of the pulls on ln σ, ln γ (needed when widths are latent).
    tune_lines : iterable of str
        Latent line parameters among ``"amplitude"``, ``"sigma"``, ``"gamma"``.
    tune_vsini, tune_resolving_power : bool
        Whether ln v sin i and ln R are latent (else held at the fit).
    rv_scale : float
        Width (km/s) of the normal prior on RV.
    vsini_scale, resolving_power_scale : float
        Widths (in ln) of the log-normal priors on v sin i and R.
    continuum_scale : float
        Width of the normal prior on each continuum coefficient, as a fraction of the order's
        continuum level.
    noise_scale : float
        Factor applied to every ε (1: the data's own uncertainties).
    amplitude_warp : bool
        Standardise ln a with :class:`AmplitudeWarp` (logarithmic below the fit, linear in a above
        it) rather than affinely. Use it for the normal guides; a point estimate needs the affine
        map (a MAP is not invariant under a non-linear change of variables).
    n_probes : int
        Random probes of the Gauss-Newton diagonal used for the standardisation.
    seed : int
        Seed of the probes.
    """

    def __init__(
        self,
        model: TransferModel,
        flux,
        sigma,
        good,
        *,
        prior: dict,
        regularization: float,
        width_regularization: float | None = None,
        tune_lines: Iterable[str] = ("amplitude",),
        tune_vsini: bool = True,
        tune_resolving_power: bool = False,
        rv_scale: float = 10.0,
        vsini_scale: float = 1.0,
        resolving_power_scale: float = 0.1,
        continuum_scale: float = 0.1,
        noise_scale: float = 1.0,
        amplitude_warp: bool = True,
        n_probes: int = 32,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, TransferModel):
            raise TypeError(f"model must be a TransferModel, got {type(model).__name__}")
        self.model = model
        st = model.stellar
        self.device = st.lam_centers.device
        self.dtype = st.dtype
        as_t = lambda x: torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
        good = np.asarray(good, dtype=bool)
        if good.shape != (model.lam_d.numel(),):
            raise ValueError("flux, sigma and good must have one entry per data pixel of the model")
        self.good = torch.as_tensor(good, device=self.device)
        self.noise_scale = float(noise_scale)
        self.flux_good = as_t(np.asarray(flux, dtype=float)[good])
        self.sigma_good = as_t(np.asarray(sigma, dtype=float)[good] * self.noise_scale)
        self.regularization = float(regularization)
        self.width_regularization = None if width_regularization is None else float(width_regularization)
        self.tune_lines = tuple(tune_lines)
        self.tune_vsini = bool(tune_vsini)
        self.tune_resolving_power = bool(tune_resolving_power)
        self._log_max_vsini = math.log(model.rot.max_vsini) - 1e-9
        # every parameter of the TransferModel, detached: the sampled ones are replaced per call
        self._fixed = {n: p.detach() for n, p in model.named_parameters()}
        blocks: list[_Block] = []

        def add(key, param, prior_kind, loc, scale):
            x0 = self._fixed[param]
            flat = x0.reshape(-1)
            loc = torch.as_tensor(loc, dtype=self.dtype, device=self.device).reshape(-1).expand_as(flat).clone()
            scale = torch.as_tensor(scale, dtype=self.dtype, device=self.device).reshape(-1).expand_as(flat).clone()
            blocks.append(_Block(key, param, f"u_{_SAMPLE_KEYS[key]}", flat.clone(), tuple(x0.shape),
                                 prior_kind, loc, scale))

        for key in self.tune_lines:
            if key == "amplitude":
                add(key, _LINE_PARAMS[key], "laplace", prior["log_amplitudes"], 2.0 * self.regularization)
            else:
                assert self.width_regularization is not None
                add(key, _LINE_PARAMS[key], "laplace", prior["log_sigmas" if key == "sigma" else "log_gammas"],
                    2.0 * self.width_regularization)
        add("rv", "rv", "normal", self._fixed["rv"], float(rv_scale))
        if self.tune_vsini:
            add("vsini", "rot.log_vsini", "normal", self._fixed["rot.log_vsini"], float(vsini_scale))
        if self.tune_resolving_power:
            add("resolving_power", "inst.log_resolving_power", "normal", self._fixed["inst.log_resolving_power"],
                float(resolving_power_scale))
        cc = self._fixed["continuum_coeffs"]
        level = cc[:, :1].abs().clamp(min=1e-12).expand_as(cc)
        add("continuum", "continuum_coeffs", "normal", cc, float(continuum_scale) * level)
        self.blocks = blocks
        self.amplitude_warp = bool(amplitude_warp)
        self._standardise(int(n_probes), int(seed))
        self._prior_u = {}
        for b in self.blocks:
            if b.key == "amplitude" and self.amplitude_warp:
                b.to_u = AmplitudeWarp(b.x0, b.s)
            else:
                b.to_u = AffineTransform(-b.x0 / b.s, 1.0 / b.s)
            prior_x = (dist.Laplace if b.prior == "laplace" else dist.Normal)(b.loc, b.scale)
            self._prior_u[b.site] = dist.TransformedDistribution(prior_x, [b.to_u]).to_event(1)

    # ------------------------------------------------------------------ standardisation
    def _standardise(self, n_probes: int, seed: int) -> None:
        """s = (diag of the Gauss-Newton curvature + prior curvature)^(-1/2), per latent element."""
        params = {b.param: b.x0.reshape(b.shape).clone().requires_grad_(True) for b in self.blocks}
        curv = [torch.zeros_like(b.x0) for b in self.blocks]
        if n_probes > 0:
            mu = functional_call(self.model, {**self._fixed, **params}, ())[self.good]
            gen = torch.Generator().manual_seed(seed)
            w_half = 1.0 / self.sigma_good
            for k in range(n_probes):
                v = (torch.randint(0, 2, (mu.numel(),), generator=gen) * 2 - 1).to(self.device, self.dtype)
                grads = torch.autograd.grad(mu, [params[b.param] for b in self.blocks], grad_outputs=v * w_half,
                                            retain_graph=k < n_probes - 1, allow_unused=True)
                for c, g in zip(curv, grads):
                    if g is not None:
                        c += g.detach().reshape(-1) ** 2
            curv = [c / n_probes for c in curv]
        for b, c in zip(self.blocks, curv):
            # Laplace(b) has variance 2b²; a normal prior of width σ has curvature 1/σ²
            prior_curv = 1.0 / (2.0 * b.scale**2) if b.prior == "laplace" else 1.0 / b.scale**2
            b.s = 1.0 / torch.sqrt(c + prior_curv)

    # ------------------------------------------------------------------ the model
    @property
    def sites(self) -> list[str]:
        """Names of the latent sample sites (standardised offsets u)."""
        return [b.site for b in self.blocks]

    def zeros(self) -> dict[str, Tensor]:
        """u = 0 for every site: the fitted point."""
        return {b.site: torch.zeros_like(b.x0) for b in self.blocks}

    def physical(self, latents: dict[str, Tensor]) -> dict[str, Tensor]:
        """TransferModel parameters (by name) for standardised latents u."""
        out = {}
        for b in self.blocks:
            x = b.to_u.inv(latents[b.site]).reshape(b.shape)
            if b.key == "vsini":
                x = torch.clamp(x, max=self._log_max_vsini)  # the kernel's fixed length
            out[b.param] = x
        return out

    def standardise(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Standardised latents u for TransferModel parameters given by name (missing: the fit)."""
        out = {}
        for b in self.blocks:
            x = params.get(b.param)
            x = b.x0 if x is None else torch.as_tensor(x, dtype=self.dtype, device=self.device).reshape(-1)
            out[b.site] = b.to_u(x)
        return out

    def model_flux(self, latents: dict[str, Tensor]) -> Tensor:
        """M(λ_D) for standardised latents u (all pixels)."""
        return functional_call(self.model, {**self._fixed, **self.physical(latents)}, ())

    def __call__(self) -> None:
        latents = {b.site: pyro.sample(b.site, self._prior_u[b.site]) for b in self.blocks}
        mu = self.model_flux(latents)[self.good]
        pyro.sample("obs", dist.Normal(mu, self.sigma_good).to_event(1), obs=self.flux_good)

    def log_posterior(self, params: dict[str, Tensor] | None = None) -> float:
        r"""Unnormalised :math:`\ln p(\theta \mid D)` in physical coordinates (ln a, RV in km/s, ...).

        ``params`` gives TransferModel parameters by name (``"stellar.log_amplitudes"``, ``"rv"``,
        ...); missing ones take the fitted values. Up to a constant, ``-2 * log_posterior`` is the
        loss of Eq. 11 plus the quadratic terms of the weak normal priors.
        """
        latents = self.standardise(params or {})
        with torch.no_grad():
            tr = poutine.trace(poutine.condition(self, data=latents)).get_trace()
            # p_x(x) = p_u(u) |du/dx|
            log_du_dx = sum(float(b.to_u.log_abs_det_jacobian(b.to_u.inv(latents[b.site]), latents[b.site]).sum())
                            for b in self.blocks)
            return float(tr.log_prob_sum()) + log_du_dx


# ====================================================================== guides


def _guide_kind(guide: str) -> str:
    if not isinstance(guide, str):
        raise TypeError(f"guide must be a name (str), got {type(guide).__name__}; choose from {sorted(GUIDES)}")
    kind = GUIDES.get(guide.lower())
    if kind is None:
        raise ValueError(f"unknown guide {guide!r}; choose from {sorted(GUIDES)}")
    return kind


def make_guide(pmodel: TransferPosteriorModel, guide: str = "normal", *, rank: int | None = None,
               init_scale: float = 0.5):
    """The Pyro autoguide named ``guide`` (see :data:`GUIDES`), initialised at the fit (u = 0).

    Parameters
    ----------
    pmodel : TransferPosteriorModel
    guide : str
        ``"map"``/``"delta"``, ``"normal"``/``"meanfield"`` or ``"lowrank"``.
    rank : int, optional
        Rank of the low-rank guide (default: Pyro's ≈ √(number of latents)).
    init_scale : float
        Initial standard deviation of the normal guides in the standardised coordinates u.
    """
    kind = _guide_kind(guide)
    if rank is not None and kind != "lowrank":
        raise ValueError(f"rank applies only to guide='lowrank', not {guide!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    init = init_to_value(values=pmodel.zeros())
    with _local_params():
        if kind == "delta":
            g = AutoDelta(pmodel, init_loc_fn=init)
            g()  # creates the parameters
            return g
        if kind == "normal":
            g = AutoNormal(pmodel, init_loc_fn=init, init_scale=float(init_scale))
        else:
            g = AutoLowRankMultivariateNormal(pmodel, init_loc_fn=init, init_scale=float(init_scale),
                                              rank=None if rank is None else int(rank))
        g()
    return g


# ====================================================================== results


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


class PosteriorFit:
    r"""Posterior of a transfer-learning fit: samples, summaries, the model band, plots, FITS I/O.

    Made by :func:`sample_posterior` (or :meth:`load`); do not build it by hand.

    Attributes
    ----------
    samples : dict of numpy arrays
        Posterior draws in physical units, first axis the draw: ``rv`` (km/s), ``vsini`` (km/s),
        ``resolving_power``, ``ln_amplitude`` (ln a, Å) and ``ln_sigma``/``ln_gamma`` (Å) when latent,
        ``continuum`` (draw, order, coefficient). Parameters held fixed repeat their value.
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
    """

    def __init__(self, *, samples: dict, fit_values: dict, clone_values: dict, line_info: dict, data: dict,
                 predictive: np.ndarray, elbo_history: np.ndarray, settings: dict,
                 result: TransferResult | None = None, lines: QTable | None = None,
                 posterior_model: TransferPosteriorModel | None = None, guide_module=None) -> None:
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
        self._lines = lines if lines is not None else self._make_lines()

    # ------------------------------------------------------------------ scalars
    def measurement(self, name: str) -> Measurement:
        """Median and 16th/84th percentiles of ``"rv"``, ``"vsini"`` or ``"resolving_power"``."""
        units = {"rv": u.km / u.s, "vsini": u.km / u.s, "resolving_power": u.dimensionless_unscaled}
        if name not in units:
            raise ValueError(f"unknown parameter {name!r}; choose from {sorted(units)}")
        lo, med, hi = _percentiles(self.samples[name])
        return Measurement(med * units[name], lo * units[name], hi * units[name])

    @property
    def measurements(self) -> dict[str, Measurement]:
        """RV, v sin i and R as :class:`Measurement` objects."""
        return {k: self.measurement(k) for k in ("rv", "vsini", "resolving_power")}

    @property
    def rv(self) -> u.Quantity:
        """Posterior median of the radial velocity: the forward model's, the measured RV on the
        data's axis (a velocity tagged on that axis included, as
        :attr:`TransferResult.rv_total`, not :attr:`TransferResult.rv`)."""
        return self.measurement("rv").value

    @property
    def rv_err(self) -> tuple[u.Quantity, u.Quantity]:
        """(median − 16th, 84th − median) percentiles of RV."""
        m = self.measurement("rv")
        return m.minus, m.plus

    @property
    def vsini(self) -> u.Quantity:
        """Posterior median of v sin i."""
        return self.measurement("vsini").value

    @property
    def vsini_err(self) -> tuple[u.Quantity, u.Quantity]:
        """(median − 16th, 84th − median) percentiles of v sin i."""
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
        return int(self.samples["rv"].shape[0])

    # ------------------------------------------------------------------ lines
    def _make_lines(self) -> QTable:
        info = self._line_info
        n = info["center"].size
        s = self.samples
        fitv, clov = self.fit_values, self.clone_values
        t = QTable()
        t["center"] = info["center"] * u.AA
        ln_draws = {}
        for key, name in (("ln_amplitude", "amplitude"), ("ln_sigma", "sigma"), ("ln_gamma", "gamma")):
            t[f"{name}_clone"] = np.exp(clov[key]) * u.AA
            t[f"{name}_fit"] = np.exp(fitv[key]) * u.AA
            ln_draws[key] = s[key] if key in s else np.broadcast_to(fitv[key], (1, n))
            if key in s:
                lo, med, hi = np.exp(_percentiles(s[key]))
                t[f"{name}_median"] = med * u.AA
                t[f"{name}_p16"] = lo * u.AA
                t[f"{name}_p84"] = hi * u.AA
        mode, sign, profile = info["mode"], info["sign"], info["profile"]

        def ew(lna, lns, lng):
            return _equivalent_widths(np.exp(lna), np.exp(lns), np.exp(lng), mode, sign, profile)

        t["equivalent_width_clone"] = ew(clov["ln_amplitude"], clov["ln_sigma"], clov["ln_gamma"]) * u.AA
        t["equivalent_width_fit"] = ew(fitv["ln_amplitude"], fitv["ln_sigma"], fitv["ln_gamma"]) * u.AA
        if "ln_amplitude" in s or "ln_sigma" in s or "ln_gamma" in s:
            widths_latent = "ln_sigma" in s or "ln_gamma" in s
            if mode == "linear":  # EW = sign · a for a unit-area profile
                ews = sign * np.exp(ln_draws["ln_amplitude"])
            elif not widths_latent:  # EW is monotonic in a at fixed widths: map the percentiles
                q = (16.0, 50.0, 84.0) if sign > 0 else (84.0, 50.0, 16.0)
                ews = ew(_percentiles(s["ln_amplitude"], q).ravel(), np.tile(fitv["ln_sigma"], 3),
                         np.tile(fitv["ln_gamma"], 3)).reshape(3, n)
            else:  # numerical integral per draw (thinned: it costs a 4801-point integral per line)
                m = max(x.shape[0] for x in ln_draws.values())
                idx = np.unique(np.linspace(0, m - 1, min(m, 200)).astype(int))
                pick = lambda x: x[idx] if x.shape[0] > 1 else np.broadcast_to(x, (idx.size, n))
                a_, s_, g_ = (pick(ln_draws[k]) for k in ("ln_amplitude", "ln_sigma", "ln_gamma"))
                ews = ew(a_.ravel(), s_.ravel(), g_.ravel()).reshape(idx.size, n)
            lo, med, hi = ews if mode != "linear" and not widths_latent else _percentiles(ews)
            t["equivalent_width_median"] = med * u.AA
            t["equivalent_width_p16"] = lo * u.AA
            t["equivalent_width_p84"] = hi * u.AA
        if "ln_amplitude" in s:
            lo, med, hi = _percentiles(s["ln_amplitude"])
            t["delta_ln_amplitude"] = med - clov["ln_amplitude"]
            if self.guide != "delta":
                # the data narrow the 68 % interval of ln a to under half the prior's
                prior68 = 2.0 * _LAPLACE_68 * 2.0 * float(self.settings["regularization"])
                t["data_constrained"] = (hi - lo) < 0.5 * prior68
        t.meta.update({"mode": mode, "profile": profile, "guide": self.guide})
        return t

    @property
    def lines(self) -> QTable:
        """Per line: clone and fitted a, σ, γ, equivalent width; for each latent parameter its
        posterior median and 16th/84th percentiles (``amplitude_median``, ``amplitude_p16``,
        ``amplitude_p84``, ..., ``equivalent_width_median``, ...); ``delta_ln_amplitude`` (median
        ln a − clone ln a); ``data_constrained`` (the data narrow ln a's 68 % interval to under half
        the prior's; normal guides only)."""
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

    # ------------------------------------------------------------------ plots
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
        m = self.measurements
        ax[1].text(0.01, 0.95, f"RV {m['rv']}, v sin i {m['vsini']} ({self.guide} guide)",
                   transform=ax[1].transAxes, fontsize=8, va="top")
        if title:
            ax[0].set_title(title)
        fig.tight_layout()
        return fig

    def corner(self, params: Sequence[str] | None = None, *, lines: Sequence[int] = (), **kwargs):
        """Corner plot (the ``corner`` package) of RV, v sin i, R and, optionally, ln a of some lines.

        Parameters
        ----------
        params : sequence of str, optional
            Among ``"rv"``, ``"vsini"``, ``"resolving_power"``; default: those that were latent.
        lines : sequence of int
            Line indices (rows of :attr:`lines`) whose ln a to add.
        **kwargs
            Passed to ``corner.corner``.
        """
        try:
            import corner as _corner
        except ImportError as err:
            raise ImportError("corner plots need the 'corner' package: pip install corner") from err
        tuned = self.settings["tuned"].split(",")
        avail = {"rv": "rv", "vsini": "vsini", "resolving_power": "resolving_power"}
        if params is None:
            params = [p for p in avail if p in tuned]
        cols, labels = [], []
        names = {"rv": "RV (km/s)", "vsini": "v sin i (km/s)", "resolving_power": "R"}
        for p in params:
            if p not in avail:
                raise ValueError(f"unknown parameter {p!r}; choose from {sorted(avail)}")
            if p not in tuned:
                raise ValueError(f"{p} was held fixed in this posterior: nothing to plot")
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

    # ------------------------------------------------------------------ summary and I/O
    def summary(self) -> dict:
        """Numbers for reports: RV, v sin i, R with percentiles, the guide and the run settings."""
        out = {}
        for k, m in self.measurements.items():
            out[k] = {"median": float(m.value.value), "p16": float(m.lower.value), "p84": float(m.upper.value)}
        out["guide"] = self.guide
        out["n_samples"] = self.n_samples
        out["n_lines"] = len(self._lines)
        if "data_constrained" in self._lines.colnames:
            out["n_lines_data_constrained"] = int(np.sum(self._lines["data_constrained"]))
        out["final_elbo"] = float(np.mean(self.elbo_history[-50:])) if self.elbo_history.size else None
        out["settings"] = dict(self.settings)
        return out

    def __repr__(self) -> str:
        m = self.measurements
        return (f"<PosteriorFit guide={self.guide!r} n_samples={self.n_samples} n_lines={len(self._lines)} "
                f"RV={m['rv']} vsini={m['vsini']}>")

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write samples, the line table, the data, the model draws and the ELBO history to FITS.

        HDUs: primary (header: guide, settings, RV/v sin i/R percentiles), ``LINES`` (the line table
        with units), ``SAMPLES`` (one row per draw), ``VALUES`` (the fit's and the clone's line
        parameters), ``DATA`` (λ_D, flux, ε, mask, order), ``PREDICT`` (model draws), ``ELBO``.
        Saved atomically (:func:`blase_specutils.io.atomic_write`): if the write fails, a previous
        file at ``path`` stays as it was.

        Raises
        ------
        FileExistsError
            A file exists at ``path`` and ``overwrite`` is not set.
        """
        path = Path(path)
        hdr = fits.Header()
        hdr["FORMAT"] = (FORMAT_NAME, "blase_specutils posterior file")
        hdr["FMTVER"] = (FORMAT_VERSION, "layout version")
        hdr["FITKIND"] = ("posterior", "blase_specutils transfer-learning posterior")
        for k, v in self.settings.items():
            key = _HEADER_KEYS.get(k)
            if key is not None and v is not None:
                hdr[key] = (v, k)
        for k, m in self.measurements.items():
            short = {"rv": "RV", "vsini": "VS", "resolving_power": "R"}[k]
            hdr[f"{short}_MED"] = float(m.value.value)
            hdr[f"{short}_P16"] = float(m.lower.value)
            hdr[f"{short}_P84"] = float(m.upper.value)
        info = self._line_info
        hdr["LINEMODE"] = info["mode"]
        hdr["PROFILE"] = info["profile"]
        hdr["LSIGN"] = float(info["sign"])
        hdr["BUNIT"] = str(self._data["flux_unit"])
        hdus = [fits.PrimaryHDU(header=hdr)]
        lines = fits.table_to_hdu(self._lines)
        lines.name = "LINES"
        hdus.append(lines)
        cols = []
        for k, v in self.samples.items():
            v = np.asarray(v, dtype=np.float64)
            flat = v.reshape(v.shape[0], -1)
            fmt = f"{flat.shape[1]}D" if v.ndim > 1 else "D"
            dim = "(" + ",".join(str(x) for x in v.shape[:0:-1]) + ")" if v.ndim > 2 else None
            cols.append(fits.Column(k, fmt, array=flat if v.ndim > 1 else v, dim=dim))
        hdus.append(fits.BinTableHDU.from_columns(cols, name="SAMPLES"))
        vcols = [fits.Column("center", "D", unit="Angstrom", array=info["center"])]
        for src, tag in ((self.fit_values, "fit"), (self.clone_values, "clone")):
            for k in ("ln_amplitude", "ln_sigma", "ln_gamma"):
                vcols.append(fits.Column(f"{k}_{tag}", "D", array=src[k]))
        hdus.append(fits.BinTableHDU.from_columns(vcols, name="VALUES"))
        d = self._data
        hdus.append(fits.BinTableHDU.from_columns([
            fits.Column("wavelength", "D", unit="Angstrom", array=d["wavelength"]),
            fits.Column("flux", "D", array=d["flux"]),
            fits.Column("sigma", "D", array=d["sigma"]),
            fits.Column("good", "L", array=d["good"]),
            fits.Column("order", "K", array=d["order"].astype(np.int64)),
        ], name="DATA"))
        hdus.append(fits.ImageHDU(np.asarray(self.predictive, dtype=np.float32), name="PREDICT"))
        hdus.append(fits.BinTableHDU.from_columns([fits.Column("elbo", "D", array=self.elbo_history)], name="ELBO"))
        hdul = fits.HDUList(hdus)
        return atomic_write(path, lambda tmp: hdul.writeto(tmp), overwrite=overwrite)

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
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no posterior file at {path}")
        try:
            with fits.open(path, memmap=False) as hdul:
                hdul.verify("exception")
                out = _read_posterior(hdul, path)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", u.UnitsWarning)
                    lines = QTable.read(path, hdu="LINES")
            except Exception as err:  # astropy raises many types for a damaged table
                raise SavedFileError(f"{path}: the LINES table cannot be read ({err}); {_DAMAGED}",
                                     path=path, field="LINES") from err
            if len(lines) != out["line_info"]["center"].size or "center" not in lines.colnames:
                raise SavedFileError(f"{path}: the LINES table has {len(lines)} rows (and columns {lines.colnames[:4]}...) "
                                     f"where VALUES has {out['line_info']['center'].size} lines; {_DAMAGED}",
                                     path=path, field="LINES")
            return cls(**out, result=None, lines=lines)
        except SavedFileError:
            raise
        except Exception as err:  # astropy/numpy raise many types for damaged files
            raise SavedFileError(f"could not read a posterior from {path}: the file is corrupt or not a blase_specutils "
                                 f"posterior file ({type(err).__name__}: {err})", path=path) from err


_DAMAGED = "the file is damaged or was not written by blase_specutils; write it again from the original"

#: settings that are numbers (the others are strings); integers among them.
_NUMERIC_SETTINGS = {"rank", "num_steps", "num_samples", "lr", "seed", "regularization", "width_regularization",
                     "noise_scale", "rv_scale", "vsini_scale", "resolving_power_scale", "continuum_scale", "seconds",
                     "skipped_steps"}
_INTEGER_SETTINGS = {"rank", "num_steps", "num_samples", "seed", "skipped_steps"}


def _read_posterior(hdul, path: Path) -> dict:
    """The keyword arguments of :class:`PosteriorFit` from an open posterior file, every field checked."""
    from .core.profiles import PROFILES

    def fail(field: str, problem: str):
        return SavedFileError(f"{path}: {field} {problem}; {_DAMAGED}", path=path, field=field)

    hdr = hdul[0].header
    if hdr.get("FORMAT") != FORMAT_NAME:
        raise SavedFileError(f"{path} is not a blase_specutils posterior file (FORMAT={hdr.get('FORMAT')!r}, "
                             f"expected {FORMAT_NAME!r})", path=path, field="FORMAT")
    version = _header_number(hdr, "FMTVER", path, integer=True, default=0)
    if version > FORMAT_VERSION:
        raise SavedFileError(f"{path} was written by a newer blase_specutils (posterior format {version}); upgrade "
                             "blase_specutils to read it", path=path, field="FMTVER")
    settings = {}
    for k, key in _HEADER_KEYS.items():
        if key not in hdr:
            continue
        if k in _NUMERIC_SETTINGS:
            settings[k] = _header_number(hdr, key, path, integer=k in _INTEGER_SETTINGS)
        else:
            v = hdr[key]
            if not isinstance(v, str):
                raise fail(key, f"must be a string, got {v!r}")
            settings[k] = v
    if settings.get("guide") not in set(GUIDES.values()):
        raise fail("GUIDE", f"must be one of {sorted(set(GUIDES.values()))}, got {hdr.get('GUIDE')!r}")
    settings.setdefault("tuned", "")
    mode = _header_choice(hdr, "LINEMODE", path, ("linear", "log"))
    profile = _header_choice(hdr, "PROFILE", path, tuple(PROFILES))
    sign = _header_number(hdr, "LSIGN", path)
    if sign not in (-1.0, 1.0):
        raise fail("LSIGN", f"must be +1 (absorption) or -1 (emission), got {sign!r}")
    bunit = hdr.get("BUNIT", "")
    try:
        flux_unit = u.Unit(bunit if isinstance(bunit, str) else "?")
    except ValueError:
        raise fail("BUNIT", f"is not a unit: {bunit!r}") from None

    def table(ext: str):
        if ext not in hdul or not isinstance(hdul[ext], fits.BinTableHDU) or hdul[ext].data is None:
            raise SavedFileError(f"{path}: the {ext} table is missing or empty; {_DAMAGED}", path=path, field=ext)
        return hdul[ext].data

    def column(data, ext: str, name: str):
        if name not in data.columns.names:
            raise SavedFileError(f"{path}: column {ext}.{name} is missing; {_DAMAGED}", path=path, field=f"{ext}.{name}")
        return data[name]

    vt = table("VALUES")
    center = _checked_array(column(vt, "VALUES", "center"), path, "VALUES.center", positive=True)
    n_lines = center.size
    fitv, clov = {}, {}
    for src, tag in ((fitv, "fit"), (clov, "clone")):
        for k in ("ln_amplitude", "ln_sigma", "ln_gamma"):
            src[k] = _checked_array(column(vt, "VALUES", f"{k}_{tag}"), path, f"VALUES.{k}_{tag}",
                                    log_limit=LOG_PARAMETER_LIMIT, size=n_lines)
    st = table("SAMPLES")
    n_draws = len(st)
    if n_draws < 1:
        raise fail("SAMPLES", "holds no draws")
    samples = {}
    for name in st.columns.names:
        raw = np.asarray(st[name])
        if raw.dtype.kind not in "biuf":
            raise fail(f"SAMPLES.{name}", f"is not numeric ({raw.dtype})")
        v = raw.astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise fail(f"SAMPLES.{name}", "has non-finite draws (NaN or inf)")
        if name.startswith("ln_") and v.ndim == 1 and n_lines == 1:
            v = v[:, None]  # a one-line vector column reads back without its length-1 axis
        if name.startswith("ln_") and (v.ndim != 2 or v.shape[1] != n_lines):
            raise fail(f"SAMPLES.{name}", f"must hold one value per line ({n_lines}) per draw, got shape {v.shape}")
        # draws of ln a for lines the data do not constrain can reach far below any fitted value:
        # only finiteness is required of them (checked above)
        samples[name] = v
    for name in ("rv", "vsini", "resolving_power"):
        if name not in samples:
            raise fail(f"SAMPLES.{name}", "is missing")
        if samples[name].ndim != 1:
            raise fail(f"SAMPLES.{name}", f"must hold one number per draw, got shape {samples[name].shape}")
    dt = table("DATA")
    n_pix = len(dt)
    good_raw = np.asarray(column(dt, "DATA", "good"))
    if good_raw.dtype.kind != "b":
        raise fail("DATA.good", f"must be a logical column (T/F), got {good_raw.dtype}")
    good = good_raw.astype(bool)
    data = {"wavelength": _checked_array(column(dt, "DATA", "wavelength"), path, "DATA.wavelength", positive=True),
            "flux": _checked_array(column(dt, "DATA", "flux"), path, "DATA.flux", finite=False),
            "sigma": _checked_array(column(dt, "DATA", "sigma"), path, "DATA.sigma", finite=False),
            "good": good,
            "order": _checked_array(column(dt, "DATA", "order"), path, "DATA.order", integer=True, minimum=0),
            "flux_unit": flux_unit}
    if not np.all(np.isfinite(data["flux"][good])):
        raise fail("DATA.flux", "is not finite at pixels marked good")
    if "PREDICT" not in hdul or not isinstance(hdul["PREDICT"], fits.ImageHDU) or hdul["PREDICT"].data is None:
        raise SavedFileError(f"{path}: the PREDICT image (model draws) is missing; {_DAMAGED}", path=path, field="PREDICT")
    pred = np.asarray(hdul["PREDICT"].data, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != n_pix or pred.shape[0] < 1:
        raise fail("PREDICT", f"must hold model draws × the {n_pix} data pixels, got shape {pred.shape}")
    elbo = _checked_array(column(table("ELBO"), "ELBO", "elbo"), path, "ELBO.elbo", finite=False)
    info = {"center": center, "mode": mode, "profile": profile, "sign": sign}
    return dict(samples=samples, fit_values=fitv, clone_values=clov, line_info=info, data=data, predictive=pred,
                elbo_history=elbo, settings=settings)


#: settings key → FITS header keyword
_HEADER_KEYS = {
    "guide": "GUIDE",
    "rank": "RANK",
    "num_steps": "NSTEPS",
    "num_samples": "NSAMPLE",
    "lr": "LR",
    "seed": "SEED",
    "regularization": "REGUL",
    "width_regularization": "WREGUL",
    "noise_scale": "NOISESC",
    "tuned": "TUNED",
    "rv_scale": "RVSCALE",
    "vsini_scale": "VSCALE",
    "resolving_power_scale": "RSCALE",
    "continuum_scale": "CSCALE",
    "seconds": "SECONDS",
    "skipped_steps": "SKIPPED",
    "device": "DEVICE",
}


# ====================================================================== entry point


def _positive(name: str, value, *, integer: bool = False, allow_zero: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value}")
    if not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}{' (an integer)' if integer else ''}, "
                         f"got {value}")
    return int(value) if integer else float(value)


def sample_posterior(
    result: TransferResult,
    guide: str = "normal",
    *,
    num_steps: int = 1000,
    num_samples: int = 1000,
    lr: float = 0.02,
    rank: int | None = None,
    tune_lines: Iterable[str] = ("amplitude",),
    tune_vsini: bool = True,
    tune_resolving_power: bool | None = None,
    regularization: float | None = None,
    width_regularization: float | None = None,
    rv_scale: float = 10.0,
    vsini_scale: float = 1.0,
    resolving_power_scale: float = 0.1,
    continuum_scale: float = 0.1,
    noise_scale: float | str = 1.0,
    num_predictive: int = 200,
    init_scale: float = 0.5,
    progress: bool = True,
    seed: int | None = 0,
) -> PosteriorFit:
    r"""Posterior of a transfer-learning fit by stochastic variational inference (SVI) with Pyro.

    Starts every guide at the fit (the Adam optimum of Eq. 11, which is the MAP of this model; see
    the module docstring), runs SVI with Adam on the ELBO, then draws samples from the guide.

    Parameters
    ----------
    result : TransferResult
        A fit from :func:`~blase_specutils.fitting.fit_spectrum`. It is not modified.
    guide : str
        ``"normal"`` (mean-field, default), ``"lowrank"`` (low-rank plus diagonal covariance:
        correlated, blended lines) or ``"map"`` (point estimate); see :data:`GUIDES`.
    num_steps : int
        SVI steps (one forward and backward pass of the model each).
    num_samples : int
        Posterior draws kept in :attr:`PosteriorFit.samples`.
    lr : float
        Adam learning rate in the standardised coordinates (decays tenfold over the run).
    rank : int, optional
        Rank of the ``"lowrank"`` guide (default ≈ √(number of latents)).
    tune_lines : iterable of str
        Latent line parameters: ``"amplitude"`` (ln a, the paper's default) and optionally
        ``"sigma"``, ``"gamma"``. Others (and λc) are held at the fit: their uncertainty is not
        propagated.
    tune_vsini : bool
        Make ln v sin i latent.
    tune_resolving_power : bool, optional
        Make ln R latent (default: if the fit tuned R).
    regularization : float, optional
        Λ of Eq. 11 (prior Laplace(ln â, 2Λ) on ln a); default the fit's.
    width_regularization : float, optional
        Λ_w of the pulls on ln σ, ln γ (needed when widths are latent); default the fit's.
    rv_scale : float
        Width (km/s) of the normal prior on RV, centred on the fit.
    vsini_scale, resolving_power_scale : float
        Widths (in ln) of the log-normal priors on v sin i and R, centred on the fit.
    continuum_scale : float
        Width of the normal prior on each continuum coefficient, as a fraction of the continuum
        level of its order.
    noise_scale : float or "chi2"
        Multiply the data uncertainties by this factor; ``"chi2"`` uses √(χ²_red) of the fit, a
        crude allowance for model misspecification (inflates every error bar alike).
    num_predictive : int
        Draws of M(λ_D) kept for the model band (at most ``num_samples``).
    init_scale : float
        Initial standard deviation of the normal guides in the standardised coordinates.
    progress : bool
        tqdm progress bar with the ELBO.
    seed : int or None
        Seeds Pyro, torch and numpy (None: leave the generators alone).

    Returns
    -------
    PosteriorFit

    Raises
    ------
    ValueError
        Unknown guide name (the message lists the valid ones), bad step/sample counts, no
        regularisation (an improper prior), unknown ``tune_lines``.
    TypeError
        ``result`` is not a TransferResult.
    """
    if not isinstance(result, TransferResult):
        raise TypeError(f"result must be a TransferResult (from fit_spectrum), got {type(result).__name__}")
    kind = _guide_kind(guide)
    num_steps = _positive("num_steps", num_steps, integer=True)
    num_samples = _positive("num_samples", num_samples, integer=True)
    num_predictive = min(_positive("num_predictive", num_predictive, integer=True, allow_zero=True), num_samples)
    lr = _positive("lr", lr)
    init_scale = _positive("init_scale", init_scale)
    for name, val in (("rv_scale", rv_scale), ("vsini_scale", vsini_scale),
                      ("resolving_power_scale", resolving_power_scale), ("continuum_scale", continuum_scale)):
        _positive(name, val)
    tune_lines = tuple(tune_lines)
    bad = [t for t in tune_lines if t not in _LINE_PARAMS]
    if bad:
        raise ValueError(f"unknown tune_lines {bad}; choose from {tuple(_LINE_PARAMS)} (centres are held at the fit)")
    if regularization is None:
        regularization = result.settings.get("regularization")
    if "amplitude" in tune_lines:
        if regularization is None:
            raise ValueError(
                "the fit used no amplitude regularisation (Λ = None): a flat prior on ln a makes the posterior "
                "of lines the data do not constrain improper. Pass regularization=Λ (the paper uses 5).")
        _positive("regularization", regularization)
    if width_regularization is None:
        width_regularization = result.settings.get("width_regularization")
    if {"sigma", "gamma"} & set(tune_lines):
        if width_regularization is None:
            raise ValueError("latent widths need a proper prior: pass width_regularization=Λ_w "
                             "(Laplace prior of scale 2Λ_w on ln σ and ln γ)")
        _positive("width_regularization", width_regularization)
    if isinstance(noise_scale, str):
        if noise_scale != "chi2":
            raise ValueError(f"noise_scale must be a number or 'chi2', got {noise_scale!r}")
        noise_scale = math.sqrt(max(result.chi2_reduced, 1e-12))
    noise_scale = _positive("noise_scale", noise_scale)
    model = result.model
    if getattr(model, "stellar", None) is None:
        raise ValueError(
            "sample_posterior needs a fit with a stellar clone (its lines, RV and v sin i are the latent "
            "variables); telluric-only fits are not supported yet")
    if tune_resolving_power is None:
        tune_resolving_power = bool(model.inst.log_resolving_power.requires_grad)
    if seed is not None:
        pyro.set_rng_seed(int(seed))

    t0 = time.perf_counter()
    pmodel = TransferPosteriorModel(
        model, result.flux, result.sigma, result.good, prior=result.prior,
        regularization=float(regularization if regularization is not None else 1.0),
        width_regularization=width_regularization, tune_lines=tune_lines, tune_vsini=tune_vsini,
        tune_resolving_power=tune_resolving_power, rv_scale=rv_scale, vsini_scale=vsini_scale,
        resolving_power_scale=resolving_power_scale, continuum_scale=continuum_scale, noise_scale=noise_scale,
        amplitude_warp=kind != "delta", seed=0 if seed is None else int(seed),
    )
    g = make_guide(pmodel, kind, rank=rank, init_scale=init_scale)
    elbo_hist, skipped = _run_svi(pmodel, g, num_steps=num_steps, lr=lr, progress=progress, desc=f"SVI ({kind})")
    samples, pred = _draw(pmodel, g, num_samples, num_predictive)
    seconds = time.perf_counter() - t0

    st = model.stellar
    with torch.no_grad():
        fit_values = {k: getattr(st, p.split(".")[1]).detach().cpu().numpy().copy()
                      for k, p in (("ln_amplitude", "stellar.log_amplitudes"), ("ln_sigma", "stellar.log_sigmas"),
                                   ("ln_gamma", "stellar.log_gammas"))}
        clone_values = {"ln_amplitude": result.prior["log_amplitudes"].cpu().numpy().copy(),
                        "ln_sigma": result.prior["log_sigmas"].cpu().numpy().copy(),
                        "ln_gamma": result.prior["log_gammas"].cpu().numpy().copy()}
        center = st.lam_centers.detach().cpu().numpy().copy()
    tuned = [k for k in tune_lines] + ["rv"] + (["vsini"] if tune_vsini else []) + (
        ["resolving_power"] if tune_resolving_power else []) + ["continuum"]
    settings = {
        "guide": kind, "rank": getattr(g, "rank", None) if kind == "lowrank" else None, "num_steps": num_steps,
        "num_samples": num_samples, "lr": lr, "seed": seed,
        "regularization": float(regularization) if regularization is not None else None,
        "width_regularization": float(width_regularization) if width_regularization is not None else None,
        "noise_scale": noise_scale, "tuned": ",".join(tuned), "rv_scale": float(rv_scale),
        "vsini_scale": float(vsini_scale), "resolving_power_scale": float(resolving_power_scale),
        "continuum_scale": float(continuum_scale), "seconds": round(seconds, 2), "skipped_steps": skipped,
        "device": str(pmodel.device),
    }
    unit = getattr(result._arrays[0], "flux_unit", u.dimensionless_unscaled) if result._arrays else u.dimensionless_unscaled
    data = {"wavelength": np.asarray(result.wavelength, dtype=float), "flux": np.asarray(result.flux, dtype=float),
            "sigma": np.asarray(result.sigma, dtype=float), "good": np.asarray(result.good, dtype=bool),
            "order": np.asarray(result.order_of_pixel), "flux_unit": unit}
    return PosteriorFit(
        samples=samples, fit_values=fit_values, clone_values=clone_values,
        line_info={"center": center, "mode": st.mode, "sign": st.sign, "profile": st.profile}, data=data,
        predictive=pred, elbo_history=elbo_hist, settings=settings, result=result, posterior_model=pmodel,
        guide_module=g,
    )


def _run_svi(pmodel: TransferPosteriorModel, guide, *, num_steps: int, lr: float, progress: bool,
             desc: str) -> tuple[np.ndarray, int]:
    """Adam on −ELBO (Trace_ELBO, one particle), learning rate decaying tenfold; returns the ELBO
    history and the number of steps skipped for a non-finite loss or gradient."""
    from tqdm.std import tqdm

    with _local_params():
        loss_fn = Trace_ELBO()(pmodel, guide)
        params = [p for p in guide.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / max(num_steps, 1)))
        hist = np.empty(num_steps)
        skipped = 0
        bar = tqdm(range(num_steps), desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
        for step in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()
            ok = math.isfinite(value) and all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
            if ok:
                opt.step()
            else:
                skipped += 1
            sched.step()
            hist[step] = -value
            if progress and (step % 10 == 0 or step == num_steps - 1):
                bar.set_postfix(elbo=f"{-value:.6g}")
        bar.close()
    if skipped:
        warnings.warn(f"{desc}: {skipped} of {num_steps} steps met a non-finite ELBO or gradient and were skipped; "
                      "try a smaller lr", RuntimeWarning, stacklevel=3)
    if skipped > num_steps // 2:
        raise RuntimeError(f"{desc}: most SVI steps were non-finite ({skipped} of {num_steps}); try a smaller lr")
    return hist, skipped


@torch.no_grad()
def _draw(pmodel: TransferPosteriorModel, guide, num_samples: int, num_predictive: int):
    """Draws from the guide in physical units, and M(λ_D) for the first ``num_predictive``."""
    keys = {b.param: b for b in pmodel.blocks}
    fixed = pmodel._fixed
    phys: dict[str, list] = {b.param: [] for b in pmodel.blocks}
    pred = []
    with _local_params():
        for i in range(num_samples):
            lat = guide()
            x = pmodel.physical(lat)
            for k, v in x.items():
                phys[k].append(v.detach().cpu().numpy().copy())
            if i < num_predictive:
                pred.append(pmodel.model_flux(lat).detach().cpu().numpy())
    n = num_samples

    def get(param):
        if param in keys:
            return np.stack(phys[param])
        return np.broadcast_to(fixed[param].detach().cpu().numpy(), (n, *fixed[param].shape)).copy()

    samples = {"rv": get("rv"), "vsini": np.exp(get("rot.log_vsini")),
               "resolving_power": np.exp(get("inst.log_resolving_power")), "continuum": get("continuum_coeffs")}
    for key, param in _LINE_PARAMS.items():
        if param in keys:
            samples[_SAMPLE_KEYS[key]] = get(param)
    n_pix = pmodel.model.lam_d.numel()
    pred = np.stack(pred) if pred else np.empty((0, n_pix))
    return samples, pred
