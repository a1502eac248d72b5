"""Window plans and graphed epochs: the same sums and the same training as the unplanned engine,
with no host synchronisation inside an evaluation (what a CUDA graph needs).

The plans are checked on real lines: a slice of the paper's HPF clone (blasé 0.3, PHOENIX 4700 K)
on its native PHOENIX grid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from blase_specutils.core import EngineOptions, LineCloneModel
from blase_specutils.core.cpu_kernel import HAVE_NUMBA
from blase_specutils.core.engine import window_half_widths
from blase_specutils.core.graphs import GraphedEpoch
from blase_specutils.core.plan import ClonePlan, WindowPlan
from blase_specutils.core.training import NonFiniteLossWarning, train

pytestmark = pytest.mark.skipif(not HAVE_NUMBA, reason="plans on CPUs use the compiled numba kernel")

BAND = (8600.0, 8700.0)


@pytest.fixture(scope="module")
def hpf_slice(blase03_clone_path, blase03_reference):
    """Lines of the paper's clone within 10 Å of 8600-8700 Å, and the native grid there."""
    sd = torch.load(blase03_clone_path, map_location="cpu", weights_only=True)
    wl = torch.as_tensor(blase03_reference["wavelength"])
    wl = wl[(wl > BAND[0]) & (wl < BAND[1])].clone()
    c = sd["lam_centers"]
    sel = torch.nonzero((c > BAND[0] - 10) & (c < BAND[1] + 10)).flatten()
    sel = sel[torch.argsort(c[sel])]
    return wl, [sd[k][sel].clone() for k in ("lam_centers", "amplitudes", "sigma_widths", "gamma_widths")]


def _model(hpf_slice, **kw) -> LineCloneModel:
    _, args = hpf_slice
    return LineCloneModel(*args, **{"wing_tolerance": 1e-7, **kw})


def _plain_epochs(model, wl, target, opt, epochs: int) -> list:
    """Losses of ``epochs`` plain Adam epochs (the unplanned engine) fitting ``target``."""
    losses = []
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = ((model(wl) - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_same(planned, plain) -> None:
    """Values to 1e-14 absolute, gradients to 1e-12 relative: (flux, grads) pairs."""
    (f1, g1), (f0, g0) = planned, plain
    torch.testing.assert_close(f1, f0, rtol=0, atol=1e-14)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _value_and_grads(model, wl, rv, plan=None):
    model.zero_grad()
    flux = model(wl, rv, plan=plan)
    (flux * torch.linspace(-1, 1, wl.numel(), dtype=flux.dtype)).sum().backward()
    return flux.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kw, rv", [
    (dict(), None),
    (dict(mode="log"), 120.0),
    (dict(emission=True), -80.0),
    (dict(profile="voigt"), None),
    (dict(far_field=False, wing_tolerance=1e-6), 40.0),
])
def test_planned_sums_equal_the_unplanned_engine(hpf_slice, kw, rv):
    wl, _ = hpf_slice
    model = _model(hpf_slice, **kw)
    plan = model.make_plan(wl, rv)
    _assert_same(_value_and_grads(model, wl, rv, plan), _value_and_grads(model, wl, rv))
    assert not plan.stale and plan.rebuilds == 0


def test_plan_follows_the_lines_and_rebuilds_when_they_outgrow_it(hpf_slice):
    wl, _ = hpf_slice
    model = _model(hpf_slice)
    plan = model.make_plan(wl)
    with torch.no_grad():
        model.log_gammas += 1.5  # wider lines: longer windows, some move up a far-field level
    plan.frozen = True
    plan.update()
    assert plan.stale  # outside the plan: a frozen evaluation would be wrong, and the flag says so
    plan.frozen = False
    f1, g1 = _value_and_grads(model, wl, None, plan)  # an unfrozen plan rebuilds itself
    assert plan.rebuilds == 1 and not plan.stale
    assert plan.headroom == pytest.approx(1.25 * 1.5)  # more room after a forced rebuild
    plan.rebuild()  # asked for, not forced: the headroom stays
    assert plan.headroom == pytest.approx(1.25 * 1.5)
    f0, g0 = _value_and_grads(model, wl, None)
    torch.testing.assert_close(f1, f0, rtol=0, atol=1e-14)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_plan_notices_lines_shifted_off_a_far_field_grid(hpf_slice):
    """A radial velocity tensor that the plan follows: 3000 km/s moves the reddest lines (8700-8710 Å)
    by 87 Å, beyond the far-field grid's 50 Å margin, where they must be summed directly."""
    wl, _ = hpf_slice
    model = _model(hpf_slice)
    rv = torch.tensor(0.0, dtype=torch.float64)
    plan = model.make_plan(wl, rv)
    assert all(v.numel() == 0 for v in plan.ff_plan.outside.values())
    rv.fill_(3000.0)
    plan.frozen = True
    plan.update()
    assert plan.stale
    plan.frozen = False
    f1, _ = _value_and_grads(model, wl, rv, plan)
    assert plan.rebuilds == 1 and not plan.stale
    assert sum(v.numel() for v in plan.ff_plan.outside.values()) > 0
    f0, _ = _value_and_grads(model, wl, rv)
    torch.testing.assert_close(f1, f0, rtol=0, atol=1e-14)
    # back at rest, the lines summed directly are on the grid again, where the engine spreads them
    rv.fill_(0.0)
    plan.frozen = True
    plan.update()
    assert plan.stale


