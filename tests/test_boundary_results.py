"""The transfer-result file at the boundary (issue 21): an atomic save, layout 3 with the frames of
the fit, layout-2 files still read, and a loader that names the file and the field of whatever is
damaged.

Each test failed on the code before issue 21: ``TransferResult.save`` wrote in place (a failed
save destroyed the previous file and left a half file that loaded as a clone), there was no layout
3 and no frames, and damaged files raised IndexError, JSONDecodeError or loaded silently wrong
(``ORDERS.n_pixels`` edited to 10 gave a 10-pixel model for 348 pixels of data).
"""

from __future__ import annotations

import errno
import json
import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from conftest import SHARED_DATA, _need
from specutils import Spectrum

import blase_specutils.fitting as fitting
from blase_specutils import SpectralClone, TransferResult, fit_spectrum, load_blase03, read_spectrum
from blase_specutils.fitting import FitFlagWarning
from blase_specutils.io import SavedFileError
from blase_specutils.results_file import RESULT_FORMAT_VERSION

#: Real fits, seconds each: outside the quick set (-m "not slow and not gpu and not medium").
pytestmark = pytest.mark.medium

WASP69 = SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"


@pytest.fixture(scope="module")
def stellar_result(blase03_clone_path):
    """A quick fit of 20 Å of WASP 69, tagged with -10 km/s, with a barycentric correction given."""
    s = read_spectrum(_need(WASP69))
    w = s.spectral_axis.to_value(u.AA)
    k = np.flatnonzero((w > 8690.0) & (w < 8710.0))
    cut = s[int(k[0]) : int(k[-1]) + 1]
    tagged = Spectrum(spectral_axis=cut.spectral_axis.to_value(u.AA) * u.AA, flux=cut.flux,
                      uncertainty=cut.uncertainty, radial_velocity=-10 * u.km / u.s, meta={"AIRORVAC": "vac"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitFlagWarning)
        return fit_spectrum(tagged, load_blase03(blase03_clone_path), rv_range=40, template_epochs=10, line_epochs=0,
                            frame="observatory", barycentric_correction=-27.5, progress=False)


@pytest.fixture(scope="module")
def telluric_result(hr4829_water_window, telfit_window_clone):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitFlagWarning)
        return fit_spectrum(hr4829_water_window, None, telluric=telfit_window_clone, template_epochs=5,
                            line_epochs=3, progress=False)


@pytest.fixture
def saved(stellar_result, tmp_path):
    return stellar_result.save(tmp_path / "fit.fits")


@pytest.fixture
def saved_telluric(telluric_result, tmp_path):
    return telluric_result.save(tmp_path / "telluric.fits")


def _rewrite(src, dst, edit):
    """Copy a FITS file, applying ``edit(hdul)`` to it in memory."""
    with fits.open(src) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    edit(hdul)
    hdul.writeto(dst, overwrite=True)
    return dst


# ------------------------------------------------------------------------------ layout 3 and 2
def test_layout_3_round_trip_keeps_the_frames(stellar_result, saved):
    with fits.open(saved) as hdul:
        assert hdul[0].header["TRFMTVER"] == RESULT_FORMAT_VERSION == 3
        assert json.loads(hdul["TRANSFER"].header["FRAMES"])["frame"] == "observatory"
    back = TransferResult.load(saved)
    for name in ("rv", "rv_tagged", "rv_total", "rv_barycentric", "barycentric_correction"):
        assert getattr(back, name).to_value(u.km / u.s) == getattr(stellar_result, name).to_value(u.km / u.s)
    assert back.rv_tagged.to_value(u.km / u.s) == pytest.approx(-10.0, abs=0.01)
    assert back.frames.to_dict() == stellar_result.frames.to_dict()
    s0, s1 = stellar_result.summary(), back.summary()
    for key in ("rv_kms", "rv_total_kms", "rv_barycentric_kms", "frame", "wavelength_frame", "air", "chi2"):
        assert s1[key] == s0[key]


def test_layout_2_files_still_load(stellar_result, saved, tmp_path):
    def to_layout_2(hdul):
        hdul[0].header["TRFMTVER"] = 2
        del hdul[0].header["TELINST"]
        for key in ("FRAMES", "OUTLIERS"):
            del hdul["TRANSFER"].header[key]
        data = hdul["DATA"]
        cols = [c for c in data.columns if c.name != "outlier"]
        hdul["DATA"] = fits.BinTableHDU.from_columns(cols, name="DATA")

    old = _rewrite(saved, tmp_path / "layout2.fits", to_layout_2)
    back = TransferResult.load(old)
    # layout 2 knew no tag: its RV is the model's, the total
    assert back.rv.to_value(u.km / u.s) == pytest.approx(stellar_result.rv_total.to_value(u.km / u.s), abs=1e-9)
    assert back.frames.frame == "unstated" and back.rv_barycentric is None
    assert "layout-2" in back.frames.barycentric_source
    assert back.chi2 == stellar_result.chi2
    np.testing.assert_array_equal(back.model_flux, stellar_result.model_flux)


