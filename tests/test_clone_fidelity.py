"""Clone fidelity on a line-rich cool star: residual passes, centres, the fidelity numbers and the
weakest windows (real data: the MOOG 4250 K synthesis in ../shared/data, muler's PHOENIX template)."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
import torch
from specutils import Spectrum

from blase_specutils import SpectralClone, clone_spectrum
from blase_specutils.core import LineCloneModel
from blase_specutils.core.detection import residual_lines



def _moog_slice(d: dict, lo: float, hi: float, pad: float = 30.0) -> Spectrum:
    wl = d["wave_vac"]
    sel = (wl >= lo - pad) & (wl <= hi + pad)
    return Spectrum(spectral_axis=wl[sel] * u.AA, flux=d["flux_norm"][sel] * u.dimensionless_unscaled)


@pytest.fixture(scope="module")
def hard_slice_clone(moog4250):
    """The default clone of 50 Å of the 4250 K synthesis in its hardest stretch (11000-11800 Å):
    saturated lines with damping wings and dense molecular blends."""
    import warnings

    from blase_specutils.cloning import EdgeWingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EdgeWingWarning)  # the 30 Å pad may end in a wing
        return clone_spectrum(_moog_slice(moog4250, 11100.0, 11150.0), band=(11100, 11150) * u.AA, progress=False)


def test_a_cool_star_slice_reaches_the_fidelity_target(hard_slice_clone):
    c = hard_slice_clone
    fid = c.fidelity()
    assert fid["band"] == (11100.0, 11150.0) and fid["n_pixels"] > 4900
    assert fid["rms"] <= 0.008, fid
    # the passes ran, were recorded line by line, and each kept pass paid
    assert len(c.passes) >= 2 and (c.line_pass > 0).sum() == sum(p["added"] for p in c.passes[1:])
    rms = [p["rms"] for p in c.passes]
    assert all(b < a for a, b in zip(rms, rms[1:]))  # every kept pass lowered the RMS
    # passes went on only while each paid 5 %: all but the last of those that ran did
    assert all(b <= 0.95 * a for a, b in zip(rms[:-2], rms[1:-1]))
    assert c.history.epochs_run <= 800 and c.meta["nadded"] == int((c.line_pass > 0).sum())
    t = c.lines
    assert np.array_equal(np.asarray(t["residual_pass"]), c.line_pass)


def test_without_passes_the_same_slice_is_far_worse(hard_slice_clone, moog4250):
    """The residual passes, not the epochs, make the difference (same budget, no passes)."""
    import warnings

    from blase_specutils.cloning import EdgeWingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EdgeWingWarning)
        plain = clone_spectrum(_moog_slice(moog4250, 11100.0, 11150.0), band=(11100, 11150) * u.AA, residual_passes=0,
                               epochs=300, progress=False)
    assert plain.n_lines < hard_slice_clone.n_lines
    assert np.all(plain.line_pass == 0) and len(plain.passes) == 1
    assert plain.fidelity()["rms"] > 3 * hard_slice_clone.fidelity()["rms"]


def test_residual_lines_find_an_injected_line_and_nothing_where_the_clone_fits(hard_slice_clone):
    c = hard_slice_clone
    wl = c.target.spectral_axis.to_value(u.AA)
    model = c.evaluate().flux.value
    # a line of depth 3 % and FWHM 0.1 Å injected into the clone's own spectrum, away from strong lines
    centres = c.model.lam_centers.detach().numpy()
    inside = (wl > 11105) & (wl < 11145)
    quiet = inside & (model > 0.97)
    x0 = float(wl[quiet][np.argmax(np.min(np.abs(wl[quiet][:, None] - centres[None, :]), axis=1))])
    injected = model * (1.0 - 0.03 * np.exp(-0.5 * ((wl - x0) / (0.1 / 2.3548)) ** 2))
    found = residual_lines(wl, injected, model, 0.01, region=(11100, 11150))
    assert found is not None and len(found) == 1
    assert abs(found.lam_centers[0] - x0) < 0.011 and 0.025 < found.depth[0] < 0.035
    # the real residual of the clone, scaled so that the clone fits to within 0.1 %: no line
    resid = c.target.flux.value - model
    close = model + resid * (0.001 / np.abs(resid).max())
    assert residual_lines(wl, close, model, 0.01) is None


def test_fidelity_and_worst_windows_describe_the_residual(hard_slice_clone):
    c = hard_slice_clone
    wl = c.target.spectral_axis.to_value(u.AA)
    r = c.target.flux.value - c.evaluate().flux.value
    sel = (wl >= 11100) & (wl <= 11150)
    fid = c.fidelity()
    assert fid["rms"] == pytest.approx(np.sqrt(np.mean(r[sel] ** 2)), rel=1e-12)
    assert fid["max"] == pytest.approx(np.abs(r[sel]).max(), rel=1e-12) and fid["p99"] <= fid["max"]
    t = c.worst_windows(3, width=10 * u.AA)
    assert len(t) == 3 and t["start"].unit == u.AA
    assert np.all(np.diff(t["rms"]) <= 0) and t["rms"][0] >= fid["rms"]
    assert np.allclose((t["end"] - t["start"]).to_value(u.AA), 10.0, atol=0.02)
    centres = np.asarray(c.lines["center"].to_value(u.AA))
    for row in t:
        idx = row["line_indices"]
        assert row["n_lines"] == idx.size
        assert np.all((centres[idx] >= row["start"].value) & (centres[idx] < row["end"].value))
        assert row["n_added"] == int((c.line_pass[idx] > 0).sum())
    # the clone's window with the worst RMS over its 10 Å is the table's first row
    edges = np.arange(wl[sel][0], wl[sel][-1] + 10.0, 10.0)
    scores = [np.sqrt(np.mean(r[sel][(wl[sel] >= a) & (wl[sel] < b)] ** 2)) for a, b in zip(edges, edges[1:])]
    assert t["start"][0].value == pytest.approx(edges[int(np.argmax(scores))])
    with pytest.raises(ValueError, match="n must be >= 1"):
        c.worst_windows(0)


def test_residual_pass_survives_save_and_load(hard_slice_clone, tmp_path):
    path = hard_slice_clone.save(tmp_path / "c.fits")
    back = SpectralClone.load(path)
    assert np.array_equal(back.line_pass, hard_slice_clone.line_pass)
    assert back.fidelity()["rms"] == pytest.approx(hard_slice_clone.fidelity()["rms"], rel=1e-9)


def test_with_lines_keeps_the_old_lines_and_their_wings():
    m = LineCloneModel([10.0, 12.0, 14.0], np.log([0.02, 0.5, 0.03]), np.log([0.05] * 3), np.log([0.05] * 3),
                       broad_lines=[1], tune=("amplitude", "sigma", "gamma", "wing"))
    with torch.no_grad():
        m.wing_alpha.fill_(0.3)
    new, order = m.with_lines([11.0, 15.0], np.log([0.01, 0.01]), np.log([0.04] * 2), np.log([0.04] * 2))
    assert new.n_lines == 5 and torch.all(torch.diff(new.lam_centers) > 0)
    assert order.tolist() == [0, 3, 1, 2, 4]
    assert new.broad_lines.tolist() == [2] and float(new.wing_alpha.detach()[0]) == pytest.approx(0.3)
    assert new.tuned == m.tuned
    with pytest.raises(ValueError, match="finite"):
        m.with_lines([np.nan], [0.0], [0.0], [0.0])
