"""Frames at the boundary of a fit (issue 21): air or vacuum wavelengths, a velocity tagged on the
spectral axis, the observatory or barycentric frame, and outputs that keep the input's identity
(class, list class, ``meta``, axis and tag) so that muler's methods keep working.

Each test failed on the code before issue 21: ``fit_spectrum`` took no ``air``/``frame``/
``barycentric_correction``; air data fitted 82 km/s off; a tagged velocity was ignored and dropped
from the outputs; a muler ``HPFSpectrumList`` came back as a plain ``SpectrumList`` (no ``.stitch()``);
and nothing reported a barycentric RV.
"""

from __future__ import annotations

import warnings

import astropy.units as u
import numpy as np
import pytest
from conftest import SHARED_DATA, _need
from specutils import Spectrum, SpectrumList

from blase_specutils import fit_spectrum, load_blase03, read_spectrum
from blase_specutils.core.clone import SPEED_OF_LIGHT_KMS
from blase_specutils.fitting import FitFlagWarning
from blase_specutils.frames import barycentric_correction, barycentric_rv, prepare_orders

#: Real fits, seconds each: outside the quick set (-m "not slow and not gpu and not medium").
pytestmark = pytest.mark.medium

WASP69 = SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"
GOLDILOCKS = SHARED_DATA / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits"
#: A quick template-matching fit: enough to place the RV to ~0.1 km/s on 700 px of WASP 69.
QUICK = dict(line_epochs=0, template_epochs=40, rv_range=120, progress=False)


def _morton_n(vac_angstrom):
    """Refractive index of standard air, Morton (2000) Eq. 8, written out here independently of the package."""
    s2 = (1e4 / np.asarray(vac_angstrom, dtype=np.float64)) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def _fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitFlagWarning)  # v sin i of WASP 69 is below HPF's resolution
        return fit_spectrum(*args, **kwargs)


@pytest.fixture(scope="module")
def wasp69_cut():
    """40 Å of the WASP 69 HPF stack (8680-8720 Å, 697 px), vacuum, as read."""
    s = read_spectrum(_need(WASP69))
    w = s.spectral_axis.to_value(u.AA)
    k = np.flatnonzero((w > 8680.0) & (w < 8720.0))
    return s[int(k[0]) : int(k[-1]) + 1]


@pytest.fixture(scope="module")
def clone4700(blase03_clone_path):
    return load_blase03(blase03_clone_path)


@pytest.fixture(scope="module")
def vacuum_fit(wasp69_cut, clone4700):
    return _fit(wasp69_cut, clone4700, **QUICK)


def _plain(spec: Spectrum, axis, **kw) -> Spectrum:
    return Spectrum(spectral_axis=axis, flux=spec.flux, uncertainty=spec.uncertainty, **kw)


# ------------------------------------------------------------------------------ air and vacuum
def test_air_data_fit_to_the_vacuum_rv(wasp69_cut, clone4700, vacuum_fit):
    vac = wasp69_cut.spectral_axis.to_value(u.AA)
    air_axis = vac / _morton_n(vac) * u.AA  # the same photons, labelled in air wavelengths (2.4 Å shorter)
    air = _plain(wasp69_cut, air_axis)
    told = _fit(air, clone4700, air=True, **QUICK)
    said = _fit(_plain(wasp69_cut, air_axis, meta={"AIRORVAC": "air"}), clone4700, **QUICK)
    rv0 = vacuum_fit.rv.to_value(u.km / u.s)
    for r in (told, said):
        # before issue 21 air data fitted 82 km/s off (−92.7 km/s for −10.4 km/s)
        assert r.rv.to_value(u.km / u.s) == pytest.approx(rv0, abs=0.05)
        assert r.frames.air and r.summary()["air"] is True
        assert r.summary()["wavelength_frame"] == "vacuum (converted from air)"
        assert "vacuum (converted from air)" in repr(r)
        # the model comes back on the user's own (air) axis, pixel for pixel
        m = r.model_spectrum
        np.testing.assert_array_equal(m.spectral_axis.to_value(u.AA), air_axis.value)
        assert np.allclose(r.wavelength, vac, rtol=0, atol=1e-8)
    assert vacuum_fit.summary()["air"] is False


