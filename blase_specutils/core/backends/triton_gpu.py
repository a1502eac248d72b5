"""The ``"triton"`` backend: the GPU kernels of :mod:`..gpu_kernel`.

The windows are cut into chunks of ``EngineOptions.chunk`` pixels, one Triton program each;
forward and backward are compiled kernels, pseudo-Voigt and exact Voigt. On an H200 an epoch of
the paper's HPF problem took 9-15 ms against 65-117 ms with the ``"torch"`` backend
(``benchmarks/RESULTS.md``, "Engine on a GPU", calls 1 and 2), which is why ``"auto"`` picks it on
CUDA devices. It also runs on CPU tensors under ``TRITON_INTERPRET=1`` (the tests use that).
"""

from __future__ import annotations

import functools
import os

import torch

from ..gpu_kernel import HAVE_TRITON, windowed_pseudo_voigt_sum_triton
from .compiled import CompiledBackend

__all__ = ["TritonBackend"]


class TritonBackend(CompiledBackend):
    """Triton's kernels over chunks of each line's window (CUDA tensors)."""

    name = "triton"

    def runs_on(self, device: torch.device) -> bool:
        """CUDA tensors where triton is installed; CPU tensors too under ``TRITON_INTERPRET=1``."""
        if not HAVE_TRITON:
            return False
        return torch.device(device).type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"

    def kernel(self, engine):
        """:func:`..gpu_kernel.windowed_pseudo_voigt_sum_triton` with the engine's chunk length and warps."""
        return functools.partial(windowed_pseudo_voigt_sum_triton, chunk=engine.chunk, num_warps=engine.num_warps)