def test_layout_1_and_newer_layouts_are_refused_by_name(saved, tmp_path):
    def layout_1(hdul):
        hdul[0].header["TRFMTVER"] = 1
        del hdul["TRANSFER"]

    old = _rewrite(saved, tmp_path / "layout1.fits", layout_1)
    with pytest.raises(SavedFileError, match="layout-1 result.*SpectralClone.load") as err:
        TransferResult.load(old)
    assert err.value.field == "TRFMTVER" and "layout1.fits" in str(err.value)
    assert SpectralClone.load(old).n_lines > 0
    new = _rewrite(saved, tmp_path / "layout9.fits", lambda h: h[0].header.__setitem__("TRFMTVER", 9))
    with pytest.raises(SavedFileError, match="newer blase_specutils"):
        TransferResult.load(new)


def test_telluric_result_round_trip(telluric_result, saved_telluric):
    back = TransferResult.load(saved_telluric)
    assert back.telluric_power == telluric_result.telluric_power
    assert back.frames.frame == "observatory"  # an HPF spectrum
    np.testing.assert_array_equal(back.model_flux, telluric_result.model_flux)


# ------------------------------------------------------------------------------ damaged files
def _set_column(ext, name, index, value):
    def edit(hdul):
        hdul[ext].data[name][index] = value
    return edit


def _drop_column(ext, name):
    def edit(hdul):
        cols = [c for c in hdul[ext].columns if c.name != name]
        header = hdul[ext].header
        new = fits.BinTableHDU.from_columns(cols, name=ext)
        for key in ("SETTINGS", "FLAGS", "FRAMES", "OUTLIERS"):
            if key in header:
                new.header[key] = header[key]
        hdul[ext] = new
    return edit


def _set_header(ext, key, value):
    def edit(hdul):
        hdul[ext].header[key] = value
    return edit


@pytest.mark.parametrize("name, edit, field", [
    ("npix", _set_column("ORDERS", "n_pixels", 0, 10), "ORDERS.n_pixels"),
    ("order", _set_column("ORDERS", "order", 0, 3), "ORDERS.order"),
    ("rv", _set_column("TRANSFER", "rv", 0, np.nan), "TRANSFER.rv"),
    ("maxvsini", _set_column("TRANSFER", "max_vsini", 0, -1.0), "TRANSFER.max_vsini"),
    ("model", _drop_column("DATA", "model"), "DATA.model"),
    ("wl", _set_column("DATA", "wavelength", 5, np.inf), "DATA.wavelength"),
    ("prior", _set_column("PRIOR", "log_amplitudes", 0, 50.0), "PRIOR.log_amplitudes"),
    ("flags", _set_header("TRANSFER", "FLAGS", "[{not json"), "TRANSFER.FLAGS"),
    ("flagkeys", _set_header("TRANSFER", "FLAGS", '[{"what": 1}]'), "TRANSFER.FLAGS"),
    ("settings", _set_header("TRANSFER", "SETTINGS", "[1, 2]"), "TRANSFER.SETTINGS"),
    ("frames", _set_header("TRANSFER", "FRAMES", '{"frame": "heliocentric"}'), "TRANSFER.FRAMES"),
    ("hasstel", _set_header("PRIMARY", "HASSTEL", "T"), "HASSTEL"),
    ("continuum", lambda h: h.__setitem__("CONTINUUM", fits.ImageHDU(np.zeros((1, 9)), name="CONTINUUM")),
     "CONTINUUM"),
    ("orders", lambda h: h.__delitem__("ORDERS"), "ORDERS"),
])
def test_damaged_result_files_name_the_file_and_the_field(saved, tmp_path, name, edit, field):
    _refused_naming(saved, tmp_path / f"bad_{name}.fits", edit, field)


def _refused_naming(src, bad, edit, field):
    """The file damaged by ``edit`` is refused with a SavedFileError naming it and ``field``."""
    _rewrite(src, bad, edit)
    with pytest.raises(SavedFileError) as err:
        TransferResult.load(bad)
    assert err.value.field == field, str(err.value)
    assert bad.name in str(err.value)


@pytest.mark.parametrize("name, edit, field", [
    ("tlines", _set_column("TLINES", "log_sigma", 0, -800.0), "TLINES.log_sigma"),
    ("tprior", _drop_column("TPRIOR", "log_gammas"), "TPRIOR.log_gammas"),
    ("twing", lambda h: h.__delitem__("TWING"), "TWING"),
])
def test_damaged_telluric_parts_are_named(saved_telluric, tmp_path, name, edit, field):
    _refused_naming(saved_telluric, tmp_path / f"bad_{name}.fits", edit, field)


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.95])
def test_truncated_or_garbage_result_files(saved, tmp_path, cut):
    raw = saved.read_bytes()
    bad = tmp_path / "cut.fits"
    bad.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(SavedFileError, match="cut.fits"):
        TransferResult.load(bad)
    junk = tmp_path / "junk.fits"
    junk.write_bytes(raw[:2880] + bytes(range(256)) * 40)
    with pytest.raises(SavedFileError, match="junk.fits"):
        TransferResult.load(junk)


# ------------------------------------------------------------------------------ atomic save
def test_a_failed_result_save_leaves_the_previous_file(stellar_result, saved, monkeypatch):
    before = saved.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fitting, "_prior_hdu", disk_full)  # dies half-way: after the lines were written
    with pytest.raises(OSError, match="No space left"):
        stellar_result.save(saved, overwrite=True)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no temporary file left
    assert TransferResult.load(saved).rv == stellar_result.rv
    with pytest.raises(FileExistsError):
        stellar_result.save(saved)
