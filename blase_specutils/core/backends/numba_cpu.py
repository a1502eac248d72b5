"""The ``"numba"`` backend: the compiled CPU loops of :mod:`..cpu_kernel`.

Each line is evaluated on exactly its own window, on all the process's torch threads, with a
hand-written backward pass; the wing loops are branch-free and vectorised. On the paper's HPF
problem (2 CPU cores) an epoch takes 80-93 ms against 327 ms with the ``"torch"`` backend
(``benchmarks/RESULTS.md``, "Engine: the paper's HPF cloning problem"), which is why ``"auto"``
picks it on CPUs.
"""

from __future__ import annotations

import torch

from ..cpu_kernel import HAVE_NUMBA, windowed_pseudo_voigt_sum_cpu
from .compiled import CompiledBackend

__all__ = ["NumbaBackend"]


class NumbaBackend(CompiledBackend):
    """numba's compiled loops over each line's window (CPU tensors)."""

    name = "numba"

    def runs_on(self, device: torch.device) -> bool:
        """CPU tensors, where numba is installed."""
        return HAVE_NUMBA and torch.device(device).type == "cpu"

    def kernel(self, engine):
        """:func:`..cpu_kernel.windowed_pseudo_voigt_sum_cpu` (it has no settings)."""
        return windowed_pseudo_voigt_sum_cpu
