"""Fitting real échelle data with a clone: the WASP 69 HPF order and bad inputs."""

import astropy.units as u
import numpy as np
import pytest
from astropy.nddata import StdDevUncertainty
from specutils import Spectrum, SpectrumList

from blase_specutils import load_blase03, read_spectrum
from blase_specutils.fitting import MissingUncertaintyWarning, TransferResult, fit_spectrum
from conftest import SHARED_DATA, _need


@pytest.fixture(scope="module")
def wasp69():
    return read_spectrum(_need(SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"))


@pytest.fixture(scope="module")
def clone4700(blase03_clone_path):
    return load_blase03(blase03_clone_path)


@pytest.fixture(scope="module")
def template_fit(wasp69, clone4700):
    return fit_spectrum(wasp69, clone4700, line_epochs=0, template_epochs=150, rv_range=60, progress=False)


def test_template_matching_on_wasp69(template_fit, wasp69):
    r = template_fit
    assert isinstance(r, TransferResult)
    # WASP 69's systemic velocity is about -9.6 km/s; the untuned clone leaves χ²_red of hundreds
    assert -11.0 < r.rv.to_value(u.km / u.s) < -8.0
    assert 100 < r.template["chi2_reduced"] < 1000
    assert r.rv.unit == u.km / u.s and r.vsini.unit == u.km / u.s
    m = r.model_spectrum
    assert isinstance(m, type(wasp69))
    np.testing.assert_allclose(m.spectral_axis.value, wasp69.spectral_axis.value)
    d = wasp69 - m  # data - model chains as specutils arithmetic
    assert np.nanstd(d.flux.value) == pytest.approx(np.nanstd(r.residual.flux.value), rel=1e-6)


def test_result_products(template_fit, tmp_path):
    r = template_fit
    t = r.lines
    assert len(t) == r.model.stellar.n_lines and t["center"].unit == u.AA
    assert np.all(t["delta_ln_amplitude"] == 0)  # template matching leaves the lines alone
    tmpl = r.semi_empirical_template()
    assert tmpl.flux.size == r.model.lam_z.numel()
    s = r.summary()
    assert s["n_lines_changed"] == 0 and s["chi2_reduced"] == pytest.approx(r.chi2_reduced)
    fig = r.plot()
    fig.savefig(tmp_path / "fit.png")
    import matplotlib.pyplot as plt

    # a band in any spectral unit (here wavenumbers) gives the same panel as in Å
    in_aa = r.plot(band=(8670, 8680) * u.AA)
    in_wavenumber = r.plot(band=(1e8 / 8680, 1e8 / 8670) / u.cm)
    np.testing.assert_allclose(in_wavenumber.axes[0].lines[0].get_xdata(), in_aa.axes[0].lines[0].get_xdata())
    plt.close("all")
    with pytest.raises(TypeError, match="band must be a pair of wavelengths with units"):
        r.plot(band=(8670, 8680))
    with pytest.raises(ValueError, match=r"band 5000-5010 Å holds 0 data pixel.*the data cover"):
        r.plot(band=(5000, 5010) * u.AA)
    path = r.save(tmp_path / "fit.fits")
    from blase_specutils import SpectralClone

    back = SpectralClone.load(path)
    assert back.n_lines == r.model.stellar.n_lines
    assert back.meta["rv_kms"] == pytest.approx(r.rv.value)


def test_bad_inputs(wasp69, clone4700):
    wl = wasp69.spectral_axis
    far = Spectrum(spectral_axis=wl + 20000 * u.AA, flux=wasp69.flux, uncertainty=wasp69.uncertainty)
    with pytest.raises(ValueError, match="no lines within the data range"):
        fit_spectrum(far, clone4700, line_epochs=0, template_epochs=1, progress=False)
    allnan = Spectrum(spectral_axis=wl, flux=np.full(wl.size, np.nan) * u.dimensionless_unscaled)
    with pytest.raises(ValueError, match="masked or non-finite"):
        fit_spectrum(allnan, clone4700, line_epochs=0, template_epochs=1, progress=False)
    zero = Spectrum(spectral_axis=wl, flux=wasp69.flux, uncertainty=StdDevUncertainty(np.zeros(wl.size)))
    with pytest.raises(ValueError, match="zero or negative uncertainty"):
        fit_spectrum(zero, clone4700, line_epochs=0, template_epochs=1, progress=False)
    with pytest.raises(ValueError, match="overlap"):
        fit_spectrum(SpectrumList([wasp69, wasp69]), clone4700, line_epochs=0, template_epochs=1, progress=False)
    with pytest.raises(TypeError, match="SpectralClone"):
        fit_spectrum(wasp69, "clone.fits", progress=False)


def _tiny_clone():
    """A one-line clone near 8670 Å (no training; the settings tests never get that far)."""
    from blase_specutils import SpectralClone
    from blase_specutils.core.clone import LineCloneModel

    return SpectralClone(LineCloneModel(np.array([8670.0]), np.log([0.1]), np.log([0.05]), np.log([0.01])))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rv_range=-30), ValueError, "rv_range must be > 0 km/s"),
        (dict(rv_range=0), ValueError, "rv_range must be > 0"),
        (dict(rv_range=[10, 20]), TypeError, "rv_range must be one number"),
        (dict(rv=np.nan), ValueError, "rv must be finite"),
        (dict(rv=4e5 * u.km / u.s), ValueError, "rv must be finite and slower than light"),
        (dict(rv=5 * u.AA), u.UnitsError, "rv must be a velocity"),
        (dict(vsini=-3), ValueError, "vsini must be >= 0"),
        (dict(vsini=np.nan), ValueError, "vsini must be finite"),
        (dict(resolving_power=np.inf), ValueError, "resolving_power must be finite and > 0"),
        (dict(resolving_power=0), ValueError, "resolving_power must be finite and > 0"),
        (dict(resolving_power="55000"), TypeError, "resolving_power must be one number"),
        (dict(regularization=-5), ValueError, "regularization must be finite and >= 0"),
        (dict(width_regularization=np.nan), ValueError, "width_regularization must be finite"),
        (dict(telluric_regularization=-1.0), ValueError, "telluric_regularization must be finite and >= 0"),
        (dict(lr=0), ValueError, "lr must be finite and > 0"),
        (dict(buffer=-1000 * u.AA), ValueError, "buffer must be finite and >= 0"),
        (dict(buffer=5 * u.km / u.s), u.UnitsError, "buffer must be a wavelength"),
        (dict(buffer=30.0), TypeError, "buffer must be a Quantity in wavelength units"),
        (dict(continuum_degree=2.5), TypeError, "continuum_degree must be an integer"),
        (dict(continuum_degree=True), TypeError, "continuum_degree must be an integer"),
        (dict(continuum_degree=-1), ValueError, "continuum_degree must be >= 0"),
        (dict(template_epochs=-1), ValueError, "template_epochs must be >= 0"),
        (dict(line_epochs=100.0), TypeError, "line_epochs must be an integer"),
        (dict(tune_lines=("amp",)), ValueError, r"tune_lines: unknown tunable parameter\(s\) \['amp'\]"),
        (dict(tune_lines=5), TypeError, "tune_lines must be a parameter name or a sequence"),
        (dict(tune_telluric="amplitud"), ValueError, r"tune_telluric: unknown tunable parameter\(s\) \['amplitud'\]"),
    ],
)
def test_bad_settings_fail_before_any_work(monkeypatch, kwargs, error, match):
    """Each bad setting raises a clear error naming it before the data are even read."""
    import blase_specutils.fitting as fitting

    def no_work(*args, **kw):
        raise AssertionError("the data were read before the settings were checked")

    monkeypatch.setattr(fitting, "_gather", no_work)
    data = Spectrum(spectral_axis=np.linspace(8660, 8680, 50) * u.AA, flux=np.ones(50) * u.one)
    with pytest.raises(error, match=match):
        fit_spectrum(data, _tiny_clone(), progress=False, **kwargs)


