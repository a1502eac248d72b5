"""Full-batch Adam training with a progress bar, early stopping and a NaN/inf guard."""

from __future__ import annotations

import copy
import math
import operator
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .options import EngineOptions

__all__ = ["TrainingHistory", "train", "seed_everything", "resolve_device", "NonFiniteLossWarning", "use_plans"]


def check_integer(value, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int: an integer (Python or numpy, not a bool or float) not below ``minimum``.

    Raises TypeError or ValueError naming ``name``, instead of truncating 2.5 to 2.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_real(value, name: str, *, positive: bool = False, optional: bool = False) -> float | None:
    """``value`` as a float: one finite number >= 0 (> 0 if ``positive``); None stays None when ``optional``.

    Raises TypeError (not one number) or ValueError (out of range), naming ``name``.
    """
    if value is None and optional:
        return None
    what = "one number" + (" or None" if optional else "")
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        raise TypeError(f"{name} must be {what}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be {what}, got {value!r}") from err
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


class NonFiniteLossWarning(RuntimeWarning):
    """Training met a NaN or infinite loss or gradient and stopped with the best parameters."""


@dataclass
class TrainingHistory:
    """What happened during training.

    Attributes
    ----------
    loss : list of float
        Loss after each epoch.
    best_loss : float
        Lowest loss seen; the model holds the parameters that gave it.
    best_epoch : int
        Epoch (0-based) of the best loss.
    epochs_run : int
        Number of epochs actually run.
    stop_reason : str
        ``"max_epochs"``, ``"plateau"`` or ``"non-finite"``.
    seconds : float
        Wall-clock time of the loop.
    """

    loss: list = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = -1
    epochs_run: int = 0
    stop_reason: str = "max_epochs"
    seconds: float = 0.0


def seed_everything(seed: int | None) -> None:
    """Seed torch (CPU and CUDA) and numpy so that runs are reproducible."""
    if seed is None:
        return
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def use_plans(plan: bool | str, device: torch.device, engine: EngineOptions | None = None) -> bool:
    """Whether to train through window plans: ``plan`` True/False, or ``"auto"`` (on CUDA devices
    when ``engine.plans_on_cuda`` is set; never on CPUs, where a plan brings no speed).

    ``plans_on_cuda`` is off by default until this path has been run and timed on a GPU: the
    graphed epoch itself was (benchmarks/RESULTS.md), its use inside ``train`` and with
    wing-corrected lines not yet."""
    if check_plan(plan) == "auto":
        engine = EngineOptions() if engine is None else engine
        return engine.plans_on_cuda and torch.device(device).type == "cuda"
    return plan


def check_plan(plan) -> bool | str:
    """``plan`` itself when it is True, False or ``"auto"``; ValueError otherwise."""
    if not (isinstance(plan, bool) or (isinstance(plan, str) and plan == "auto")):
        raise ValueError(f"plan must be True, False or 'auto', got {plan!r}")
    return plan


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda"`` into a torch device, with a clear error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use device='cpu'")
    return dev


