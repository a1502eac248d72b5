r"""A Gaussian-process likelihood for an imperfect (pseudo-)continuum (Appendix C.2, Eq. C4).

The residual :math:`R = D - M` between data and model is modelled as a smooth Gaussian process
:math:`f(\lambda)` (the continuum error) plus the per-pixel noise of the data,

.. math::
    R \sim \mathcal{N}(0, C), \qquad
    C = K + \beta^2\,\mathrm{diag}(\sigma^2), \qquad
    K_{ik} = A^2\, k\!\left(\frac{|\lambda_i - \lambda_k|}{\ell}\right),

independently for each échelle order, with a stationary kernel :math:`k` (Matérn-1/2, 3/2, 5/2
or squared exponential) of amplitude :math:`A` (flux units) and length scale :math:`\ell` (Å),
and :math:`\beta` a noise scale (1 by default: the data σ are trusted). The negative log
marginal likelihood is Eq. C4 plus its constant,

.. math::
    -\ln p(R) = \tfrac12 R^\mathsf{T} C^{-1} R + \tfrac12 \ln\det C + \tfrac{N}{2}\ln 2\pi .

**Scale of the loss.** The transfer-learning loss of this package is
:math:`\chi^2 + \sum_j |\ln a_j - \ln\hat a_j|/\Lambda` (Eq. 11 with χ²), i.e. *twice* a
negative log-likelihood. To keep the same balance with the L1 pull, a
:class:`GPContinuumLikelihood` called on a residual returns

.. math::
    \mathcal{L}_\mathrm{GP} = -2\ln p(R) - \sum_i \ln(2\pi\sigma_i^2)
    = R^\mathsf{T} C^{-1} R + \ln\det\!\left(C\,\mathrm{diag}(\sigma^{-2})\right),

which equals χ² exactly when :math:`A \to 0` and :math:`\beta = 1`, and is always ≥ 0 when
:math:`\beta \ge 1`. It replaces χ² in the total loss.

The GP's conditional mean given the residual,

.. math::
    \mathrm{E}[f \mid R] = K_{*}\, C^{-1} R ,

is the inferred continuum error (:meth:`GPContinuumLikelihood.conditional_mean`), evaluated at
every pixel, masked ones included.

Two ways to evaluate it, chosen per order by size (or forced with ``method``):

``"exact"``
    Dense :math:`K` from the GPyTorch kernel and a Cholesky factorisation of :math:`C`
    (:math:`O(n^3)`; the default up to ``max_exact_size`` good pixels per order).
``"scalable"``
    Structured kernel interpolation (KISS-GP, Wilson & Nickisch 2015): :math:`K \approx W
    K_{UU} W^\mathsf{T}` on a regular wavelength grid (Toeplitz :math:`K_{UU}`, cubic
    interpolation weights :math:`W`), with preconditioned conjugate gradients for
    :math:`C^{-1}R` and stochastic Lanczos quadrature for :math:`\ln\det C` (Gardner et al.
    2018). The probe vectors are drawn from a fixed seed, so the loss is a deterministic,
    smooth function of the parameters (common random numbers).

This module needs GPyTorch (``pip install "blase_specutils[gp]"``) and is imported only when a
GP likelihood is asked for; it uses torch, numpy and GPyTorch only (no astropy).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

try:
    import linear_operator
    from gpytorch.constraints import GreaterThan, Interval, Positive
    from gpytorch.kernels import GridInterpolationKernel, MaternKernel, RBFKernel
except ImportError as _err:  # the optional extra is missing
    raise ImportError(
        "the Gaussian-process continuum likelihood (blase_specutils.gp) needs GPyTorch, an optional extra: "
        'pip install "blase_specutils[gp]"'
    ) from _err

from .constants import (GP_GRID_PER_LENGTH_SCALE, GP_LANCZOS_ITERATIONS, GP_MAX_CG_ITERATIONS, GP_MAX_EXACT_SIZE,
                        GP_ORDER_GAP)

__all__ = ["KERNELS", "METHODS", "GPContinuumLikelihood", "GPSettings", "build_likelihood"]

#: Kernel names and their Matérn smoothness ν (None: squared exponential).
KERNELS: dict[str, float | None] = {"matern12": 0.5, "matern32": 1.5, "matern52": 2.5, "rbf": None}

#: Ways of evaluating the GP (see the module docstring).
METHODS = ("auto", "exact", "scalable")

F64 = torch.float64


def _as_1d(x, name: str, n: int | None, dtype=np.float64) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and a.size != n:
        raise ValueError(f"{name} has {a.size} entries but wavelength has {n}: one per pixel is needed")
    return a


def _fft_friendly(m: int) -> int:
    """Smallest m' >= m such that 2m' - 1 (the FFT length of a Toeplitz product) has no prime factor > 7."""
    k = max(int(m), 2)
    while True:
        v = 2 * k - 1
        for p in (3, 5, 7):
            while v % p == 0:
                v //= p
        if v == 1:
            return k
        k += 1


def _default_orders(wl: np.ndarray) -> np.ndarray:
    """One order per run of pixels without a gap wider than ``GP_ORDER_GAP`` median pixel spacings."""
    if wl.size < 3:
        return np.zeros(wl.size, dtype=np.int64)
    d = np.abs(np.diff(wl))
    gap = d > GP_ORDER_GAP * np.median(d)
    return np.concatenate([[0], np.cumsum(gap)]).astype(np.int64)


def _checked_bounds(bounds, name: str, initial: float) -> tuple[float | None, float | None]:
    """``(lower, upper)`` of a hyperparameter (either may be None), checked against each other and
    against the initial value."""
    if bounds is None:
        bounds = (None, None)
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise ValueError(f"{name}_bounds must be None or a pair (lower, upper), got {bounds!r}") from None
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo is not None and not (math.isfinite(lo) and lo >= 0.0):
        raise ValueError(f"the lower bound of {name} must be finite and >= 0, got {lo}")
    if hi is not None and not (math.isfinite(hi) and hi > 0.0):
        raise ValueError(f"the upper bound of {name} must be finite and > 0, got {hi}")
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"{name}_bounds must have lower < upper, got {bounds!r}")
    if (lo is not None and not initial > lo) or (hi is not None and not initial < hi):
        raise ValueError(f"the initial {name} {initial} lies outside its bounds {(lo, hi)}")
    return lo, hi


def _constraint(lo: float | None, hi: float | None):
    """The GPyTorch constraint of checked bounds ``(lo, hi)``.

    Unbounded and lower-bounded parameters move in log space (``exp`` transform), so Adam's
    steps are relative; a two-sided interval uses GPyTorch's sigmoid.
    """
    if hi is None:
        if lo is None or lo == 0.0:
            return Positive(transform=torch.exp, inv_transform=torch.log)
        c = GreaterThan(lo, transform=torch.exp, inv_transform=torch.log)
    else:
        c = Interval(0.0 if lo is None else lo, hi)
    # GPyTorch stores bounds in the default dtype (float32): keep them exact in float64
    c.lower_bound = torch.tensor(0.0 if lo is None else lo, dtype=F64)
    c.upper_bound = torch.tensor(math.inf if hi is None else hi, dtype=F64)
    return c


def _positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


@dataclass(frozen=True)
class GPSettings:
    """The options of a :class:`GPContinuumLikelihood`, each checked once, here.

    Parameters
    ----------
    kernel : {"matern32", "matern52", "matern12", "rbf"}
        Stationary kernel k: Matérn with ν = 3/2, 5/2, 1/2, or squared exponential.
    amplitude : float
        Initial A (flux units; 0.01 = 1 % of a normalised continuum).
    length_scale : float
        Initial ℓ (Å).
    amplitude_bounds, length_scale_bounds : (float or None, float or None) or None
        Optional bounds on A and ℓ. The default lower bound of 1 Å on ℓ (several resolution
        elements of HPF or IGRINS) keeps the GP from taking over line-scale residuals that the
        lines should explain; pass ``(None, None)`` to lift it.
    per_order : bool
        Give every order its own A and ℓ (default: shared by all orders).
    method : {"auto", "exact", "scalable"}
        ``"auto"``: exact (Cholesky) for orders with at most ``max_exact_size`` good pixels,
        scalable (KISS-GP with CG and Lanczos) above. Échelle orders of ≈ 2,000 pixels are exact.
    max_exact_size : int
        Size limit of the exact method under ``"auto"`` (3,000: about where the scalable method
        becomes faster on a CPU; :data:`blase_specutils.constants.GP_MAX_EXACT_SIZE`).
    grid_spacing : float, optional
        Spacing (Å) of the KISS-GP grid; default: an eighth of the lower bound of ℓ (or of the
        initial ℓ without a lower bound). Cubic interpolation is accurate when the spacing is
        well below ℓ.
    noise_scale : float
        β: the noise covariance is β² diag(σ²).
    learn_noise_scale : bool
        Tune β as well (for data whose σ are uncertain, or for cloning, where σ is a nominal
        tolerance).
    learn : bool
        Tune A and ℓ (default). False keeps them fixed; with β fixed too, the exact method then
        factorises C once and each evaluation costs O(n²) instead of O(n³).
    jitter : float
        Added to the diagonal of K as ``jitter · A²`` (vanishes with A, so the χ² limit is exact).
    cg_tolerance : float
        Relative residual tolerance of the conjugate-gradient solves (scalable method).
    n_probes : int
        Probe vectors of the stochastic log-determinant (scalable method).
    preconditioner_rank : int
        Rank of the pivoted-Cholesky preconditioner (scalable method).
    seed : int
        Seed of the probe vectors (fixed: the scalable loss is deterministic).

    Raises
    ------
    ValueError
        Unknown kernel or method, non-positive or non-finite A, ℓ, β, bad bounds.
    TypeError
        A number given as something else.
    """

    kernel: str = "matern32"
    amplitude: float = 0.01
    length_scale: float = 5.0
    amplitude_bounds: tuple[float | None, float | None] | None = None
    length_scale_bounds: tuple[float | None, float | None] | None = (1.0, None)
    per_order: bool = False
    method: str = "auto"
    max_exact_size: int = GP_MAX_EXACT_SIZE
    grid_spacing: float | None = None
    noise_scale: float = 1.0
    learn_noise_scale: bool = False
    learn: bool = True
    jitter: float = 1e-8
    cg_tolerance: float = 1e-5
    n_probes: int = 32
    preconditioner_rank: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        if not isinstance(self.kernel, str) or self.kernel.lower() not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}: choose one of {sorted(KERNELS)}")
        put("kernel", self.kernel.lower())
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {METHODS}")
        for name in ("amplitude", "length_scale", "noise_scale"):
            put(name, _positive(getattr(self, name), name))
        if int(self.max_exact_size) < 1:
            raise ValueError(f"max_exact_size must be >= 1, got {self.max_exact_size}")
        if not (0.0 <= float(self.jitter) < 1.0):
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if not float(self.cg_tolerance) > 0:
            raise ValueError(f"cg_tolerance must be > 0, got {self.cg_tolerance}")
        if int(self.n_probes) < 1 or int(self.preconditioner_rank) < 0:
            raise ValueError("n_probes must be >= 1 and preconditioner_rank >= 0")
        put("length_scale_bounds", _checked_bounds(self.length_scale_bounds, "length_scale", self.length_scale))
        put("amplitude_bounds", _checked_bounds(self.amplitude_bounds, "amplitude", self.amplitude))
        for name, kind in (("max_exact_size", int), ("jitter", float), ("cg_tolerance", float), ("n_probes", int),
                           ("preconditioner_rank", int), ("seed", int), ("per_order", bool),
                           ("learn_noise_scale", bool), ("learn", bool)):
            put(name, kind(getattr(self, name)))
        if self.grid_spacing is not None:
            put("grid_spacing", _positive(self.grid_spacing, "grid_spacing"))

    @property
    def kiss_grid_spacing(self) -> float:
        """The KISS-GP grid spacing (Å): ``grid_spacing``, or by default the lower bound of ℓ (or the
        initial ℓ without a positive lower bound) over :data:`~blase_specutils.constants.GP_GRID_PER_LENGTH_SCALE`."""
        if self.grid_spacing is not None:
            return self.grid_spacing
        floor = self.length_scale_bounds[0]
        floor = floor if floor is not None and floor > 0 else self.length_scale
        return min(floor, self.length_scale) / GP_GRID_PER_LENGTH_SCALE

    def method_for(self, n_good: int) -> str:
        """The method of an order with ``n_good`` good pixels (``"auto"`` resolved by size)."""
        if self.method != "auto":
            return self.method
        return "exact" if n_good <= self.max_exact_size else "scalable"


@dataclass(frozen=True)
class _Pixels:
    """The checked pixels of a likelihood: wavelengths (Å), σ, the good mask and the order of each."""

    wavelength: np.ndarray
    sigma: np.ndarray
    good: np.ndarray
    order_index: np.ndarray


def _checked_pixels(wavelength, sigma, good, order_index) -> _Pixels:
    """The pixels, checked: ≥ 2 finite wavelengths, σ finite and > 0 at every good pixel, one good
    pixel at least, one entry per pixel in every array."""
    wl = _as_1d(wavelength, "wavelength", None)
    n = wl.size
    if n < 2 or not np.all(np.isfinite(wl)):
        raise ValueError("wavelength must hold at least 2 finite values (Å)")
    sig = _as_1d(sigma, "sigma", n)
    good_a = np.ones(n, bool) if good is None else _as_1d(good, "good", n, dtype=bool)
    bad = good_a & ~(np.isfinite(sig) & (sig > 0))
    if bad.any():
        raise ValueError(
            f"sigma must be finite and > 0 at every good pixel; {int(bad.sum())} are not (mask them with good=False)"
        )
    if not good_a.any():
        raise ValueError("no good pixel: every pixel is masked")
    oi = _default_orders(wl) if order_index is None else _as_1d(order_index, "order_index", n, dtype=np.int64)
    return _Pixels(wl, sig, good_a, oi)


def _settings_from(settings: GPSettings | None, options: dict) -> GPSettings:
    """The settings of a likelihood from ``settings=`` or from keywords (not both)."""
    if settings is None:
        return GPSettings(**options)
    if not isinstance(settings, GPSettings):
        raise TypeError(f"settings must be a GPSettings, got {type(settings).__name__}")
    if options:
        raise TypeError(f"pass the GP options either as settings= or as keywords, not both (got {sorted(options)})")
    return settings


class _CholeskyQuadLogdet(torch.autograd.Function):
    r"""(R^T C^{-1} R, ln det C) of a dense SPD C by Cholesky, with the analytic backward pass
    ∂/∂C = g_ld C^{-1} - g_q α α^T and ∂/∂R = 2 g_q α (α = C^{-1}R): about a third of the cost
    of differentiating through the factorisation."""

    @staticmethod
    def forward(ctx, cov: Tensor, r: Tensor):
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise FloatingPointError(
                "the GP covariance is not positive definite (Cholesky failed); raise the jitter or check sigma"
            )
        alpha = torch.cholesky_solve(r[:, None], chol)[:, 0]
        ctx.save_for_backward(chol, alpha)
        return (r * alpha).sum(), 2.0 * torch.log(torch.diagonal(chol)).sum()

    @staticmethod
    def backward(ctx, g_quad: Tensor, g_logdet: Tensor):
        chol, alpha = ctx.saved_tensors
        g_cov = g_r = None
        if ctx.needs_input_grad[0]:
            g_cov = torch.cholesky_inverse(chol) * g_logdet - torch.outer(alpha, alpha) * g_quad
        if ctx.needs_input_grad[1]:
            g_r = 2.0 * g_quad * alpha
        return g_cov, g_r


class GPContinuumLikelihood(nn.Module):
    r"""Per-order Gaussian-process likelihood of the residual R = data − model (Eq. C4).

    Call it on the residual at every pixel to get :math:`\mathcal{L}_\mathrm{GP}
    = -2\ln p(R) - \sum_i \ln 2\pi\sigma_i^2` (χ² when A → 0; see the module docstring). The
    amplitude A, the length scale ℓ and (if asked) the noise scale β are ``nn.Parameter``\ s,
    tuned together with the model when the likelihood is passed to
    :func:`~blase_specutils.core.transfer.fit_transfer`,
    :func:`~blase_specutils.fitting.fit_spectrum` or
    :func:`~blase_specutils.cloning.clone_spectrum`.

    Parameters
    ----------
    wavelength : array_like
        Pixel wavelengths λ (Å), shape (N,).
    sigma : array_like
        1-σ uncertainty of each pixel (flux units), shape (N,); must be finite and > 0 wherever
        ``good``.
    good : array_like of bool, optional
        Pixels that enter the likelihood (default: all). Masked pixels are left out entirely;
        the conditional mean is still predicted there.
    order_index : array_like of int, optional
        Échelle order of each pixel: one independent GP per order. Default: a new order at every
        gap wider than 5× the median pixel spacing (:data:`~blase_specutils.constants.GP_ORDER_GAP`).
    settings : GPSettings, optional
        The kernel, its starting values and bounds, the method and its tolerances, checked.
    device : str or torch.device, optional
        Device of the buffers (default CPU); ``.to(device)`` moves the module later.
    **options
        Instead of ``settings``: its fields as keywords (``kernel="matern32"``, ``amplitude=0.01``,
        ``length_scale=5.0``, ``amplitude_bounds``, ``length_scale_bounds=(1.0, None)``,
        ``per_order``, ``method="auto"``, ``max_exact_size``, ``grid_spacing``, ``noise_scale``,
        ``learn_noise_scale``, ``learn``, ``jitter``, ``cg_tolerance``, ``n_probes``,
        ``preconditioner_rank``, ``seed``); see :class:`GPSettings` for each.

    Raises
    ------
    ValueError
        Unknown kernel or method, non-positive or non-finite A, ℓ, σ, bad bounds, arrays of
        different lengths, or no good pixel.
    TypeError
        Both ``settings`` and keywords, or an unknown keyword.
    """

    def __init__(self, wavelength, sigma, *, good=None, order_index=None, settings: GPSettings | None = None,
                 device: str | torch.device | None = None, **options) -> None:
        super().__init__()
        s = _settings_from(settings, options)
        px = _checked_pixels(wavelength, sigma, good, order_index)
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.settings = s
        self.kernel_name = s.kernel
        self.method = s.method
        self.max_exact_size = s.max_exact_size
        self.jitter = s.jitter
        self.cg_tolerance = s.cg_tolerance
        self.n_probes = s.n_probes
        self.preconditioner_rank = s.preconditioner_rank
        self.lanczos_iterations = GP_LANCZOS_ITERATIONS
        self.seed = s.seed
        self.n_pixels = px.wavelength.size
        uniq = np.unique(px.order_index)
        self.per_order = s.per_order
        _add_hyperparameters(self, s, len(uniq) if s.per_order else 1)
        self.grid_spacing = s.kiss_grid_spacing
        _add_orders(self, px, uniq, dev)
        self.to(dev)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_weight(cls, wavelength, weight, **kwargs) -> GPContinuumLikelihood:
        """Build it from inverse variances ``weight`` = 1/σ² (0 = masked), as the core's fitters use."""
        w = _as_1d(weight, "weight", None)
        if np.any(~np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weight (1/σ²) must be finite and >= 0")
        good = w > 0
        sigma = np.where(good, 1.0 / np.sqrt(np.where(good, w, 1.0)), 1.0)
        return cls(wavelength, sigma, good=good, **kwargs)

    # ------------------------------------------------------------------ hyperparameters
    @property
    def amplitude(self) -> Tensor:
        """A (flux units), one per order if ``per_order`` else a single value."""
        return self.amplitude_constraint.transform(self.raw_amplitude)

    @property
    def length_scale(self) -> Tensor:
        """ℓ (Å), one per order if ``per_order`` else a single value."""
        return torch.cat([k.lengthscale.reshape(-1) for k in self.base_kernels])

    @property
    def noise_scale(self) -> Tensor:
        """β: the noise covariance is β² diag(σ²)."""
        return self.raw_log_noise_scale.exp()

    @property
    def methods(self) -> list[str]:
        """Method used for each order (``"exact"`` or ``"scalable"``)."""
        return [o["method"] for o in self._orders]

    def extra_repr(self) -> str:
        with torch.no_grad():
            a = ", ".join(f"{v:.4g}" for v in self.amplitude.tolist())
            ell = ", ".join(f"{v:.4g}" for v in self.length_scale.tolist())
        return (f"kernel={self.kernel_name!r}, amplitude=[{a}], length_scale=[{ell}] Å, "
                f"noise_scale={float(self.noise_scale):.4g}, orders={len(self._orders)}, methods={self.methods}")

    # ------------------------------------------------------------------ linear algebra per order
    def _buf(self, o: dict, what: str) -> Tensor:
        return getattr(self, o["name"] + "_" + what)

    def _check_residual(self, residual: Tensor) -> Tensor:
        if not torch.is_tensor(residual):
            residual = torch.as_tensor(np.asarray(residual, dtype=np.float64))
        if residual.shape != (self.n_pixels,):
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected ({self.n_pixels},), one value per pixel")
        return residual.to(dtype=F64, device=self.raw_amplitude.device)

    def _noise_diag(self, o: dict, a2: Tensor) -> Tensor:
        return self._buf(o, "sig2") * self.noise_scale**2 + self.jitter * a2

    def _dense(self, o: dict, x1: Tensor, x2: Tensor) -> Tensor:
        """A² k(x1, x2) as a dense matrix."""
        a2 = self.amplitude[o["hyper"]] ** 2
        return a2 * self.base_kernels[o["hyper"]](x1, x2).to_dense()

    def _scalable_operator(self, o: dict, x1: Tensor, x2: Tensor):
        ski = self._ski[o["ski"]]
        ski._clear_cache()  # K_UU must follow ℓ: never reuse a cached grid kernel
        a2 = self.amplitude[o["hyper"]] ** 2
        return ski.forward(x1, x2) * a2

    def _iterative(self) -> contextlib.ExitStack:
        """Settings of the scalable method: iterative solves always, our tolerances, and quiet
        about torch deprecations inside linear_operator's sparse interpolation."""
        s = linear_operator.settings
        stack = contextlib.ExitStack()
        for c in (s.max_cholesky_size(0), s.cg_tolerance(self.cg_tolerance), s.max_cg_iterations(GP_MAX_CG_ITERATIONS),
                  s.num_trace_samples(self.n_probes), s.max_preconditioner_size(self.preconditioner_rank),
                  s.min_preconditioning_size(1), s.max_lanczos_quadrature_iterations(self.lanczos_iterations),
                  s.fast_computations(covar_root_decomposition=True, log_prob=True, solves=True),
                  warnings.catch_warnings()):
            stack.enter_context(c)
        for msg in ("TypedStorage is deprecated", "torch.sparse.SparseTensor", "Sparse invariant checks"):
            warnings.filterwarnings("ignore", message=msg, category=UserWarning)
        return stack

    def _frozen(self) -> bool:
        """True when no hyperparameter is tuned: C is then a constant and its Cholesky factor is reused."""
        return not any(p.requires_grad for p in self.parameters())

    def _cholesky(self, o: dict) -> tuple[Tensor, Tensor]:
        """Cholesky factor and ln det C of a frozen order, computed once per set of hyperparameter values."""
        with torch.no_grad():
            key = (float(self.amplitude[o["hyper"]]), float(self.length_scale[o["hyper"]]), float(self.noise_scale),
                   str(self.raw_amplitude.device))
            hit = self._factor_cache.get(o["name"])
            if hit is not None and hit[0] == key:
                return hit[1], hit[2]
            a2 = self.amplitude[o["hyper"]] ** 2
            x = self._buf(o, "xgood")
            chol = torch.linalg.cholesky(self._dense(o, x, x) + torch.diag(self._noise_diag(o, a2)))
            logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
            self._factor_cache[o["name"]] = (key, chol, logdet)
            return chol, logdet

    def _order_quad_logdet(self, o: dict, r: Tensor) -> tuple[Tensor, Tensor]:
        a2 = self.amplitude[o["hyper"]] ** 2
        x = self._buf(o, "xgood")
        if o["method"] == "exact":
            if self._frozen():  # O(n²) per call: only R changes
                chol, logdet = self._cholesky(o)
                z = torch.linalg.solve_triangular(chol, r[:, None], upper=False)
                return (z * z).sum(), logdet
            c = self._dense(o, x, x) + torch.diag(self._noise_diag(o, a2))
            return _CholeskyQuadLogdet.apply(c, r)
        devices = [r.device] if r.device.type == "cuda" else []
        with self._iterative(), torch.random.fork_rng(devices=devices):
            cov = self._scalable_operator(o, x, x).add_diagonal(self._noise_diag(o, a2))
            torch.manual_seed(self.seed + 7919 * o["hyper"] + o["n_good"])  # the same probes at every call
            quad, logdet = cov.inv_quad_logdet(inv_quad_rhs=r[:, None], logdet=True)
        return quad.reshape(()), logdet.reshape(())

    # ------------------------------------------------------------------ public evaluation
    def quad_logdet(self, residual: Tensor) -> tuple[Tensor, Tensor]:
        r"""The two terms of Eq. C4 summed over orders: :math:`R^\mathsf{T}C^{-1}R` and
        :math:`\ln\det C` (good pixels only)."""
        r = self._check_residual(residual)
        quad = torch.zeros((), dtype=F64, device=r.device)
        logdet = torch.zeros((), dtype=F64, device=r.device)
        for o in self._orders:
            q, ld = self._order_quad_logdet(o, r[self._buf(o, "good")])
            quad = quad + q
            logdet = logdet + ld
        return quad, logdet

    def negative_log_likelihood(self, residual: Tensor) -> Tensor:
        r""":math:`-\ln p(R) = \tfrac12 R^\mathsf{T}C^{-1}R + \tfrac12\ln\det C + \tfrac N2 \ln 2\pi`
        (Eq. C4 with its constant), over the good pixels."""
        quad, logdet = self.quad_logdet(residual)
        return 0.5 * (quad + logdet + self.n_good * math.log(2.0 * math.pi))

    def log_marginal_likelihood(self, residual: Tensor) -> Tensor:
        r""":math:`\ln p(R)`, the log marginal likelihood of the residual."""
        return -self.negative_log_likelihood(residual)

    def forward(self, residual: Tensor) -> Tensor:
        r"""The loss :math:`\mathcal{L}_\mathrm{GP} = R^\mathsf{T}C^{-1}R + \ln\det C - \sum_i \ln\sigma_i^2`
        (= :math:`-2\ln p(R) - \sum_i \ln 2\pi\sigma_i^2`; χ² when A → 0 and β = 1).

        Parameters
        ----------
        residual : Tensor
            R = data − model at every pixel, shape (N,); masked pixels are ignored.

        Returns
        -------
        Tensor
            Scalar, differentiable with respect to R and to A, ℓ (and β).
        """
        quad, logdet = self.quad_logdet(residual)
        return quad + logdet - self._log_sig2_sum

    def conditional_mean(self, residual: Tensor) -> Tensor:
        r"""The inferred continuum error :math:`\mathrm{E}[f \mid R] = K_{*} C^{-1} R` at every pixel.

        Parameters
        ----------
        residual : Tensor
            R = data − model at every pixel, shape (N,).

        Returns
        -------
        Tensor
            Shape (N,), float64: the GP mean given the good pixels of each order, predicted at
            masked pixels as well (0 in orders without good pixels).
        """
        r = self._check_residual(residual)
        out = torch.zeros(self.n_pixels, dtype=F64, device=r.device)
        for o in self._orders:
            rg = r[self._buf(o, "good")]
            a2 = self.amplitude[o["hyper"]] ** 2
            xg, xa = self._buf(o, "xgood"), self._buf(o, "xall")
            if o["method"] == "exact":
                if self._frozen():
                    chol = self._cholesky(o)[0]
                else:
                    chol = torch.linalg.cholesky(self._dense(o, xg, xg) + torch.diag(self._noise_diag(o, a2)))
                alpha = torch.cholesky_solve(rg[:, None], chol)
                mean = self._dense(o, xa, xg) @ alpha
            else:
                with self._iterative():
                    cov = self._scalable_operator(o, xg, xg).add_diagonal(self._noise_diag(o, a2))
                    alpha = cov.solve(rg[:, None])
                    mean = self._scalable_operator(o, xa, xg).matmul(alpha)
            out[self._buf(o, "all")] = mean.reshape(-1)
        return out

    def covariance(self, order: int | None = None) -> Tensor:
        """The dense covariance C over the good pixels of one order (for small problems and checks).

        Parameters
        ----------
        order : int, optional
            The order's id as given in ``order_index`` (default: the only order).
        """
        if order is None:
            if len(self._orders) != 1:
                raise ValueError("several orders: say which one (order=...)")
            o = self._orders[0]
        else:
            match = [o for o in self._orders if o["order"] == int(order)]
            if not match:
                raise ValueError(f"no order {order} with good pixels; orders are {[o['order'] for o in self._orders]}")
            o = match[0]
        a2 = self.amplitude[o["hyper"]] ** 2
        x = self._buf(o, "xgood")
        return self._dense(o, x, x) + torch.diag(self._noise_diag(o, a2))


# ------------------------------------------------------------------ set-up steps of the likelihood
def _add_hyperparameters(lik: GPContinuumLikelihood, s: GPSettings, n_hyper: int) -> None:
    """Give ``lik`` its kernels (one ℓ each), amplitudes A and noise scale β, at their starting
    values and in float64; A and ℓ tuned when ``s.learn``, β when ``s.learn_noise_scale``."""
    nu = KERNELS[s.kernel]
    kernels = []
    for _ in range(n_hyper):
        c = _constraint(*s.length_scale_bounds)
        kernels.append(RBFKernel(lengthscale_constraint=c) if nu is None else MaternKernel(nu=nu, lengthscale_constraint=c))
    lik.base_kernels = nn.ModuleList(kernels)
    lik.amplitude_constraint = _constraint(*s.amplitude_bounds)
    lik.raw_amplitude = nn.Parameter(torch.zeros(n_hyper, dtype=F64))
    lik.raw_log_noise_scale = nn.Parameter(torch.tensor(math.log(s.noise_scale), dtype=F64),
                                           requires_grad=s.learn_noise_scale)
    lik.double()
    with torch.no_grad():
        for k in lik.base_kernels:
            k.lengthscale = torch.tensor(s.length_scale, dtype=F64)
        lik.raw_amplitude.fill_(float(lik.amplitude_constraint.inverse_transform(torch.tensor(s.amplitude, dtype=F64))))
    for p in [lik.raw_amplitude, *[k.raw_lengthscale for k in lik.base_kernels]]:
        p.requires_grad_(s.learn)


def _add_orders(lik: GPContinuumLikelihood, px: _Pixels, uniq: np.ndarray, dev: torch.device) -> None:
    """Give ``lik`` the per-order bookkeeping: for each order with good pixels, its pixel indices,
    centred wavelengths and σ² as buffers, its method and (scalable) its KISS-GP kernel; and the
    sum of ln σ² over the good pixels."""
    lik._orders = []
    lik._factor_cache = {}
    lik._ski = nn.ModuleList()
    lik.order_ids = [int(u) for u in uniq]
    wl, oi, good = px.wavelength, px.order_index, px.good
    sig2 = np.where(good, px.sigma, 1.0) ** 2
    for k, u in enumerate(uniq):
        all_idx = np.flatnonzero(oi == u)
        good_idx = all_idx[good[all_idx]]
        if good_idx.size == 0:
            continue
        centre = 0.5 * (wl[all_idx].min() + wl[all_idx].max())
        name = f"_o{k}"
        for what, value in (("all", torch.as_tensor(all_idx, device=dev)),
                            ("good", torch.as_tensor(good_idx, device=dev)),
                            ("xall", torch.as_tensor(wl[all_idx] - centre, dtype=F64, device=dev)[:, None]),
                            ("xgood", torch.as_tensor(wl[good_idx] - centre, dtype=F64, device=dev)[:, None]),
                            ("sig2", torch.as_tensor(sig2[good_idx], dtype=F64, device=dev))):
            lik.register_buffer(f"{name}_{what}", value, persistent=False)
        meth = lik.settings.method_for(int(good_idx.size))
        hyper = k if lik.per_order else 0
        ski_index = _add_grid_kernel(lik, wl[all_idx] - centre, hyper) if meth == "scalable" else -1
        lik._orders.append({"name": name, "hyper": hyper, "method": meth, "ski": ski_index,
                            "n_good": int(good_idx.size), "n_all": int(all_idx.size), "order": int(u)})
    lik.register_buffer("_log_sig2_sum", torch.tensor(float(np.log(sig2[good]).sum()), dtype=F64), persistent=False)
    lik.n_good = int(good.sum())


def _add_grid_kernel(lik: GPContinuumLikelihood, xs: np.ndarray, hyper: int) -> int:
    """Add the KISS-GP kernel of an order whose centred wavelengths are ``xs`` (a regular grid of
    FFT-friendly size, padded by two cells); return its index in ``lik._ski``."""
    h = lik.grid_spacing
    lo, hi = float(xs.min()) - 2.01 * h, float(xs.max()) + 2.01 * h
    m = _fft_friendly(math.ceil((hi - lo) / h) + 2)
    ski = GridInterpolationKernel(lik.base_kernels[hyper], grid_size=m, grid_bounds=((lo, hi),))
    ski.update_grid([g.to(F64) for g in ski.grid])
    lik._ski.append(ski)
    return len(lik._ski) - 1


def _check_options(options) -> dict:
    """Keyword options for :class:`GPContinuumLikelihood` given as a mapping (or None)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"GP options must be a dict of GPContinuumLikelihood keywords, got {type(options).__name__}")
    forbidden = {"wavelength", "sigma", "good", "order_index"} & set(options)
    if forbidden:
        raise ValueError(f"{sorted(forbidden)} are set from the data; leave them out of the GP options")
    return dict(options)


def build_likelihood(spec, wavelength: np.ndarray, sigma: np.ndarray, good: np.ndarray,
                     order_index: Sequence[int] | np.ndarray | None, *, defaults: dict | None = None,
                     device=None) -> GPContinuumLikelihood:
    """Turn a user's ``likelihood=`` argument (``"gp"``, a dict of options, a :class:`GPSettings`
    or a :class:`GPContinuumLikelihood`) into a likelihood for these pixels."""
    if isinstance(spec, GPSettings):
        return GPContinuumLikelihood(wavelength, sigma, good=good, order_index=order_index, settings=spec,
                                     device=device)
    if isinstance(spec, GPContinuumLikelihood):
        if spec.n_pixels != len(wavelength):
            raise ValueError(
                f"the GP likelihood was built for {spec.n_pixels} pixels but the data have {len(wavelength)}; "
                "pass likelihood='gp' (or a dict of options) to build it from the data"
            )
        return spec.to(device) if device is not None else spec
    if isinstance(spec, str):
        if spec.lower() != "gp":
            raise ValueError(f"unknown likelihood {spec!r}: use None (χ²), 'gp', a dict of GP options, "
                             "a GPSettings or a GPContinuumLikelihood")
        options = {}
    else:
        options = _check_options(spec)
    kw = dict(defaults or {})
    kw.update(options)
    return GPContinuumLikelihood(wavelength, sigma, good=good, order_index=order_index, device=device, **kw)