def test_one_tune_name_and_numpy_integers_are_accepted():
    """A bare string is one parameter name (not its letters); numpy integers count as integers."""
    wl = np.linspace(8660, 8680, 200)
    flux = 1.0 - 0.3 * np.exp(-0.5 * ((wl - 8670.0) / 0.1) ** 2)
    data = Spectrum(spectral_axis=wl * u.AA, flux=flux * u.one, uncertainty=StdDevUncertainty(np.full(wl.size, 0.01)))
    tune = ["amplitude"]
    r = fit_spectrum(data, _tiny_clone(), rv=0.0, tune_lines="amplitude", continuum_degree=np.int64(1),
                     template_epochs=np.int32(2), line_epochs=np.int64(2), progress=False)
    assert r.settings["tune_lines"] == "amplitude" and r.settings["line_epochs"] == 2
    assert r.model.continuum_coeffs.shape[1] == 2
    r = fit_spectrum(data, _tiny_clone(), rv=0.0, tune_lines=tune, template_epochs=1, line_epochs=1, progress=False)
    assert tune == ["amplitude"] and r.settings["tune_lines"] == "amplitude"


def test_products_come_back_on_the_users_own_axis_and_uncertainty_units_count():
    """A descending nm axis (values that do not survive a trip through Å) and an uncertainty in mJy
    on a flux in Jy: the model and residual have the data's own axis, and σ is in Jy."""
    wl = np.linspace(8660, 8680, 301)
    flux = 1.0 - 0.3 * np.exp(-0.5 * ((wl - 8670.0) / 0.1) ** 2)
    axis = (wl / 10.0)[::-1] * u.nm
    data = Spectrum(spectral_axis=axis, flux=flux[::-1] * u.Jy,
                    uncertainty=StdDevUncertainty(np.full(wl.size, 10.0) * u.mJy))
    r = fit_spectrum(data, _tiny_clone(), rv=0.0, template_epochs=2, line_epochs=0, progress=False)
    np.testing.assert_allclose(r.sigma, 0.01, rtol=1e-12)
    for product in (r.model_spectrum, r.residual):
        np.testing.assert_array_equal(product.spectral_axis.value, axis.value)
        assert product.spectral_axis.unit == u.nm
    residual = data - r.model_spectrum  # arithmetic with the data works, pixel by pixel
    np.testing.assert_allclose(residual.flux.value, r.residual.flux.value, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.model_spectrum.flux.value, r.model_flux[::-1], rtol=0, atol=0)


