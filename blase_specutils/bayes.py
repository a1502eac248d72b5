r"""Posterior uncertainties for transfer learning with Pyro (the optional ``[pyro]`` extra).

The fitted forward model of Eq. 10 is wrapped, unchanged, in a probabilistic model:

.. math::
    p(\theta \mid D) \propto
    \prod_i \mathcal{N}\!\left(D_i \mid M(\lambda_{D,i}; \theta), \epsilon_i^2\right)\;
    \prod_j \mathrm{Laplace}\!\left(\ln a_j \mid \ln\hat a_j, 2\Lambda\right)\;
    p(RV)\, p(\ln v\sin i)\, p(\ln R)\, p(\ln X)\, p(P_\mathrm{data}),

with :math:`\epsilon_i` the data uncertainties (masked pixels left out), :math:`\hat a_j` the
cloned amplitudes and X the Beer's-law power of the telluric transmission :math:`T^X` (one per
molecule when the fit was given several named telluric clones).

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
wider than the posteriors they produce on real data. The telluric power, when the fit tuned it,
has a normal prior on ln X (default width 1, a factor e either way), sample key
``ln_telluric_power``: a scalar per draw, or one column per molecule component.

A telluric-only fit (no stellar clone) has no RV, v sin i or stellar lines: its latents are the
telluric power(s), the continuum and, when asked, ln R. Telluric line parameters are always held
at the fit (the power's posterior is conditional on them, like the σ of
:attr:`TransferResult.uncertainties <blase_specutils.fitting.TransferResult.uncertainties>`).

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
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import astropy.units as u
import numpy as np
import torch
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
        'dependency, which is not installed: pip install "blase_specutils[pyro]"'
    ) from _err

from .constants import POSTERIOR_LR_DECAY
from .core.transfer import TransferModel
from .fitting import TransferResult
# the result and its file, re-exported from where they were first defined
from .posterior import _LAPLACE_68, Measurement, ModelBand, PosteriorFit, _percentiles  # noqa: F401
from .posterior_file import FORMAT_NAME, FORMAT_VERSION, _read_posterior  # noqa: F401
from .posterior_file import HEADER_KEYS as _HEADER_KEYS  # noqa: F401

__all__ = [
    "GUIDES",
    "AmplitudeWarp",
    "Measurement",
    "ModelBand",
    "PosteriorFit",
    "PosteriorSettings",
    "TransferPosteriorModel",
    "make_guide",
    "run_posterior",
    "sample_posterior",
]

#: Guide names accepted by :func:`sample_posterior`, and the guide each one selects (the kinds are
#: :data:`blase_specutils.posterior_file.GUIDE_KINDS`).
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
    "telluric_power": "ln_telluric_power",
    "continuum": "continuum",
}

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
    tune_telluric_power : bool, optional
        Whether ln X, the telluric Beer's-law power(s), is latent (needs a telluric clone). None
        (default): when the fit tuned it (``model.log_telluric_power`` requires grad).
    rv_scale : float
        Width (km/s) of the normal prior on RV.
    vsini_scale, resolving_power_scale : float
        Widths (in ln) of the log-normal priors on v sin i and R.
    telluric_power_scale : float
        Width (in ln X) of the normal prior on each telluric power, centred on the fit.
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

    Notes
    -----
    Without a stellar clone (a telluric-only model) there is no RV, v sin i or stellar line to
    sample: ``tune_lines`` and ``tune_vsini`` are ignored, and the latents are ln X (when tuned),
    the continuum and, when asked, ln R.

    Raises
    ------
    TypeError
        ``model`` is not a TransferModel.
    ValueError
        Data of the wrong length; ``tune_telluric_power=True`` without a telluric clone.
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
        tune_telluric_power: bool | None = None,
        rv_scale: float = 10.0,
        vsini_scale: float = 1.0,
        resolving_power_scale: float = 0.1,
        telluric_power_scale: float = 1.0,
        continuum_scale: float = 0.1,
        noise_scale: float = 1.0,
        amplitude_warp: bool = True,
        n_probes: int = 32,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, TransferModel):
            raise TypeError(f"model must be a TransferModel, got {type(model).__name__}")
        self.model = model
        self.has_stellar = model.stellar is not None
        # the continuum and the data grid exist in every TransferModel (a telluric-only one included)
        self.device = model.lam_d.device
        self.dtype = model.continuum_coeffs.dtype
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
        self.tune_lines = tuple(tune_lines) if self.has_stellar else ()
        self.tune_vsini = bool(tune_vsini) and self.has_stellar
        self.tune_resolving_power = bool(tune_resolving_power)
        if tune_telluric_power is None:
            tune_telluric_power = model.telluric is not None and bool(model.log_telluric_power.requires_grad)
        if tune_telluric_power and model.telluric is None:
            raise ValueError("tune_telluric_power=True needs a fit with a telluric clone (there is no power X to "
                             "sample)")
        self.tune_telluric_power = bool(tune_telluric_power)
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
        if self.has_stellar:
            add("rv", "rv", "normal", self._fixed["rv"], float(rv_scale))
        if self.tune_vsini:
            add("vsini", "rot.log_vsini", "normal", self._fixed["rot.log_vsini"], float(vsini_scale))
        if self.tune_resolving_power:
            add("resolving_power", "inst.log_resolving_power", "normal", self._fixed["inst.log_resolving_power"],
                float(resolving_power_scale))
        if self.tune_telluric_power:
            add("telluric_power", "log_telluric_power", "normal", self._fixed["log_telluric_power"],
                float(telluric_power_scale))
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


def _checked_rank(rank, guide: str) -> int | None:
    """The rank of a low-rank guide: None (Pyro's default) or a positive integer, for ``"lowrank"`` only."""
    if rank is not None and _guide_kind(guide) != "lowrank":
        raise ValueError(f"rank applies only to guide='lowrank', not {guide!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return None if rank is None else int(rank)


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
    rank = _checked_rank(rank, guide)
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



# ====================================================================== settings


def _positive(name: str, value, *, integer: bool = False, allow_zero: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value}")
    if not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}{' (an integer)' if integer else ''}, "
                         f"got {value}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class PosteriorSettings:
    r"""The options of a posterior run (:func:`sample_posterior`), each checked once, here.

    The fields are the keywords of :func:`sample_posterior` (see there for their meaning), except
    ``guide``, which holds the guide kind (``"delta"``, ``"normal"`` or ``"lowrank"``) that the name
    given selects, and ``num_predictive``, clipped to ``num_samples``. Five fields may be left to the
    fit (None, or ``"chi2"`` for ``noise_scale``): :meth:`for_result` fills them in.

    Raises
    ------
    ValueError, TypeError
        An unknown guide or ``tune_lines`` entry, a count that is not a positive integer, a rate,
        scale or Λ that is not a finite number > 0, a rank for a guide that has none.
    """

    guide: str = "normal"
    num_steps: int = 1000
    num_samples: int = 1000
    lr: float = 0.02
    rank: int | None = None
    tune_lines: tuple[str, ...] = ("amplitude",)
    tune_vsini: bool = True
    tune_resolving_power: bool | None = None
    regularization: float | None = None
    width_regularization: float | None = None
    rv_scale: float = 10.0
    vsini_scale: float = 1.0
    resolving_power_scale: float = 0.1
    continuum_scale: float = 0.1
    noise_scale: float | str = 1.0
    num_predictive: int = 200
    init_scale: float = 0.5
    progress: bool = True
    seed: int | None = 0
    tune_telluric_power: bool | None = None
    telluric_power_scale: float = 1.0

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        kind = _guide_kind(self.guide)
        put("rank", _checked_rank(self.rank, self.guide))
        put("guide", kind)
        for name in ("num_steps", "num_samples"):
            put(name, _positive(name, getattr(self, name), integer=True))
        put("num_predictive", min(_positive("num_predictive", self.num_predictive, integer=True, allow_zero=True),
                                  self.num_samples))
        for name in ("lr", "init_scale", "rv_scale", "vsini_scale", "resolving_power_scale", "telluric_power_scale",
                     "continuum_scale"):
            put(name, _positive(name, getattr(self, name)))
        put("tune_lines", tuple(self.tune_lines))
        bad = [t for t in self.tune_lines if t not in _LINE_PARAMS]
        if bad:
            raise ValueError(f"unknown tune_lines {bad}; choose from {tuple(_LINE_PARAMS)} (centres are held at "
                             "the fit)")
        for name in ("regularization", "width_regularization"):
            if getattr(self, name) is not None:
                put(name, _positive(name, getattr(self, name)))
        if isinstance(self.noise_scale, str):
            if self.noise_scale != "chi2":
                raise ValueError(f"noise_scale must be a number or 'chi2', got {self.noise_scale!r}")
        else:
            put("noise_scale", _positive("noise_scale", self.noise_scale))
        if self.seed is not None:
            put("seed", _positive("seed", self.seed, integer=True, allow_zero=True))
        put("tune_vsini", bool(self.tune_vsini))
        put("progress", bool(self.progress))
        if self.tune_resolving_power is not None:
            put("tune_resolving_power", bool(self.tune_resolving_power))
        if self.tune_telluric_power is not None:
            put("tune_telluric_power", bool(self.tune_telluric_power))

    def for_result(self, result: TransferResult) -> PosteriorSettings:
        """These settings with what was left to the fit filled in from ``result``: Λ and Λ_w (the
        fit's), ``noise_scale="chi2"`` (√χ²_red of the fit), ``tune_resolving_power`` (whether the
        fit tuned R) and ``tune_telluric_power`` (whether the fit tuned X).

        A telluric-only fit (no stellar clone) has no stellar lines, RV or v sin i: ``tune_lines``
        comes back empty and ``tune_vsini`` False.

        Raises
        ------
        ValueError
            Latent amplitudes (or widths) without a Λ (or Λ_w): an improper prior;
            ``tune_telluric_power=True`` for a fit without a telluric clone.
        """
        model = result.model
        has_stellar = getattr(model, "stellar", None) is not None
        if not has_stellar:  # nothing stellar to sample
            self = replace(self, tune_lines=(), tune_vsini=False)
        reg = self.regularization if self.regularization is not None else result.settings.get("regularization")
        if "amplitude" in self.tune_lines and reg is None:
            raise ValueError(
                "the fit used no amplitude regularisation (Λ = None): a flat prior on ln a makes the posterior "
                "of lines the data do not constrain improper. Pass regularization=Λ (the paper uses 5).")
        wreg = (self.width_regularization if self.width_regularization is not None
                else result.settings.get("width_regularization"))
        if {"sigma", "gamma"} & set(self.tune_lines) and wreg is None:
            raise ValueError("latent widths need a proper prior: pass width_regularization=Λ_w "
                             "(Laplace prior of scale 2Λ_w on ln σ and ln γ)")
        noise = math.sqrt(max(result.chi2_reduced, 1e-12)) if self.noise_scale == "chi2" else self.noise_scale
        tune_r = self.tune_resolving_power
        if tune_r is None:
            tune_r = bool(model.inst.log_resolving_power.requires_grad)
        has_telluric = getattr(model, "telluric", None) is not None
        tune_x = self.tune_telluric_power
        if tune_x is None:
            tune_x = has_telluric and bool(model.log_telluric_power.requires_grad)
        if tune_x and not has_telluric:
            raise ValueError("tune_telluric_power=True needs a fit with a telluric clone (there is no power X to "
                             "sample)")
        return replace(self, regularization=reg, width_regularization=wreg, noise_scale=noise,
                       tune_resolving_power=tune_r, tune_telluric_power=bool(tune_x))

    def record(self, *, rank: int | None, seconds: float, skipped_steps: int, device,
               has_stellar: bool = True) -> dict:
        """The settings of a finished run as :attr:`PosteriorFit.settings` holds and the file keeps them."""
        tuned = [*self.tune_lines, *(["rv"] if has_stellar else []), *(["vsini"] if self.tune_vsini else []),
                 *(["resolving_power"] if self.tune_resolving_power else []),
                 *(["telluric_power"] if self.tune_telluric_power else []), "continuum"]
        return {
            "guide": self.guide, "rank": rank, "num_steps": self.num_steps, "num_samples": self.num_samples,
            "lr": self.lr, "seed": self.seed, "regularization": self.regularization,
            "width_regularization": self.width_regularization, "noise_scale": self.noise_scale,
            "tuned": ",".join(tuned), "rv_scale": self.rv_scale, "vsini_scale": self.vsini_scale,
            "resolving_power_scale": self.resolving_power_scale, "continuum_scale": self.continuum_scale,
            "telluric_power_scale": self.telluric_power_scale, "seconds": round(seconds, 2),
            "skipped_steps": skipped_steps, "device": str(device),
        }


# ====================================================================== entry point


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
    tune_telluric_power: bool | None = None,
    telluric_power_scale: float = 1.0,
) -> PosteriorFit:
    r"""Posterior of a transfer-learning fit by stochastic variational inference (SVI) with Pyro.

    Starts every guide at the fit (the Adam optimum of Eq. 11, which is the MAP of this model; see
    the module docstring), runs SVI with Adam on the ELBO, then draws samples from the guide.

    A fit with a telluric clone whose Beer's-law power X was tuned gets ln X as a latent (one per
    molecule for several named telluric clones), reported by
    :meth:`PosteriorFit.measurement("telluric_power") <blase_specutils.posterior.PosteriorFit.measurement>`
    (``"telluric_power:H2O"`` for a component) and :attr:`PosteriorFit.telluric_power`. A
    telluric-only fit (no stellar clone) is sampled in its telluric power(s) and continuum alone
    (``tune_lines`` and ``tune_vsini`` are then ignored).

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
    tune_telluric_power : bool, optional
        Make ln X, the telluric Beer's-law power(s), latent (default: if the fit tuned X; needs a
        telluric clone).
    regularization : float, optional
        Λ of Eq. 11 (prior Laplace(ln â, 2Λ) on ln a); default the fit's.
    width_regularization : float, optional
        Λ_w of the pulls on ln σ, ln γ (needed when widths are latent); default the fit's.
    rv_scale : float
        Width (km/s) of the normal prior on RV, centred on the fit.
    vsini_scale, resolving_power_scale : float
        Widths (in ln) of the log-normal priors on v sin i and R, centred on the fit.
    telluric_power_scale : float
        Width (in ln X) of the log-normal prior on each telluric power X, centred on the fit
        (default 1: a factor e either way, far wider than the data allow).
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

    See Also
    --------
    run_posterior : the same, with the options as one :class:`PosteriorSettings`.

    Raises
    ------
    ValueError
        Unknown guide name (the message lists the valid ones), bad step/sample counts, no
        regularisation (an improper prior), unknown ``tune_lines``, ``tune_telluric_power=True``
        without a telluric clone.
    TypeError
        ``result`` is not a TransferResult.
    """
    if not isinstance(result, TransferResult):
        raise TypeError(f"result must be a TransferResult (from fit_spectrum), got {type(result).__name__}")
    settings = PosteriorSettings(
        guide=guide, num_steps=num_steps, num_samples=num_samples, lr=lr, rank=rank, tune_lines=tuple(tune_lines),
        tune_vsini=tune_vsini, tune_resolving_power=tune_resolving_power, regularization=regularization,
        width_regularization=width_regularization, rv_scale=rv_scale, vsini_scale=vsini_scale,
        resolving_power_scale=resolving_power_scale, continuum_scale=continuum_scale, noise_scale=noise_scale,
        num_predictive=num_predictive, init_scale=init_scale, progress=progress, seed=seed,
        tune_telluric_power=tune_telluric_power, telluric_power_scale=telluric_power_scale)
    return run_posterior(result, settings)