def train(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    *,
    epochs: int = 1000,
    lr: float = 0.05,
    patience: int | None = 100,
    min_rel_improvement: float = 1e-4,
    progress: bool = True,
    desc: str = "training",
    callback: Callable[[int, float], None] | None = None,
    lr_overrides: dict[str, float] | None = None,
    extra: nn.Module | None = None,
    plans=None,
    graph: bool | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
) -> TrainingHistory:
    """Minimise ``loss_fn()`` over the model's trainable parameters with full-batch Adam.

    Parameters
    ----------
    model : nn.Module
        Its parameters with ``requires_grad=True`` are tuned.
    loss_fn : callable
        Evaluates the model and returns a scalar loss tensor.
    epochs : int
        Largest number of epochs (full passes: forward, backward, step).
    lr : float
        Adam learning rate.
    patience : int or None
        Stop when the best loss has not improved by a relative ``min_rel_improvement`` for this
        many epochs (``None``: never stop early).
    progress : bool
        Show a tqdm progress bar with the current loss.
    desc : str
        Label of the progress bar.
    callback : callable, optional
        Called as ``callback(epoch, loss)`` after each epoch.
    lr_overrides : dict, optional
        Learning rates for particular parameters by name (``model.named_parameters()``), e.g.
        ``{"lam_centers": 0.002}``: centres move in Å, not in log units.
    extra : nn.Module, optional
        A second module whose trainable parameters are tuned together with the model's (at the
        rate ``lr``) and restored with them, e.g. a likelihood with its own hyperparameters.
    plans : plan or sequence of plans, optional
        The window plans through which ``loss_fn`` evaluates every line sum
        (``LineCloneModel.make_plan``, e.g. ``loss_fn = lambda: ((model(wl, plan=plan) - f)**2).sum()``).
        Each epoch then runs as a :class:`~blase_specutils.core.graphs.GraphedEpoch`: the plans are
        updated on the device after each step, and on a GPU the whole epoch is recorded once and
        replayed as a CUDA graph. The losses and parameters are those of the loop without plans.
    graph : bool, optional
        With ``plans``: record the epoch as a CUDA graph (default: when the parameters are on a
        CUDA device). ``loss_fn`` must then read nothing back from the device.
    betas : (float, float)
        Adam's decay rates of the running means of the gradient and of its square.

    Returns
    -------
    TrainingHistory
        The model is left holding the parameters of the lowest loss seen. If the loss or a
        gradient becomes NaN/inf, training stops, those best parameters are restored, and a
        :class:`NonFiniteLossWarning` says so.
    """
    epochs = check_integer(epochs, "epochs", minimum=0)
    if patience is not None:
        patience = check_integer(patience, "patience", minimum=1)
    lr = check_real(lr, "lr", positive=True)
    lr_overrides = dict(lr_overrides or {})
    unknown = set(lr_overrides) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"lr_overrides names unknown parameters {sorted(unknown)}")
    if extra is not None:  # one module holding both, so that one state dict restores both
        model = nn.ModuleDict({"model": model, "extra": extra})
        lr_overrides = {f"model.{n}": v for n, v in lr_overrides.items()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    hist = TrainingHistory()
    best_state = copy.deepcopy(model.state_dict())
    if not params or epochs == 0:
        with torch.no_grad():
            hist.best_loss = float(loss_fn())
        hist.best_epoch = 0
        hist.stop_reason = "max_epochs"
        return hist
    groups = [{"params": [p for n, p in named if n not in lr_overrides], "lr": lr}]
    groups += [{"params": [p], "lr": float(lr_overrides[n])} for n, p in named if n in lr_overrides]
    epoch_fn = None
    if plans is not None:
        from .graphs import GraphedEpoch

        on_cuda = params[0].device.type == "cuda"
        use_graph = on_cuda if graph is None else bool(graph)
        opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr, betas=betas, capturable=use_graph)
        epoch_fn = GraphedEpoch(loss_fn, opt, plans, graph=use_graph, keep_previous=True, check_gradients=True)
        previous = {id(p): buf for p, buf in zip(epoch_fn.params, epoch_fn.previous)}
    else:
        if graph:
            raise ValueError("graph=True needs plans: the line sums of a CUDA graph go through window plans")
        opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr, betas=betas)
    try:
        return _loop(model, loss_fn, opt, params, hist, best_state, epochs=int(epochs), patience=patience,
                     min_rel_improvement=min_rel_improvement, progress=progress, desc=desc, callback=callback,
                     epoch_fn=epoch_fn, previous=previous if epoch_fn is not None else None)
    finally:
        if epoch_fn is not None:
            for p in epoch_fn.plans:
                p.frozen = False  # evaluations after training update the plans again


class _BestParameters:
    """The parameters of the lowest loss so far: a copy of the state dict, or, with a graphed epoch,
    buffers holding the parameters before its step (``previous``, by ``id`` of the parameter),
    copied on the device in one operation (the state dict is assembled at the end)."""

    def __init__(self, model: nn.Module, state: dict, previous: dict | None) -> None:
        self.model, self.state, self.previous = model, state, previous
        self.kept: dict = {}

    def keep(self, before_step: bool) -> None:
        """Keep the current parameters, or (``before_step``) those before the step the epoch took."""
        if not before_step:
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return
        if not self.kept:
            self.kept.update({k: v.clone() for k, v in self.previous.items()})
        else:
            torch._foreach_copy_(list(self.kept.values()), [self.previous[k] for k in self.kept])
        self.state = None

    def restore(self) -> None:
        """Load the kept parameters into the model."""
        state = self.state
        if state is None:  # the best parameters are in the kept buffers
            state = {k: self.kept.get(id(v), v).detach().clone()
                     for k, v in self.model.state_dict(keep_vars=True).items()}
        self.model.load_state_dict(state)


