import math

import pytest
import torch

from blase_specutils.core.clone import SPEED_OF_LIGHT_KMS, LineCloneModel
from blase_specutils.core.engine import dense_log_flux, window_half_widths, windowed_log_flux
from blase_specutils.core.options import EngineOptions
from blase_specutils.core.profiles import pseudo_voigt, voigt

F64 = torch.float64


def _lines(n=60, seed=3, lo=5000.0, hi=5050.0):
    gen = torch.Generator().manual_seed(seed)
    c = lo + 2 + (hi - lo - 4) * torch.rand(n, generator=gen, dtype=F64)
    a = 10 ** (-3 + 1.5 * torch.rand(n, generator=gen, dtype=F64))
    s = 0.02 + 0.05 * torch.rand(n, generator=gen, dtype=F64)
    g = 0.01 + 0.05 * torch.rand(n, generator=gen, dtype=F64)
    return c, a, s, g


GRID = torch.arange(5000.0, 5050.0, 0.01, dtype=F64)


#: The compiled kernel with the torch path's padded windows, so that both sum the same pairs and can
#: be compared to rounding (by default each line takes its own, shorter window).
PADDED = EngineOptions(pad_windows=True)


@pytest.mark.parametrize("mode", ["linear", "log"])
@pytest.mark.parametrize("profile", [pseudo_voigt, voigt])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_windowed_converges_to_dense(mode, profile, sign):
    c, a, s, g = _lines()
    dense = dense_log_flux(GRID, c, a, s, g, profile=profile, mode=mode, sign=sign)
    errs = []
    for tol in (1e-5, 1e-7, 1e-9):
        win = windowed_log_flux(GRID, c, a, s, g, profile=profile, mode=mode, sign=sign, tolerance=tol)
        errs.append(float((win.exp() - dense.exp()).abs().max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 2e-7


def test_full_windows_equal_dense_to_rounding():
    c, a, s, g = _lines()
    hw = torch.full_like(c, 1e4)  # every window covers the grid
    win = windowed_log_flux(GRID, c, a, s, g, profile=pseudo_voigt, half_widths=hw)
    dense = dense_log_flux(GRID, c, a, s, g, profile=pseudo_voigt)
    assert torch.allclose(win, dense, atol=1e-13, rtol=0)


def test_window_half_width_meets_tolerance():
    c, a, s, g = _lines()
    tol = 1e-6
    hw = window_half_widths(a, s, g, tol)
    edge = pseudo_voigt(hw, s, g) * a
    assert torch.all(edge <= tol * 1.0001)


@pytest.mark.parametrize("mode", ["linear", "log"])
def test_fused_path_matches_autograd_values_and_gradients(mode):
    c, a, s, g = _lines()
    params = [t.clone().requires_grad_(True) for t in (c, a, s, g)]
    target = torch.linspace(0.9, 1.0, GRID.numel(), dtype=F64)
    results = []
    for fused in (False, True):
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        f = windowed_log_flux(GRID, *ps, profile=pseudo_voigt, mode=mode, tolerance=1e-6, fused=fused,
                              engine=PADDED).exp()
        loss = ((f - target) ** 2).sum()
        grads = torch.autograd.grad(loss, ps)
        results.append((f.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-14, rtol=0)
    for g0, g1 in zip(results[0][1], results[1][1]):
        assert torch.allclose(g0, g1, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("mode", ["linear", "log"])
@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck_every_parameter_and_rv(mode, fused):
    grid = torch.arange(5000.0, 5003.0, 0.02, dtype=F64)
    c = torch.tensor([5000.8, 5001.5, 5002.1], dtype=F64, requires_grad=True)
    la = torch.log(torch.tensor([0.01, 0.03, 0.02], dtype=F64)).requires_grad_(True)
    ls = torch.log(torch.tensor([0.03, 0.05, 0.04], dtype=F64)).requires_grad_(True)
    lg = torch.log(torch.tensor([0.02, 0.04, 0.03], dtype=F64)).requires_grad_(True)
    rv = torch.tensor(12.0, dtype=F64, requires_grad=True)
    hw = torch.full((3,), 10.0, dtype=F64)  # fixed windows: gradcheck needs a fixed pixel set

    def f(c, la, ls, lg, rv):
        cc = c * (1 + rv / SPEED_OF_LIGHT_KMS)
        return windowed_log_flux(grid, cc, la.exp(), ls.exp(), lg.exp(), profile=pseudo_voigt, mode=mode,
                                 half_widths=hw, fused=fused)

    assert torch.autograd.gradcheck(f, (c, la, ls, lg, rv))


def test_windows_follow_radial_velocity_shift():
    """A ±500 km/s shift evaluates as accurately as no shift: windows move with the lines."""
    c, a, s, g = _lines(lo=5010.0, hi=5040.0)
    model = LineCloneModel(c, a.log(), s.log(), g.log(), wing_tolerance=1e-7)
    errs = {}
    with torch.no_grad():
        lam_min = float(GRID[torch.argmin(model(GRID))])
    for rv in (-500.0, 0.0, 500.0):
        with torch.no_grad():
            win = model(GRID, rv)
            dense = model(GRID, rv, dense=True)
        errs[rv] = float((win - dense).abs().max())
        # the lines really moved: the flux minimum moved by the Doppler shift (8.4 Å at 500 km/s)
        shifted = lam_min * (1 + rv / SPEED_OF_LIGHT_KMS)
        assert abs(float(GRID[torch.argmin(win)]) - shifted) < 0.1
    assert errs[500.0] < 2 * errs[0.0] + 1e-9
    assert errs[-500.0] < 2 * errs[0.0] + 1e-9
    assert max(errs.values()) < 1e-5


def test_lines_off_the_grid_contribute_nothing_and_do_not_crash():
    c = torch.tensor([4000.0, 5025.0, 6000.0], dtype=F64)
    a = torch.tensor([0.1, 0.01, 0.1], dtype=F64)
    s = torch.tensor([0.05, 0.05, 0.05], dtype=F64)
    g = torch.tensor([0.001, 0.001, 0.001], dtype=F64)
    win = windowed_log_flux(GRID, c, a, s, g, profile=pseudo_voigt)
    dense = dense_log_flux(GRID, c[1:2], a[1:2], s[1:2], g[1:2], profile=pseudo_voigt)
    assert torch.allclose(win, dense, atol=1e-6)


# ----------------------------------------------------------------------------- far field
from blase_specutils.core.farfield import FarFieldSettings, far_field  # noqa: E402


def _strong_lines():
    c, a, s, g = _lines(n=80, seed=7)
    a = a.clone()
    a[::10] *= 30.0  # some strong lines with long Lorentzian wings
    g = g.clone()
    g[5] = 0.8  # and one much broader than the far-field kernel
    return c, a, s, g


@pytest.mark.parametrize("mode", ["linear", "log"])
@pytest.mark.parametrize("profile", [pseudo_voigt, voigt])
def test_far_field_split_matches_dense(mode, profile):
    c, a, s, g = _strong_lines()
    ff = FarFieldSettings.for_grid(GRID)
    dense = dense_log_flux(GRID, c, a, s, g, profile=profile, mode=mode).exp()
    split = windowed_log_flux(GRID, c, a, s, g, profile=profile, mode=mode, tolerance=1e-8, far_field=ff).exp()
    assert float((split - dense).abs().max()) < 2e-7
    # at a working tolerance the split is far more exact than truncated windows
    split = windowed_log_flux(GRID, c, a, s, g, profile=profile, mode=mode, tolerance=1e-6, far_field=ff).exp()
    plain = windowed_log_flux(GRID, c, a, s, g, profile=profile, mode=mode, tolerance=1e-6).exp()
    assert float((split - dense).abs().max()) < float((plain - dense).abs().max()) / 5


def test_far_field_alone_is_the_sum_of_kernels():
    gen = torch.Generator().manual_seed(0)
    c = 5005 + 40 * torch.rand(30, generator=gen, dtype=F64)
    kc = torch.rand(30, generator=gen, dtype=F64) * 1e-3
    ke = torch.rand(30, generator=gen, dtype=F64) * 1e-4
    ff = FarFieldSettings.for_grid(GRID)
    d = GRID[None, :] - c[:, None]
    hb = 1.0 / (d * d + ff.b**2)
    exact = -(kc[:, None] * hb + ke[:, None] * hb * hb).sum(0)
    approx = far_field(GRID, c, kc, ke, ff)
    assert float((approx - exact).abs().max()) < 1e-6 * float(exact.abs().max())


def test_far_field_of_lines_beyond_the_grid_margin():
    """Lines hundreds of Å outside the pixels (a whole-band clone evaluated on a narrow grid) add
    their true Lorentzian tails, not a spike at the grid edge."""
    c, a, s, g = _strong_lines()
    far_c = torch.tensor([4200.0, 4990.0, 5300.0, 6500.0], dtype=F64)
    c = torch.cat([c, far_c])
    a = torch.cat([a, torch.full((4,), 3.0, dtype=F64)])
    s = torch.cat([s, torch.full((4,), 0.5, dtype=F64)])
    g = torch.cat([g, torch.full((4,), 5.0, dtype=F64)])  # broad lines: strong far wings
    ff = FarFieldSettings.for_grid(GRID)
    dense = dense_log_flux(GRID, c, a, s, g, profile=pseudo_voigt).exp()
    split = windowed_log_flux(GRID, c, a, s, g, profile=pseudo_voigt, tolerance=1e-8, far_field=ff).exp()
    assert float((split - dense).abs().max()) < 2e-7
    # the direct sum of the far lines is what the kernels give for them
    kc, ke = torch.rand(4, dtype=F64) * 1e-3, torch.rand(4, dtype=F64) * 1e-4
    d = GRID[None, :] - far_c[:, None]
    hb = 1.0 / (d * d + ff.b**2)
    exact = -(kc[:, None] * hb + ke[:, None] * hb * hb).sum(0)
    torch.testing.assert_close(far_field(GRID, far_c, kc, ke, ff), exact, rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck_with_far_field(fused):
    grid = torch.arange(5000.0, 5003.0, 0.02, dtype=F64)
    c = torch.tensor([5000.8, 5001.5, 5002.1], dtype=F64, requires_grad=True)
    la = torch.log(torch.tensor([0.01, 0.03, 0.02], dtype=F64)).requires_grad_(True)
    ls = torch.log(torch.tensor([0.03, 0.05, 0.04], dtype=F64)).requires_grad_(True)
    lg = torch.log(torch.tensor([0.02, 0.04, 0.03], dtype=F64)).requires_grad_(True)
    rv = torch.tensor(7.0, dtype=F64, requires_grad=True)
    hw = torch.full((3,), 0.6, dtype=F64)
    ff = FarFieldSettings(b=0.3, spacing=0.03)

    def f(c, la, ls, lg, rv):
        cc = c * (1 + rv / SPEED_OF_LIGHT_KMS)
        return windowed_log_flux(grid, cc, la.exp(), ls.exp(), lg.exp(), profile=pseudo_voigt,
                                 half_widths=hw, far_field=ff, fused=fused)

    assert torch.autograd.gradcheck(f, (c, la, ls, lg, rv))


def test_far_field_fused_and_plain_paths_agree():
    c, a, s, g = _strong_lines()
    ff = FarFieldSettings.for_grid(GRID)
    target = torch.linspace(0.9, 1.0, GRID.numel(), dtype=F64)
    res = []
    for fused in (True, False):
        ps = [t.clone().requires_grad_(True) for t in (c, a, s, g)]
        f = windowed_log_flux(GRID, *ps, profile=pseudo_voigt, tolerance=1e-7, far_field=ff, fused=fused,
                              engine=PADDED).exp()
        grads = torch.autograd.grad(((f - target) ** 2).sum(), ps)
        res.append((f.detach(), grads))
    assert torch.allclose(res[0][0], res[1][0], atol=1e-13, rtol=0)
    for g0, g1 in zip(res[0][1], res[1][1]):
        assert torch.allclose(g0, g1, rtol=1e-8, atol=1e-11)


def test_far_field_settings_validation():
    with pytest.raises(ValueError):
        FarFieldSettings(b=0.0, spacing=0.1)
    with pytest.raises(ValueError):
        FarFieldSettings(b=1.0, spacing=0.1, order=5)


def test_float32_model_keeps_float64_centres_and_is_accurate():
    c, a, s, g = _strong_lines()
    grid = GRID + 7000.0  # near 12,000 Å, where float32 spacing is 0.001 Å
    m64 = LineCloneModel(c + 7000.0, a.log(), s.log(), g.log())
    m32 = LineCloneModel(c + 7000.0, a.log(), s.log(), g.log(), dtype=torch.float32)
    assert m32.lam_centers.dtype == torch.float64 and m32.dtype == torch.float32
    with torch.no_grad():
        f64, f32 = m64(grid), m32(grid)
    assert f32.dtype == torch.float32
    assert float((f32.double() - f64).abs().max()) < 2e-5
    # gradients flow in float32 to the widths and in float64 to the centres
    m32.set_tuned(["center", "amplitude", "sigma", "gamma"])
    m32(grid).sum().backward()
    assert m32.lam_centers.grad.dtype == torch.float64 and m32.log_sigmas.grad.dtype == torch.float32


@pytest.mark.parametrize("mode", ["linear", "log"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("profile", [pseudo_voigt, voigt])
def test_numba_and_torch_kernels_agree(mode, sign, far, profile):
    """The compiled CPU kernel and the torch paths (the blocked kernel for the pseudo-Voigt, plain
    autograd for the exact Voigt) give the same sums and gradients."""
    c, a, s, g = _strong_lines() if far else _lines()
    ff = FarFieldSettings.for_grid(GRID) if far else None
    target = torch.linspace(0.9, 1.0, GRID.numel(), dtype=F64)
    res = []
    for kernel in ("numba", "torch"):
        ps = [t.clone().requires_grad_(True) for t in (c, a, s, g)]
        f = windowed_log_flux(GRID, *ps, profile=profile, mode=mode, sign=sign, tolerance=1e-7,
                              far_field=ff, kernel=kernel, engine=PADDED).exp()
        grads = torch.autograd.grad(((f - target) ** 2).sum(), ps)
        res.append((f.detach(), grads))
    # equal to rounding (emission lines in log mode reach fluxes of ~1e5)
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-13, rtol=1e-13)
    for g0, g1 in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-9, atol=1e-12)


def test_numba_kernel_splits_lines_over_threads_without_changing_results():
    c, a, s, g = _lines(n=200)
    old = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            ps = [t.clone().requires_grad_(True) for t in (c, a, s, g)]
            f = windowed_log_flux(GRID, *ps, profile=pseudo_voigt, tolerance=1e-7, kernel="numba")
            out.append((f.detach(), torch.autograd.grad(f.square().sum(), ps)))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-14, rtol=0)
    for g0, g1 in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("profile", [pseudo_voigt, voigt])
def test_gradcheck_numba_kernel_every_parameter(profile):
    grid = torch.arange(5000.0, 5003.0, 0.02, dtype=F64)
    c = torch.tensor([5000.807, 5001.513, 5002.109], dtype=F64, requires_grad=True)
    la = torch.log(torch.tensor([0.01, 0.03, 0.02], dtype=F64)).requires_grad_(True)
    ls = torch.log(torch.tensor([0.03, 0.05, 0.04], dtype=F64)).requires_grad_(True)
    lg = torch.log(torch.tensor([0.02, 0.04, 0.03], dtype=F64)).requires_grad_(True)
    ff = FarFieldSettings(b=0.3, spacing=0.03)
    # centres and window edges off the grid points; without the far field the windows cover the
    # grid (a truncated wing is a step in λc)
    for far, width in ((None, 5.0), (ff, 0.6)):
        hw = torch.full((3,), width, dtype=F64)

        def f(c, la, ls, lg):
            return windowed_log_flux(grid, c, la.exp(), ls.exp(), lg.exp(), profile=profile,
                                     half_widths=hw, far_field=far, kernel="numba")

        assert torch.autograd.gradcheck(f, (c, la, ls, lg))


def test_unknown_kernel_is_rejected():
    c, a, s, g = _lines(n=3)
    with pytest.raises(ValueError, match="kernel"):
        windowed_log_flux(GRID, c, a, s, g, profile=pseudo_voigt, kernel="cuda")


def test_compiled_interpolation_matches_gather_and_gradcheck():
    from blase_specutils.core.cpu_kernel import interpolate_cpu

    gen = torch.Generator().manual_seed(5)
    conv = torch.randn(40, dtype=F64, generator=gen, requires_grad=True)
    i0 = torch.randint(0, 34, (25,), generator=gen)
    w = torch.randn(25, 6, dtype=F64, generator=gen)
    idx = i0[:, None] + torch.arange(6)
    torch.testing.assert_close(interpolate_cpu(conv, i0, w), (conv[idx] * w).sum(1), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda c: interpolate_cpu(c, i0, w), (conv,))


def test_gather_interpolation_of_the_gpu_path_gradcheck():
    from blase_specutils.core.farfield import _GatherInterpolation

    gen = torch.Generator().manual_seed(6)
    conv = torch.randn(40, dtype=F64, generator=gen, requires_grad=True)
    idx = torch.randint(0, 34, (25,), generator=gen)[:, None] + torch.arange(6)  # overlapping stencils
    w = torch.randn(25, 6, dtype=F64, generator=gen)
    torch.testing.assert_close(_GatherInterpolation.apply(conv, idx, w), (conv[idx] * w).sum(1), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda c: _GatherInterpolation.apply(c, idx, w), (conv,))


@pytest.mark.parametrize("mode", ["linear", "log"])
def test_far_field_with_lines_much_broader_than_the_kernel(mode):
    """A line with γ ≫ b (clones fit broad continuum dips with γ of 10-3000 Å) is evaluated whole:
    split into near and far field, its e_j ≈ −c_j γ² cancelled to far below the FFT's accuracy
    (errors up to 16 in ln F for γ = 1000 Å on an HPF-order grid)."""
    c, a, s, g = _lines()
    c = torch.cat([c, torch.tensor([5020.0, 5031.0], dtype=F64)])
    a = torch.cat([a, torch.tensor([0.5, 0.002], dtype=F64)])
    s = torch.cat([s, torch.tensor([0.1, 0.05], dtype=F64)])
    g = torch.cat([g, torch.tensor([141.0, 2900.0], dtype=F64)])
    ff = FarFieldSettings.for_grid(GRID)
    dense = dense_log_flux(GRID, c, a, s, g, profile=pseudo_voigt, mode=mode)
    split = windowed_log_flux(GRID, c, a, s, g, profile=pseudo_voigt, mode=mode, tolerance=1e-8, far_field=ff)
    assert float((split - dense).abs().max()) < 2e-7


def test_far_field_levels_follow_line_widths():
    ff = FarFieldSettings(b=0.5, spacing=0.04)
    g = torch.tensor([0.1, 0.5, 0.51, 4.0, 4.1, 32.0, 40.0, 1e4], dtype=F64)
    # b r^l = 0.5, 4, 32, 256 Å; a 100 Å span allows levels up to 2 (32 Å)
    assert ff.line_levels(g, span=100.0).tolist() == [0, 0, 1, 1, 2, 2, -1, -1]
    assert ff.line_levels(g, span=100.0, cap=True).tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    lv2 = ff.at_level(2)
    assert (lv2.b, lv2.spacing, lv2.order) == pytest.approx((32.0, 2.56, ff.order))
    assert lv2.margin == pytest.approx(320.0)
    with pytest.raises(ValueError, match="level_ratio"):
        FarFieldSettings(b=0.5, spacing=0.04, level_ratio=1)


def test_multilevel_far_field_is_the_sum_of_each_levels_kernels():
    gen = torch.Generator().manual_seed(11)
    c = 4990 + 70 * torch.rand(40, generator=gen, dtype=F64)  # some beyond the pixels
    kc = torch.rand(40, generator=gen, dtype=F64) * 1e-2
    ke = torch.rand(40, generator=gen, dtype=F64) * 1e-3
    levels = torch.randint(0, 3, (40,), generator=gen)
    levels[:3] = -1  # left out
    ff = FarFieldSettings.for_grid(GRID)
    exact = torch.zeros_like(GRID)
    for lv in range(3):
        sel = levels == lv
        b = ff.at_level(lv).b
        d = GRID[None, :] - c[sel, None]
        hb = 1.0 / (d * d + b * b)
        exact -= (kc[sel, None] * hb + ke[sel, None] * hb * hb).sum(0)
    approx = far_field(GRID, c, kc, ke, ff, levels)
    assert float((approx - exact).abs().max()) < 1e-6 * float(exact.abs().max())


def test_multilevel_far_field_masks_and_gathers_agree():
    """The GPU way of taking each level's lines (zeroed coefficients of the other levels) and the
    CPU way (gathers), both through the torch spreading: same values and gradients."""
    gen = torch.Generator().manual_seed(12)
    c = 4990 + 70 * torch.rand(40, generator=gen, dtype=F64)  # some beyond the level-0 margin
    kc = torch.rand(40, generator=gen, dtype=F64) * 1e-2
    ke = torch.rand(40, generator=gen, dtype=F64) * 1e-3
    levels = torch.randint(0, 3, (40,), generator=gen)
    levels[:3] = -1
    ff = FarFieldSettings.for_grid(GRID)
    weights = torch.randn(GRID.numel(), generator=gen, dtype=F64)
    res = []
    for masks in (False, True):
        engine = EngineOptions(compiled_cpu=False, mask_levels=masks)
        ps = [t.clone().requires_grad_(True) for t in (c, kc, ke)]
        val = far_field(GRID, *ps, ff, levels, engine=engine)
        res.append((val.detach(), torch.autograd.grad((val * weights).sum(), ps)))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=0, atol=1e-14)
    for g_gather, g_mask in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(g_mask, g_gather, rtol=1e-10, atol=1e-14)
    assert float(res[0][1][0][levels < 0].abs().max()) == 0.0  # lines without a level are left out


def test_eta_autograd_function_gradcheck():
    from blase_specutils.core.fused import eta_and_derivatives
    from blase_specutils.core.profiles import pseudo_voigt_eta

    s = torch.tensor([0.02, 0.05, 0.3], dtype=F64, requires_grad=True)
    g = torch.tensor([0.001, 0.05, 2.0], dtype=F64, requires_grad=True)
    eta, deta_ds, deta_dg = eta_and_derivatives(s, g)
    torch.testing.assert_close(eta, pseudo_voigt_eta(s, g), rtol=1e-14, atol=0)
    assert not (deta_ds.requires_grad or deta_dg.requires_grad)
    assert torch.autograd.gradcheck(lambda s, g: eta_and_derivatives(s, g)[0], (s, g))


@pytest.mark.parametrize("mode", ["linear", "log"])
def test_near_field_residual_is_below_tolerance_beyond_its_window(mode):
    """The residual t + c h + e h² of a pseudo-Voigt line is exactly bounded by |c|(b²−γ²)²/d⁶
    (plus the Gaussian and, in linear mode, c²/2d⁴), so the window needs no safety floor."""
    from blase_specutils.core.farfield import residual_half_widths
    from blase_specutils.core.fused import pseudo_voigt_term
    from blase_specutils.core.profiles import pseudo_voigt_eta

    gen = torch.Generator().manual_seed(2)
    n, b, tol = 200, 0.5, 1e-7
    a = 10 ** (-4 + 4 * torch.rand(n, 1, generator=gen, dtype=F64))
    s = 0.01 + 0.2 * torch.rand(n, 1, generator=gen, dtype=F64)
    g = b * torch.rand(n, 1, generator=gen, dtype=F64) ** 2  # γ from ≪ b up to b
    eta = pseudo_voigt_eta(s, g)
    kc = a * eta * g / math.pi
    ke = kc * (b * b - g * g)
    hw = residual_half_widths(a, s, g, eta, kc, b, tol, mode)
    d = hw * torch.logspace(0, 1.5, 300, dtype=F64)[None, :]  # from the window edge outwards
    res = pseudo_voigt_term(d, torch.zeros_like(a), a, s, g, mode=mode, sign=1.0, kc=kc, ke=ke, b=b)
    # each part is below ε at the window edge: two parts in log mode, three in linear mode
    assert float((res.abs() / tol).max()) <= (3.0 if mode == "linear" else 2.0)
    # and the windows are much shorter than the old 3b floor for weak lines
    assert float(hw.min()) < b


def test_compiled_spreading_matches_torch_and_gradcheck():
    from blase_specutils.core.cpu_kernel import spread_cpu
    from blase_specutils.core.farfield import _lagrange_weights

    gen = torch.Generator().manual_seed(4)
    pos = torch.cat([3 + 30 * torch.rand(10, generator=gen, dtype=F64), torch.tensor([0.4, 38.6], dtype=F64)])
    pos.requires_grad_(True)
    c = torch.randn(12, generator=gen, dtype=F64, requires_grad=True)
    e = torch.randn(12, generator=gen, dtype=F64, requires_grad=True)
    for m in (1, 2, 3, 4):
        gc, ge = spread_cpu(pos, c, e, 40, m)
        k0 = torch.clamp(torch.floor(pos.detach()), m - 1, 40 - m - 1)
        f = torch.clamp(pos - k0, -float(m - 1), float(m))
        rc, re_ = torch.zeros(40, dtype=F64), torch.zeros(40, dtype=F64)
        for q, o in enumerate(range(-(m - 1), m + 1)):
            w = torch.ones_like(f)  # the textbook product, point by point
            for k in range(-(m - 1), m + 1):
                if k != o:
                    w = w * (f - k) / (o - k)
            torch.testing.assert_close(_lagrange_weights(f, m)[:, q], w, rtol=1e-13, atol=1e-14)
            rc = rc.index_add(0, k0.long() + o, c * w)
            re_ = re_.index_add(0, k0.long() + o, e * w)
        torch.testing.assert_close(gc, rc, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(ge, re_, rtol=1e-13, atol=1e-14)
        assert torch.autograd.gradcheck(lambda p, c, e: spread_cpu(p, c, e, 40, m), (pos, c, e))


def test_kernel_convolution_matches_direct_sum_and_gradcheck():
    from blase_specutils.core.farfield import _kernel_ffts, _KernelConvolution, _next_fast_len

    gen = torch.Generator().manual_seed(6)
    n, dx, b = 37, 0.1, 0.3
    gc = torch.randn(n, generator=gen, dtype=F64, requires_grad=True)
    ge = torch.randn(n, generator=gen, dtype=F64, requires_grad=True)
    nfft = _next_fast_len(2 * n - 1)
    hk, h2k = _kernel_ffts(n, nfft, dx, b, F64, "cpu")
    k = torch.arange(n, dtype=F64) * dx
    h = 1.0 / ((k[:, None] - k[None, :]) ** 2 + b * b)
    torch.testing.assert_close(_KernelConvolution.apply(gc, ge, hk, h2k, nfft), h @ gc + (h * h) @ ge,
                               rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: _KernelConvolution.apply(x, y, hk, h2k, nfft), (gc, ge))


def test_series_log1p_of_the_compiled_kernel():
    import numpy as np

    from blase_specutils.core.cpu_kernel import _SMALL, _log1p_small

    for t in np.linspace(-_SMALL, _SMALL, 41):
        assert abs(_log1p_small(t) - np.log1p(t)) <= 4.5e-16 * abs(np.log1p(t))  # two ulp


def test_compiled_faddeeva_matches_the_torch_expansion_and_its_derivative():
    """Weideman's expansion inside |z| = 8 and the asymptotic series outside agree with
    :func:`faddeeva` (and with w' = −2zw + 2i/√π) across the boundary and far out."""
    import numpy as np

    from blase_specutils.core.cpu_kernel import _faddeeva
    from blase_specutils.core.profiles import faddeeva

    x = np.concatenate([np.linspace(-30, 30, 241), [7.99, 8.01, -8.01, 200.0, -3000.0]])
    for y in (1e-4, 0.05, 0.7, 3.0, 7.9):
        z = x + 1j * y
        ref = faddeeva(torch.as_tensor(z)).numpy()
        got = np.array([_faddeeva(complex(v), True)[0] for v in z])
        dgot = np.array([_faddeeva(complex(v), True)[1] for v in z])
        # relative to |w| (Re w alone can be ~e^-x² of that, below any absolute accuracy)
        assert np.max(np.abs(got - ref) / np.abs(ref)) < 1e-11
        dref = -2 * z * ref + 2j / np.sqrt(np.pi)
        assert np.max(np.abs(dgot - dref) / np.abs(dgot)) < 1e-6


def test_lagrange_weights_with_gradients_match_the_prefix_products_and_gradcheck():
    """The weights as one product per point with an analytic derivative against the prefix/suffix
    products (autograd), on and between grid points."""
    from blase_specutils.core.farfield import _lagrange_weights, _lagrange_weights_scan

    gen = torch.Generator().manual_seed(5)
    for m in (1, 2, 3, 4):
        f = torch.cat([-(m - 1) + (2 * m - 1) * torch.rand(20, generator=gen, dtype=F64),
                       torch.arange(-(m - 1), m + 1, dtype=F64)])  # the stencil points themselves
        plain = _lagrange_weights_scan(f, m)
        fg = f.clone().requires_grad_(True)
        torch.testing.assert_close(_lagrange_weights(fg, m), plain, rtol=1e-14, atol=1e-15)
        g_scan = torch.autograd.grad(_lagrange_weights_scan(fg, m).pow(2).sum(), fg)[0]
        g_prod = torch.autograd.grad(_lagrange_weights(fg, m).pow(2).sum(), fg)[0]
        torch.testing.assert_close(g_prod, g_scan, rtol=1e-12, atol=1e-12)
        # the weights reproduce polynomials of degree < 2m: Σ w_j = 1 and Σ w_j o_j = f
        offsets = torch.arange(-(m - 1), m + 1, dtype=F64)
        torch.testing.assert_close(plain.sum(1), torch.ones_like(f), rtol=0, atol=1e-13)
        torch.testing.assert_close(plain @ offsets, f, rtol=0, atol=1e-12)
        assert torch.autograd.gradcheck(lambda x: _lagrange_weights(x, m), (fg,), eps=1e-6, atol=1e-8)


def _wing_model(alpha: float, **kw) -> LineCloneModel:
    """Four lines, the first with the Appendix C.4 wing correction (stretched by e^alpha)."""
    c = torch.tensor([10030.0, 10050.0, 10052.0, 10070.0], dtype=F64)
    la = torch.log(torch.tensor([0.002, 0.02, 0.01, 0.03], dtype=F64))
    ls = torch.log(torch.tensor([0.05, 0.03, 0.04, 0.05], dtype=F64))
    lg = torch.log(torch.tensor([0.02, 0.02, 0.01, 0.05], dtype=F64))
    m = LineCloneModel(c, la, ls, lg, broad_lines=[0], **{"wing_tolerance": 1e-7, **kw})
    with torch.no_grad():
        m.wing_alpha.fill_(alpha)
    return m


@pytest.mark.parametrize("kw", [dict(), dict(mode="log"), dict(far_field=False), dict(profile="voigt")])
def test_wing_corrected_lines_are_as_exact_as_the_others(kw):
    """Stretched wings (e^3 = 20× beyond λ_t) get windows wide enough for them: the windowed clone
    stays within the truncation tolerance of the dense one, as with no stretch. (Windows sized for
    the unstretched line were off by 1.7e-6 here.)"""
    grid = torch.linspace(10000.0, 10100.0, 20001, dtype=F64)
    errs = []
    for alpha in (0.0, 3.0):
        m = _wing_model(alpha, **kw)
        with torch.no_grad():
            errs.append(float((m(grid) - m(grid, dense=True)).abs().max()))
            if alpha:  # a real change of the wings, far above the tolerance
                assert float((m(grid, dense=True) - _wing_model(0.0, **kw)(grid, dense=True)).abs().max()) > 1e-4
    assert errs[1] < 3e-7 and errs[1] < 1.5 * errs[0]


def test_gradcheck_wing_correction_parameters():
    grid = torch.arange(5000.0, 5003.0, 0.02, dtype=F64)
    m = LineCloneModel(torch.tensor([5000.8, 5001.5, 5002.1], dtype=F64),
                       torch.log(torch.tensor([0.01, 0.03, 0.02], dtype=F64)),
                       torch.log(torch.tensor([0.03, 0.05, 0.04], dtype=F64)),
                       torch.log(torch.tensor([0.02, 0.04, 0.03], dtype=F64)), broad_lines=[1, 2],
                       tune=("amplitude", "sigma", "gamma", "wing"), wing_tolerance=1e-9, far_field=False)
    names = ["log_amplitudes", "log_sigmas", "log_gammas", "wing_alpha", "wing_log_lt", "wing_log_b"]
    with torch.no_grad():
        m.wing_alpha.copy_(torch.tensor([0.4, -0.3], dtype=F64))
        m.wing_log_lt.copy_(torch.log(torch.tensor([0.1, 0.15], dtype=F64)))

    def f(*values):
        return torch.func.functional_call(m, dict(zip(names, values)), (grid,))

    # windows stay fixed for these small steps (every window spans the 3 Å grid)
    assert bool((m.window_half_widths() > 3.0).all())
    start = tuple(getattr(m, n).detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, start)
