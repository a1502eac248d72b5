"""Saved files at the boundary (issue 21): atomic saves, and loaders that check what they read.

Every test here failed on the code before issue 21 (a failed save destroyed the previous file;
damaged files loaded silently wrong or raised IndexError/KeyError/AttributeError), except the
malicious-pickle test, which pins down a refusal that was right but untested.
"""

from __future__ import annotations

import errno
import os

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.io import fits
from specutils import Spectrum

import blase_specutils.io as bio
from blase_specutils.cloning import CloneFileError, SpectralClone, load_blase03
from blase_specutils.core.clone import LineCloneModel

N_LINES = 12


@pytest.fixture(scope="module")
def small_clone(blase03_clone_path) -> SpectralClone:
    """12 real lines of the paper's 4700 K clone near 8700 Å, one of them broad (a WING row), with
    a target spectrum: every HDU a saved clone can have."""
    full = load_blase03(blase03_clone_path)
    m = full.model
    c = m.lam_centers.detach().numpy()
    idx = np.flatnonzero(c > 8700.0)[:N_LINES]
    model = LineCloneModel(c[idx], m.log_amplitudes.detach().numpy()[idx], m.log_sigmas.detach().numpy()[idx],
                           m.log_gammas.detach().numpy()[idx], broad_lines=[3], tune=("amplitude", "wing"))
    wl = np.linspace(c[idx][0] - 1.0, c[idx][-1] + 1.0, 400)
    clone = SpectralClone(model, band=(float(wl[0]), float(wl[-1])), meta={"prom": 0.01})
    flux = clone.evaluate(wl * u.AA).flux.value
    clone.target = Spectrum(spectral_axis=wl * u.AA, flux=flux * u.dimensionless_unscaled, mask=np.zeros(wl.size, bool))
    return clone


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _disk_full_writer(self, fileobj, *args, **kwargs):
    """``HDUList.writeto`` that dies half-way, as on a full disk: it leaves a partial file behind."""
    with open(fileobj, "wb") as fh:
        fh.write(b"SIMPLE  =                    T / half a header, then the disk was full")
    raise OSError(errno.ENOSPC, "No space left on device")


