"""Engine options: which code computes a clone's lines, chosen once and carried by the model.

Every choice of code path or kernel setting of the engine lives in one frozen
:class:`EngineOptions` value. A model (:class:`~.clone.LineCloneModel`,
:class:`~.transfer.TransferModel`) holds one and passes it down to the engine, the far field, the
window plans and the kernels, so that two models in one process can hold two settings and a test
cannot leave a setting behind for the tests after it.

The backend that ``backend="auto"`` picks (:func:`.backends.select_backend`, the one rule) follows
the timings of ``benchmarks/RESULTS.md``: on CPUs the compiled numba loops where numba is installed (the
paper's HPF problem: 80-93 ms per epoch on 2 cores, against 327 ms with blocked torch
operations); on CUDA devices the Triton kernel where triton is installed (9-15 ms per epoch on an
H200 against 65-117 ms with blocked torch operations); blocked torch operations otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .cpu_kernel import HAVE_NUMBA

__all__ = ["EngineOptions", "BACKENDS"]

#: The names a backend may be given (``"auto"`` picks one of the others).
BACKENDS = ("auto", "numba", "triton", "torch", "autograd")


def _check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"EngineOptions.{name} must be True or False, got {value!r}")


def _check_power_of_two(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"EngineOptions.{name} must be a power of two >= 1, got {value!r}")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine computes the line sums: one validated, immutable value.

    Parameters
    ----------
    backend : {"auto", "numba", "triton", "torch", "autograd"}
        The backend (:mod:`.backends`) that sums the lines over their windows: ``"numba"``, the
        compiled CPU loops of :mod:`.cpu_kernel` (CPU tensors only); ``"triton"``, the GPU kernel
        of :mod:`.gpu_kernel` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
        ``"torch"``, blocked torch operations (:mod:`.fused`), any device; ``"autograd"``, bucketed
        torch operations through plain autograd (the slowest; what the wing-corrected lines always
        take). ``"auto"`` (default): the rule of :func:`.backends.select_backend`.
    plans_on_cuda : bool
        Whether ``plan="auto"`` (``clone_spectrum``, ``fit_transfer``) trains through window plans
        and CUDA graphs on CUDA devices. Off (default) until that path has been run and timed on a
        GPU inside training; plans are never chosen automatically on CPUs, where they bring no
        speed.
    compiled_cpu : bool
        Use numba's compiled far-field spreading, interpolation and convolutions on CPU tensors
        (where numba is installed). False runs the device-independent torch operations that GPUs
        run, on the CPU (tests use this to check those operations).
    pad_windows : bool
        Pad the compiled kernels' windows to the bucket lengths of the torch path (to compare the
        two to rounding); by default each line evaluates its own window only.
    mask_levels : bool or None
        How each far-field level takes its lines: by gathering them (False) or by zeroing the other
        levels' coefficients (True). None (default): masks on GPUs, gathers on CPUs.
    cpu_block_elements, gpu_block_elements : int
        Lines × pixels per block of the blocked torch kernel (:mod:`.fused`) on CPUs and on other
        devices.
    chunk : int
        Pixels per Triton program (a power of two). On an H200, 256 gave 1.30 ms per graphed epoch
        of the paper's problem against 1.38 ms with 512 and 1.63 ms with 1024.
    num_warps : int
        Warps per Triton program of the pseudo-Voigt kernels (a power of two).
    triton_windows : bool
        With a plan on a GPU, also find each window's pixels, check the plan and fill the chunk
        table in Triton kernels, after the one kernel that finds every line's window and level
        (not yet timed on a GPU).
    triton_coefficients : bool
        The far-field coefficients of a frozen plan in one Triton kernel each way (not yet timed on
        a GPU).
    triton_spread : bool
        Spread the lines onto the far-field level grids with one Triton kernel each way on GPUs
        (not yet timed on a GPU).
    triton_far : bool
        With a plan on a GPU, the whole far field in a few Triton kernels and batched FFTs (not yet
        timed on a GPU).

    Examples
    --------
    >>> EngineOptions(backend="torch").backend_for("cpu")
    'torch'
    """

    backend: str = "auto"
    plans_on_cuda: bool = False
    compiled_cpu: bool = True
    pad_windows: bool = False
    mask_levels: bool | None = None
    cpu_block_elements: int = 1 << 15
    gpu_block_elements: int = 1 << 24
    chunk: int = 256
    num_warps: int = 4
    triton_windows: bool = False
    triton_coefficients: bool = False
    triton_spread: bool = False
    triton_far: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"EngineOptions.backend must be one of {', '.join(map(repr, BACKENDS))}, "
                             f"got {self.backend!r}")
        for name in ("plans_on_cuda", "compiled_cpu", "pad_windows", "triton_windows", "triton_coefficients",
                     "triton_spread", "triton_far"):
            _check_bool(getattr(self, name), name)
        if self.mask_levels is not None:
            _check_bool(self.mask_levels, "mask_levels")
        for name in ("cpu_block_elements", "gpu_block_elements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineOptions.{name} must be an integer >= 1, got {value!r}")
        _check_power_of_two(self.chunk, "chunk")
        _check_power_of_two(self.num_warps, "num_warps")

    def replace(self, **changes) -> "EngineOptions":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def backend_for(self, device: torch.device | str) -> str:
        """The backend's name on ``device``: ``backend`` unless it is ``"auto"``, then the rule of
        :func:`.backends.select_backend` (numba on CPUs where it is installed, Triton on other
        devices where it is installed, else torch)."""
        if self.backend != "auto":
            return self.backend
        from .backends import auto_backend_name

        return auto_backend_name(device)

    def numba_on(self, device: torch.device | str) -> bool:
        """Whether the compiled CPU helpers (far field, convolutions) run on ``device``."""
        return self.compiled_cpu and HAVE_NUMBA and torch.device(device).type == "cpu"

    def block_elements(self, device: torch.device | str) -> int:
        """Lines × pixels per block of the blocked torch kernel on ``device``."""
        return self.cpu_block_elements if torch.device(device).type == "cpu" else self.gpu_block_elements

    def masks_levels(self, device: torch.device | str) -> bool:
        """Whether far-field levels take their lines by masks (True) or gathers (False) on ``device``."""
        return torch.device(device).type != "cpu" if self.mask_levels is None else self.mask_levels

    def describe(self, device: torch.device | str, dtype: torch.dtype) -> dict:
        """What runs: ``{"backend", "device", "dtype"}`` (JSON-ready), the backend resolved for ``device``."""
        return {"backend": self.backend_for(device), "device": str(torch.device(device)),
                "dtype": str(dtype).replace("torch.", "")}