# ------------------------------------------------------------------------------ tagged velocities
def test_a_tagged_velocity_is_the_known_part_of_the_rv(wasp69_cut, clone4700, vacuum_fit):
    tagged = _plain(wasp69_cut, wasp69_cut.spectral_axis.to_value(u.AA) * u.AA, radial_velocity=-15.0 * u.km / u.s)
    r = _fit(tagged, clone4700, **QUICK)
    tag = SPEED_OF_LIGHT_KMS * float(tagged.spectral_axis.redshift)  # c z of the tag: −14.9996 km/s
    assert r.rv_tagged.to_value(u.km / u.s) == pytest.approx(tag, abs=1e-9)
    # the same photons give the same total; the fitted part is the rest (it was the total before)
    assert r.rv_total.to_value(u.km / u.s) == pytest.approx(vacuum_fit.rv.to_value(u.km / u.s), abs=0.05)
    assert r.rv.to_value(u.km / u.s) == pytest.approx(vacuum_fit.rv.to_value(u.km / u.s) - tag, abs=0.05)
    s = r.summary()
    assert s["rv_kms"] + s["rv_tagged_kms"] == pytest.approx(s["rv_total_kms"], abs=1e-12)
    assert "tagged" in repr(r) and "total" in repr(r)
    # outputs keep the tag
    for out in (r.model_spectrum, r.residual):
        assert out.spectral_axis.radial_velocity.to_value(u.km / u.s) == pytest.approx(-15.0, abs=1e-6)
    # the semi-empirical template is at rest and says how to get to the data
    t = r.semi_empirical_template()
    assert t.spectral_axis.radial_velocity.to_value(u.km / u.s) == 0.0
    assert t.meta["rv_total_kms"] == s["rv_total_kms"] and t.meta["rv_tagged_kms"] == s["rv_tagged_kms"]


def test_orders_with_different_tags_are_refused(wasp69_cut):
    axis = wasp69_cut.spectral_axis.to_value(u.AA)
    a = _plain(wasp69_cut[:300], axis[:300] * u.AA, radial_velocity=10 * u.km / u.s)
    b = _plain(wasp69_cut[300:], axis[300:] * u.AA)
    with pytest.raises(ValueError, match="different radial velocities"):
        prepare_orders([a, b])


# ------------------------------------------------------------------------------ barycentric frame
def test_barycentric_correction_from_the_goldilocks_header():
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time, TimeDelta

    from blase_specutils.io import read_orders

    s = read_orders(_need(GOLDILOCKS), [8])[0]
    v, source = barycentric_correction(s)
    h = s.meta["header"]
    # independently: HET at 30°40'53.2"N 104°00'53.5"W, 2026 m; the target's J2000 position; mid-exposure
    het = EarthLocation.from_geodetic(-(104 + 0 / 60 + 53.5 / 3600) * u.deg, (30 + 40 / 60 + 53.2 / 3600) * u.deg,
                                      2026 * u.m)
    when = Time(h["DATE-OBS"], scale="utc") + TimeDelta(h["ITIME"] / 2, format="sec")
    expect = SkyCoord(h["QRA"], h["QDEC"], unit=(u.hourangle, u.deg)).radial_velocity_correction(
        obstime=when, location=het).to_value(u.km / u.s)
    assert v == pytest.approx(expect, abs=1e-3)  # 1 m/s
    assert -22.0 < v < -21.8
    assert "DATE-OBS" in source and "HET" in source


def test_stellar_rv_is_reported_in_both_frames(wasp69_cut, clone4700, vacuum_fit):
    # the WASP 69 stack is not a pipeline product as recorded: its frame is unstated, no barycentric RV
    s = vacuum_fit.summary()
    assert s["frame"] == "unstated" and s["rv_barycentric_kms"] is None and vacuum_fit.rv_barycentric is None
    assert s["barycentric_correction_kms"] is not None  # from its header, for the user to judge
    # stated: observatory, with the user's own correction
    r = _fit(wasp69_cut, clone4700, frame="observatory", barycentric_correction=-27.5 * u.km / u.s, **QUICK)
    rv = r.rv_total.to_value(u.km / u.s)
    assert r.rv_barycentric.to_value(u.km / u.s) == pytest.approx(rv - 27.5 + rv * -27.5 / SPEED_OF_LIGHT_KMS)
    s = r.summary()
    assert s["rv_observatory_kms"] == pytest.approx(rv) and s["barycentric_correction_kms"] == -27.5
    assert s["barycentric_source"] == "given by the user" and s["frame"] == "observatory"
    assert "barycentric RV" in repr(r)