def test_missing_uncertainties_and_other_units(wasp69, clone4700):
    """No uncertainties: a documented noise estimate with a warning; a µm axis gives the same fit."""
    um = Spectrum(spectral_axis=wasp69.spectral_axis.to(u.um), flux=wasp69.flux)
    with pytest.warns(MissingUncertaintyWarning):
        r = fit_spectrum(um, clone4700, line_epochs=0, template_epochs=30, rv=-9.5, progress=False)
    assert r.model_spectrum.spectral_axis.unit == u.um
    # DER_SNR counts line structure as noise: an overestimate here (measured 3.8x), never an underestimate
    real = np.nanmedian(wasp69.uncertainty.array)
    assert 1.0 * real < np.median(r.sigma) < 5 * real


def test_der_snr_estimate_on_pure_noise():
    from blase_specutils.fitting import _noise_from_flux

    gen = np.random.default_rng(3)
    assert _noise_from_flux(1.0 + gen.normal(0, 0.004, 20000)) == pytest.approx(0.004, rel=0.03)


# ---------------------------------------------------------------- tellurics: power, telluric-only fits, save/load
def _simulate_tellurics(clone, power, snr=200.0, seed=1):
    """HPF-like pixels (0.07 Å) over 9070-9100 Å from a telluric clone raised to ``power``, R = 55,000
    (multiplied in after the LSF when the clone is at the instrument's resolution, as a fit does)."""
    import torch

    from blase_specutils.core.transfer import TransferModel

    wl = np.arange(9070.0, 9100.0, 0.07)
    sim = TransferModel(None, wl, telluric=clone.model.subset(torch.arange(clone.n_lines)), telluric_power=power,
                        resolving_power=55000.0, continuum_degree=1,
                        telluric_instrumental=clone.instrument_resolution)
    with torch.no_grad():
        sim.continuum_coeffs[0, 1] = 0.01  # a slight tilt of the continuum
        flux = sim().numpy()
    gen = np.random.default_rng(seed)
    return Spectrum(spectral_axis=wl * u.AA, flux=(flux + gen.normal(0.0, 1.0 / snr, wl.size)) * u.one,
                    uncertainty=StdDevUncertainty(np.full(wl.size, 1.0 / snr)))