def run_posterior(result: TransferResult, settings: PosteriorSettings) -> PosteriorFit:
    """:func:`sample_posterior` with its options as one :class:`PosteriorSettings`.

    Parameters
    ----------
    result : TransferResult
        A fit from :func:`~blase_specutils.fitting.fit_spectrum`. It is not modified.
    settings : PosteriorSettings
        The options of the run.

    Returns
    -------
    PosteriorFit
    """
    if not isinstance(result, TransferResult):
        raise TypeError(f"result must be a TransferResult (from fit_spectrum), got {type(result).__name__}")
    if not isinstance(settings, PosteriorSettings):
        raise TypeError(f"settings must be a PosteriorSettings, got {type(settings).__name__}")
    s = settings.for_result(result)
    if s.seed is not None:
        pyro.set_rng_seed(s.seed)
    t0 = time.perf_counter()
    pmodel = _posterior_model(result, s)
    g = make_guide(pmodel, s.guide, rank=s.rank, init_scale=s.init_scale)
    elbo_hist, skipped = _run_svi(pmodel, g, num_steps=s.num_steps, lr=s.lr, progress=s.progress,
                                  desc=f"SVI ({s.guide})")
    samples, pred = _draw(pmodel, g, s.num_samples, s.num_predictive)
    seconds = time.perf_counter() - t0
    record = s.record(rank=getattr(g, "rank", None) if s.guide == "lowrank" else None, seconds=seconds,
                      skipped_steps=skipped, device=pmodel.device, has_stellar=pmodel.has_stellar)
    return PosteriorFit(samples=samples, **_line_values(result), data=_data_of(result), predictive=pred,
                        elbo_history=elbo_hist, settings=record, result=result, posterior_model=pmodel,
                        guide_module=g, telluric_names=_component_names(result.model))


