import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.table import QTable
from specutils import Spectrum

from blase_specutils import SpectralClone, clone_spectrum, trim


def test_subband_clone_is_accurate(phoenix_subband_clone):
    c = phoenix_subband_clone
    assert 10 < c.n_lines < 200
    # the clone reproduces the preprocessed PHOENIX spectrum at native resolution
    assert c.rms_residual() < 0.005
    # and training really improved on the initial guess
    assert c.history.best_loss < 0.8 * c.history.loss[0]


def test_clone_evaluates_on_any_spectral_axis(phoenix_subband_clone):
    c = phoenix_subband_clone
    wl = np.linspace(10520.0, 10630.0, 777)
    ref = c.evaluate(wl * u.AA).flux.value
    um = (wl * u.AA).to(u.um)
    wn = (wl * u.AA).to(1 / u.cm, equivalencies=u.spectral())  # descending wavenumbers
    for axis, expected in ((um, ref), (wn, ref), (wl[::-1] * u.AA, ref[::-1]), (wl / 10 * u.nm, ref)):
        out = c.evaluate(axis)
        # the axis comes back as given: same values (no round trip through Å), unit and order
        np.testing.assert_array_equal(out.spectral_axis.value, axis.value)
        assert out.spectral_axis.unit == axis.unit
        np.testing.assert_allclose(out.flux.value, expected, rtol=1e-11)  # unit conversions move the grid by ~1e-16
        data = Spectrum(spectral_axis=axis, flux=np.ones(wl.size) * u.dimensionless_unscaled)
        np.testing.assert_allclose((data / c.evaluate(data)).flux.value, 1.0 / expected, rtol=1e-11)
    # the native grid by default, as a Spectrum
    native = c.evaluate()
    assert isinstance(native, Spectrum) and native.flux.size == c.target.flux.size


def test_residual_and_rms_agree(phoenix_subband_clone):
    c = phoenix_subband_clone
    r = c.residual
    assert isinstance(r, Spectrum)
    wl = r.spectral_axis.to_value(u.AA)
    sel = (wl >= c.band[0]) & (wl <= c.band[1])
    assert np.sqrt(np.mean(r.flux.value[sel] ** 2)) == pytest.approx(c.rms_residual(), rel=1e-12)


def test_line_table_has_units_and_consistent_values(phoenix_subband_clone):
    t = phoenix_subband_clone.lines
    assert isinstance(t, QTable)
    for col in ("center", "amplitude", "sigma", "gamma", "fwhm", "equivalent_width"):
        assert t[col].unit == u.AA
    assert len(t) == phoenix_subband_clone.n_lines
    assert np.all(t["fwhm"] > 0 * u.AA) and np.all(t["sigma"] > 0 * u.AA)
    # linear mode: the single-line equivalent width is the line area a
    np.testing.assert_allclose(t["equivalent_width"].value, t["amplitude"].value)
    assert np.all((t["depth"] > 0) & (t["depth"] < 1))


def test_save_load_round_trip_is_exact(phoenix_subband_clone, tmp_path):
    c = phoenix_subband_clone
    path = c.save(tmp_path / "clone.fits")
    d = SpectralClone.load(path)
    for name in ("lam_centers", "log_amplitudes", "log_sigmas", "log_gammas", "wing_alpha", "wing_log_lt", "wing_log_b"):
        assert torch.equal(getattr(c.model, name), getattr(d.model, name)), name
    assert torch.equal(c.model.broad_lines, d.model.broad_lines)
    assert d.band == c.band and d.model.mode == c.model.mode and d.model.wing_tolerance == c.model.wing_tolerance
    np.testing.assert_array_equal(d.evaluate().flux.value, c.evaluate().flux.value)
    assert d.rms_residual() == c.rms_residual()
    with pytest.raises(OSError):
        c.save(path)  # no silent overwrite
    c.save(path, overwrite=True)