def test_telluric_power_recovers_injected_value(telfit_window_clone):
    """Data made from the telluric clone raised to X = 1.6 (S/N 200): template matching finds X."""
    data = _simulate_tellurics(telfit_window_clone, 1.6)
    r = fit_spectrum(data, None, telluric=telfit_window_clone, resolving_power=55000.0, continuum_degree=1,
                     template_epochs=150, line_epochs=0, progress=False)
    assert r.telluric_power == pytest.approx(1.6, rel=0.02)
    assert r.template["telluric_power"] == pytest.approx(r.telluric_power)
    assert r.chi2_reduced < 1.2
    fixed = fit_spectrum(data, None, telluric=telfit_window_clone, resolving_power=55000.0, continuum_degree=1,
                         template_epochs=150, line_epochs=0, tune_telluric_power=False, progress=False)
    assert fixed.telluric_power == 1.0
    assert fixed.chi2_reduced > 10 * r.chi2_reduced


@pytest.fixture(scope="module")
def hr4829_telluric_fit(hr4829_water_window, telfit_window_clone):
    return fit_spectrum(hr4829_water_window, None, telluric=telfit_window_clone, resolving_power=55000.0,
                        template_epochs=100, line_epochs=150, progress=False)


def test_telluric_only_fit_of_hr4829(hr4829_telluric_fit, hr4829_water_window, telfit_window_clone, tmp_path):
    r = hr4829_telluric_fit
    assert not r.has_stellar and r.has_telluric
    s = r.summary()
    assert s["components"] == "telluric" and s["rv_kms"] is None and s["vsini_kms"] is None
    assert s["template_matching"]["rv"] is None and np.isnan(r.rv.value) and np.isnan(r.vsini.value)
    # tuning the telluric amplitudes and widths (the default of a telluric-only fit) beats template
    # matching (by less than it did while the TelFit clone was broadened twice: template matching is
    # closer now)
    assert r.settings["tune_telluric"] == "amplitude,sigma,gamma"
    assert r.chi2 < 0.8 * r.template["chi2"]
    assert s["n_lines_changed"] > 0 and s["n_telluric_lines"] == s["n_lines"] == r.model.telluric.n_lines
    assert np.array_equal(r.lines["amplitude_fit"], r.telluric_lines["amplitude_fit"])
    assert r.stellar_clone() is None and r.semi_empirical_template() is None
    t = r.telluric_template()
    assert np.all(t.flux.value <= 1.0) and np.all(t.flux.value >= 0.0)
    raw = r.telluric_template(power=False).flux.value
    np.testing.assert_allclose(t.flux.value, raw ** r.telluric_power, rtol=1e-12, atol=1e-300)
    assert isinstance(r.model_spectrum, type(hr4829_water_window))
    r.plot().savefig(tmp_path / "tellurics.png")


def test_neither_clone_raises(telfit_window_clone):
    from blase_specutils.core.transfer import TransferModel

    data = _simulate_tellurics(telfit_window_clone, 1.0)
    with pytest.raises(ValueError, match="stellar clone, a telluric clone"):
        fit_spectrum(data, None, progress=False)
    with pytest.raises(ValueError, match="stellar clone, a telluric clone"):
        TransferModel(None, np.arange(9070.0, 9080.0, 0.07))
    with pytest.raises(TypeError, match="telluric must be a SpectralClone"):
        fit_spectrum(data, None, telluric="telfit.fits", progress=False)
    far = Spectrum(spectral_axis=data.spectral_axis + 3000 * u.AA, flux=data.flux, uncertainty=data.uncertainty)
    with pytest.raises(ValueError, match="telluric clone has no lines"):
        fit_spectrum(far, None, telluric=telfit_window_clone, progress=False)


