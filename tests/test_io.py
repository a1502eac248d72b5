import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table

from blase_specutils import read_spectrum
from conftest import SHARED_DATA, _need


def test_reads_the_wasp69_hpf_table():
    path = _need(SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits")
    s = read_spectrum(path)
    assert s.flux.size == 2048
    wl = s.spectral_axis.to_value(u.AA)
    assert 8650 < wl.min() < wl.max() < 8770
    assert s.uncertainty is not None
    snr = np.nanmedian(s.flux.value / s.uncertainty.array)
    assert 100 < snr < 1000


def test_unitless_table_warns_and_assumes_angstrom(tmp_path):
    t = Table({"wave": [5000.0, 5000.1, 5000.2], "flux": [1.0, 0.9, 1.0]})
    path = tmp_path / "t.ecsv"
    t.write(path)
    with pytest.warns(UserWarning, match="assuming Å"):
        s = read_spectrum(path)
    assert s.spectral_axis.unit == u.AA


def test_unreadable(tmp_path):
    bad = tmp_path / "x.fits"
    bad.write_bytes(b"nope" * 100)
    with pytest.raises(ValueError, match="could not read"):
        read_spectrum(bad)
    with pytest.raises(FileNotFoundError):
        read_spectrum(tmp_path / "missing.fits")
    t = Table({"a": [1.0, 2.0], "b": [1.0, 2.0]})
    t.write(tmp_path / "ab.ecsv")
    with pytest.raises(ValueError, match="no wavelength and flux columns"):
        read_spectrum(tmp_path / "ab.ecsv")