def _posterior_model(result: TransferResult, s: PosteriorSettings) -> TransferPosteriorModel:
    """The Pyro model around the fit, with the priors and latents the settings ask for."""
    return TransferPosteriorModel(
        result.model, result.flux, result.sigma, result.good, prior=result.prior,
        regularization=float(s.regularization if s.regularization is not None else 1.0),
        width_regularization=s.width_regularization, tune_lines=s.tune_lines, tune_vsini=s.tune_vsini,
        tune_resolving_power=s.tune_resolving_power, tune_telluric_power=s.tune_telluric_power, rv_scale=s.rv_scale,
        vsini_scale=s.vsini_scale, resolving_power_scale=s.resolving_power_scale,
        telluric_power_scale=s.telluric_power_scale, continuum_scale=s.continuum_scale, noise_scale=s.noise_scale,
        amplitude_warp=s.guide != "delta", seed=0 if s.seed is None else s.seed,
    )


def _component_names(model: TransferModel) -> tuple[str, ...]:
    """The names of the telluric components, one per entry of a vector ``log_telluric_power``
    (empty for one power or no telluric clone)."""
    if model.telluric is None or model.log_telluric_power.ndim == 0:
        return ()
    return tuple(str(n) for n in model.telluric_names)


@torch.no_grad()
def _line_values(result: TransferResult) -> dict:
    """The fitted and cloned ln a, ln σ, ln γ of the stellar lines, and their centres, mode, sign and
    profile (empty values and no line information for a telluric-only fit)."""
    st = result.model.stellar
    if st is None:
        return {"fit_values": {}, "clone_values": {}, "line_info": None}
    fit_values = {k: getattr(st, p.split(".")[1]).detach().cpu().numpy().copy()
                  for k, p in (("ln_amplitude", "stellar.log_amplitudes"), ("ln_sigma", "stellar.log_sigmas"),
                               ("ln_gamma", "stellar.log_gammas"))}
    clone_values = {"ln_amplitude": result.prior["log_amplitudes"].cpu().numpy().copy(),
                    "ln_sigma": result.prior["log_sigmas"].cpu().numpy().copy(),
                    "ln_gamma": result.prior["log_gammas"].cpu().numpy().copy()}
    center = st.lam_centers.detach().cpu().numpy().copy()
    return {"fit_values": fit_values, "clone_values": clone_values,
            "line_info": {"center": center, "mode": st.mode, "sign": st.sign, "profile": st.profile}}