# ------------------------------------------------------------------------------ A. atomic saves
def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "product.fits"
    path.write_bytes(b"the previous good file")

    def fails(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.EFBIG, "File too large")

    with pytest.raises(OSError, match="too large"):
        bio.atomic_write(path, fails, overwrite=True)
    assert path.read_bytes() == b"the previous good file"
    assert _listing(tmp_path) == ["product.fits"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        bio.atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    bio.atomic_write(path, lambda tmp: tmp.write_bytes(b"new"), overwrite=True)
    assert path.read_bytes() == b"new" and _listing(tmp_path) == ["product.fits"]


def test_atomic_write_cleans_up_after_ctrl_c(tmp_path):
    path = tmp_path / "product.fits"
    path.write_bytes(b"old")

    def interrupted(tmp):
        tmp.write_bytes(b"part")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bio.atomic_write(path, interrupted, overwrite=True)
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["product.fits"]


def test_clone_save_failing_mid_write_leaves_the_previous_file(small_clone, tmp_path, monkeypatch):
    path = small_clone.save(tmp_path / "clone.fits")
    before = path.read_bytes()
    monkeypatch.setattr(fits.HDUList, "writeto", _disk_full_writer)
    with pytest.raises(OSError, match="No space left"):
        small_clone.save(path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before, "the previous good clone was destroyed by a failed save"
    assert _listing(tmp_path) == ["clone.fits"], "a failed save left a stray file"
    back = SpectralClone.load(path)
    assert back.n_lines == N_LINES


def test_clone_save_round_trip_and_no_silent_overwrite(small_clone, tmp_path):
    path = small_clone.save(tmp_path / "clone.fits")
    back = SpectralClone.load(path)
    for name in ("lam_centers", "log_amplitudes", "log_sigmas", "log_gammas", "wing_alpha", "wing_log_lt", "wing_log_b"):
        assert torch.equal(getattr(back.model, name), getattr(small_clone.model, name)), name
    with pytest.raises(OSError):
        small_clone.save(path)
    assert _listing(tmp_path) == ["clone.fits"]


# ------------------------------------------------------------------------------ B. the clone loader
def _damaged_copy(good, tmp_path, name, edit) -> os.PathLike:
    path = tmp_path / name
    path.write_bytes(good.read_bytes())
    with fits.open(path, mode="update") as hdul:
        edit(hdul)
    return path


def _set_column(ext, col, index, value):
    def edit(hdul):
        hdul[ext].data[col][index] = value
    return edit


def _set_header(key, value):
    def edit(hdul):
        hdul[0].header[key] = value
    return edit


@pytest.mark.parametrize(
    ("name", "edit", "field"),
    [
        ("emission_string", _set_header("EMISSION", "F"), "EMISSION"),
        ("emission_number", _set_header("EMISSION", 0), "EMISSION"),
        ("farfield_string", _set_header("FARFIELD", "T"), "FARFIELD"),
        ("wing_alpha_nan", _set_column("WING", "alpha", 0, np.nan), "WING.alpha"),
        ("wing_log_b_huge", _set_column("WING", "log_b", 0, 800.0), "WING.log_b"),
        ("log_amp_50", _set_column("LINES", "log_amp", 2, 50.0), "LINES.log_amp"),
        ("log_sigma_800", _set_column("LINES", "log_sigma", 4, 800.0), "LINES.log_sigma"),
        ("log_gamma_minus_800", _set_column("LINES", "log_gamma", 5, -800.0), "LINES.log_gamma"),
        ("centre_nan", _set_column("LINES", "lam_center", 1, np.nan), "LINES.lam_center"),
        ("centre_negative", _set_column("LINES", "lam_center", 1, -5.0), "LINES.lam_center"),
        ("residual_pass_negative", _set_column("LINES", "residual_pass", 0, -1), "LINES.residual_pass"),
        ("broad_index_out_of_range", _set_column("WING", "line", 0, 10_000), "WING.line"),
        ("mode_unknown", _set_header("MODE", "cubic"), "MODE"),
        ("profile_unknown", _set_header("PROFILE", "lorentz"), "PROFILE"),
        ("wingtol_string", _set_header("WINGTOL", "1e-7"), "WINGTOL"),
        ("wingtol_negative", _set_header("WINGTOL", -1.0), "WINGTOL"),
        ("nlines_wrong", _set_header("NLINES", N_LINES + 3), "LINES.lam_center"),
        ("tune_unknown", _set_header("TUNE", "amplitude,colour"), "TUNE"),
        ("band_reversed", _set_header("BANDLO", 1e6), "BANDLO"),
        ("target_unsorted", _set_column("TARGET", "wavelength", 5, 1.0), "TARGET.wavelength"),
    ],
)
def test_damaged_clone_files_name_the_file_and_the_field(small_clone, tmp_path, name, edit, field):
    good = small_clone.save(tmp_path / "good.fits")
    bad = _damaged_copy(good, tmp_path, f"{name}.fits", edit)
    with pytest.raises(CloneFileError) as err:
        SpectralClone.load(bad)
    msg = str(err.value)
    assert bad.name in msg and field in msg, msg


def test_a_missing_extension_is_named(small_clone, tmp_path):
    good = small_clone.save(tmp_path / "good.fits")
    bad = tmp_path / "nowing.fits"
    with fits.open(good) as hdul:
        fits.HDUList([h for h in hdul if h.name != "WING"]).writeto(bad)
    with pytest.raises(CloneFileError, match="WING"):
        SpectralClone.load(bad)


def test_emission_false_stays_absorption(small_clone, tmp_path):
    """The original defect: EMISSION = 'F' (a string) read as True turned absorption into emission."""
    path = small_clone.save(tmp_path / "c.fits")
    assert fits.getheader(path)["EMISSION"] is False
    assert SpectralClone.load(path).model.emission is False


# ------------------------------------------------------------------------------ B. load_blase03
def _state(n=5, **override):
    sd = {"lam_centers": torch.linspace(8700.0, 8710.0, n, dtype=torch.float64),
          "amplitudes": torch.full((n,), -3.0, dtype=torch.float64),
          "sigma_widths": torch.full((n,), -2.5, dtype=torch.float64),
          "gamma_widths": torch.full((n,), -3.0, dtype=torch.float64)}
    sd.update(override)
    return sd


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"amplitudes": [-3.0, -3.0, -3.0, -3.0, -3.0]}, "amplitudes must be a tensor"),
        ({"lam_centers": (8700.0, 8702.5, 8705.0, 8707.5, 8710.0)}, "lam_centers must be a tensor"),
        ({"gamma_widths": {"values": torch.zeros(5)}}, "gamma_widths must be a tensor"),
        ({"sigma_widths": torch.full((4,), -2.5, dtype=torch.float64)}, "different lengths"),
        ({"gamma_widths": torch.full((7,), -3.0, dtype=torch.float64)}, "different lengths"),
        ({"amplitudes": torch.tensor([-3.0, 50.0, -3.0, -3.0, -3.0], dtype=torch.float64)}, "amplitudes"),
        ({"sigma_widths": torch.tensor([-2.5, -2.5, float("nan"), -2.5, -2.5], dtype=torch.float64)}, "sigma_widths"),
        ({"lam_centers": torch.arange(5)}, "floating-point"),
        ({"amplitudes": torch.zeros(5, 2, dtype=torch.float64)}, "1-D"),
    ],
)
def test_blase03_lists_and_ragged_tensors_give_clear_errors(tmp_path, override, match):
    path = tmp_path / "bad.pt"
    torch.save(_state(**override), path)
    with pytest.raises(ValueError, match=match) as err:
        load_blase03(path)
    assert path.name in str(err.value)