def _assert_round_trip(r: TransferResult, path) -> TransferResult:
    import torch

    r.save(path)
    back = TransferResult.load(path)
    for name in ("chi2", "chi2_reduced", "resolving_power", "telluric_power", "n_pixels", "rms_residual"):
        assert getattr(back, name) == getattr(r, name), name
    for name in ("rv", "vsini"):
        a, b = getattr(r, name).value, getattr(back, name).value
        assert (np.isnan(a) and np.isnan(b)) or a == b, name
    assert back.template == r.template
    assert back.summary() == r.summary()
    with torch.no_grad():
        np.testing.assert_allclose(back.model().numpy(), r.model_flux, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(back.model_flux, r.model_flux)
    for got, want in ((back.lines, r.lines), (back.telluric_lines, r.telluric_lines)):
        if want is None:
            assert got is None
            continue
        assert got.colnames == want.colnames
        for c in want.colnames:
            np.testing.assert_array_equal(np.asarray(got[c]), np.asarray(want[c]), err_msg=c)
    m1, m0 = back.model_spectrum, r.model_spectrum
    assert isinstance(m1, Spectrum) and m1.spectral_axis.unit == m0.spectral_axis.unit
    np.testing.assert_array_equal(m1.flux.value, m0.flux.value)
    np.testing.assert_array_equal(back.residual.flux.value, r.residual.flux.value)
    for f in ("semi_empirical_template", "telluric_template"):
        a, b = getattr(r, f)(), getattr(back, f)()
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(b.flux.value, a.flux.value, rtol=0, atol=1e-12)
    back.plot()
    return back


def test_save_load_round_trip_telluric_only(hr4829_telluric_fit, tmp_path):
    back = _assert_round_trip(hr4829_telluric_fit, tmp_path / "tellurics.fits")
    assert back.settings == hr4829_telluric_fit.settings
    assert back.fit.chi2 == hr4829_telluric_fit.fit.chi2


def test_save_load_round_trip_stellar(template_fit, tmp_path):
    _assert_round_trip(template_fit, tmp_path / "wasp69.fits")


def test_save_load_round_trip_stellar_and_telluric(telfit_window_clone, tmp_path):
    """Both clones, both tuned (the telluric clone also stands in as the 'stellar' one here, RV-shifted)."""
    from blase_specutils import SpectralClone

    data = _simulate_tellurics(telfit_window_clone, 1.3)
    r = fit_spectrum(data, telfit_window_clone, telluric=telfit_window_clone, rv=3.0, vsini=2.0,
                     resolving_power=55000.0, template_epochs=15, line_epochs=15, tune_lines=("amplitude", "center"),
                     tune_telluric=("amplitude",), progress=False)
    assert r.summary()["components"] == "stellar+telluric"
    assert r.summary()["n_lines_changed"] > 0 and r.summary()["n_telluric_lines_changed"] > 0
    back = _assert_round_trip(r, tmp_path / "both.fits")
    np.testing.assert_array_equal(back.prior_centers["stellar"], r.prior_centers["stellar"])
    clone = SpectralClone.load(tmp_path / "both.fits")  # still a clone file: the stellar lines
    assert clone.n_lines == r.model.stellar.n_lines and clone.meta["telpower"] == pytest.approx(r.telluric_power)


def test_load_rejects_a_plain_clone(telfit_window_clone, tmp_path):
    path = telfit_window_clone.save(tmp_path / "clone.fits")
    with pytest.raises(ValueError, match="not a transfer-learning result"):
        TransferResult.load(path)


# ------------------------------------------------------------------------------ FitSettings
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rv_range=2000), ValueError, r"at most 1000 km/s .*tag a larger known velocity on the spectral axis"),
        (dict(rv=200.0, rv_range=150), ValueError, r"outside the RV bound ±rv_range = ±150.0 km/s; widen rv_range"),
        (dict(resolving_power=500.0), ValueError, r"resolving_power must be >= 1000"),
        (dict(vsini=700.0), ValueError, r"above the bound max_vsini = 600.0 km/s \(FitBounds\)"),
        (dict(buffer=30.0), TypeError, r"buffer must be a Quantity in wavelength units, e\.g\. 30 \* u\.AA"),
        (dict(rv=5 * u.AA), u.UnitsError, r"rv must be a velocity \(e\.g\. 30 \* u\.km / u\.s\)"),
        (dict(plan="yes"), ValueError, r"plan must be True, False or 'auto'"),
        (dict(tune_telluric_power="no"), TypeError, r"tune_telluric_power must be True or False"),
        (dict(calibration_degree=-1), ValueError, r"calibration_degree must be >= 0"),
        (dict(bounds=dict(max_vsini=60)), TypeError, r"bounds must be a FitBounds"),
    ],
)
def test_fit_settings_refuse_a_bad_value_naming_it_and_the_fix(kwargs, error, match):
    from blase_specutils.fit_settings import FitSettings

    with pytest.raises(error, match=match):
        FitSettings(**kwargs)


