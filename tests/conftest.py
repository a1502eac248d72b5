"""Shared fixtures: the real data in ../shared/data and small real spectra from muler's templates."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
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