def test_two_evaluations_of_one_plan_before_backward(hpf_slice):
    """An unfrozen plan evaluated at two RVs in one loss: each evaluation's backward pass keeps its
    own windows, so the gradients are the plain engine's."""
    wl, _ = hpf_slice
    model = _model(hpf_slice)
    plan = model.make_plan(wl)
    grads = []
    for p in (plan, None):
        model.zero_grad()
        loss = (model(wl, 0.0, plan=p) ** 2).sum() + (model(wl, 150.0, plan=p) * 0.5).sum()
        loss.backward()
        grads.append([q.grad.clone() for q in model.parameters() if q.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_graphed_epoch_on_a_cpu_trains_like_the_plain_loop(hpf_slice):
    wl, _ = hpf_slice
    losses = {}
    states = {}
    for how in ("plain", "epoch"):
        model = _model(hpf_slice)
        with torch.no_grad():
            target = model(wl) ** 1.1  # deeper lines than the start
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
        if how == "plain":
            out = _plain_epochs(model, wl, target, opt, 6)
        else:
            plan = model.make_plan(wl)
            epoch = GraphedEpoch(lambda: ((model(wl, plan=plan) - target) ** 2).sum(), opt, plan)
            assert not epoch.use_graph
            out = [float(epoch()) for _ in range(6)]
        losses[how] = out
        states[how] = [p.detach().clone() for p in model.parameters()]
    assert losses["epoch"][-1] < 0.5 * losses["epoch"][0]
    np.testing.assert_allclose(losses["epoch"], losses["plain"], rtol=1e-12)
    for a, b in zip(states["epoch"], states["plain"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_graphed_epoch_updates_the_plan_before_its_first_epoch(hpf_slice):
    """Parameters changed between make_plan and the first epoch: that epoch sees them."""
    wl, _ = hpf_slice
    model = _model(hpf_slice)
    with torch.no_grad():
        target = model(wl)
    plan = model.make_plan(wl)
    with torch.no_grad():
        model.log_gammas += 0.3
        model.log_amplitudes += 0.2
        expected = float(((model(wl) - target) ** 2).sum())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    epoch = GraphedEpoch(lambda: ((model(wl, plan=plan) - target) ** 2).sum(), opt, plan)
    assert float(epoch()) == pytest.approx(expected, rel=1e-12)


def test_graphed_epoch_notices_parameters_changed_between_epochs(hpf_slice):
    wl, _ = hpf_slice
    model = _model(hpf_slice)
    with torch.no_grad():
        target = model(wl)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    plan = model.make_plan(wl)
    epoch = GraphedEpoch(lambda: ((model(wl, plan=plan) - target) ** 2).sum(), opt, plan)
    epoch()
    with torch.no_grad():
        model.log_gammas += 1.5  # wider lines than the plan was made for
    ref = _model(hpf_slice)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = float(((ref(wl) - target) ** 2).sum())
    # the plan is updated (and here rebuilt) before the next epoch evaluates the changed lines
    loss = float(epoch())
    assert plan.rebuilds == 1
    assert loss == pytest.approx(expected, rel=1e-12)


def test_bad_plan_and_epoch_arguments(hpf_slice):
    wl, args = hpf_slice
    model = _model(hpf_slice)
    with pytest.raises(TypeError, match="float64"):
        model.make_plan(wl.float())
    assert isinstance(LineCloneModel(*args, broad_lines=[0]).make_plan(wl), ClonePlan)
    plan = model.make_plan(wl)
    with pytest.raises(ValueError, match="another wavelength grid"):
        model(wl.clone(), plan=plan)
    with pytest.raises(ValueError, match="another model"):
        _model(hpf_slice)(wl, plan=plan)
    with pytest.raises(ValueError, match="shape"):
        plan.log_flux(*(t[:-1] for t in args))
    with pytest.raises(ValueError, match="dense"):
        model(wl, plan=plan, dense=True)
    # an unfrozen plan follows whatever RV it is evaluated at; a frozen one only its own
    torch.testing.assert_close(model(wl, 250.0, plan=plan), model(wl, 250.0), rtol=0, atol=1e-14)
    plan.frozen = True
    with pytest.raises(ValueError, match="radial_velocity"):
        model(wl, 250.0, plan=plan)
    plan.frozen = False
    with pytest.raises(ValueError, match="headroom"):
        model.make_plan(wl, headroom=0.5)
    with pytest.raises(ValueError, match="kernel must be"):
        WindowPlan(wl, lambda: args, kernel="cuda")
    with pytest.raises(ValueError, match="profile"):
        WindowPlan(wl, lambda: args, profile="gaussian")
    with pytest.raises(ValueError, match="at least one line"):
        WindowPlan(wl, lambda: [t[:0] for t in args])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedEpoch(lambda: model(wl, plan=plan).sum(), opt, plan, graph=True)
    with pytest.raises(TypeError, match="WindowPlan"):
        GraphedEpoch(lambda: model(wl, plan=plan).sum(), opt, [object()])
    epoch = GraphedEpoch(lambda: model(wl, plan=plan), opt, plan)
    with pytest.raises(TypeError, match="scalar"):
        epoch()


def _broad_model(hpf_slice, **kw) -> LineCloneModel:
    """The slice's lines, five of them (of middling width: their windows are shorter than the grid)
    with the Appendix C.4 wing correction, stretched or shrunk."""
    _, args = hpf_slice
    hw = window_half_widths(args[1].exp(), args[2].exp(), args[3].exp(), 1e-7)
    broad = torch.argsort(hw)[5:55:10]  # windows of 7-15 Å at tolerance 1e-7, on a 100 Å grid
    model = LineCloneModel(*args, **{"wing_tolerance": 1e-7, "broad_lines": broad.tolist(),
                                     "tune": ("amplitude", "sigma", "gamma", "wing", "center"), **kw})
    with torch.no_grad():
        model.wing_alpha.copy_(torch.linspace(-0.5, 1.0, 5, dtype=model.dtype))
    return model


@pytest.mark.parametrize("kw, rv", [
    (dict(), None),
    (dict(mode="log"), 120.0),
    (dict(emission=True, profile="voigt"), -80.0),
    (dict(far_field=False, wing_tolerance=1e-6), 40.0),
])
def test_planned_sums_with_wing_corrected_lines_equal_the_unplanned_engine(hpf_slice, kw, rv):
    wl, _ = hpf_slice
    model = _broad_model(hpf_slice, **kw)
    plan = model.make_plan(wl, rv)
    assert isinstance(plan, ClonePlan) and plan.broad.width < wl.numel()
    plain = _value_and_grads(model, wl, rv)
    planned = _value_and_grads(model, wl, rv, plan)
    assert len(plain[1]) == 7  # λc, ln a, ln σ, ln γ and the three wing parameters
    _assert_same(planned, plain)
    assert not plan.stale and plan.rebuilds == 0


def test_broad_line_plan_flags_wings_that_outgrow_it_and_rebuilds(hpf_slice):
    wl, _ = hpf_slice
    model = _broad_model(hpf_slice)
    plan = model.make_plan(wl)
    with torch.no_grad():
        model.wing_alpha += 3.0  # wings 20× stronger: longer windows than the block holds
    plan.frozen = True
    plan.update()
    assert plan.broad.stale and not plan.plain.stale and plan.stale
    plan.frozen = False
    planned = _value_and_grads(model, wl, None, plan)
    assert plan.rebuilds == 1 and not plan.stale
    _assert_same(planned, _value_and_grads(model, wl, None))


@pytest.mark.parametrize("where", [(8650.0, 8652.0), (8690.0, 8703.0)])
def test_plan_of_a_clone_whose_lines_are_all_broad(hpf_slice, where):
    """Lines in the middle of the grid, and lines at and beyond its red end (windows held on the grid)."""
    wl, args = hpf_slice
    sel = (args[0] > where[0]) & (args[0] < where[1])
    n = int(sel.sum())
    assert n >= 3
    model = LineCloneModel(*(t[sel] for t in args), broad_lines=list(range(n)), tune=("amplitude", "wing"))
    plan = model.make_plan(wl, 25.0)
    assert plan.plain is None
    _assert_same(_value_and_grads(model, wl, 25.0, plan), _value_and_grads(model, wl, 25.0))


def _train_both_ways(hpf_slice, epochs: int, *, nan_after: int | None = None, nan_gradient_after: int | None = None,
                     **kw):
    """train() with and without a plan on a clone with wing-corrected lines: histories and parameters.
    ``nan_after``: the loss turns NaN after that many evaluations; ``nan_gradient_after``: the loss
    stays finite but its gradient in α turns NaN (d√|x|/dx at 0)."""
    wl, _ = hpf_slice
    out = {}
    for planned in (False, True):
        model = _broad_model(hpf_slice)
        with torch.no_grad():
            target = model(wl) ** 1.1
        plan = model.make_plan(wl) if planned else None
        calls = [0]

        def loss_fn():
            calls[0] += 1
            loss = ((model(wl, plan=plan) - target) ** 2).sum()
            if nan_gradient_after is not None and calls[0] > nan_gradient_after:
                loss = loss + torch.sqrt((model.wing_alpha - model.wing_alpha.detach()).abs()).sum()
            return loss * float("nan") if nan_after is not None and calls[0] > nan_after else loss

        hist = train(model, loss_fn, epochs=epochs, progress=False, plans=plan,
                     lr_overrides={"lam_centers": 1e-4}, **kw)
        out[planned] = (hist, [p.detach().clone() for p in model.parameters()], plan)
    return out


def test_train_through_plans_gives_the_plain_training(hpf_slice):
    out = _train_both_ways(hpf_slice, 12, lr=0.03)
    (h0, p0, _), (h1, p1, plan) = out[False], out[True]
    assert h1.loss[-1] < 0.5 * h1.loss[0]
    np.testing.assert_allclose(h1.loss, h0.loss, rtol=1e-12)
    assert (h1.best_epoch, h1.epochs_run, h1.stop_reason) == (h0.best_epoch, h0.epochs_run, h0.stop_reason)
    assert h1.best_loss == pytest.approx(h0.best_loss, rel=1e-12)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not plan.frozen  # handed back for evaluations that update it


def test_train_through_plans_keeps_the_best_parameters_when_the_loss_turns_nan(hpf_slice):
    with pytest.warns(NonFiniteLossWarning):
        out = _train_both_ways(hpf_slice, 12, lr=0.03, nan_after=6)
    (h0, p0, _), (h1, p1, _) = out[False], out[True]
    assert h0.stop_reason == h1.stop_reason == "non-finite"
    assert h1.best_epoch == h0.best_epoch == 5  # the sixth loss, the last finite one
    for a, b in zip(p1, p0):  # the parameters of that loss, not those after its step
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_train_through_plans_stops_on_a_nan_gradient_of_a_finite_loss(hpf_slice):
    """A NaN gradient need not show in the next loss (a NaN width drops its line from every window):
    the planned epochs check the gradients on the device, and stop where the plain loop stops."""
    with pytest.warns(NonFiniteLossWarning):
        out = _train_both_ways(hpf_slice, 12, lr=0.03, nan_gradient_after=5)
    (h0, p0, _), (h1, p1, _) = out[False], out[True]
    assert h0.stop_reason == h1.stop_reason == "non-finite"
    np.testing.assert_allclose(h1.loss, h0.loss, rtol=1e-12)
    assert len(h1.loss) == 6 and h1.best_epoch == h0.best_epoch
    for a, b in zip(p1, p0):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_clone_plan_refuses_a_model_whose_broad_lines_changed(hpf_slice):
    wl, args = hpf_slice
    model = LineCloneModel(*args, broad_lines=[2])
    plan = model.make_plan(wl)
    model.load_state_dict(model.state_dict())  # the same lines written again: the plan still holds
    torch.testing.assert_close(model(wl, plan=plan), model(wl), rtol=0, atol=1e-14)
    model.load_state_dict(LineCloneModel(*args, broad_lines=[5]).state_dict())
    with pytest.raises(ValueError, match="make a new plan"):
        model(wl, plan=plan)


def test_train_arguments_with_plans(hpf_slice):
    wl, _ = hpf_slice
    model = _model(hpf_slice)
    with pytest.raises(ValueError, match="needs plans"):
        train(model, lambda: model(wl).sum(), epochs=2, progress=False, graph=True)
    with pytest.raises(ValueError, match="CUDA"):
        train(model, lambda: model(wl).sum(), epochs=2, progress=False, plans=model.make_plan(wl), graph=True)


SYNC_FREE = textwrap.dedent("""
    import collections, json, sys
    import numpy as np
    import torch
    from blase_specutils.core import EngineOptions, LineCloneModel
    from torch.profiler import ProfilerActivity, profile
    data = np.load(sys.argv[1])
    wl = torch.as_tensor(data["wl"])
    lines = [torch.as_tensor(data[k]) for k in ("c", "a", "s", "g")]
    out = []
    # the far field's torch spreading and plan update, then the Triton ones; then lines with the
    # Appendix C.4 wing correction (one broad, one narrow: a ClonePlan)
    for spread, broad, shape in ((False, [], "pseudo-voigt"), (True, [], "pseudo-voigt"),
                                 (False, [3, 10], "pseudo-voigt")):
        # compiled_cpu=False: the GPU code path of the far field, on the CPU
        engine = EngineOptions(compiled_cpu=False, triton_spread=spread, triton_far=spread, triton_windows=spread,
                               triton_coefficients=spread)
        kw = dict(wing_tolerance=1e-7, broad_lines=broad, profile=shape, engine=engine)
        model = LineCloneModel(*lines, **kw)
        if broad:
            with torch.no_grad():
                model.wing_alpha.fill_(0.5)
        plan = model.make_plan(wl, 30.0, kernel="triton")
        ref = LineCloneModel(*lines, **kw)
        ref.load_state_dict(model.state_dict())
        f0 = ref(wl, 30.0)
        model(wl, 30.0, plan=plan)  # a first evaluation caches constants, as GraphedEpoch's warm-up epochs do
        plan.frozen = True
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            f1 = model(wl, 30.0, plan=plan)
            f1.sum().backward()
            plan.update()
        names = collections.Counter(e.name for e in prof.events())
        syncs = {k: v for k, v in names.items()
                 if any(s in k for s in ("local_scalar_dense", "nonzero", "aten::item", "is_nonzero", "unique",
                                         "lift_fresh"))}
        windows = plan if not broad else plan.plain
        out.append(dict(syncs=syncs, diff=float((f1 - f0).abs().max()), stale=plan.stale,
                        present=list(windows.ff_plan.present), broad=len(broad)))
    print(json.dumps(out))
""")


@pytest.mark.slow  # plans on CUDA are opt-in (``EngineOptions.plans_on_cuda``, off by default); interpreted, about 30 s
def test_planned_gpu_code_path_never_synchronises(hpf_slice, tmp_path):
    """The Triton kernel (interpreted) and the far field's GPU operations, with a plan, on the CPU:
    no operation of a planned evaluation, its backward pass or the plan's update reads a number
    back from the device (no .item(), nonzero, unique or truth test), and none makes a tensor from
    Python numbers (which a CUDA graph's recording refuses: a copy from host memory). With the
    torch far field and the one-kernel update, and with the far field, its coefficients and the
    update in Triton kernels. And a clone with wing-corrected lines (a ClonePlan)."""
    pytest.importorskip("triton", reason="the GPU kernel needs triton")
    wl, (c, a, s, g) = hpf_slice
    keep = (c > 8630) & (c < 8670)  # with the Ca II line at 8662 Å, on the second far-field level
    sub = (wl > 8640) & (wl < 8660)
    path = tmp_path / "lines.npz"
    np.savez(path, wl=wl[sub].numpy(), c=c[keep].numpy(), a=a[keep].numpy(), s=s[keep].numpy(), g=g[keep].numpy())
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SYNC_FREE, str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for res in __import__("json").loads(out.stdout.strip().splitlines()[-1]):
        assert res["syncs"] == {}
        assert res["diff"] < 1e-14 and not res["stale"], res
        assert len(res["present"]) >= 2  # more than one far-field level is exercised


LINES_KERNEL = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    from blase_specutils.core import LineCloneModel
    from blase_specutils.core.plan import WindowPlan
    # the torch operations (what numba plans run), the one-kernel update (what Triton plans run), the
    # three-kernel one (EngineOptions.triton_windows)
    UPDATES = ("_update_in_torch", "_update_with_line_kernel", "_update_with_window_kernels")
    data = np.load(sys.argv[1])
    wl = torch.as_tensor(data["wl"])
    args = [torch.as_tensor(data[k]) for k in ("c", "a", "s", "g")]
    cases = []
    for kw in [dict(), dict(mode="log"), dict(emission=True), dict(profile="voigt"),
               dict(profile="voigt", mode="log"), dict(far_field=False), dict(dtype=torch.float32), "fixed"]:
        model = LineCloneModel(*args, wing_tolerance=1e-7, **(kw if isinstance(kw, dict) else {}))
        if kw == "fixed":
            hw = torch.full((len(args[0]),), 0.8, dtype=torch.float64)
            plan = WindowPlan(wl, lambda: (model.lam_centers, model.log_amplitudes.exp(), model.log_sigmas.exp(),
                                           model.log_gammas.exp()), half_widths=hw, kernel="triton")
        else:
            plan = model.make_plan(wl, 40.0, kernel="triton")
        res = []
        for way in UPDATES:
            getattr(plan, way)(*(t.detach() for t in plan.source()))
            res.append([t.clone().double() for t in (plan.eta, plan.levels, plan.b_line, plan.start, plan.count)]
                       + [t.clone() for t in plan.chunks[:3]])
        for other in res[1:]:
            diff = [float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(res[0], other)]
            diff[0] /= float(res[0][0].abs().max())  # η and its derivatives: relative
            cases.append(dict(case=str(kw), diff=diff, stale=plan.stale))
    # a grid that is not contiguous in memory: the same windows each way
    strided = torch.stack([wl, wl + 1000.0], 1)[:, 0]
    model = LineCloneModel(*args, wing_tolerance=1e-7)
    plan = model.make_plan(strided, 40.0, kernel="triton")
    res = []
    for way in (UPDATES[0], UPDATES[2]):
        getattr(plan, way)(*(t.detach() for t in plan.source()))
        res.append([t.clone() for t in (plan.start, plan.count, *plan.chunks)])
    cases.append(dict(case="strided", diff=[0.0, 0, 0.0] + [float((x - y).abs().max()) for x, y in zip(*res)],
                      stale=plan.stale))
    # lines that outgrow the chunk table of a plan with no headroom (wider), leave a far-field grid
    # (moved past the red end) or have a NaN width: every way of updating raises the flag
    for change in ("wider", "moved", "nan"):
        flags = []
        for way in UPDATES:
            # (wider lines without far field: nothing but the chunk table's capacity is outgrown)
            model = LineCloneModel(*args, wing_tolerance=1e-7, far_field=change != "wider")
            plan = model.make_plan(wl, 0.0, kernel="triton", headroom=1.0)
            with torch.no_grad():
                if change == "wider":
                    model.log_gammas += 1.0
                    model.log_sigmas += 1.0
                elif change == "moved":
                    model.lam_centers[-1] = wl[-1] + 80.0
                else:  # a diverged fit
                    model.log_gammas[3] = float("nan")
            getattr(plan, way)(*(t.detach() for t in plan.source()))
            flags.append(plan.stale)
        cases.append(dict(case=change, flags=flags))
    print(json.dumps(cases))
""")


def test_triton_line_kernel_of_the_plan_update_matches_its_torch_operations(hpf_slice, tmp_path):
    """The one-kernel update (η and its derivatives, levels, b_j, windows, interpreted), and the
    three-kernel one (windows, chunk table and checks too), against the torch operations, for both
    profiles and modes, emission, without far field, float32 and fixed half widths: the same
    windows and chunk table, η to rounding; lines that outgrow the plan raise the flag each way."""
    pytest.importorskip("triton", reason="the GPU kernel needs triton")
    wl, (c, a, s, g) = hpf_slice
    path = tmp_path / "lines.npz"
    np.savez(path, wl=wl.numpy(), c=c.numpy(), a=a.numpy(), s=s.numpy(), g=g.numpy())
    out = subprocess.run([sys.executable, "-c", LINES_KERNEL, str(path)], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cases = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert len(cases) == 2 * 8 + 1 + 3
    for case in cases[-3:]:
        assert case["flags"] == [True, True, True], case
    for case in cases[:-3]:
        eta, levels, b_line, *windows = case["diff"]
        tol = 1e-6 if "float32" in case["case"] else 1e-14
        assert eta <= tol and b_line <= tol, case
        assert levels == 0 and windows == [0.0] * 5, case
        assert not case["stale"], case


PLANNED_FAR = textwrap.dedent("""
    import json, math, os, sys
    import numpy as np
    import torch
    import blase_specutils.core.farfield as farfield
    from blase_specutils.core.fused import eta_and_derivatives, stored_eta
    from blase_specutils.core.gpu_kernel import line_coefficients_triton
    from blase_specutils.core import EngineOptions, LineCloneModel
    FAR = EngineOptions(triton_far=True)  # the planned far field in Triton kernels
    dev = os.environ.get("BLASE_TRITON_DEVICE", "cpu")
    data = np.load(sys.argv[1])
    wl = torch.as_tensor(data["wl"]).to(dev)
    args = [torch.as_tensor(data[k]) for k in ("c", "a", "s", "g")]
    out = []
    for kw in [dict(), dict(mode="log"), dict(emission=True), dict(profile="voigt"), dict(dtype=torch.float32)]:
        res = []
        # the torch operations; the Triton far field; with the Triton coefficients too (a frozen
        # plan with the Triton near field: interpreted on a CPU, slow, so for one case there)
        variants = [(False, False), (True, False)]
        if dev == "cuda" or not kw:
            variants.append((True, True))
        for far, coefficients in variants:
            model = LineCloneModel(*args, wing_tolerance=1e-7, device=dev,
                                   engine=EngineOptions(triton_far=far, triton_coefficients=coefficients), **kw)
            model.lam_centers.requires_grad_(True)
            rv = torch.tensor(30.0, dtype=torch.float64, device=dev, requires_grad=True)
            plan = model.make_plan(wl, rv, kernel="triton" if coefficients or dev == "cuda" else "auto")
            plan.frozen = coefficients
            f = model(wl, rv, plan=plan)
            (f * torch.linspace(0.0, 1.0, f.numel(), dtype=f.dtype, device=dev)).sum().backward()
            res.append([f.detach()] + [p.grad for p in model.parameters() if p.grad is not None] + [rv.grad[None]])
        for other in res[1:]:
            diff = [float((x - y).abs().max() / y.abs().max()) for x, y in zip(other, res[0])]
            out.append(dict(case=str(kw), diff=diff, grads=len(res[0]) - 1, levels=list(plan.ff_plan.present)))
    # an unfrozen plan evaluated twice before backward(), a line moved to another level in between:
    # the first evaluation's backward pass keeps its own levels
    model = LineCloneModel(*args, wing_tolerance=1e-7, device=dev, engine=FAR)
    lines = [model.lam_centers.detach().clone().requires_grad_(True),
             *(t.detach().exp() for t in (model.log_amplitudes, model.log_sigmas, model.log_gammas))]
    wide = lines[3].clone()
    wide[torch.argmax(lines[1])] *= 40.0  # the deepest line onto the next level
    twice = []
    for second in (False, True):
        lines[0].grad = None
        plan = model.make_plan(wl, kernel="triton" if dev == "cuda" else "auto")
        f1 = plan.log_flux(*lines)
        if second:
            before = plan.levels.clone()
            plan.log_flux(lines[0], lines[1], lines[2], wide)
            moved = bool((plan.levels != before).any())
        (f1 ** 2).sum().backward()
        twice.append(lines[0].grad.clone())
    two_evaluations = float((twice[0] - twice[1]).abs().max() / twice[0].abs().max())
    # the coefficients' kernel alone against their torch expressions, values and gradients
    gen = torch.Generator().manual_seed(5)
    n = 300
    a, s, g, b = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.05 + 0.01 for _ in range(4))
    eta = torch.rand(3, n, generator=gen, dtype=torch.float64)
    w = torch.randn(2, n, generator=gen, dtype=torch.float64)
    coef_cases = []
    for voigt in (False, True):
        for sign in (1.0, -1.0):
            for dtype in (torch.float64, torch.float32):
                xs = [t.to(dev, dtype).requires_grad_(True) for t in (a, s, g)]
                e_ = eta.to(dev, dtype)
                bb = b.to(dev, dtype)
                par = torch.tensor([sign], dtype=torch.float64, device=dev)
                kc, ke = line_coefficients_triton(*xs, e_, bb, par, voigt=voigt)
                fast = [kc, ke, *torch.autograd.grad((w[0].to(dev) * kc + w[1].to(dev) * ke).sum(), xs)]
                ys = [t.to(dev, dtype).requires_grad_(True) for t in (a, s, g)]
                if voigt:
                    kc = sign * ys[0] * ys[2] / math.pi
                    ke = kc * (bb * bb - ys[2] ** 2 + 3.0 * ys[1] ** 2)
                else:
                    et = stored_eta(ys[1], ys[2], *e_)
                    kc = sign * ys[0] * et * ys[2] / math.pi
                    ke = kc * (bb * bb - ys[2] ** 2)
                ref = [kc, ke, *torch.autograd.grad((w[0].to(dev) * kc + w[1].to(dev) * ke).sum(), ys)]
                diff = [float((x - y).abs().max() / y.abs().max()) for x, y in zip(fast, ref)]
                coef_cases.append(dict(case=[voigt, sign, str(dtype)], diff=diff))
    xs = [t[:5].to(dev).requires_grad_(True) for t in (a, s, g)]
    par = torch.tensor([-1.0], dtype=torch.float64, device=dev)
    # (η and its derivatives recomputed for the perturbed σ, γ, as a plan's update does)
    coef_check = all(torch.autograd.gradcheck(
        lambda *x: line_coefficients_triton(*x, torch.stack(eta_and_derivatives(x[1], x[2])).detach(), b[:5].to(dev),
                                            par, voigt=v), xs)
        for v in (False, True))
    # gradcheck of the planned far field itself (λc, c_j, e_j) on a few lines and a short grid
    model = LineCloneModel(*args, wing_tolerance=1e-7, device=dev, engine=FAR)
    short = wl[(wl > 8652.0) & (wl < 8658.0)].clone()
    plan = model.make_plan(short)
    ff = plan.ff_plan
    pick = torch.cat([torch.nonzero(plan.levels == k).flatten()[:3] for k in ff.present])
    gen = torch.Generator().manual_seed(3)
    coef = [torch.randn(len(args[0]), generator=gen, dtype=torch.float64).to(dev) * 1e-3 for _ in range(2)]
    def far(x, c, e):
        cs, cc, ce = (t.detach().clone() for t in (model.lam_centers, *coef))
        cs[pick], cc[pick], ce[pick] = x, c, e
        return farfield.far_field(short, cs, cc, ce, plan.far_field, plan.levels, plan=ff, engine=FAR)
    inputs = [t[pick].detach().clone().requires_grad_(True) for t in (model.lam_centers, *coef)]
    ok = torch.autograd.gradcheck(far, inputs, eps=1e-6, atol=1e-9, fast_mode=True)
    print(json.dumps(dict(cases=out, gradcheck=bool(ok), picked=int(pick.numel()), levels=list(ff.present),
                          triton=ff.triton is not None, coefficients=coef_cases,
                          coefficients_gradcheck=bool(coef_check), two_evaluations=two_evaluations, moved=moved)))
""")


def _planned_far_field(hpf_slice, tmp_path, env: dict) -> dict:
    wl, (c, a, s, g) = hpf_slice
    keep = (c > 8630) & (c < 8670)  # with the Ca II line at 8662 Å, on the second far-field level
    sub = (wl > 8640) & (wl < 8660)
    path = tmp_path / "lines.npz"
    np.savez(path, wl=wl[sub].numpy(), c=c[keep].numpy(), a=a[keep].numpy(), s=s[keep].numpy(), g=g[keep].numpy())
    out = subprocess.run([sys.executable, "-c", PLANNED_FAR, str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return __import__("json").loads(out.stdout.strip().splitlines()[-1])


def _check_planned_far_field(res: dict) -> None:
    assert len(res["cases"]) >= 5 + 1 and res["gradcheck"]
    assert len(res["coefficients"]) == 8 and res["coefficients_gradcheck"]
    assert res["moved"] and res["two_evaluations"] < 1e-13, res
    for case in res["coefficients"]:
        assert max(case["diff"]) < (1e-6 if "float32" in case["case"][2] else 1e-14), case
    assert res["triton"] and len(res["levels"]) >= 2 and res["picked"] >= 4, res
    for case in res["cases"]:
        assert case["grads"] == 5 and len(case["levels"]) >= 2, case
        # values to rounding; gradients to 1e-11 of their largest element: they are sums over lines
        # and pixels, taken in another order (the RV's with cancellations)
        f32 = "float32" in case["case"]
        assert case["diff"][0] < (1e-6 if f32 else 1e-13), case
        assert max(case["diff"][1:]) < (1e-6 if f32 else 1e-11), case


@pytest.mark.slow  # the Triton far field and coefficients are opt-in (``EngineOptions.triton_far``, ``triton_coefficients``, off by default); interpreted, about 30 s
def test_triton_far_field_of_a_plan_matches_its_torch_operations(hpf_slice, tmp_path):
    """The planned far field in Triton kernels (interpreted): spreading of all levels in one
    kernel, batched FFTs, interpolations in one kernel each way, and with it the coefficients c_j,
    e_j in one kernel each way (in a frozen plan), against the torch operations.
    Values and gradients (λc, ln a, ln σ, ln γ and the RV) agree to rounding in both modes, for
    emission, the exact Voigt and float32; gradcheck of the far field in λc, c_j and e_j."""
    pytest.importorskip("triton", reason="the GPU kernel needs triton")
    _check_planned_far_field(_planned_far_field(hpf_slice, tmp_path, dict(os.environ, TRITON_INTERPRET="1")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_far_field_of_a_plan_compiled_on_the_gpu(hpf_slice, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _check_planned_far_field(_planned_far_field(hpf_slice, tmp_path, dict(env, BLASE_TRITON_DEVICE="cuda")))


def test_far_field_plan_checks_centres_against_the_float64_range_of_the_unplanned_far_field(hpf_slice):
    """The plan's table of the centres each far-field level can spread holds the float64 ends that
    the unplanned far field tests (a float32 table rounded them by up to 2.4e-4 Å at 8600 Å), so a
    centre within a hair of an end gets the same verdict both ways."""
    from blase_specutils.core import farfield

    wl, _ = hpf_slice
    plan = _model(hpf_slice).make_plan(wl)
    ff, st = plan.ff_plan, plan.far_field
    m = st.order // 2
    assert len(ff.present) >= 2
    for level in ff.present:
        lo, dx, n = farfield._level_geometry(ff.ends, st.at_level(level))
        ends = torch.tensor([lo + (m - 1) * dx, lo + (n - m) * dx], dtype=torch.float64)
        assert torch.equal(ff.spreadable[level], ends)
        probe = torch.cat([ends - 1e-7, ends, ends + 1e-7])
        levels = torch.full(probe.shape, level, dtype=torch.long)
        assert torch.equal(farfield._off_grid(ff.spreadable, probe, levels), ~farfield._spreadable(probe, lo, dx, n, m))


@pytest.mark.parametrize("profile", ["pseudo-voigt", "voigt"])
def test_broad_line_plan_never_synchronises(hpf_slice, profile):
    """A frozen plan of wing-corrected lines (torch operations only, on any device): its evaluation,
    backward pass and update read nothing back and copy nothing from host memory."""
    import collections

    from torch.profiler import ProfilerActivity, profile as profiler

    wl, args = hpf_slice
    sel = (args[0] > 8640) & (args[0] < 8660)
    model = LineCloneModel(*(t[sel] for t in args), broad_lines=list(range(int(sel.sum()))), profile=profile,
                           tune=("amplitude", "sigma", "gamma", "wing", "center"))
    plan = model.make_plan(wl, 20.0)
    model(wl, 20.0, plan=plan).sum().backward()  # a first evaluation caches constants
    plan.frozen = True
    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        model(wl, 20.0, plan=plan).sum().backward()
        plan.update()
    names = collections.Counter(e.name for e in prof.events())
    assert names.get("aten::index_add", 0) >= 1  # the broad lines were summed in the profiled window
    syncs = {k: v for k, v in names.items() if any(s in k for s in ("local_scalar_dense", "nonzero", "aten::item",
                                                                      "is_nonzero", "unique", "lift_fresh"))}
    assert syncs == {} and not plan.stale


def _cuda_lines(hpf_slice):
    wl, args = hpf_slice
    return wl.cuda(), args


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("headroom, lr", [(1.25, 0.01), (1.0, 0.1)])
@pytest.mark.parametrize("spread, windows, far, coefficients", [
    (False, False, False, False), (True, False, False, False), (False, True, False, False),
    (False, False, True, False), (False, False, False, True), (False, True, True, True)])
def test_cuda_graph_epochs_train_like_the_plain_loop(hpf_slice, headroom, lr, spread, windows, far, coefficients):
    """Eight epochs replayed as a CUDA graph against eight plain epochs (unplanned engine); with no
    headroom and a large learning rate the lines outgrow the plan at nearly every epoch, and the
    epochs that follow a rebuild run eagerly until the plan holds. With and without the Triton
    spreading, the three-kernel update, the far field in Triton kernels and the coefficients' kernel."""
    engine = EngineOptions(triton_spread=spread, triton_windows=windows, triton_far=far,
                           triton_coefficients=coefficients)
    wl, args = _cuda_lines(hpf_slice)
    res = {}
    for how in ("plain", "graph"):
        model = LineCloneModel(*args, wing_tolerance=1e-7, device="cuda", engine=engine)
        with torch.no_grad():
            target = model(wl) ** 1.1
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, capturable=True)
        if how == "plain":
            losses = _plain_epochs(model, wl, target, opt, 8)
        else:
            plan = model.make_plan(wl, headroom=headroom)
            epoch = GraphedEpoch(lambda: ((model(wl, plan=plan) - target) ** 2).sum(), opt, plan)
            losses = [float(epoch()) for _ in range(8)]
            res["recordings"], res["rebuilds"] = epoch.recordings, plan.rebuilds
        res[how] = (losses, [p.detach().cpu() for p in model.parameters()])
    np.testing.assert_allclose(res["graph"][0], res["plain"][0], rtol=1e-10)
    for a, b in zip(res["graph"][1], res["plain"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert res["recordings"] >= 1
    if headroom == 1.0:
        assert res["rebuilds"] >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("profile", ["pseudo-voigt", "voigt"])
def test_cuda_train_through_a_graphed_clone_plan(hpf_slice, profile):
    """train() with a plan of a clone with wing-corrected lines, replayed as a CUDA graph, against
    train() without a plan on the same GPU: the same losses, best epoch and parameters."""
    wl, args = _cuda_lines(hpf_slice)
    out = {}
    for planned in (False, True):
        model = _broad_model((wl.cpu(), args), profile=profile).to("cuda")
        with torch.no_grad():
            target = model(wl) ** 1.1
        plan = model.make_plan(wl) if planned else None
        hist = train(model, lambda: ((model(wl, plan=plan) - target) ** 2).sum(), epochs=12, lr=0.03,
                     progress=False, plans=plan, lr_overrides={"lam_centers": 1e-4})
        out[planned] = (hist, [p.detach().cpu() for p in model.parameters()])
    (h0, p0), (h1, p1) = out[False], out[True]
    np.testing.assert_allclose(h1.loss, h0.loss, rtol=1e-10)
    assert h1.best_epoch == h0.best_epoch and h1.loss[-1] < 0.5 * h1.loss[0]
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
