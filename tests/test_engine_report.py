"""What ran is visible: the clone, its file and the fit result report their engine."""

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.io import fits

from blase_specutils import SpectralClone, fit_spectrum
from blase_specutils.core import EngineOptions, LineCloneModel


def _clone(engine: EngineOptions = EngineOptions()) -> SpectralClone:
    gen = torch.Generator().manual_seed(11)
    n = 25
    c = 8601 + 48 * torch.rand(n, generator=gen, dtype=torch.float64)
    a = torch.log(0.02 + 0.05 * torch.rand(n, generator=gen, dtype=torch.float64))
    s = torch.log(0.05 + 0.03 * torch.rand(n, generator=gen, dtype=torch.float64))
    g = torch.log(0.02 + 0.03 * torch.rand(n, generator=gen, dtype=torch.float64))
    return SpectralClone(LineCloneModel(c, a, s, g, engine=engine), band=(8600.0, 8650.0))


def test_clone_reports_its_engine_and_its_file_records_the_backend(tmp_path):
    clone = _clone(EngineOptions(backend="torch"))
    assert clone.engine == {"backend": "torch", "device": "cpu", "dtype": "float64"}
    assert _clone().engine["backend"] == EngineOptions().backend_for("cpu")
    path = clone.save(tmp_path / "clone.fits")
    assert fits.getheader(path)["ENGINE"] == "torch"
    back = SpectralClone.load(path)
    assert back.meta["engine"] == "torch"  # what computed the saved clone
    assert back.engine["backend"] == EngineOptions().backend_for("cpu")  # what runs it now
    wl = np.arange(8605.0, 8645.0, 0.02) * u.AA
    # two backends (the torch one pads each window to its bucket's length): each within the
    # truncation of the untruncated sum
    dense = clone.evaluate(wl, dense=True).flux.value
    for c in (clone, back):
        np.testing.assert_allclose(c.evaluate(wl).flux.value, dense, rtol=0, atol=1e-6)
    # a clone saved again records the backend that runs it, not the one it was loaded with
    again = back.save(tmp_path / "again.fits")
    assert fits.getheader(again)["ENGINE"] == back.engine["backend"]


def test_clone_files_without_the_engine_keyword_still_load(tmp_path):
    path = _clone().save(tmp_path / "clone.fits")
    with fits.open(path) as hdul:
        del hdul[0].header["ENGINE"]
        hdul.writeto(tmp_path / "old.fits")
    back = SpectralClone.load(tmp_path / "old.fits")
    assert "engine" not in back.meta and back.n_lines == 25


def test_fit_summary_reports_the_engine():
    clone = _clone()
    wl = np.arange(8605.0, 8645.0, 0.03) * u.AA
    data = clone.evaluate(wl, radial_velocity=12.0)
    result = fit_spectrum(data, clone, template_epochs=3, line_epochs=0, rv_range=30, progress=False)
    summary = result.summary()
    assert summary["engine"] == {"backend": EngineOptions().backend_for("cpu"), "device": "cpu", "dtype": "float64"}
    assert summary["rv_kms"] == pytest.approx(12.0, abs=1.0)