def test_blase03_good_small_state_dict_loads(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(_state(), path)
    assert load_blase03(path).n_lines == 5


class _Payload:
    """Unpickling this runs ``touch <marker>``: a stand-in for a .pt file that would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save(_state(amplitudes=_Payload(marker)), path)
    with pytest.raises(ValueError, match="could not read"):
        load_blase03(path)
    assert not marker.exists(), "loading the clone ran code from the pickle"
    # the payload is live: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------ PosteriorFit
@pytest.fixture()
def posterior_path(tmp_path):
    """A small PosteriorFit (3 lines, 60 draws, 40 pixels) saved to FITS; needs the [pyro] extra."""
    pytest.importorskip("pyro", reason="PosteriorFit needs the [pyro] extra")
    from blase_specutils.bayes import PosteriorFit

    gen = np.random.default_rng(5)
    n_lines, n_draws, n_pix = 3, 60, 40
    center = np.array([8701.0, 8704.0, 8707.5])
    clone_v = {"ln_amplitude": np.full(n_lines, -3.0), "ln_sigma": np.full(n_lines, -2.4),
               "ln_gamma": np.full(n_lines, -3.2)}
    fit_v = {k: v + 0.05 for k, v in clone_v.items()}
    samples = {"rv": gen.normal(7.3, 0.1, n_draws), "vsini": gen.normal(2.5, 0.2, n_draws),
               "resolving_power": np.full(n_draws, 55000.0),
               "ln_amplitude": fit_v["ln_amplitude"] + gen.normal(0, 0.05, (n_draws, n_lines)),
               "continuum": gen.normal(1.0, 0.01, (n_draws, 1, 3))}
    wl = np.linspace(8700.0, 8709.0, n_pix)
    data = {"wavelength": wl, "flux": 1 - 0.1 * gen.random(n_pix), "sigma": np.full(n_pix, 0.01),
            "good": np.ones(n_pix, bool), "order": np.zeros(n_pix, np.int64), "flux_unit": u.dimensionless_unscaled}
    post = PosteriorFit(samples=samples, fit_values=fit_v, clone_values=clone_v,
                        line_info={"center": center, "mode": "linear", "sign": 1.0, "profile": "pseudo-voigt"},
                        data=data, predictive=np.tile(data["flux"], (20, 1)), elbo_history=-np.arange(50.0)[::-1],
                        settings={"guide": "normal", "num_steps": 50, "lr": 0.03, "regularization": 0.15,
                                  "tuned": "amplitude,rv,vsini,continuum", "seed": 3})
    return post, post.save(tmp_path / "post.fits")


def test_posterior_round_trip(posterior_path):
    from blase_specutils.bayes import PosteriorFit

    post, path = posterior_path
    back = PosteriorFit.load(path)
    for k, v in post.samples.items():
        np.testing.assert_array_equal(back.samples[k], v)
    assert back.guide == "normal" and back.measurement("rv").value == post.measurement("rv").value


def test_posterior_save_failing_mid_write_leaves_the_previous_file(posterior_path, monkeypatch):
    from blase_specutils.bayes import PosteriorFit

    post, path = posterior_path
    before = path.read_bytes()
    monkeypatch.setattr(fits.HDUList, "writeto", _disk_full_writer)
    with pytest.raises(OSError, match="No space left"):
        post.save(path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _listing(path.parent) == [path.name]
    assert PosteriorFit.load(path).n_samples == post.n_samples


def _drop_header(key):
    def edit(hdul):
        del hdul[0].header[key]
    return edit


def _drop_hdu(name):
    def edit(hdul):
        del hdul[name]
    return edit


def _replace_hdu(name, make):
    def edit(hdul):
        hdul[name] = make(hdul)
    return edit


def _values_without(col):
    def make(hdul):
        old = hdul["VALUES"]
        return fits.BinTableHDU.from_columns([c for c in old.columns if c.name != col], name="VALUES")
    return make


def _short_predict(hdul):
    return fits.ImageHDU(np.asarray(hdul["PREDICT"].data)[:, :-5], name="PREDICT")


def _short_lines(hdul):
    return fits.BinTableHDU(hdul["LINES"].data[:-1], header=hdul["LINES"].header, name="LINES")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_drop_header("GUIDE"), "GUIDE"),
        (_set_header("GUIDE", "magic"), "GUIDE"),
        (_drop_header("LINEMODE"), "LINEMODE"),
        (_set_header("LSIGN", "plus"), "LSIGN"),
        (_set_header("LSIGN", 0.3), "LSIGN"),
        (_set_header("BUNIT", "not a unit at all"), "BUNIT"),
        (_set_header("REGUL", "strong"), "REGUL"),
        (_drop_hdu("SAMPLES"), "SAMPLES"),
        (_drop_hdu("PREDICT"), "PREDICT"),
        (_set_column("SAMPLES", "rv", 3, np.nan), "SAMPLES.rv"),
        (_replace_hdu("VALUES", _values_without("ln_sigma_fit")), "VALUES.ln_sigma_fit"),
        (_set_column("VALUES", "ln_amplitude_fit", 1, 50.0), "VALUES.ln_amplitude_fit"),
        (_set_column("VALUES", "center", 0, np.nan), "VALUES.center"),
        (_replace_hdu("PREDICT", _short_predict), "PREDICT"),
        (_replace_hdu("LINES", _short_lines), "LINES"),
        (_set_column("DATA", "order", 2, -4), "DATA.order"),
    ],
)
def test_damaged_posterior_files_name_the_file_and_the_field(posterior_path, tmp_path, edit, field):
    from blase_specutils.bayes import PosteriorFit

    _, good = posterior_path
    bad = _damaged_copy(good, tmp_path, "damaged.fits", edit)
    with pytest.raises(ValueError) as err:
        PosteriorFit.load(bad)
    assert type(err.value).__name__ == "SavedFileError", f"{type(err.value).__name__}: {err.value}"
    assert bad.name in str(err.value) and field in str(err.value), str(err.value)
    assert err.value.field.startswith(field.split(".")[0])


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
def test_truncated_or_garbage_posterior_files(posterior_path, tmp_path, cut):
    from blase_specutils.bayes import PosteriorFit

    _, good = posterior_path
    raw = good.read_bytes()
    bad = tmp_path / "cut.fits"
    bad.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(ValueError) as err:
        PosteriorFit.load(bad)
    assert type(err.value).__name__ == "SavedFileError" and bad.name in str(err.value)
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"not a FITS file " * 300)
    with pytest.raises(ValueError, match="garbage.fits"):
        PosteriorFit.load(garbage)
    with pytest.raises(FileNotFoundError):
        PosteriorFit.load(tmp_path / "missing.fits")
