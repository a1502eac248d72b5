"""Batches at the boundary (issue 21): one path is one job, not one job per character.

Before issue 21, ``fit_many("one/path.fits", clone)`` ran ``len(path)`` jobs, one per character.
"""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from specutils import Spectrum

from blase_specutils import clone_many, fit_many
from blase_specutils.cloning import SpectralClone
from blase_specutils.core.clone import LineCloneModel


@pytest.fixture(scope="module")
def tiny_clone() -> SpectralClone:
    return SpectralClone(LineCloneModel([8700.0, 8705.0], [-3.0, -3.0], [-2.5, -2.5], [-3.0, -3.0]))


@pytest.mark.parametrize("as_path", [False, True])
def test_fit_many_takes_one_path_as_one_job(tiny_clone, tmp_path, as_path):
    missing = tmp_path / "nowhere" / "one_file.fits"
    res = fit_many(missing if as_path else str(missing), tiny_clone, progress=False)
    assert len(res) == 1, f"{len(res)} jobs for one path"
    rec = res[0]
    assert not rec.ok and rec.label == "one_file" and "no such file" in rec.error


def test_clone_many_takes_one_path_or_one_spectrum_as_one_job(tmp_path):
    res = clone_many(str(tmp_path / "missing.fits"), progress=False)
    assert len(res) == 1 and not res[0].ok and "no such file" in res[0].error
    wl = np.linspace(8700.0, 8702.0, 9)
    one = Spectrum(spectral_axis=wl * u.AA, flux=np.ones(9) * u.one, meta={"name": "flat"})
    res = clone_many(one, progress=False, epochs=0, residual_passes=0)
    assert len(res) == 1 and res[0].label == "flat_0"


def test_a_dict_of_inputs_is_refused_clearly(tiny_clone):
    with pytest.raises(TypeError, match="not a dict"):
        fit_many({"a": Path("x.fits")}, tiny_clone, progress=False)


@pytest.mark.parametrize("kw, error, match", [
    (dict(frame="heliocentric"), ValueError, "frame must be one of"),
    (dict(air="yes"), TypeError, "air must be True"),
    (dict(barycentric_correction=-21900.0), ValueError, "was it in m/s"),
    (dict(resolving_power=5), ValueError, "resolving_power must be >= 1000"),
])
def test_fit_many_checks_frame_settings_before_any_job(tiny_clone, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        fit_many([str(tmp_path / "a.fits"), str(tmp_path / "b.fits")], tiny_clone, progress=False, **kw)


def test_clone_many_takes_clone_settings_with_its_own_device_and_progress():
    from blase_specutils.clone_settings import CloneSettings

    wl = np.linspace(8700.0, 8702.0, 201)
    flux = 1.0 - 0.5 * np.exp(-0.5 * ((wl - 8701.0) / 0.05) ** 2)
    one = Spectrum(spectral_axis=wl * u.AA, flux=flux * u.one, meta={"name": "one line"})
    settings = CloneSettings(epochs=0, residual_passes=0, flatten=False)
    res = clone_many(one, progress=False, device="cpu", settings=settings)
    assert len(res) == 1 and res[0].ok, res[0].error
    assert res[0].summary["n_lines"] == 1
