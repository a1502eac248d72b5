"""Shared fixtures: the real data in ../shared/data and small real spectra from muler's templates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N processes share the cores, one torch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

#: Tests marked ``medium`` here (besides those marked in their own files): each takes seconds to a
#: minute on 2 cores (Triton kernels under the interpreter, Dask clusters, notebooks, subprocesses
#: that import the package afresh, fits of real data). The quick set leaves them out:
#: ``python -m pytest -m "not slow and not gpu and not medium"`` (under 3 minutes on 2 cores); the
#: default run, which ``.ci/run`` uses, keeps them. Entries are "file::test name" prefixes, or a file.
MEDIUM = (
    "tests/core/test_triton_compile.py::test_every_kernel_compiles",
    "tests/core/test_triton_compile.py::test_compiled_kernels_do_no_float32_arithmetic",
    "tests/core/test_triton_compile.py::test_per_pixel_kernels_fit_in_registers",
    "tests/core/test_plan.py::test_planned_gpu_code_path_never_synchronises",
    "tests/core/test_plan.py::test_triton_far_field_of_a_plan_matches_its_torch_operations",
    "tests/core/test_plan.py::test_triton_line_kernel_of_the_plan_update_matches_its_torch_operations",
    "tests/core/test_gpu_kernel.py::test_triton_kernel_matches_the_compiled_cpu_kernel",
    "tests/core/test_gpu_kernel.py::test_triton_spreading_matches_the_compiled_cpu_spreading",
    "tests/core/test_transfer.py::test_transfer_epoch_on_the_gpu_code_path_never_synchronises",
    "tests/test_batch.py::test_cluster_results_identical_to_serial",
    "tests/test_batch.py::test_cli_fit_many_local_cluster",
    "tests/test_batch.py::test_worker_killed_mid_batch",
    "tests/test_batch.py::test_fit_many_wasp69_on_cluster_equals_serial",
    "tests/test_batch.py::test_clone_grid_airmass_follows_beers_law",
    "tests/test_batch.py::test_corrupt_file_fails_only_its_item",
    "tests/test_notebooks.py::test_notebook_runs",
    "tests/test_blase03.py::test_dense_evaluation_matches_flux_dense",
    "tests/test_blase03.py::test_shifted_by_500_kms_is_as_accurate",
    "tests/test_gp.py::test_clear_import_error_without_gpytorch",
    "tests/test_bayes.py",
    "tests/test_boundary_frames.py::test_air_data_fit_to_the_vacuum_rv",
    "tests/test_star_import.py::test_star_import",
)


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(config, items):
    """Mark the tests listed in :data:`MEDIUM` with ``medium``."""
    for item in items:
        node = item.nodeid.split("[")[0]
        if any(node == m or node.startswith(m) for m in MEDIUM):
            item.add_marker(pytest.mark.medium)
#: The project's shared data: ../shared/data next to the checkout, or where BLASE_SHARED_DATA points
#: (a GPU machine that has only the files it was sent).
SHARED_DATA = Path(os.environ.get("BLASE_SHARED_DATA", ROOT.parent / "shared" / "data"))
BLASE03_CLONE = SHARED_DATA / "clones" / "blase03_T4700g4p5_prom0p01_HPF.pt"
BLASE03_REFERENCE = SHARED_DATA / "reference" / "blase03_T4700g4p5_HPF_forward.npz"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared/data folder is not next to this checkout)")
    return path


@pytest.fixture(scope="session")
def blase03_clone_path() -> Path:
    return _need(BLASE03_CLONE)


@pytest.fixture(scope="session")
def blase03_reference():
    import numpy as np

    return np.load(_need(BLASE03_REFERENCE))


@pytest.fixture(scope="session")
def phoenix_10k():
    from blase_specutils import load_template

    return load_template("phoenix-10kK-hpf")


@pytest.fixture(scope="session")
def phoenix_subband_clone(phoenix_10k):
    """A real clone of 150 Å of the PHOENIX 10 kK template between Paschen δ and γ, 150 epochs."""
    import astropy.units as u

    from blase_specutils import clone_spectrum

    return clone_spectrum(phoenix_10k, band=(10500, 10650) * u.AA, buffer=10 * u.AA, teff=10000 * u.K,
                          prominence=0.01, epochs=150, progress=False)


@pytest.fixture(scope="session")
def telfit_window_clone():
    """A real clone of 40 Å of muler's TelFit telluric template (water lines near 9085 Å), centres
    tuned (the template is sampled at HPF pixels, so detected centres sit on that grid), 80 epochs."""
    import astropy.units as u

    from blase_specutils import clone_spectrum, load_template

    return clone_spectrum(load_template("telfit-hpf"), band=(9065, 9105) * u.AA, buffer=5 * u.AA, flatten=False,
                          prominence=0.01, epochs=80, progress=False,
                          tune=("amplitude", "sigma", "gamma", "center"))


@pytest.fixture(scope="session")
def hr4829_water_window():
    """30 Å of the HR 4829 HPF Goldilocks order 8 (9070-9100 Å, water lines, no stellar lines),
    reduced with muler's remove_nans().deblaze().normalize()."""
    import numpy as np

    from blase_specutils.io import read_orders

    path = _need(SHARED_DATA / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits")
    s = read_orders(path, [8])[0]
    w = s.spectral_axis.to_value("AA")
    idx = np.flatnonzero((w > 9070.0) & (w < 9100.0))
    return s[int(idx[0]) : int(idx[-1]) + 1]


@pytest.fixture(scope="session")
def moog4250():
    """The MOOG/MARCS 4250 K K-dwarf synthesis (vacuum Å, ``wave_vac``, ``flux_norm``) as a dict of arrays."""
    import numpy as np

    with np.load(_need(SHARED_DATA / "synthetic" / "moog_T4250_g4.5_feh0_vac.npz")) as d:
        return {"wave_vac": d["wave_vac"], "flux_norm": d["flux_norm"].astype(np.float64)}