def _run_epoch(loss_fn, opt, params, epoch_fn) -> tuple[float, str]:
    """Run one epoch up to the optimizer's step: its loss and ``"ok"``, ``"bad loss"`` (a non-finite
    loss: no backward pass) or ``"bad gradient"`` (a non-finite gradient)."""
    if epoch_fn is not None:
        # forward, backward, step and the plans' update, then the loss and whether the gradients
        # were finite, read back together; a step with non-finite gradients is undone, as the best
        # parameters (kept before each step) are restored
        loss = epoch_fn()
        value, finite = torch.stack([loss.detach().double(), epoch_fn.gradients_finite.double()]).tolist()
        if not math.isfinite(value):
            return value, "bad loss"
        return value, "ok" if finite else "bad gradient"
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    value = float(loss.detach())
    if not math.isfinite(value):
        return value, "bad loss"
    loss.backward()
    if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
        return value, "bad gradient"
    return value, "ok"


def _close_bar(bar, hist: TrainingHistory, epochs: int) -> None:
    """Close the progress bar; after an early stop it ends full at the epochs run, not part-way."""
    if hist.epochs_run < epochs:
        bar.n = hist.epochs_run
        bar.total = hist.epochs_run
        bar.refresh()
    bar.close()


def _check_final_step(loss_fn, hist: TrainingHistory, best: _BestParameters) -> None:
    """Evaluate the parameters of the final step once more, so that the best parameters really are the best seen."""
    if hist.stop_reason == "non-finite":
        return
    with torch.no_grad():
        final = float(loss_fn())
    if math.isfinite(final) and final < hist.best_loss:
        hist.best_loss = final
        hist.best_epoch = hist.epochs_run
        best.keep(False)


def _loop(model, loss_fn, opt, params, hist, best_state, *, epochs, patience, min_rel_improvement, progress, desc,
          callback, epoch_fn, previous) -> TrainingHistory:
    """The epochs of :func:`train`: plain, or through a :class:`.graphs.GraphedEpoch` (``epoch_fn``)
    that keeps the parameters before each step in ``previous`` (by ``id`` of the parameter)."""
    best = _BestParameters(model, best_state, previous)
    last_improvement = 0
    plateau_ref = math.inf
    t0 = time.perf_counter()
    from tqdm.std import tqdm

    # updated by hand (not iterated): iterating closes the bar as the loop breaks, before it can end full
    bar = tqdm(total=int(epochs), desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    for epoch in range(int(epochs)):
        value, outcome = _run_epoch(loss_fn, opt, params, epoch_fn)
        if outcome != "ok":
            hist.stop_reason = "non-finite"
            if outcome == "bad gradient":
                hist.loss.append(value)
            break
        hist.loss.append(value)
        if value < hist.best_loss:
            hist.best_loss = value
            hist.best_epoch = epoch
            best.keep(epoch_fn is not None)
        if value < plateau_ref - min_rel_improvement * abs(plateau_ref) or not math.isfinite(plateau_ref):
            plateau_ref = value
            last_improvement = epoch
        if epoch_fn is None:
            opt.step()
        hist.epochs_run = epoch + 1
        bar.update(1)
        if progress and (epoch % 10 == 0 or epoch == epochs - 1):
            bar.set_postfix(loss=f"{value:.4g}", best=f"{hist.best_loss:.4g}")
        if callback is not None:
            callback(epoch, value)
        if patience is not None and epoch - last_improvement >= patience:
            hist.stop_reason = "plateau"
            break
    _close_bar(bar, hist, epochs)
    _check_final_step(loss_fn, hist, best)
    best.restore()
    hist.seconds = time.perf_counter() - t0
    if hist.stop_reason == "non-finite":
        warnings.warn(
            f"{desc}: the loss or its gradient became NaN/inf at epoch {len(hist.loss)}; stopped and "
            f"restored the best parameters (epoch {hist.best_epoch}, loss {hist.best_loss:.6g}). "
            "Try a smaller learning rate.",
            NonFiniteLossWarning,
            stacklevel=3,
        )
    return hist