def test_corrupted_clone_files(phoenix_subband_clone, tmp_path):
    good = phoenix_subband_clone.save(tmp_path / "good.fits")
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(raw[: len(raw) // 3])
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"this is not a FITS file at all" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match="corrupt|not a"):
            SpectralClone.load(bad)
    with pytest.raises(FileNotFoundError):
        SpectralClone.load(tmp_path / "missing.fits")
    from astropy.io import fits

    other = tmp_path / "other.fits"
    fits.PrimaryHDU(np.zeros(3)).writeto(other)
    with pytest.raises(ValueError, match="not a blase_specutils clone"):
        SpectralClone.load(other)


def test_clone_accepts_other_units_and_descending_axes_with_same_result(phoenix_10k):
    base = trim(phoenix_10k, (9000, 9050) * u.AA, 5 * u.AA)
    kw = dict(prominence=0.005, epochs=30, progress=False)
    a = clone_spectrum(base, **kw)
    nm_desc = Spectrum(spectral_axis=base.spectral_axis.to(u.nm)[::-1], flux=base.flux[::-1])
    b = clone_spectrum(nm_desc, **kw)
    assert a.n_lines == b.n_lines
    np.testing.assert_allclose(b.model.lam_centers.detach(), a.model.lam_centers.detach(), rtol=1e-12)
    np.testing.assert_allclose(b.model.log_amplitudes.detach(), a.model.log_amplitudes.detach(), rtol=1e-6, atol=1e-9)


def test_nan_pixels_are_left_out_and_input_not_mutated(phoenix_10k):
    base = trim(phoenix_10k, (10600, 10640) * u.AA, 5 * u.AA)
    flux = base.flux.value.copy()
    flux[100:150] = np.nan
    s = Spectrum(spectral_axis=base.spectral_axis, flux=flux * base.flux.unit)
    before = s.flux.value.copy()
    c = clone_spectrum(s, prominence=0.02, epochs=20, progress=False)
    np.testing.assert_array_equal(s.flux.value, before)  # untouched, NaNs included
    assert np.isfinite(c.rms_residual())
    assert c.target.mask[100:150].all()


def test_log_mode_and_emission(phoenix_10k):
    base = trim(phoenix_10k, (10600, 10640) * u.AA, 5 * u.AA)
    lg = clone_spectrum(base, prominence=0.02, epochs=60, mode="log", progress=False)
    assert lg.model.mode == "log" and lg.rms_residual() < 0.01
    # an emission spectrum: the same lines flipped above the continuum
    from blase_specutils import flatten_continuum

    flat = flatten_continuum(base)
    em = Spectrum(spectral_axis=flat.spectral_axis, flux=(2.0 - flat.flux.value) * u.dimensionless_unscaled)
    e = clone_spectrum(em, prominence=0.02, epochs=60, emission=True, flatten=False, progress=False)
    assert e.model.emission and e.n_lines == lg.n_lines
    assert e.evaluate().flux.value.max() > 1.05
    assert e.rms_residual() < 0.01


def test_exact_voigt_profile_option(phoenix_10k):
    base = trim(phoenix_10k, (10600, 10640) * u.AA, 5 * u.AA)
    v = clone_spectrum(base, prominence=0.02, epochs=30, profile="voigt", progress=False)
    assert v.model.profile == "voigt" and v.rms_residual() < 0.02


@pytest.mark.parametrize("prom", [0.0, 1.0, -0.5, 2.0, "0.01"])
def test_bad_prominence(phoenix_10k, prom):
    with pytest.raises(ValueError, match="prominence"):
        clone_spectrum(phoenix_10k[:1000], prominence=prom, progress=False)


def test_bad_inputs(phoenix_10k):
    wl = np.linspace(10000, 10010, 1000) * u.AA
    flat = Spectrum(spectral_axis=wl, flux=np.ones(1000) * u.dimensionless_unscaled)
    with pytest.raises(ValueError, match="no lines"):
        clone_spectrum(flat, flatten=False, progress=False)
    allnan = Spectrum(spectral_axis=wl, flux=np.full(1000, np.nan) * u.dimensionless_unscaled)
    with pytest.raises(ValueError, match="no usable pixels"):
        clone_spectrum(allnan, progress=False)
    with pytest.raises(u.UnitsError, match="spectral units"):
        clone_spectrum(Spectrum(spectral_axis=np.arange(1.0, 1001.0) * u.pix, flux=np.ones(1000) * u.Jy), progress=False)
    with pytest.raises(ValueError, match="positive temperature"):
        clone_spectrum(phoenix_10k[:1000], teff=-3 * u.K, progress=False)
    with pytest.raises(TypeError, match="Spectrum"):
        clone_spectrum(np.ones(10), progress=False)
    with pytest.raises(ValueError, match="mode"):
        clone_spectrum(phoenix_10k[:1000], mode="quadratic", progress=False)
    with pytest.raises(ValueError, match="plan must be"):
        clone_spectrum(phoenix_10k[:1000], plan="yes", progress=False)
    # checked before any work: integers are not truncated, names are named
    for kw, err, match in ((dict(epochs=2.5), TypeError, "epochs must be an integer"),
                           (dict(n_broad="many"), TypeError, "n_broad must be 'auto' or an integer"),
                           (dict(n_broad=-1), ValueError, "n_broad must be >= 0"),
                           (dict(continuum_order=1.5), TypeError, "continuum_order"),
                           (dict(lr=float("nan")), ValueError, "lr must be")):
        with pytest.raises(err, match=match):
            clone_spectrum(phoenix_10k[:1000], progress=False, **kw)


def test_numpy_scalars_one_tunable_and_celsius_are_understood(phoenix_10k):
    base = trim(phoenix_10k, (10600, 10610) * u.AA, 2 * u.AA)
    ref = clone_spectrum(base, prominence=0.02, teff=10000 * u.K, epochs=3, tune=("amplitude",), progress=False)
    other = clone_spectrum(base, prominence=np.float32(0.02), teff=(10000 - 273.15) * u.deg_C, epochs=np.int64(3),
                           tune="amplitude", progress=False)
    assert other.meta["teff"] == pytest.approx(10000.0)
    assert not other.model.log_sigmas.requires_grad and other.model.log_amplitudes.requires_grad
    np.testing.assert_allclose(other.model.log_amplitudes.detach().numpy(), ref.model.log_amplitudes.detach().numpy(),
                               rtol=1e-6)


def test_evaluate_bad_arguments(phoenix_subband_clone):
    c = phoenix_subband_clone
    wl = np.linspace(10550.0, 10560.0, 11) * u.AA
    for rv, err, match in ((np.nan, ValueError, "finite and slower than light"),
                           (4e5 * u.km / u.s, ValueError, "slower than light"),
                           (np.array([1.0, 2.0]), TypeError, "one number"),
                           (3 * u.AA, u.UnitsError, "radial_velocity must be a velocity")):
        with pytest.raises(err, match=match):
            c.evaluate(wl, radial_velocity=rv)
    with pytest.raises(ValueError, match="1-D"):
        c.evaluate(np.vstack([wl.value, wl.value]) * u.AA)
    with pytest.raises(ValueError, match="positive"):
        c.evaluate(-wl)
    with pytest.raises(TypeError, match="Quantity"):
        c.evaluate(wl.value)


@pytest.mark.skipif(not __import__("blase_specutils.core.cpu_kernel", fromlist=["x"]).HAVE_NUMBA,
                    reason="plans on CPUs use the compiled numba kernel")
def test_cloning_through_a_plan_gives_the_same_clone(phoenix_10k):
    """plan=True (a window plan and, on a GPU, CUDA-graph epochs) with two broad, wing-corrected lines
    and tuned centres: the same losses and lines as plan=False."""
    base = trim(phoenix_10k, (9000, 9050) * u.AA, 5 * u.AA)
    kw = dict(prominence=0.005, epochs=30, n_broad=2, tune=("amplitude", "sigma", "gamma", "center"), progress=False)
    a = clone_spectrum(base, plan=False, **kw)
    b = clone_spectrum(base, plan=True, **kw)
    assert a.model.broad_lines.numel() == 2 and a.n_lines > 5 and a.history.loss[-1] < 0.5 * a.history.loss[0]
    np.testing.assert_allclose(b.history.loss, a.history.loss, rtol=1e-12)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_warns_when_the_band_edge_cuts_a_broad_wing(phoenix_10k):
    from blase_specutils.cloning import EdgeWingWarning

    # 10930 Å + 10 Å buffer stops just short of the centre of Paschen γ (10941 Å)
    base = trim(phoenix_10k, (10880, 10930) * u.AA, 10 * u.AA)
    with pytest.warns(EdgeWingWarning, match="red end"):
        clone_spectrum(base, teff=10000 * u.K, prominence=0.02, epochs=2, progress=False)


# ------------------------------------------------------------------------------ CloneSettings
@pytest.mark.parametrize("kw, error, match", [
    (dict(prominence=2.0), ValueError, r"prominence must be a number in \(0, 1\).*0.01 is the paper's value"),
    (dict(prominence="0.01"), ValueError, "prominence"),
    (dict(mode="quadratic"), ValueError, "mode must be 'linear'.* or 'log'"),
    (dict(profile="gauss"), ValueError, "profile must be one of"),
    (dict(epochs=2.5), TypeError, "epochs must be an integer"),
    (dict(residual_passes=-1), ValueError, "residual_passes must be >= 0"),
    (dict(lr=0.0), ValueError, "lr must be finite and > 0"),
    (dict(wing_tolerance=2.0), ValueError, r"wing_tolerance must be in \(0, 1\)"),
    (dict(train_tolerance=float("nan")), ValueError, "train_tolerance must be finite"),
    (dict(band=(10500, 10600)), TypeError, r"band must be a pair of wavelengths with units, e.g. \(8079, 12785\) \* u.AA"),
    (dict(band=(10500, 10500) * u.AA), ValueError, "band must have a non-zero width"),
    (dict(buffer=30.0), TypeError, r"buffer must be a Quantity in wavelength units, e.g. 30 \* u.AA"),
    (dict(buffer=30 * u.s), u.UnitsError, "buffer must be a wavelength"),
    (dict(teff=5 * u.m), u.UnitsError, "teff must be a temperature"),
    (dict(teff=-3 * u.K), ValueError, "positive temperature"),
    (dict(powers=(0.5, 1.0)), ValueError, "pass mode='log'"),
    (dict(powers=(), mode="log"), ValueError, "at least one power"),
    (dict(powers=(1.0,), mode="log", likelihood="gp"), ValueError, "cannot be combined"),
    (dict(likelihood="gauss"), ValueError, "unknown likelihood 'gauss'.*'gp'"),
    (dict(likelihood={"noise": -1.0}), ValueError, "the GP 'noise' must be finite and > 0"),
    (dict(n_broad="many"), TypeError, "n_broad must be 'auto' or an integer"),
    (dict(tune=("amplitude", "width")), ValueError, r"unknown tunable parameter\(s\) \['width'\]"),
    (dict(flatten="yes"), TypeError, "flatten must be True or False"),
    (dict(plan="yes"), ValueError, "plan must be True, False or 'auto'"),
    (dict(air="air"), TypeError, "air must be True"),
    (dict(dtype=torch.int32), TypeError, "dtype must be torch.float32 or torch.float64"),
    (dict(patience=0), ValueError, "patience must be >= 1"),
    (dict(continuum_bins=0), ValueError, "continuum_bins must be >= 1"),
])
def test_clone_settings_name_the_setting_and_the_fix(kw, error, match):
    from blase_specutils.clone_settings import CloneSettings

    with pytest.raises(error, match=match):
        CloneSettings(**kw)


def test_clone_settings_are_one_checked_immutable_value():
    import dataclasses
    import pickle

    from blase_specutils.cloning import CloneSettings

    s = CloneSettings(band=(1.05, 1.065) * u.um, buffer=1 * u.nm, teff=(10000 - 273.15) * u.deg_C, tune="amplitude",
                      mode="log", powers=0.5, prominence=np.float32(0.02), epochs=np.int64(3))
    assert s.band_angstrom == pytest.approx((10500.0, 10650.0)) and s.band[0].unit == u.AA
    assert s.buffer_angstrom == pytest.approx(10.0) and s.teff_kelvin == pytest.approx(10000.0) and s.teff.unit == u.K
    assert s.tune == ("amplitude",) and s.powers == (0.5,) and type(s.epochs) is int and type(s.prominence) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epochs = 10
    assert s.replace(epochs=10).epochs == 10 and s.epochs == 3  # a checked copy
    with pytest.raises(TypeError, match="epochs must be an integer"):
        s.replace(epochs=1.5)
    assert s.replace() == s and pickle.loads(pickle.dumps(s)) == s  # a canonical value survives re-checking
    assert CloneSettings().changed() == [] and sorted(s.changed()) == sorted(
        ["band", "buffer", "teff", "tune", "mode", "powers", "prominence", "epochs"])
    options = {"noise": 0.01}
    g = CloneSettings(likelihood=options)
    options["noise"] = -1.0  # the settings hold their own copy
    assert g.likelihood == {"noise": 0.01}


def test_keywords_and_settings_give_the_same_clone(phoenix_10k):
    from blase_specutils.clone_settings import CloneSettings
    from blase_specutils.core.options import EngineOptions

    base = trim(phoenix_10k, (10600, 10612) * u.AA, 3 * u.AA)
    kw = dict(prominence=0.02, teff=10000 * u.K, epochs=25, residual_passes=0, tune=("amplitude", "sigma", "gamma"))
    a = clone_spectrum(base, progress=False, **kw)
    b = clone_spectrum(base, progress=False, settings=CloneSettings(**kw))
    assert a.n_lines == b.n_lines > 0 and a.meta.keys() == b.meta.keys()
    assert a.history.loss == b.history.loss
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    # settings= and a changed keyword: one or the other, and the error says how to change a setting
    with pytest.raises(TypeError, match=r"keyword\(s\) \['epochs'\].*settings.replace\(epochs=...\)"):
        clone_spectrum(base, progress=False, settings=CloneSettings(**kw), epochs=10)
    with pytest.raises(TypeError, match="settings must be a CloneSettings"):
        clone_spectrum(base, progress=False, settings=kw)
    # the engine travels with the clone and is reported
    c = clone_spectrum(base, progress=False, settings=CloneSettings(**kw).replace(epochs=2),
                       engine=EngineOptions(backend="torch"))
    assert c.engine["backend"] == "torch" and c.model.engine.backend == "torch"
    with pytest.raises(TypeError, match="engine must be an EngineOptions"):
        clone_spectrum(base, progress=False, engine="torch")
