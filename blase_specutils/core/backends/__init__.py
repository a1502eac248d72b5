r"""The backends that put lines onto pixels, one module each, and the rule that picks one.

Every backend follows the :class:`~.base.Backend` protocol: ``add_lines(out, wavelength, lines,
windows, mode=, sign=, near=, engine=)`` adds the log-flux terms of a set of lines, each over its
window, onto a running sum, differentiably. The engine (:func:`..engine.windowed_log_flux`) finds
the windows and the far field; the backend only sums.

========== ============================================ ==================================
name       what                                         picked
========== ============================================ ==================================
dense      every line at every pixel (the reference)    never (``dense=True``, tests)
autograd   bucketed torch operations, plain autograd    wing-corrected lines; profiles the
                                                        fused backends lack; ``fused=False``
torch      bucketed, fused, blocked torch operations    no numba on a CPU, no Triton on a GPU
numba      compiled CPU loops (:mod:`..cpu_kernel`)     CPUs
triton     Triton kernels (:mod:`..gpu_kernel`)         CUDA devices
========== ============================================ ==================================

:func:`select_backend` is the one place that picks (see its docstring for the timings).
"""

from __future__ import annotations

import torch

from .autograd import AutogradBackend
from .base import Backend, LineSet, NearField, Windows, line_terms
from .dense import DenseBackend, dense_log_flux
from .numba_cpu import NumbaBackend
from .torch_blocked import TorchBlockedBackend
from .triton_gpu import TritonBackend

__all__ = ["Backend", "LineSet", "Windows", "NearField", "line_terms", "dense_log_flux", "BACKEND_CLASSES",
           "get_backend", "select_backend", "auto_backend_name"]

#: The backends by name (one instance each is made by :func:`get_backend`).
BACKEND_CLASSES = {cls.name: cls for cls in (DenseBackend, AutogradBackend, TorchBlockedBackend, NumbaBackend,
                                             TritonBackend)}

_INSTANCES: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (stateless: one shared instance per name)."""
    if name not in BACKEND_CLASSES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(map(repr, BACKEND_CLASSES))}")
    if name not in _INSTANCES:
        _INSTANCES[name] = BACKEND_CLASSES[name]()
    return _INSTANCES[name]


def auto_backend_name(device: torch.device | str, dtype: torch.dtype | None = None, n_lines: int | None = None,
                      n_pixels: int | None = None) -> str:
    """The backend ``"auto"`` means on ``device`` (the rule of :func:`select_backend`)."""
    if torch.device(device).type == "cpu":
        return "numba" if get_backend("numba").runs_on(device) else "torch"
    return "triton" if get_backend("triton").runs_on(device) else "torch"


def select_backend(engine, device: torch.device | str, dtype: torch.dtype | None = None, n_lines: int | None = None,
                   n_pixels: int | None = None) -> Backend:
    """The backend that sums the plain lines of a model: the one rule, applied once per model.

    ``engine.backend`` when it names one; for ``"auto"``:

    ======== ================ ================ ===========================================
    device   installed        backend          timing (``benchmarks/RESULTS.md``)
    ======== ================ ================ ===========================================
    CPU      numba            ``numba``        HPF problem, 2 cores: 80 ms/epoch ("far-field
                                               (default), float64") against 327 ms ("torch
                                               kernel, on this CPU"); float32 83 ms
    CPU      no numba         ``torch``        the only fused CPU path left
    CUDA     triton           ``triton``       H200, call 2: 15.0 ms ("far-field (default)")
                                               against 117 ms ("torch kernel"); call 1: 10.6
                                               against 65 ms; float32 16.0 ms
    CUDA     no triton        ``torch``        the only fused GPU path left
    ======== ================ ================ ===========================================

    The dtype and the problem size do not change the choice: float32 and float64 rank the
    backends alike on both devices (the float32 rows above), and on a 200-line, 20,000-pixel
    problem numba still wins on a CPU: 6.7 ms per epoch against 19.7 (torch) and 22.1 (autograd)
    (``engine_speed.py --small``; ``benchmarks/RESULTS.md``, "Backends behind one interface"). A named backend that cannot run on ``device`` falls back to ``"torch"``, except
    ``"triton"``, which raises (it was asked for a device it has no kernels for).

    Parameters
    ----------
    engine : EngineOptions
        The model's options (``engine.backend``: ``"auto"`` or a backend's name).
    device : torch.device or str
        Where the model's tensors live.
    dtype : torch.dtype, optional
        The model's working dtype.
    n_lines, n_pixels : int, optional
        The problem's size.

    Returns
    -------
    Backend
    """
    name = engine.backend
    if name == "auto":
        name = auto_backend_name(device, dtype, n_lines, n_pixels)
    backend = get_backend(name)
    if not backend.runs_on(device):
        if name == "triton":
            raise ValueError("backend 'triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); "
                             "use 'numba' or 'auto' on a CPU")
        return get_backend("torch")
    return backend
