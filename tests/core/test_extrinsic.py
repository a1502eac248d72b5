import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from blase_specutils.core.clone import SPEED_OF_LIGHT_KMS
from blase_specutils.core.extrinsic import (
    FWHM_PER_SIGMA,
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

F64 = torch.float64
C = SPEED_OF_LIGHT_KMS


def _zeta(x, eps):
    """Continuous rotation profile in x = v / vsini (unit area over x)."""
    if abs(x) >= 1.0:
        return 0.0
    return (2 * (1 - eps) * math.sqrt(1 - x * x) + 0.5 * math.pi * eps * (1 - x * x)) / (math.pi * (1 - eps / 3))


def _quad_variance(vsini, eps):
    return vsini**2 * quad(lambda x: x * x * _zeta(x, eps), -1, 1, epsabs=1e-14, epsrel=1e-13)[0]


def _taps(w, dv):
    n = (w.numel() - 1) // 2
    return torch.arange(-n, n + 1, dtype=F64) * dv


def _moments(depth, v):
    """Zeroth moment and variance of a (non-negative) line depth profile on velocities v."""
    m0 = depth.sum()
    mu = (v * depth).sum() / m0
    return m0, ((v - mu) ** 2 * depth).sum() / m0


# ---------------------------------------------------------------------------------- grid
def test_log_lambda_grid_has_constant_velocity_step_and_covers_range():
    lam = log_lambda_grid(8000.0, 8100.0, dv=0.5)
    assert lam.dtype == F64
    assert float(lam[0]) == 8000.0
    assert float(lam[-1]) >= 8100.0 > float(lam[-2])
    step = C * torch.diff(torch.log(lam))
    assert torch.allclose(step, torch.full_like(step, 0.5), rtol=1e-9, atol=0)
    lam32 = log_lambda_grid(8000.0, 8100.0, dv=0.5, dtype=torch.float32)
    assert lam32.dtype == torch.float32 and lam32.shape == lam.shape


@pytest.mark.parametrize("args", [(8100.0, 8000.0, 0.5), (0.0, 10.0, 0.5), (-1.0, 10.0, 0.5),
                                  (8000.0, 8100.0, 0.0), (8000.0, 8100.0, -0.5), (8000.0, math.inf, 0.5)])
def test_log_lambda_grid_rejects_bad_input(args):
    with pytest.raises(ValueError):
        log_lambda_grid(*args)


# ---------------------------------------------------------------------------------- rotation kernel
@pytest.mark.parametrize("eps", [0.0, 0.3, 0.6, 1.0])
def test_rotational_variance_formula_matches_numerical_integration(eps):
    assert float(rotational_kernel_variance(7.0, eps)) == pytest.approx(_quad_variance(7.0, eps), rel=1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("vsini", [0.05, 0.3, 0.8, 3.0, 10.0, 47.3])
def test_rotational_kernel_unit_sum_symmetric_exact_second_moment(vsini, eps):
    dv = 0.5
    w = rotational_kernel(vsini, dv, eps)
    assert w.ndim == 1 and w.numel() % 2 == 1 and w.dtype == F64
    assert abs(float(w.sum()) - 1.0) < 1e-13
    assert torch.equal(w, w.flip(0))
    v = _taps(w, dv)
    var = float((v * v * w).sum())
    assert var == pytest.approx(_quad_variance(vsini, eps), rel=1e-9)
    # the plain bin integrals: non-negative, variance too large by about Sheppard's dv^2/12
    wb = rotational_kernel(vsini, dv, eps, exact_variance=False)
    assert wb.shape == w.shape and float(wb.min()) >= 0.0 and abs(float(wb.sum()) - 1.0) < 1e-13
    excess = float((v * v * wb).sum()) - _quad_variance(vsini, eps)
    if vsini >= 3.0:
        assert excess == pytest.approx(dv * dv / 12, rel=0.25)


def test_rotational_kernel_taps_are_bin_integrals_of_the_continuous_kernel():
    vsini, dv, eps = 10.0, 0.5, 0.6
    wb = rotational_kernel(vsini, dv, eps, exact_variance=False)
    v = _taps(wb, dv).numpy()
    for k in range(wb.numel()):
        lo, hi = (v[k] - dv / 2) / vsini, (v[k] + dv / 2) / vsini
        ref = quad(lambda x: _zeta(x, eps), max(lo, -1), min(hi, 1), epsabs=1e-15)[0] if lo < 1 and hi > -1 else 0.0
        assert abs(float(wb[k]) - ref) < 1e-12
    # the variance correction changes the interior taps by well under a percent
    w = rotational_kernel(vsini, dv, eps)
    core = np.abs(v) < vsini - 2 * dv
    assert np.max(np.abs(w.numpy()[core] / wb.numpy()[core] - 1)) < 0.01
    assert float(w.min()) > -1e-4


def test_rotational_kernel_fixed_length_and_support():
    dv = 0.5
    lengths = {rotational_kernel(vs, dv, half_width=20.0).numel() for vs in (0.0, 0.1, 1.0, 19.9, 20.0)}
    assert lengths == {2 * (40 + 1) + 1}
    w = rotational_kernel(5.0, dv, half_width=20.0)
    v = _taps(w, dv)
    assert float(w[v.abs() > 5.0 + 1.5 * dv].abs().max()) == 0.0


def test_rotational_kernel_tends_to_delta_smoothly():
    dv = 0.5
    w0 = rotational_kernel(0.0, dv, half_width=3.0)
    assert float(w0[w0.numel() // 2]) == 1.0 and float(w0.abs().sum()) == 1.0
    for vs in (0.01, 0.1, 0.2):  # below dv/2: the 3-tap kernel [s2/2dv^2, 1 - s2/dv^2, s2/2dv^2]
        w = rotational_kernel(vs, dv, half_width=3.0)
        s2 = float(rotational_kernel_variance(vs))
        mid = w.numel() // 2
        assert float(w[mid + 1]) == pytest.approx(s2 / (2 * dv * dv), rel=1e-12)
        assert float(w[mid]) == pytest.approx(1 - s2 / (dv * dv), rel=1e-12)
        assert float(w.abs().sum() - w[mid - 1 : mid + 2].sum()) < 1e-15
    # the taps are continuous in vsini across the shape floor (dv/4) and dv/2
    for edge in (0.25 * dv, 0.5 * dv, 1.5 * dv):
        a = rotational_kernel(edge * (1 - 1e-9), dv, half_width=3.0)
        b = rotational_kernel(edge * (1 + 1e-9), dv, half_width=3.0)
        assert float((a - b).abs().max()) < 1e-8


# ---------------------------------------------------------------------------------- broadening
def test_rotational_broadening_accuracy_against_continuous_convolution():
    dv, vsini, eps, s0 = 0.5, 3.0, 0.6, 1.0
    v = torch.arange(-20.0, 20.0 + dv / 2, dv, dtype=F64)
    line = lambda u: 1.0 - 0.5 * math.exp(-0.5 * (u / s0) ** 2)  # noqa: E731
    flux = 1.0 - 0.5 * torch.exp(-0.5 * (v / s0) ** 2)
    idx = range(10, v.numel() - 10, 2)
    ref = np.array([quad(lambda x: line(float(v[i]) - vsini * x) * _zeta(x, eps), -1, 1,
                         epsabs=1e-13, limit=200)[0] for i in idx])
    errs = {}
    for exact in (True, False):
        out = rotationally_broaden(flux, vsini, dv, eps, exact_variance=exact).numpy()[list(idx)]
        errs[exact] = np.max(np.abs(out - ref))
    assert errs[True] < 1.5e-4
    assert errs[True] < errs[False] / 5


def test_broadening_conserves_equivalent_width_and_adds_variances():
    dv, vsini, eps, R, s0 = 0.5, 12.0, 0.6, 45000.0, 1.2
    lam = log_lambda_grid(10000.0, 10012.0, dv)
    lam_c = float(lam[lam.numel() // 2])
    v = C * torch.log(lam / lam_c)
    flux = 1.0 - 0.6 * torch.exp(-0.5 * (v / s0) ** 2)
    m0, var0 = _moments(1 - flux, v)
    ew_lam0 = torch.trapezoid(1 - flux, lam)

    rot = rotationally_broaden(flux, vsini, dv, eps, max_vsini=20.0)
    m1, var1 = _moments(1 - rot, v)
    inst = instrumental_broaden(rot, R, dv)
    m2, var2 = _moments(1 - inst, v)
    sig_inst = C / (R * FWHM_PER_SIGMA)

    assert abs(float(m1 / m0) - 1) < 1e-12 and abs(float(m2 / m0) - 1) < 1e-12
    assert abs(float(torch.trapezoid(1 - inst, lam) / ew_lam0) - 1) < 1e-6
    assert float(var0) == pytest.approx(s0**2, rel=1e-12)
    assert float(var1) == pytest.approx(s0**2 + float(rotational_kernel_variance(vsini, eps)), rel=1e-9)
    assert float(var2) == pytest.approx(float(var1) + sig_inst**2, rel=1e-9)


def test_vsini_zero_or_tiny_returns_input_with_finite_gradients():
    gen = torch.Generator().manual_seed(0)
    flux = (1 + 0.1 * torch.randn(200, generator=gen, dtype=F64)).requires_grad_(True)
    weights = torch.randn(200, generator=gen, dtype=F64)
    for vs0 in (0.0, 1e-8, 1e-3):
        vs = torch.tensor(vs0, dtype=F64, requires_grad=True)
        out = rotationally_broaden(flux, vs, 0.5, max_vsini=10.0)
        assert float((out - flux).detach().abs().max()) < (1e-12 if vs0 <= 1e-8 else 1e-6)
        (out * weights).sum().backward()
        assert torch.isfinite(vs.grad) and torch.isfinite(flux.grad).all()
        if vs0 == 0.0:
            assert float(vs.grad) == 0.0 and torch.allclose(flux.grad, weights, rtol=0, atol=1e-15)
        flux.grad = None


def _gradcheck(fn, inputs, fast_mode=False):
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast_mode)


def test_gradcheck_rotational_broadening():
    gen = torch.Generator().manual_seed(1)
    fn = lambda f, s, e: rotationally_broaden(f, s, 0.5, e, max_vsini=5.0)  # noqa: E731
    eps = torch.tensor(0.6, dtype=F64, requires_grad=True)
    small = (1 - 0.5 * torch.rand(16, generator=gen, dtype=F64)).requires_grad_(True)
    assert _gradcheck(fn, (small, torch.tensor(2.3, dtype=F64, requires_grad=True), eps))  # full Jacobian
    flux = (1 - 0.5 * torch.rand(40, generator=gen, dtype=F64)).requires_grad_(True)
    for vsini in (0.0, 0.1, 0.3, 0.9, 2.3, 4.1):  # below the shape floor, below dv/2, resolved
        vs = torch.tensor(vsini, dtype=F64, requires_grad=True)
        if vsini == 0.0:  # at exactly 0 only the one-sided derivative exists: check the flux
            assert _gradcheck(lambda f: fn(f, vs, eps), (flux,), fast_mode=True)
        else:
            assert _gradcheck(fn, (flux, vs, eps), fast_mode=True)


def test_rotational_kernel_gradient_matches_finite_differences():
    """The taps are C1 in vsini (C-infinity away from vsini = (k + 1/2) dv, where the bin mass
    grows like (vsini - edge)^1.5); test away from those points."""
    dv = 0.5
    for vs0 in np.linspace(0.05, 2.0, 40) + 0.0123:
        vs = torch.tensor(vs0, dtype=F64, requires_grad=True)
        w = rotational_kernel(vs, dv, half_width=3.0)
        jac = torch.stack([torch.autograd.grad(w[k], vs, retain_graph=True)[0] for k in range(w.numel())])
        h = 1e-6
        fd = (rotational_kernel(vs0 + h, dv, half_width=3.0) - rotational_kernel(vs0 - h, dv, half_width=3.0)) / (2 * h)
        assert torch.allclose(jac, fd, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- instrument
@pytest.mark.parametrize("R", [2.0e4, 5.5e4, 1.0e5, 3.0e5, 1.0e6])
def test_gaussian_lsf_unit_sum_symmetric_exact_variance(R):
    dv = 0.5
    w = gaussian_lsf_kernel(R, dv)
    sigma = C / (R * 2 * math.sqrt(2 * math.log(2)))
    assert float(resolving_power_to_sigma(R)) == pytest.approx(sigma, rel=1e-15)
    assert abs(float(w.sum()) - 1) < 1e-13 and torch.equal(w, w.flip(0))
    v = _taps(w, dv)
    assert float((v * v * w).sum()) == pytest.approx(sigma**2, rel=1e-10)
    assert float(v.max()) >= 5 * sigma
    if sigma > 2 * dv:  # resolved: the taps are the sampled Gaussian (FWHM = c / R) truncated at 5 sigma
        inner = v.abs() <= 5 * sigma
        g = torch.exp(-0.5 * (v / sigma) ** 2)
        g = g / g[inner].sum()
        assert float((w - g)[inner].abs().max()) < 1e-5 * float(w.max())
        assert float(w[~inner].abs().max()) < 1e-6


def test_gradcheck_instrumental_broadening():
    gen = torch.Generator().manual_seed(2)
    fn = lambda f, r: instrumental_broaden(f, r, 0.5, half_width=15.0)  # noqa: E731
    small = (1 - 0.5 * torch.rand(16, generator=gen, dtype=F64)).requires_grad_(True)
    assert _gradcheck(fn, (small, torch.tensor(4.5e4, dtype=F64, requires_grad=True)))  # full Jacobian
    flux = (1 - 0.5 * torch.rand(50, generator=gen, dtype=F64)).requires_grad_(True)
    for R0 in (4.5e4, 4.0e5, 3.0e6):  # resolved, sigma_v < dv/2, below the shape floor
        R = torch.tensor(R0, dtype=F64, requires_grad=True)
        assert _gradcheck(fn, (flux, R), fast_mode=True)


def test_fft_and_direct_convolution_agree_on_batches():
    gen = torch.Generator().manual_seed(3)
    flux = 1 + 0.1 * torch.randn(2, 3, 700, generator=gen, dtype=F64)
    for fn, kw in ((rotationally_broaden, dict(vsini=60.0, dv=0.5)), (instrumental_broaden, dict(resolving_power=8000.0, dv=0.5))):
        d = fn(flux, method="direct", **kw)
        f = fn(flux, method="fft", **kw)
        a = fn(flux, **kw)
        assert d.shape == flux.shape
        assert float((d - f).abs().max()) < 1e-12 and float((a - f).abs().max()) < 1e-12
        single = fn(flux[1, 2], method="direct", **kw)
        assert torch.allclose(single, d[1, 2], rtol=0, atol=1e-14)


def test_compiled_direct_convolution_matches_conv1d():
    """On CPUs the direct convolution runs in compiled loops (float64 conv1d has no fast path there):
    the same values and gradients, flux and kernel, as torch's conv1d."""
    from blase_specutils.core.cpu_kernel import correlate_cpu
    from blase_specutils.core.options import EngineOptions

    gen = torch.Generator().manual_seed(7)
    flux = 1 + 0.1 * torch.randn(2, 400, generator=gen, dtype=F64)
    weights = torch.randn(2, 400, generator=gen, dtype=F64)
    res = []
    for compiled in (True, False):
        f = flux.clone().requires_grad_(True)
        vs = torch.tensor(7.3, dtype=F64, requires_grad=True)
        out = rotationally_broaden(f, vs, 0.5, method="direct", engine=EngineOptions(compiled_cpu=compiled))
        res.append((out.detach(), torch.autograd.grad((out * weights).sum(), (f, vs))))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=1e-14)
    for g_compiled, g_torch in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(g_compiled, g_torch, rtol=1e-12, atol=1e-13)
    x = torch.randn(3, 30, generator=gen, dtype=F64, requires_grad=True)
    k = torch.randn(7, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(correlate_cpu, (x, k))
    with pytest.raises(ValueError, match="m <= n"):
        correlate_cpu(x[:, :5], k)


def test_edges_are_padded_with_edge_values():
    flux = torch.linspace(0.5, 1.0, 30, dtype=F64)
    out = rotationally_broaden(flux, 40.0, 0.5)  # kernel much longer than the spectrum
    assert torch.isfinite(out).all() and float(out.min()) >= 0.5 - 1e-3 and float(out.max()) <= 1.0 + 1e-3
    const = torch.full((30,), 0.7, dtype=F64)
    assert torch.allclose(instrumental_broaden(const, 3000.0, 0.5), const, rtol=0, atol=1e-14)


def test_float32_flux_stays_float32_and_accurate():
    gen = torch.Generator().manual_seed(4)
    f64 = 1 - 0.3 * torch.rand(500, generator=gen, dtype=F64)
    f32 = f64.float()
    for fn, arg in ((rotationally_broaden, 8.0), (instrumental_broaden, 30000.0)):
        out32 = fn(f32, arg, 0.5)
        assert out32.dtype == torch.float32
        assert float((out32.double() - fn(f64, arg, 0.5)).abs().max()) < 1e-6
    assert rotational_kernel(torch.tensor(3.0), 0.5).dtype == torch.float32
    assert gaussian_lsf_kernel(torch.tensor(3e4), 0.5).dtype == torch.float32


def test_broadening_rejects_bad_input():
    flux = torch.ones(20, dtype=F64)
    with pytest.raises(ValueError, match="vsini must be >= 0"):
        rotationally_broaden(flux, -1.0, 0.5)
    with pytest.raises(ValueError, match="exceeds the kernel half width"):
        rotationally_broaden(flux, 12.0, 0.5, max_vsini=10.0)
    with pytest.raises(ValueError, match="limb_darkening"):
        rotational_kernel(3.0, 0.5, limb_darkening=1.5)
    with pytest.raises(ValueError, match="finite"):
        rotational_kernel(math.nan, 0.5)
    with pytest.raises(ValueError, match="dv"):
        rotational_kernel(3.0, 0.0)
    for R in (0.0, -5.0):
        with pytest.raises(ValueError, match="resolving_power must be > 0"):
            instrumental_broaden(flux, R, 0.5)
    with pytest.raises(ValueError, match="3 sigma"):
        gaussian_lsf_kernel(3e4, 0.5, half_width=5.0)
    with pytest.raises(ValueError, match="method"):
        rotationally_broaden(flux, 3.0, 0.5, method="spline")
    with pytest.raises(ValueError, match="floating-point"):
        rotationally_broaden(torch.ones(20, dtype=torch.long), 3.0, 0.5)


def test_broadening_modules():
    gen = torch.Generator().manual_seed(5)
    flux = 1 - 0.3 * torch.rand(300, generator=gen, dtype=F64)
    rot = RotationalBroadening(7.0, 0.5, max_vsini=25.0)
    ins = InstrumentalBroadening(55000.0, 0.5, tune=True)
    assert rot.log_vsini.requires_grad and ins.log_resolving_power.requires_grad
    out = ins(rot(flux))
    ref = instrumental_broaden(rotationally_broaden(flux, 7.0, 0.5, max_vsini=25.0), 55000.0, 0.5,
                               half_width=ins.half_width)
    assert float((out - ref).detach().abs().max()) < 1e-12
    out.square().sum().backward()
    assert float(rot.log_vsini.grad) != 0.0 and float(ins.log_resolving_power.grad) != 0.0
    n = rot.kernel().numel()
    with torch.no_grad():
        rot.log_vsini.fill_(math.log(20.0))
    assert rot.kernel().numel() == n  # fixed shape while vsini is tuned
    with pytest.raises(ValueError):
        RotationalBroadening(0.0)
    with pytest.raises(ValueError):
        InstrumentalBroadening(-1.0)


def test_tuned_resolving_power_is_held_at_the_kernel_limit():
    """An optimiser pushing R below what the fixed kernel spans gets R_min, not an exception."""
    flux = 1 - 0.3 * torch.rand(300, generator=torch.Generator().manual_seed(5), dtype=F64)
    ins = InstrumentalBroadening(45000.0, 0.5, tune=True)
    assert ins.min_resolving_power == pytest.approx(0.375 * 45000.0, rel=1e-8)
    assert float(ins.resolving_power) == pytest.approx(45000.0, rel=1e-15)
    with torch.no_grad():
        ins.log_resolving_power.fill_(math.log(5000.0))
    assert float(ins.resolving_power) == pytest.approx(ins.min_resolving_power, rel=1e-12)
    out = ins(flux)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert float(ins.log_resolving_power.grad) == 0.0


# ---------------------------------------------------------------------------------- resampling
def test_pixel_edges_contiguous_and_with_gaps():
    lo, hi = pixel_edges(torch.tensor([10.0, 11.0, 12.0, 13.0]))
    assert lo.tolist() == [9.5, 10.5, 11.5, 12.5] and hi.tolist() == [10.5, 11.5, 12.5, 13.5]
    c = np.array([1.0, 1.1, 1.2, 1.3, 5.0, 5.2, 5.4, 9.0])  # two gaps; a single-pixel piece at the end
    lo, hi = pixel_edges(c)
    assert np.allclose(lo.numpy(), [0.95, 1.05, 1.15, 1.25, 4.9, 5.1, 5.3, 9.0 - 0.1], atol=1e-12)
    assert np.allclose(hi.numpy(), [1.05, 1.15, 1.25, 1.35, 5.1, 5.3, 5.5, 9.0 + 0.1], atol=1e-12)
    with pytest.raises(ValueError, match="strictly increasing"):
        pixel_edges([3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        pixel_edges([1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="at least two"):
        pixel_edges([1.0])


def _piecewise_linear_mean(x, f, lo, hi):
    """Exact reference: trapezoid over the model nodes inside [lo, hi] plus the two edges."""
    nodes = np.concatenate([[lo], x[(x > lo) & (x < hi)], [hi]])
    return np.trapezoid(np.interp(nodes, x, f), nodes) / (hi - lo)


def _model_and_pixels(seed=6):
    rng = np.random.default_rng(seed)
    lam = log_lambda_grid(10000.0, 10010.0, 0.5)
    x = lam.numpy()
    centres = np.concatenate([np.linspace(10000.3, 10004.0, 40), np.linspace(10005.0, 10009.5, 30)])
    centres += rng.uniform(-0.01, 0.01, centres.size)
    lo, hi = pixel_edges(centres)
    return lam, x, lo, hi, rng


def test_resample_exact_for_constant_and_linear_and_matches_reference():
    lam, x, lo, hi, rng = _model_and_pixels()
    const = resample_to_pixels(lam, torch.full_like(lam, 0.83), lo, hi)
    assert float((const - 0.83).abs().max()) < 1e-13
    lin = resample_to_pixels(lam, 2.0 + 0.3 * (lam - 10000.0), lo, hi)
    assert float((lin - (2.0 + 0.3 * (0.5 * (lo + hi) - 10000.0))).abs().max()) < 1e-11
    f = rng.uniform(0.2, 1.0, x.size)
    out = resample_to_pixels(lam, torch.from_numpy(f), lo, hi).numpy()
    ref = np.array([_piecewise_linear_mean(x, f, a, b) for a, b in zip(lo.numpy(), hi.numpy())])
    assert np.max(np.abs(out - ref)) < 1e-12
    # contiguous pixels conserve the integral (first order: pixels 0..39)
    total = float((torch.from_numpy(out[:40]) * (hi[:40] - lo[:40])).sum())
    assert total == pytest.approx(_piecewise_linear_mean(x, f, float(lo[0]), float(hi[39])) * float(hi[39] - lo[0]), rel=1e-13)


def test_resample_gradients_and_module_and_batches():
    lam = log_lambda_grid(5000.0, 5000.5, 0.5)  # 31 points
    lo, hi = pixel_edges(torch.linspace(5000.05, 5000.44, 6, dtype=F64))
    flux = torch.rand(lam.numel(), dtype=F64, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: resample_to_pixels(lam, f, lo, hi), (flux,))
    jac = torch.autograd.functional.jacobian(lambda f: resample_to_pixels(lam, f, lo, hi), flux)
    assert torch.allclose(jac.sum(1), torch.ones(6, dtype=F64), atol=1e-14) and float(jac.min()) >= 0
    res = PixelResampler(lam, torch.linspace(5000.05, 5000.44, 6, dtype=F64))
    assert res.n_pixels == 6
    batch = torch.stack([flux.detach(), 2 * flux.detach()])
    out = res(batch)
    assert out.shape == (2, 6)
    assert torch.allclose(out[0], resample_to_pixels(lam, flux.detach(), lo, hi), rtol=0, atol=1e-15)
    assert torch.allclose(out[1], 2 * out[0], rtol=0, atol=1e-14)


def test_resample_float32_flux_on_a_long_grid():
    lam = log_lambda_grid(8000.0, 12000.0, 0.5)  # ~1.2e5 points
    f64 = 1.0 + 0.1 * torch.sin(lam / 0.7)
    centres = torch.linspace(8001.0, 11999.0, 3000, dtype=F64)
    lo, hi = pixel_edges(centres)
    ref = resample_to_pixels(lam, f64, lo, hi)
    out = resample_to_pixels(lam, f64.float(), lo, hi)
    assert out.dtype == torch.float32
    assert float((out.double() - ref).abs().max()) < 2e-7


def test_resample_rejects_bad_input():
    lam = log_lambda_grid(5000.0, 5001.0, 0.5)
    flux = torch.ones_like(lam)
    with pytest.raises(ValueError, match="outside the model grid"):
        resample_to_pixels(lam, flux, torch.tensor([4999.9, 5000.5]), torch.tensor([5000.1, 5000.6]))
    with pytest.raises(ValueError, match="outside the model grid"):
        resample_to_pixels(lam, flux, torch.tensor([5000.5]), torch.tensor([5001.5]))
    with pytest.raises(ValueError, match="positive width"):
        resample_to_pixels(lam, flux, torch.tensor([5000.5]), torch.tensor([5000.5]))
    with pytest.raises(ValueError, match="strictly increasing"):
        resample_to_pixels(lam.flip(0), flux, torch.tensor([5000.2]), torch.tensor([5000.5]))
    with pytest.raises(ValueError, match="must match lam_model"):
        resample_to_pixels(lam, flux[:-1], torch.tensor([5000.2]), torch.tensor([5000.5]))
    with pytest.raises(ValueError, match="one shape"):
        resample_to_pixels(lam, flux, torch.tensor([5000.2, 5000.3]), torch.tensor([5000.5]))


# ---------------------------------------------------------------------------------- the chain
def test_forward_model_chain_is_differentiable_end_to_end():
    """Eqs. 7-10 on a small problem: rotate, multiply by a telluric, convolve, resample."""
    dv = 0.5
    lam = log_lambda_grid(10000.0, 10003.0, dv)  # ~180 points
    v = C * torch.log(lam / 10001.5)
    star = (1 - 0.5 * torch.exp(-0.5 * (v / 1.5) ** 2)).requires_grad_(True)
    tell = 1 - 0.3 * torch.exp(-0.5 * ((v - 20.0) / 1.0) ** 2)
    lo, hi = pixel_edges(torch.linspace(10000.6, 10002.4, 12, dtype=F64))

    def model(s, vsini, R):
        s_ext = rotationally_broaden(s, vsini, dv, max_vsini=10.0)
        return resample_to_pixels(lam, instrumental_broaden(s_ext * tell, R, dv, half_width=20.0), lo, hi)

    vs = torch.tensor(4.0, dtype=F64, requires_grad=True)
    R = torch.tensor(3.0e4, dtype=F64, requires_grad=True)
    assert _gradcheck(lambda s, r: model(star.detach(), s, r), (vs, R))  # full Jacobian in vsini and R
    assert _gradcheck(model, (star, vs, R), fast_mode=True)
