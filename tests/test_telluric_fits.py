"""Telluric fits (issue 20, part 2): telluric templates at the instrument's resolution are not
broadened twice, the per-order wavelength correction recovers an injected shift in real HR 4829
data, and the telluric-corrected spectrum keeps the input's class, meta and units."""

from __future__ import annotations

import json
import math
import warnings

import astropy.units as u
import numpy as np
import pytest
import torch

from blase_specutils import SpectralClone
from blase_specutils.core.clone import SPEED_OF_LIGHT_KMS, LineCloneModel
from blase_specutils.core.transfer import TransferModel
from blase_specutils.fitting import fit_spectrum
from blase_specutils.spectra import arrays_to_spectrum


def _fit(window, clone, **kw):
    return fit_spectrum(window, telluric=clone, line_epochs=0, template_epochs=150, progress=False, **kw)


def _with_lsf(clone: SpectralClone, lsf: str) -> SpectralClone:
    return SpectralClone(clone.model, target=clone.target, band=clone.band, meta={**clone.meta, "lsf": lsf})


def test_telfit_clone_records_instrument_resolution(telfit_window_clone, tmp_path):
    """muler's TelFit HPF template carries HPF's LSF: its clone says so, and keeps saying so after a save."""
    assert telfit_window_clone.instrument_resolution
    path = telfit_window_clone.save(tmp_path / "telfit.fits")
    assert SpectralClone.load(path).instrument_resolution
    assert not _with_lsf(telfit_window_clone, "native").instrument_resolution


