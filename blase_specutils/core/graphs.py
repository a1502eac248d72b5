r"""A whole training epoch recorded once and replayed as a CUDA graph.

An epoch of blasé (zero the gradients, evaluate the clone, the loss, backpropagate, take an Adam
step) launches a few hundred small GPU kernels. Issued one by one from Python, their launch costs
dominate on a modern GPU: the device is busy for well under half of the epoch. A CUDA graph
records the kernels of one epoch once and replays them with one launch.

A graph can hold no host synchronisation and no change of shape, so the lines are evaluated
through :class:`.plan.WindowPlan` objects, and the plans are updated on the device after the
optimizer step, inside the graph, for the next epoch. After every replay one flag is read back: if
the lines outgrew a plan, the plans are rebuilt and the graph recorded again at the next epoch.
On CPUs, or with ``graph=False``, the same epoch runs eagerly.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .plan import BroadLinePlan, ClonePlan, WindowPlan

#: What ``plans`` may hold.
PLAN_TYPES = (WindowPlan, ClonePlan, BroadLinePlan)

__all__ = ["GraphedEpoch"]


class GraphedEpoch:
    r"""One optimisation epoch, ``loss = loss_fn(); loss.backward(); optimizer.step()``, replayed
    as a CUDA graph.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn()`` returns the scalar loss. It must evaluate every line sum through ``plans``
        (e.g. ``model(wavelength, plan=plan)``) and keep to tensors that stay where they are
        (the target, the grid, the model's parameters): a graph replays the same memory.
    optimizer : torch.optim.Optimizer
        On CUDA it must be built with ``capturable=True`` (e.g. ``torch.optim.Adam(params, lr,
        capturable=True)``), so that its step counter lives on the GPU.
    plans : WindowPlan, ClonePlan or a sequence of them
        The plans ``loss_fn`` evaluates with (``LineCloneModel.make_plan``). They are updated after
        each optimizer step.
    graph : bool, optional
        Record a CUDA graph (default: when the parameters are on a CUDA device).
    warmup : int
        Epochs run eagerly before the first recording (the first evaluations compile kernels and
        make FFT plans, which a recording cannot do).
    keep_previous : bool
        Copy the parameters into :attr:`previous` before each optimizer step, so that the caller
        can keep the parameters that gave a loss (``train`` keeps the best ones).
    check_gradients : bool
        Set :attr:`gradients_finite` (a 0-d tensor on the device) at each epoch to whether every
        gradient was finite before the step, without synchronising.

    Notes
    -----
    Each call runs one epoch and returns its loss, a 0-d tensor on the device that the next call
    overwrites (``float(loss)`` or ``loss.clone()`` to keep it); nothing stops on a NaN loss.
    The optimizer's parameters changed between calls (by ``load_state_dict`` or in place under
    ``torch.no_grad()``) are noticed, and the plans are updated before the next epoch. A recorded
    graph does not see other changes: the optimizer's learning rate or state replaced, parameters
    frozen or unfrozen, a radial-velocity tensor outside the optimizer changed in place; after
    those, make a new ``GraphedEpoch``. :attr:`recordings` counts the graphs recorded.
    """

    def __init__(
        self,
        loss_fn: Callable[[], Tensor],
        optimizer: torch.optim.Optimizer,
        plans: WindowPlan | ClonePlan | Sequence[WindowPlan | ClonePlan],
        *,
        graph: bool | None = None,
        warmup: int = 2,
        keep_previous: bool = False,
        check_gradients: bool = False,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError("loss_fn must be a callable that returns the loss")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("optimizer must be a torch.optim.Optimizer")
        self.plans = [plans] if isinstance(plans, PLAN_TYPES) else list(plans)
        if not self.plans or not all(isinstance(p, PLAN_TYPES) for p in self.plans):
            raise TypeError("plans must be one plan (a WindowPlan or ClonePlan, from make_plan) or a sequence of them")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        if not self.params:
            raise ValueError("the optimizer has no parameters")
        on_cuda = self.params[0].device.type == "cuda"
        if graph is None:
            graph = on_cuda
        if graph and not on_cuda:
            raise ValueError("CUDA graphs need the parameters on a CUDA device; use graph=False on a CPU")
        if graph and not all(g.get("capturable", False) for g in optimizer.param_groups):
            raise ValueError("a CUDA graph needs an optimizer built with capturable=True, "
                             "e.g. torch.optim.Adam(params, lr=0.01, capturable=True)")
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (a recording needs the kernels compiled first)")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.use_graph = bool(graph)
        self.warmup = int(warmup)
        self.recordings = 0
        self._graph = None
        self._loss = None
        self._eager_left = self.warmup
        self._versions = None
        #: The parameters before the last epoch's optimizer step (with ``keep_previous``), in the
        #: optimizer's order: those that gave the loss the last call returned.
        self.previous = [p.detach().clone() for p in self.params] if keep_previous else None
        #: Whether the last epoch's gradients were all finite (with ``check_gradients``).
        self.gradients_finite = torch.ones((), dtype=torch.bool, device=self.params[0].device) \
            if check_gradients else None
        for p in self.plans:
            p.frozen = True

    def _body(self) -> Tensor:
        loss = self.loss_fn()
        if not (torch.is_tensor(loss) and loss.numel() == 1):
            raise TypeError("loss_fn must return a scalar tensor")
        loss.backward()
        if self.gradients_finite is not None:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:  # the largest |gradient| of each parameter (NaN propagates), in one fused operation
                self.gradients_finite.copy_(torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf))).all())
            else:
                self.gradients_finite.fill_(True)
        if self.previous is not None:
            torch._foreach_copy_(self.previous, [p.detach() for p in self.params])
        self.optimizer.step()
        for p in self.plans:
            p.update()
        return loss

    def _seen(self) -> list:
        return [p._version for p in self.params]

    def __call__(self) -> Tensor:
        """Run one epoch; returns its loss (a 0-d tensor, overwritten by the next call)."""
        if self._versions is None or self._seen() != self._versions:
            # the first epoch, or parameters changed outside the epochs: windows for the lines as
            # they are now before the next evaluation
            for p in self.plans:
                p.update()
            if any(p.stale for p in self.plans):
                self._rebuild()
        if self._graph is not None:
            self._graph.replay()
            loss = self._loss
        else:
            loss = self._eager()
        if any(p.stale for p in self.plans):
            self._rebuild()
        self._versions = self._seen()
        return loss

    def _eager(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if not self.use_graph:
            return self._body().detach()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss = self._body().detach()
        torch.cuda.current_stream().wait_stream(stream)
        self._eager_left -= 1
        if self._eager_left <= 0 and not any(p.stale for p in self.plans):
            self._record()
        return loss

    def _record(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # recording runs nothing: the parameters are as the last eager epoch left them
        try:
            with torch.cuda.graph(graph):
                self._loss = self._body().detach()
        except Exception as err:
            raise RuntimeError(
                "recording the epoch as a CUDA graph failed: something in loss_fn reads a value back from the "
                "GPU, copies from host memory, or evaluates a line sum without its plan. "
                "GraphedEpoch(..., graph=False) runs the same epoch without a graph") from err
        self._graph = graph
        self.recordings += 1

    def _rebuild(self) -> None:
        for p in self.plans:
            p.rebuild()
        if self._graph is not None:
            self._graph = None
            self._loss = None
            self._eager_left = 1
