"""Batches of clones and fits, serially and on a two-worker Dask LocalCluster (loopback)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.table import QTable, Table
from specutils import Spectrum

from blase_specutils import load_blase03, load_template, read_spectrum
from blase_specutils.batch import (
    BatchResult,
    LineGrid,
    clone_grid,
    clone_many,
    fit_many,
    hpf_order_jobs,
    match_lines,
    run_batch,
)
from conftest import SHARED_DATA, _need

#: A telluric band rich in water lines; the TelFit model at airmass X is T^X (Beer's law), so the
#: airmasses make a real one-parameter model grid.
BAND = (8100.0, 8120.0) * u.AA
AIRMASSES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5)
CLONE_SETTINGS = dict(band=BAND, buffer=2 * u.AA, prominence=0.02, epochs=150, flatten=False)


@pytest.fixture(scope="module")
def airmass_grid():
    tel = load_template("telfit-hpf")
    wl = tel.spectral_axis.to_value(u.AA)
    sel = (wl > BAND[0].value - 3) & (wl < BAND[1].value + 3)
    axis = tel.spectral_axis[sel]
    return [Spectrum(spectral_axis=axis, flux=tel.flux[sel] ** x, meta={"name": f"airmass{x}"}) for x in AIRMASSES]


@pytest.fixture(scope="module")
def serial_clones(airmass_grid):
    return clone_many(airmass_grid, threads_per_task=1, progress=False, **CLONE_SETTINGS)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _lines(centers, amps) -> QTable:
    t = QTable()
    t["center"] = np.asarray(centers, float) * u.AA
    t["amplitude"] = np.asarray(amps, float) * u.AA
    return t


# ----------------------------------------------------------------------------- line matching
def test_match_lines_follows_shifting_lines():
    # line at 10000 Å drifts by 0.05 Å per point (1.5 km/s < 3 km/s); a line appears at point 1,
    # one vanishes at point 1 and returns at point 2; a far line never matches anything
    tables = [
        _lines([10000.00, 10010.0, 10020.0], [1, 2, 3]),
        _lines([10000.05, 10005.0, 10020.02], [1.1, 5, 3.1]),
        _lines([10000.10, 10005.01, 10010.03], [1.2, 5.1, 2.2]),
    ]
    params = [{"teff": 5000}, {"teff": 5100}, {"teff": 5200}]
    grid = match_lines(tables[::-1], params[::-1], labels=["c", "b", "a"])  # order of the inputs does not matter
    assert isinstance(grid, LineGrid)
    values, ids, points = grid.pivot("amplitude")
    assert list(points["teff"]) == [5000, 5100, 5200]
    assert values.shape == (4, 3)  # 10000, 10005, 10010, 10020 Å
    np.testing.assert_allclose(values[0], [1, 1.1, 1.2])
    np.testing.assert_allclose(values[1], [np.nan, 5, 5.1])
    np.testing.assert_allclose(values[2], [2, np.nan, 2.2])
    np.testing.assert_allclose(values[3], [3, 3.1, np.nan])
    assert len(grid.line(0)) == 3 and grid.line(0)["teff"][0] == 5000


def test_match_lines_tolerance_and_errors():
    tables = [_lines([10000.0], [1]), _lines([10000.2], [1])]  # 6 km/s apart
    params = [{"teff": 1}, {"teff": 2}]
    assert len(np.unique(match_lines(tables, params).table["line_id"])) == 2
    assert len(np.unique(match_lines(tables, params, tolerance=10 * u.km / u.s).table["line_id"])) == 1
    assert len(np.unique(match_lines(tables, params, tolerance=0.3 * u.AA).table["line_id"])) == 1
    with pytest.raises(u.UnitsError, match="velocity or a wavelength"):
        match_lines(tables, params, tolerance=3 * u.s)
    with pytest.raises(ValueError, match="2 line tables"):
        match_lines(tables, params[:1])
    # one line of point 2 cannot claim two lines of point 1: closest wins, the other starts its own line
    t2 = [_lines([10000.0, 10000.05], [1, 2]), _lines([10000.03], [3])]
    grid = match_lines(t2, params)
    values, _, _ = grid.pivot("amplitude")
    assert values.shape == (2, 2) and np.nansum(values[:, 1]) == 3


# ---------------------------------------------------------------------------- serial engine
def _flaky(item):
    if item == 3:
        raise ValueError("item three is broken")
    return {"summary": {"square": item * item, "nested": {"half": item / 2}}}


def test_run_batch_records_errors_and_keeps_order(tmp_path):
    res = run_batch(_flaky, range(6), progress=False, summary_path=tmp_path / "s.ecsv")
    assert isinstance(res, BatchResult) and len(res) == 6 and not res.ok
    assert [r.index for r in res] == list(range(6))
    assert [r.label for r in res][:2] == ["item 0", "item 1"]
    bad = res.failed
    assert len(bad) == 1 and bad[0].index == 3 and bad[0].error == "ValueError: item three is broken"
    assert "Traceback" in bad[0].traceback
    assert [r.summary.get("square") for r in res] == [0, 1, 4, None, 16, 25]
    t = Table.read(tmp_path / "s.ecsv")
    assert list(t["ok"]) == [True, True, True, False, True, True]
    assert t["nested.half"][4] == 2.0 and np.isnan(t["square"][3])
    with pytest.raises(ValueError, match="labels"):
        run_batch(_flaky, range(3), labels=["a"], progress=False)
    with pytest.raises(ValueError, match="threads_per_task"):
        run_batch(_flaky, range(3), threads_per_task=0, progress=False)


def test_clone_grid_airmass_follows_beers_law(airmass_grid, tmp_path):
    grid = clone_grid(airmass_grid, [{"airmass": x} for x in AIRMASSES], output_dir=tmp_path, progress=False,
                      **CLONE_SETTINGS)
    assert grid.batch.ok and len(grid.batch) == len(AIRMASSES)
    values, ids, points = grid.pivot("equivalent_width")
    everywhere = np.all(np.isfinite(values), axis=1)
    assert everywhere.sum() >= 10, f"only {everywhere.sum()} lines matched across all airmasses"
    w = values[everywhere]
    # equivalent widths grow with airmass (T^X). Blends can be re-split between neighbours when a
    # new weak line crosses the prominence threshold, so most (not all) single lines grow
    # monotonically; the total equivalent width of the band always does, and never faster than X
    # (curve of growth)
    assert np.mean(np.all(np.diff(w, axis=1) > 0, axis=1)) >= 0.75
    total = np.nansum(values, axis=0)
    assert np.all(np.diff(total) > 0)
    assert 1.5 < total[-1] / total[0] <= AIRMASSES[-1] / AIRMASSES[0] * 1.05
    assert (tmp_path / "grid_lines.ecsv").exists() and (tmp_path / "summary.ecsv").exists()
    assert len(list(tmp_path.glob("*_clone.fits"))) == len(AIRMASSES)
    back = QTable.read(tmp_path / "grid_lines.ecsv")
    assert back["center"].unit == u.AA and "airmass" in back.colnames
    import matplotlib

    matplotlib.use("Agg")
    fig = grid.plot_heatmap("amplitude")
    fig.savefig(tmp_path / "heat.png")
    with pytest.raises(ValueError, match="grid parameter"):
        grid.plot_heatmap(parameter="teff")


# ----------------------------------------------------------------------------------- cluster
def _params(clone):
    m = clone.model
    return np.concatenate([m.lam_centers.detach().numpy(), m.log_amplitudes.detach().numpy(),
                           m.log_sigmas.detach().numpy(), m.log_gammas.detach().numpy()])


def test_cluster_results_identical_to_serial(client, airmass_grid, serial_clones):
    serial = serial_clones
    parallel = clone_many(airmass_grid, client=client, progress=False, **CLONE_SETTINGS)
    assert serial.ok and parallel.ok
    assert parallel.n_workers == 2 and {r.threads for r in parallel} == {1}
    assert len({r.worker for r in parallel}) == 2  # both workers took jobs
    for a, b in zip(serial, parallel):
        assert a.label == b.label
        np.testing.assert_array_equal(_params(a.result), _params(b.result))


def test_worker_killed_mid_batch(client, airmass_grid, serial_clones, tmp_path):
    reference = serial_clones
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    killed = threading.Event()

    def kill_after_first_product():
        t0 = time.time()
        while time.time() - t0 < 120:
            if list(tmp_path.glob("*_clone.fits")):
                os.kill(victim, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_product, daemon=True)
    watcher.start()
    res = clone_many(airmass_grid, client=client, output_dir=tmp_path, progress=False, **CLONE_SETTINGS)
    watcher.join()
    assert killed.is_set()
    done = sum(1 for r in res if r.ok)
    assert done == len(airmass_grid), [r.error for r in res.failed]
    # every product is there and equals the serial clone
    from blase_specutils import SpectralClone

    for ref, rec in zip(reference, res):
        assert rec.result is None  # products went to disk, not to the client
        back = SpectralClone.load(rec.output)
        np.testing.assert_allclose(_params(back), _params(ref.result), rtol=0, atol=1e-12)
    client.wait_for_workers(2, timeout=60)


def test_corrupt_file_fails_only_its_item(client, airmass_grid, tmp_path):
    good = tmp_path / "good.ecsv"
    t = QTable()
    t["wavelength"] = u.Quantity(airmass_grid[0].spectral_axis)
    t["flux"] = airmass_grid[0].flux
    t.write(good)
    bad = tmp_path / "corrupt.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + os.urandom(3000))
    missing = tmp_path / "missing.fits"
    res = clone_many([good, bad, missing], client=client, progress=False, **CLONE_SETTINGS)
    assert [r.label for r in res] == ["good", "corrupt", "missing"]
    assert res[0].ok and res[0].summary["n_lines"] > 0
    assert not res[1].ok and "could not read" in res[1].error
    assert not res[2].ok and res[2].error.startswith("FileNotFoundError")


def test_fit_many_wasp69_on_cluster_equals_serial(client, blase03_clone_path, tmp_path):
    path = _need(SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits")
    spec = read_spectrum(path)
    clone = load_blase03(blase03_clone_path)
    wl = spec.spectral_axis.to_value(u.AA)
    halves = [spec[: wl.size // 2], spec[wl.size // 2:]]
    kw = dict(line_epochs=0, template_epochs=60, rv=-9.0)
    serial = fit_many(halves, clone, threads_per_task=1, progress=False, **kw)
    par = fit_many(halves, clone, client=client, output_dir=tmp_path, progress=False, **kw)
    assert serial.ok and par.ok
    for a, b in zip(serial, par):
        assert b.summary["rv_kms"] == a.summary["rv_kms"] and b.summary["chi2"] == a.summary["chi2"]
        assert -11 < a.summary["rv_kms"] < -8
        assert Path(b.output).exists()
    t = Table.read(tmp_path / "summary.ecsv")
    assert len(t) == 2 and np.all(t["ok"]) and "rv_kms" in t.colnames


def test_fit_many_telluric_only(telfit_window_clone, hr4829_water_window, tmp_path):
    """A telluric clone alone: one telluric-only fit per input, RV and v sin i missing in the summary."""
    d = hr4829_water_window
    half = d.spectral_axis.size // 2
    items = [d[:half], d[half:]]
    res = fit_many(items, telluric=telfit_window_clone, output_dir=tmp_path, progress=False,
                   resolving_power=55000.0, template_epochs=40, line_epochs=40)
    assert res.ok and len(res) == 2
    for r in res:
        assert r.summary["components"] == "telluric"
        assert r.summary["rv_kms"] is None and r.summary["telluric_power"] > 0
        assert r.summary["chi2_reduced"] < r.summary["template_matching"]["chi2_reduced"]
    t = Table.read(tmp_path / "summary.ecsv")
    assert len(t) == 2 and np.all(t["ok"])
    with pytest.raises(TypeError, match="a telluric clone, or both"):
        fit_many(items, progress=False)


def test_hpf_order_jobs_and_bad_clone(tmp_path):
    gold = _need(SHARED_DATA / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits")
    items, labels = hpf_order_jobs([gold, tmp_path / "x.fits"], orders=[3, 4])
    assert items == [(str(gold), 3), (str(gold), 4), (str(tmp_path / "x.fits"), None)]
    assert labels[0].endswith("_order03")
    with pytest.raises(FileNotFoundError, match="no clone file"):
        fit_many(items, tmp_path / "nothing.fits", progress=False)
    with pytest.raises(TypeError, match="SpectralClone"):
        fit_many(items, 42, progress=False)
    with pytest.raises(ValueError, match="no inputs"):
        clone_many([], progress=False)


class _NoCluster:
    """Stands in for a Dask client: any use of it means a job was about to be queued."""

    def __getattr__(self, name):
        raise AssertionError(f"the batch used its client ({name}) before rejecting its arguments")


def test_bad_keywords_and_settings_fail_before_any_job(tmp_path):
    spec = Spectrum(spectral_axis=np.linspace(8660, 8680, 100) * u.AA, flux=np.ones(100) * u.one)
    clone = tmp_path / "not_checked_yet.fits"  # a missing clone would raise FileNotFoundError if checked first
    out = tmp_path / "out"
    with pytest.raises(TypeError, match=r"fit_many got keyword argument\(s\) \['vsin'\].*Valid keywords: .*vsini"):
        fit_many([spec, spec], clone, client=_NoCluster(), output_dir=out, vsin=3, progress=False)
    with pytest.raises(ValueError, match="rv_range must be > 0"):
        fit_many([spec], clone, client=_NoCluster(), output_dir=out, rv_range=-30, progress=False)
    with pytest.raises(TypeError, match="continuum_degree must be an integer"):
        fit_many([spec], clone, client=_NoCluster(), output_dir=out, continuum_degree=2.5, progress=False)
    with pytest.raises(TypeError, match=r"clone_many got keyword argument\(s\) \['promincence'\]"):
        clone_many([spec], client=_NoCluster(), output_dir=out, promincence=0.02, progress=False)
    with pytest.raises(TypeError, match=r"clone_many \(item_kwargs\) got keyword argument\(s\) \['tef'\]"):
        clone_many([spec], client=_NoCluster(), item_kwargs=[{"tef": 5000 * u.K}], progress=False)
    with pytest.raises(TypeError, match=r"\['epoch'\] that clone_spectrum does not take"):
        clone_grid([spec], [{"airmass": 1.0}], client=_NoCluster(), output_dir=out, epoch=10, progress=False)
    with pytest.raises(u.UnitsError, match="tolerance must be a velocity or a wavelength"):
        clone_grid([spec], [{"airmass": 1.0}], client=_NoCluster(), tolerance=3 * u.s, progress=False)
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match="output_dir .*afile is an existing file, not a folder"):
        clone_many([spec], client=_NoCluster(), output_dir=afile, progress=False)


def test_table_without_unit_in_micrometres_fails_its_job(tmp_path):
    """A unitless wavelength column is read as Å; µm numbers fail the job with a clear error, not a 1 Å clone."""
    wl = np.linspace(1.0540, 1.0560, 200)
    t = Table()
    t["wavelength"] = wl  # no unit
    t["flux"] = 1.0 - 0.1 * np.exp(-(((wl - 1.055) / 2e-5) ** 2))
    t.write(tmp_path / "um.csv")
    res = clone_many([tmp_path / "um.csv"], progress=False, prominence=0.02, epochs=1)
    assert not res.ok and res[0].error.startswith("ValueError: the wavelength column of um.csv has no unit")
    assert "they look like µm" in res[0].error


# ------------------------------------------------------------------------------- command line
def test_cli_clone_grid(airmass_grid, tmp_path, capsys):
    import json

    from blase_specutils.cli import main

    rows = []
    for x, spec in zip(AIRMASSES[:3], airmass_grid[:3]):
        t = QTable()
        t["wavelength"] = u.Quantity(spec.spectral_axis)
        t["flux"] = spec.flux
        name = f"tel_X{x}.ecsv"
        t.write(tmp_path / name)
        rows.append((name, x))
    Table(rows=rows, names=("file", "airmass")).write(tmp_path / "grid.csv")
    out = tmp_path / "out"
    rc = main(["clone-grid", str(tmp_path / "grid.csv"), "-o", str(out), "--band", "8100", "8120", "--buffer", "2",
               "--prominence", "0.02", "--epochs", "60", "--no-flatten", "--json", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["jobs"] == 3 and summary["failed"] == 0 and summary["matched_lines"] >= 10
    grid = QTable.read(out / "grid_lines.ecsv")
    assert set(grid["airmass"]) == {1.0, 1.25, 1.5}
    assert len(list(out.glob("*_clone.fits"))) == 3
    with pytest.raises(SystemExit, match="'file' column"):
        Table(rows=[(1.0,)], names=("airmass",)).write(tmp_path / "bad.csv")
        main(["clone-grid", str(tmp_path / "bad.csv"), "-q"])


def test_cli_fit_many_local_cluster(blase03_clone_path, tmp_path, capsys):
    import json

    from blase_specutils.cli import main

    wasp = _need(SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits")
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"not a FITS file at all")
    out = tmp_path / "fits"
    rc = main(["fit-many", str(wasp), str(bad), "--stellar", str(blase03_clone_path), "--template-only",
               "--rv-range", "20", "--scheduler", "local", "--workers", "2", "-o", str(out), "--json"])
    assert rc == 1  # one job failed
    summary = json.loads(capsys.readouterr().out)
    assert summary["jobs"] == 2 and summary["failed"] == 1 and summary["workers"] == 2
    assert "broken" in summary["errors"] and "could not read" in summary["errors"]["broken"]
    t = Table.read(out / "summary.ecsv")
    good = t[t["label"] == "WASP_69_hpf_stack"][0]
    assert good["ok"] and -11 < good["rv_kms"] < -8
    assert (out / "WASP_69_hpf_stack_fit.fits").exists()