def test_barycentric_data_are_fitted_with_tellurics_in_the_observatory_frame(hr4829_water_window, telfit_window_clone):
    """HR 4829 (HPF, a telluric standard): the same order fitted as recorded, and after muler's
    rv_shift by the barycentric correction (what barycentric_correct does) with frame='barycentric',
    gives the same telluric fit; told nothing, the shifted data fit worse."""
    bc, _ = barycentric_correction(hr4829_water_window)
    shifted = hr4829_water_window.rv_shift(bc * u.km / u.s)  # muler: λ (1 + z) with the relativistic z of bc
    assert type(shifted).__name__ == "HPFSpectrum"
    kw = dict(resolving_power=55000.0, template_epochs=60, line_epochs=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitFlagWarning)
        as_recorded = fit_spectrum(hr4829_water_window, None, telluric=telfit_window_clone, **kw)
        back = fit_spectrum(shifted, None, telluric=telfit_window_clone, frame="barycentric", **kw)
        wrong = fit_spectrum(shifted, None, telluric=telfit_window_clone, frame="observatory", **kw)
    assert as_recorded.frames.frame == "observatory"  # the default for an HPF spectrum
    assert back.frames.frame == "barycentric" and back.barycentric_correction.to_value(u.km / u.s) == pytest.approx(bc)
    assert back.telluric_power == pytest.approx(as_recorded.telluric_power, rel=2e-3)
    assert back.chi2 == pytest.approx(as_recorded.chi2, rel=2e-3)
    assert wrong.chi2 > 2.0 * as_recorded.chi2  # tellurics 22 km/s off
    # the fit checks the stated frame against the telluric lines, and says so
    assert "telluric_frame" in [f.code for f in wrong.flags]
    assert "look barycentric" in next(f.message for f in wrong.flags if f.code == "telluric_frame")
    # the wavelength correction of a telluric-only fit (on by default) tried to absorb the 22 km/s, and says so
    assert wrong.model.calibration_degree is not None
    assert "wavelength_correction_large" in [f.code for f in wrong.flags]
    assert "wavelength_correction_large" not in [f.code for f in as_recorded.flags + back.flags]
    assert "telluric_frame" not in [f.code for f in as_recorded.flags + back.flags]
    # the output is on the user's (barycentric) axis
    np.testing.assert_array_equal(back.model_spectrum.spectral_axis.value, shifted.spectral_axis.value)


def test_frame_arguments_are_checked(wasp69_cut, clone4700):
    with pytest.raises(ValueError, match="frame must be one of"):
        fit_spectrum(wasp69_cut, clone4700, frame="heliocentric", progress=False)
    with pytest.raises(ValueError, match="needs the barycentric correction"):
        fit_spectrum(_plain(wasp69_cut, wasp69_cut.spectral_axis.to_value(u.AA) * u.AA), clone4700,
                     frame="barycentric", progress=False)
    with pytest.raises(ValueError, match="was it in m/s"):
        fit_spectrum(wasp69_cut, clone4700, barycentric_correction=-21900.0, progress=False)
    with pytest.raises(u.UnitsError, match="must be a velocity"):
        fit_spectrum(wasp69_cut, clone4700, barycentric_correction=3 * u.AA, progress=False)
    assert barycentric_rv(10.0, 0.0) == 10.0


# ------------------------------------------------------------------------------ muler identity
def test_a_muler_list_comes_back_as_a_muler_list_that_stitches(telfit_window_clone):
    from muler.hpf import HPFSpectrumList

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = HPFSpectrumList.read(str(_need(GOLDILOCKS)))
        data = HPFSpectrumList([raw[k].remove_nans().deblaze().normalize() for k in (8, 9)])
        r = fit_spectrum(data, None, telluric=telfit_window_clone, template_epochs=10, line_epochs=0, progress=False)
    for out in (r.model_spectrum, r.residual):
        assert type(out) is HPFSpectrumList  # a plain SpectrumList before issue 21
        assert [type(s).__name__ for s in out] == ["HPFSpectrum", "HPFSpectrum"]
        for s, d in zip(out, data):
            assert s.meta["header"]["DATE-OBS"] == d.meta["header"]["DATE-OBS"]
            assert s.astropy_time == d.astropy_time
            np.testing.assert_array_equal(s.spectral_axis.value, d.spectral_axis.value)
        stitched = out.stitch()
        assert type(stitched).__name__ == "HPFSpectrum" and stitched.flux.size == sum(d.flux.size for d in data)
    # a plain list of orders still gives a SpectrumList, one plain order a Spectrum
    plain = fit_spectrum(list(data), None, telluric=telfit_window_clone, template_epochs=2, line_epochs=0,
                         progress=False)
    assert type(plain.model_spectrum) is SpectrumList