def _data_of(result: TransferResult) -> dict:
    """The fit's pixels, masks, orders and flux unit, as a posterior keeps them."""
    unit = (getattr(result._arrays[0], "flux_unit", u.dimensionless_unscaled) if result._arrays
            else u.dimensionless_unscaled)
    return {"wavelength": np.asarray(result.wavelength, dtype=float), "flux": np.asarray(result.flux, dtype=float),
            "sigma": np.asarray(result.sigma, dtype=float), "good": np.asarray(result.good, dtype=bool),
            "order": np.asarray(result.order_of_pixel), "flux_unit": unit}


def _run_svi(pmodel: TransferPosteriorModel, guide, *, num_steps: int, lr: float, progress: bool,
             desc: str) -> tuple[np.ndarray, int]:
    """Adam on −ELBO (Trace_ELBO, one particle), learning rate decaying tenfold; returns the ELBO
    history and the number of steps skipped for a non-finite loss or gradient."""
    from tqdm.std import tqdm

    with _local_params():
        loss_fn = Trace_ELBO()(pmodel, guide)
        params = [p for p in guide.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=POSTERIOR_LR_DECAY ** (1.0 / max(num_steps, 1)))
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

    samples = {}
    if pmodel.has_stellar:  # a telluric-only model has no RV or v sin i to report
        samples.update(rv=get("rv"), vsini=np.exp(get("rot.log_vsini")))
    samples.update(resolving_power=np.exp(get("inst.log_resolving_power")), continuum=get("continuum_coeffs"))
    if pmodel.model.telluric is not None:  # held at the fit unless latent, as R
        samples["ln_telluric_power"] = get("log_telluric_power")
    for key, param in _LINE_PARAMS.items():
        if param in keys:
            samples[_SAMPLE_KEYS[key]] = get(param)
    n_pix = pmodel.model.lam_d.numel()
    pred = np.stack(pred) if pred else np.empty((0, n_pix))
    return samples, pred
