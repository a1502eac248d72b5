"""Shared fixtures: the real data in ../shared/data and small real spectra from muler's templates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