def test_instrument_resolution_clone_is_not_broadened_twice(telfit_window_clone, hr4829_water_window):
    """With the flag, T^X multiplies after the LSF: the model at the pixels is resample[T^X] exactly;
    without it, resample[T^X * g(R)], which differs by more than 1 % of the continuum on these lines."""
    tel = telfit_window_clone.model
    wl = hr4829_water_window.spectral_axis.to_value(u.AA)
    once = TransferModel(None, wl, telluric=tel, resolving_power=55000.0, telluric_instrumental=True)
    twice = TransferModel(None, wl, telluric=tel, resolving_power=55000.0)
    with torch.no_grad():
        t = torch.exp(tel.log_flux(once.lam_z))
        np.testing.assert_allclose(once.unscaled().numpy(), once.resampler(t).numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(twice.unscaled().numpy(), twice.resampler(twice.inst(t)).numpy(), rtol=0,
                                   atol=1e-12)
        diff = float((once.unscaled() - twice.unscaled()).abs().max())
    assert diff > 0.01  # the second convolution is not negligible on these lines


def test_instrument_resolution_fits_real_water_lines_better(telfit_window_clone, hr4829_water_window):
    """On real HR 4829 water lines, the TelFit clone multiplied in once fits better than broadened twice."""
    once = _fit(hr4829_water_window, telfit_window_clone)
    twice = _fit(hr4829_water_window, _with_lsf(telfit_window_clone, "native"))
    assert once.model.telluric_instrumental and not twice.model.telluric_instrumental
    assert once.summary()["telluric_lsf"] == "instrument"
    assert once.chi2_reduced < 0.7 * twice.chi2_reduced, (once.chi2_reduced, twice.chi2_reduced)


def test_injected_wavelength_shift_recovered(telfit_window_clone, hr4829_water_window):
    """A 200 m/s shift of the real HR 4829 wavelength labels is recovered to 20 m/s by the
    per-order wavelength correction, the telluric lines being the calibrators."""
    w = hr4829_water_window
    shift = 0.2  # km/s: the pixel labelled λ sees λ (1 + shift/c)
    labels = w.spectral_axis.to_value(u.AA) / (1.0 + shift / SPEED_OF_LIGHT_KMS)
    shifted = arrays_to_spectrum(labels, w.flux.value, flux_unit=w.flux.unit,
                                 uncertainty=w.uncertainty.array, like=w)
    base = _fit(w, telfit_window_clone, calibration_degree=0)
    moved = _fit(shifted, telfit_window_clone, calibration_degree=0)
    d0 = float(base.wavelength_correction["mean"][0].to_value(u.m / u.s))
    d1 = float(moved.wavelength_correction["mean"][0].to_value(u.m / u.s))
    assert abs((d1 - d0) - 1000.0 * shift) < 20.0, (d0, d1)
    assert "wavelength_correction_ms" in moved.summary()


@pytest.fixture(scope="module")
def water_fit(telfit_window_clone, hr4829_water_window):
    return _fit(hr4829_water_window, telfit_window_clone)


def test_telluric_corrected_keeps_class_meta_units(water_fit, hr4829_water_window):
    w = hr4829_water_window
    out = water_fit.telluric_corrected(min_transmission=0.2)
    assert type(out) is type(w)
    assert out.flux.unit == w.flux.unit and out.spectral_axis.unit == w.spectral_axis.unit
    for key, value in w.meta.items():
        if isinstance(value, (str, int, float)):
            assert out.meta.get(key) == value, key
    trans = water_fit.telluric_transmission()
    low = trans < 0.2
    assert low.any() and not low.all()
    assert np.all(np.asarray(out.mask)[low])
    ok = ~np.asarray(out.mask)
    np.testing.assert_allclose(out.flux.value[ok] * trans[ok], w.flux.value[ok], rtol=1e-12)
    np.testing.assert_allclose(out.uncertainty.array[ok] * trans[ok], w.uncertainty.array[ok], rtol=1e-12)
    # the telluric lines are gone: the corrected flux is flatter than the data where T is not low
    assert np.std(out.flux.value[ok]) < 0.5 * np.std(w.flux.value[ok])


def test_telluric_corrected_needs_a_telluric_fit(water_fit):
    with pytest.raises(ValueError, match="min_transmission"):
        water_fit.telluric_corrected(min_transmission=1.5)
    assert math.isfinite(water_fit.chi2_reduced)


def test_cli_writes_the_corrected_spectrum(telfit_window_clone, tmp_path, capsys):
    """``fit --telluric CLONE --corrected`` writes data / transmission with the mask; without a telluric
    clone ``--corrected`` is a usage error before any work."""
    from astropy.table import Table

    from blase_specutils.cli import main
    from conftest import SHARED_DATA, _need

    goldilocks = _need(SHARED_DATA / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits")
    clone = telfit_window_clone.save(tmp_path / "telfit.fits")
    rc = main(["fit", str(goldilocks), "--telluric", str(clone), "--order", "8", "--template-only", "--corrected",
               "--calibration-degree", "1", "-o", str(tmp_path), "--json", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    table = Table.read(summary["corrected_file"])
    assert {"wavelength", "flux", "uncertainty", "transmission", "mask", "order"} <= set(table.colnames)
    low = np.asarray(table["transmission"]) < 0.2
    assert np.all(np.asarray(table["mask"])[low])
    assert len(summary["wavelength_correction_ms"]["0"]) == 2
    rc = main(["fit", str(goldilocks), "--stellar", str(clone), "--order", "8", "--corrected", "-o", str(tmp_path)])
    assert rc == 2
    assert "--corrected needs a telluric clone" in capsys.readouterr().err


def _psg_mixture(band, powers, resolving_power=45000.0, snr=200.0, seed=1):
    """A synthetic telluric spectrum made from the PSG template's own molecule columns:
    Π_k T_k^{X_k}, convolved with a Gaussian LSF of R on a log grid (numpy, independent of the
    package's engine), sampled at IGRINS-like pixels (λ/Δλ = 90,000), with Gaussian noise."""
    from astropy.nddata import StdDevUncertainty
    from specutils import Spectrum

    from blase_specutils import load_template

    c, dv = SPEED_OF_LIGHT_KMS, 0.5
    lo, hi = band[0] + 2.0, band[1] - 2.0
    grid = np.exp(np.arange(np.log(lo - 3.0), np.log(hi + 3.0), dv / c))
    log_t = np.zeros_like(grid)
    for mol, x in powers.items():
        t = load_template("psg-igrins", molecule=mol)
        log_t += x * np.log(np.clip(np.interp(grid, t.spectral_axis.to_value(u.AA), t.flux.value), 1e-300, None))
    sig = c / resolving_power / (2.0 * math.sqrt(2.0 * math.log(2.0))) / dv
    kernel = np.exp(-0.5 * (np.arange(-40, 41) / sig) ** 2)
    observed = np.convolve(np.exp(log_t), kernel / kernel.sum(), mode="same")
    pix = np.exp(np.arange(np.log(lo), np.log(hi), 1.0 / 90000.0))
    flux = np.interp(pix, grid, observed) + np.random.default_rng(seed).normal(0.0, 1.0 / snr, pix.size)
    return Spectrum(spectral_axis=pix * u.AA, flux=flux * u.one,
                    uncertainty=StdDevUncertainty(np.full(pix.size, 1.0 / snr)))


@pytest.fixture(scope="module")
def psg_molecule_clones():
    """Log-mode clones of the PSG H2O and CO2 columns over 16000-16050 Å (both absorb there)."""
    from blase_specutils import clone_spectrum, load_template

    return {mol: clone_spectrum(load_template("psg-igrins", molecule=mol), band=(16000, 16050) * u.AA,
                                buffer=5 * u.AA, flatten=False, mode="log", progress=False)
            for mol in ("H2O", "CO2")}


def test_per_molecule_powers_recovered_from_psg_mixture(psg_molecule_clones):
    """T_H2O^0.6 T_CO2^1.4 made from the PSG columns: each molecule's power comes back within 5 %
    and within 4σ; one power for the total cannot fit the same data."""
    truth = {"H2O": 0.6, "CO2": 1.4}
    data = _psg_mixture((16000.0, 16050.0), truth)
    fit = fit_spectrum(data, telluric=psg_molecule_clones, resolving_power=45000, tune_telluric=(),
                       line_epochs=0, progress=False)
    powers = fit.telluric_power
    assert set(powers) == {"H2O", "CO2"}
    for mol, x in truth.items():
        sigma = fit.uncertainties[f"telluric_power_{mol}"]
        assert abs(powers[mol] - x) < 0.05 * x and abs(powers[mol] - x) < 4 * sigma + 0.01 * x, (mol, powers, sigma)
    assert fit.chi2_reduced < 1.5
    assert set(fit.telluric_lines["component"]) == {"H2O", "CO2"}
    summary = fit.summary()
    assert set(summary["telluric_power"]) == {"H2O", "CO2"} and set(summary["telluric_power_sigma"]) == {"H2O", "CO2"}
    # the same lines with one power common to both molecules
    merged, _ = LineCloneModel.concatenate([c.model for c in psg_molecule_clones.values()])
    single = fit_spectrum(data, telluric=SpectralClone(merged, meta={"kind": "telluric"}), resolving_power=45000,
                          tune_telluric=(), line_epochs=0, progress=False)
    assert single.chi2_reduced > 3 * fit.chi2_reduced


def test_per_molecule_components_checked(psg_molecule_clones, telfit_window_clone):
    with pytest.raises(ValueError, match="lsf"):
        fit_spectrum(_psg_mixture((16000.0, 16050.0), {"H2O": 1.0}),
                     telluric={"H2O": psg_molecule_clones["H2O"], "telfit": telfit_window_clone}, progress=False)
    with pytest.raises(TypeError, match="SpectralClone"):
        fit_spectrum(_psg_mixture((16000.0, 16050.0), {"H2O": 1.0}), telluric={"H2O": "h2o.fits"}, progress=False)
    with pytest.raises(ValueError, match="molecule"):
        from blase_specutils import load_template

        load_template("psg-igrins", molecule="N2")


def test_command_line_fits_one_power_per_named_telluric_clone(psg_molecule_clones, tmp_path, capsys):
    """``fit --telluric H2O=h2o.fits --telluric CO2=co2.fits``: one power per component, named, as
    the Python API gives them; unnamed components take the clone's molecule; bad names are usage
    errors, an unknown molecule of a template a data error, both before any fit."""
    from blase_specutils.cli import main

    truth = {"H2O": 0.6, "CO2": 1.4}
    data = tmp_path / "mixture.fits"
    _psg_mixture((16000.0, 16050.0), truth).write(data, format="tabular-fits")
    files = {}
    for mol, clone in psg_molecule_clones.items():
        files[mol] = clone.save(tmp_path / f"{mol.lower()}.fits")
    common = [str(data), "--resolving-power", "45000", "--template-only", "--json", "-q", "-o", str(tmp_path / "out")]
    assert main(["fit", *common, "--telluric", f"H2O={files['H2O']}", "--telluric", f"CO2={files['CO2']}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["telluric_power"]) == {"H2O", "CO2"}
    for mol, x in truth.items():
        assert abs(summary["telluric_power"][mol] - x) < 0.05 * x
    # unnamed: the clones' own molecule names them
    assert all(c.meta.get("molecule") == mol for mol, c in psg_molecule_clones.items())
    assert main(["fit", *common, "--telluric", str(files["H2O"]), "--telluric", str(files["CO2"])]) == 0
    assert set(json.loads(capsys.readouterr().out)["telluric_power"]) == {"H2O", "CO2"}
    with pytest.raises(SystemExit, match="'W' is given twice"):
        main(["fit", *common, "--telluric", f"W={files['H2O']}", "--telluric", f"W={files['CO2']}"])
    with pytest.raises(SystemExit, match="molecule 'XYZ'.*H2O"):
        main(["fit", *common, "--telluric", "psg-igrins:XYZ"])
    with pytest.raises(SystemExit, match="fit-many takes one telluric"):
        main(["fit-many", str(data), "--telluric", str(files["H2O"]), "--telluric", str(files["CO2"]),
              "-o", str(tmp_path / "many")])


def test_template_names_are_cloned_once_and_cached(tmp_path, monkeypatch):
    """A template's name gives its clone over the data's range, from the cache the second time; a
    new package version uses a new key (the old clone is not reused)."""
    import time

    import blase_specutils.template_cache as tc

    monkeypatch.setenv("BLASE_SPECUTILS_CACHE", str(tmp_path))
    assert tc.cache_folder() == tmp_path
    first = tc.template_clone("telfit-hpf", (9080.0, 9085.0), progress=False)
    files = list(tmp_path.glob("telfit-hpf_*.fits"))
    assert len(files) == 1 and first.instrument_resolution
    assert first.band == (9040.0, 9130.0)
    t0 = time.perf_counter()
    again = tc.template_clone("telfit-hpf", (9081.0, 9084.0), progress=False)
    assert time.perf_counter() - t0 < 5.0
    np.testing.assert_array_equal(again.model.lam_centers.detach().numpy(), first.model.lam_centers.detach().numpy())
    monkeypatch.setattr(tc, "__version__", "999.0")
    assert tc._key("telfit-hpf", (9040.0, 9130.0), tc._settings("telfit-hpf")) not in files[0].name
    with pytest.raises(ValueError, match="outside the band"):
        tc.template_clone("telfit-hpf", (20000.0, 20100.0), progress=False)
    with pytest.raises(ValueError, match="only 'psg-igrins' has per-molecule columns"):
        tc.template_clone("telfit-hpf", (9080.0, 9085.0), molecule="H2O", progress=False)


def test_component_without_lines_near_the_data_gets_no_power(psg_molecule_clones):
    """A molecule whose lines all lie away from the data is left out of the fit (no power to fit)."""
    far = LineCloneModel([17000.0, 17001.0], [-2.0, -2.0], [-2.5, -2.5], [-4.0, -4.0], mode="log")
    data = _psg_mixture((16000.0, 16050.0), {"H2O": 1.0, "CO2": 1.0})
    fit = fit_spectrum(data, telluric={**psg_molecule_clones, "far": SpectralClone(far)}, resolving_power=45000,
                       tune_telluric=(), line_epochs=0, template_epochs=100, progress=False)
    assert set(fit.telluric_power) == {"H2O", "CO2"}


def test_clone_trained_for_beer_powers_holds_inside_saturated_bands():
    """A PSG water clone trained on T alone is blind where T ≈ 0; trained for T^X over a range of X
    it stays right at the small powers of a dry night, and as good at X = 1."""
    from blase_specutils import clone_spectrum, load_template

    water = load_template("psg-igrins", molecule="H2O")
    band = (17600.0, 17640.0)
    kw = dict(band=band * u.AA, buffer=5 * u.AA, flatten=False, mode="log", progress=False, epochs=400)
    plain = clone_spectrum(water, **kw)
    powered = clone_spectrum(water, powers=(0.02, 0.05, 0.15, 0.4, 1.0), **kw)
    assert powered.meta["powers"] == "0.02,0.05,0.15,0.4,1"
    w = water.spectral_axis.to_value(u.AA)
    sel = (w > band[0]) & (w < band[1])
    log_t = np.log(np.clip(water.flux.value[sel], 1e-300, None))

    def rms(clone, x):
        with torch.no_grad():
            log_c = clone.model.log_flux(torch.as_tensor(w[sel])).numpy()
        return float(np.sqrt(np.mean((np.exp(x * log_t) - np.exp(x * log_c)) ** 2)))

    assert rms(powered, 0.04) < rms(plain, 0.04) / 3, (rms(powered, 0.04), rms(plain, 0.04))
    assert rms(powered, 1.0) < 2 * rms(plain, 1.0) + 1e-3
    with pytest.raises(ValueError, match="log"):
        clone_spectrum(water, band=band * u.AA, powers=(0.5, 1.0), progress=False)


def test_result_with_components_and_calibration_round_trips(psg_molecule_clones, tmp_path):
    """Per-molecule powers, their σ, the wavelength correction and the model come back from the file."""
    from blase_specutils import TransferResult

    data = _psg_mixture((16000.0, 16050.0), {"H2O": 0.8, "CO2": 1.2})
    fit = fit_spectrum(data, telluric=psg_molecule_clones, resolving_power=45000, tune_telluric=(), line_epochs=0,
                       template_epochs=100, calibration_degree=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt model must match the saved one
        back = TransferResult.load(fit.save(tmp_path / "fit.fits"))
    assert back.telluric_power == pytest.approx(fit.telluric_power, rel=1e-12)
    assert back.template["telluric_power"] == pytest.approx(fit.template["telluric_power"], rel=1e-12)
    for mol in ("H2O", "CO2"):
        assert back.uncertainties[f"telluric_power_{mol}"] == pytest.approx(fit.uncertainties[f"telluric_power_{mol}"])
    np.testing.assert_array_equal(back.telluric_lines["component"], fit.telluric_lines["component"])
    np.testing.assert_allclose(back.wavelength_correction["coefficients"].value,
                               fit.wavelength_correction["coefficients"].value, rtol=0, atol=1e-9)
    with torch.no_grad():
        np.testing.assert_allclose(back.model().numpy(), fit.model_flux, rtol=0, atol=1e-10)


def test_line_stage_holds_power_and_resolution_when_telluric_widths_are_tuned(psg_molecule_clones):
    """Telluric widths, R and the Beer's-law powers are nearly degenerate: with the widths tuned
    the line stage keeps X and R at their template-matching values (as v sin i with the stellar
    widths). With the amplitudes of log-mode clones alone X·a is exactly degenerate, so X holds too,
    while R, which no tuned width competes with, stays free."""
    data = _psg_mixture((16000.0, 16050.0), {"H2O": 0.6, "CO2": 1.4})
    kw = dict(telluric=psg_molecule_clones, resolving_power=45000, tune_resolving_power=True, template_epochs=100,
              line_epochs=60, progress=False)
    widths = fit_spectrum(data, tune_telluric=("amplitude", "sigma", "gamma"), **kw)
    assert widths.fit.stages["lines"].epochs_run > 0
    assert widths.telluric_power == widths.template["telluric_power"]
    assert widths.resolving_power == pytest.approx(widths.template["resolving_power"], rel=1e-12)
    amplitudes = fit_spectrum(data, tune_telluric=("amplitude",), **kw)
    assert amplitudes.telluric_power == amplitudes.template["telluric_power"]
    assert amplitudes.resolving_power != pytest.approx(amplitudes.template["resolving_power"], rel=1e-9)


def test_lines_no_pixel_sees_keep_their_clone_values(psg_molecule_clones):
    """Lines whose profiles stay below a depth of 1e-3 at every fitted pixel (here: inside a masked
    stretch of the order) are held at their clone values in the line stage, so that their unseen
    wings cannot trade against the continuum; the lines the pixels see are tuned."""
    from astropy.nddata import StdDevUncertainty
    from specutils import Spectrum

    data = _psg_mixture((16000.0, 16050.0), {"H2O": 0.6, "CO2": 1.4})
    w = data.spectral_axis.to_value(u.AA)
    masked = w > 16028.0
    data = Spectrum(spectral_axis=data.spectral_axis, flux=data.flux, uncertainty=StdDevUncertainty(data.uncertainty.array),
                    mask=masked)
    fit = fit_spectrum(data, telluric=psg_molecule_clones, resolving_power=45000, tune_telluric=("amplitude",),
                       template_epochs=60, line_epochs=80, progress=False)
    lines = fit.telluric_lines
    center = lines["center"].to_value(u.AA)
    unchanged = lines["amplitude_fit"] == lines["amplitude_clone"]
    deep_inside_mask = center > 16034.0
    seen = center < 16026.0
    assert deep_inside_mask.sum() > 3 and seen.sum() > 3
    assert np.all(unchanged[deep_inside_mask])
    assert np.mean(~unchanged[seen]) > 0.5


@pytest.fixture(scope="module")
def psg_saturated_clone():
    """A log-mode clone of the PSG H2O column over 14630-14660 Å, inside the 1.4 µm band that PSG's
    own column saturates (trained for the powers a dry night needs)."""
    from blase_specutils import clone_spectrum, load_template

    return clone_spectrum(load_template("psg-igrins", molecule="H2O"), band=(14630, 14660) * u.AA, buffer=5 * u.AA,
                          flatten=False, mode="log", powers=(0.02, 0.05, 0.15, 0.4, 1.0), epochs=150, progress=False)


def test_transmission_extrapolated_from_a_saturated_template_is_flagged(psg_saturated_clone):
    """A night 30 times drier than PSG's column, seen through a band that the template saturates:
    the fitted T^X there rests on depths the template does not record, and the fit says so. The
    template's own column fitted through the same band is not flagged (nothing is extrapolated)."""
    band = (14630.0, 14660.0)
    dry = fit_spectrum(_psg_mixture(band, {"H2O": 0.03}), telluric={"H2O": psg_saturated_clone},
                       resolving_power=45000, tune_telluric=(), line_epochs=0, progress=False)
    assert "telluric_template_saturated" in {f.code for f in dry.flags}
    wet = fit_spectrum(_psg_mixture(band, {"H2O": 1.0}), telluric={"H2O": psg_saturated_clone},
                       resolving_power=45000, tune_telluric=(), line_epochs=0, progress=False)
    assert "telluric_template_saturated" not in {f.code for f in wet.flags}
    assert 0.7 < wet.telluric_power < 1.4 and dry.telluric_power < 0.1  # one component: one power


def test_wavelength_correction_is_judged_at_the_fitted_pixels(water_fit):
    """A linear correction under 2 km/s at the fitted pixels reaches more beyond them, where an
    order's masked ends lie (IGRINS order 9: 1.8 km/s fitted, 2.2 km/s at the masked end): only the
    fitted pixels count for ``wavelength_correction_large``."""
    import copy

    from blase_specutils.core.diagnostics import _calibration_flags

    model = copy.deepcopy(water_fit.model)
    weight = torch.as_tensor(water_fit.good).double()
    n = weight.numel()
    weight[-n // 5:] = 0.0  # a masked stretch at the red end
    with torch.no_grad():
        model.calibration_coeffs.zero_()
        model.calibration_coeffs[:, 0] = -1.2  # δv = -1.2 (1 + x) km/s: 0 at the blue end, 2.4 at the red
        model.calibration_coeffs[:, 1] = -1.2
    dv = model.velocity_correction().abs()
    assert float(dv.max()) > 2.3 and float(dv[weight > 0].max()) < 2.0
    assert [f.code for f in _calibration_flags(model)] == ["wavelength_correction_large"]
    assert _calibration_flags(model, weight) == []