def test_fit_settings_normalise_units_and_check_again_on_replace():
    """Velocities become km/s, the buffer a Quantity in Å; replace() checks the changed copy."""
    from blase_specutils.core.diagnostics import FitBounds
    from blase_specutils.fit_settings import FitSettings

    s = FitSettings(rv=-9.5 * u.km / u.s, rv_range=60000 * u.m / u.s, vsini=np.float64(3.0), buffer=1 * u.nm,
                    tune_lines="amplitude")
    assert (s.rv, s.rv_range, s.vsini) == (-9.5, 60.0, 3.0)
    assert s.buffer_angstrom == pytest.approx(10.0) and s.tune_lines == ("amplitude",)
    assert s.bounds == FitBounds() and s.tune_telluric_for(True) == () and s.tune_telluric_for(False) == ("amplitude", "sigma", "gamma")
    assert FitSettings(**{k: getattr(s, k) for k in FitSettings.field_names()}) == s  # normalised values are valid
    with pytest.raises(ValueError, match="widen rv_range"):
        s.replace(rv_range=5.0)
    with pytest.raises(AttributeError):
        s.rv = 0.0  # frozen


def test_fit_settings_and_keywords_are_not_mixed():
    from blase_specutils.fit_settings import FitSettings

    data = Spectrum(spectral_axis=np.linspace(8660, 8680, 50) * u.AA, flux=np.ones(50) * u.one)
    with pytest.raises(TypeError, match=r"settings= and the setting keyword\(s\) \['rv_range'\]"):
        fit_spectrum(data, _tiny_clone(), settings=FitSettings(), rv_range=30, progress=False)
    with pytest.raises(TypeError, match="settings must be a FitSettings"):
        fit_spectrum(data, _tiny_clone(), settings={"rv_range": 30}, progress=False)
    with pytest.raises(TypeError, match="engine must be an EngineOptions"):
        fit_spectrum(data, _tiny_clone(), engine="torch", progress=False)


def test_keywords_and_settings_give_the_same_fit(wasp69, clone4700):
    """The keyword front and settings= are one fit: the same numbers, bit for bit (a real WASP 69 cut),
    and engine= reaches the model and its clones."""
    from blase_specutils.core.options import EngineOptions
    from blase_specutils.fit_settings import FitSettings

    cut = wasp69[1024:1280]
    kw = dict(rv_range=20 * u.km / u.s, template_epochs=8, line_epochs=8, tune_lines=("amplitude",),
              buffer=5 * u.AA)
    a = fit_spectrum(cut, clone4700, progress=False, **kw)
    engine = EngineOptions()
    b = fit_spectrum(cut, clone4700, settings=FitSettings(**kw), engine=engine, progress=False)
    assert np.array_equal(a.model_flux, b.model_flux)
    assert a.rv.value == b.rv.value and a.vsini.value == b.vsini.value and a.settings == b.settings
    assert b.model.engine is engine and b.model.stellar.engine is engine
