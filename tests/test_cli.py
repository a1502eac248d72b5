import json

import pytest
from astropy.table import QTable

from blase_specutils import SpectralClone
from blase_specutils.cli import main


def test_clone_template_subband_with_json(tmp_path, capsys):
    rc = main(["clone", "phoenix-10kK-hpf", "--band", "10500", "10650", "--buffer", "10", "--epochs", "40",
               "-o", str(tmp_path), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_lines"] > 10
    assert 0 < summary["rms_residual"] < 0.01
    assert summary["epochs"] <= 40 and summary["seconds"] > 0
    clone = SpectralClone.load(summary["clone_file"])
    assert clone.n_lines == summary["n_lines"]
    table = QTable.read(summary["line_table"])
    assert len(table) == summary["n_lines"] and table["center"].unit == "Angstrom"
    png = open(summary["figure"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_clone_a_file_specutils_reads(tmp_path, capsys):
    import astropy.units as u

    from blase_specutils import load_template, trim

    spec = trim(load_template("phoenix-10kK-hpf"), (10600, 10640) * u.AA, 5 * u.AA)
    path = tmp_path / "piece.fits"
    spec.write(path, format="tabular-fits")
    rc = main(["clone", str(path), "--teff", "10000", "--epochs", "10", "-o", str(tmp_path / "out"), "--json", "--mode", "log"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "log" and summary["n_lines"] > 0


def test_demo_runs_end_to_end_briefly(tmp_path, capsys):
    """The demo's 150 Å of the embedded PHOENIX 10 kK HPF model (few epochs here)."""
    rc = main(["demo", "--epochs", "3", "-o", str(tmp_path), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_lines"] > 30
    for key in ("clone_file", "line_table", "figure"):
        assert (tmp_path / summary[key].split("/")[-1]).exists()


@pytest.mark.skipif(not __import__("blase_specutils.core.cpu_kernel", fromlist=["x"]).HAVE_NUMBA,
                    reason="plans on CPUs use the compiled numba kernel")
def test_clone_through_a_plan_gives_the_same_clone(tmp_path, capsys):
    summaries = []
    for plan in ("no", "yes"):
        rc = main(["clone", "phoenix-10kK-hpf", "--band", "10500", "10650", "--buffer", "10", "--epochs", "15",
                   "--plan", plan, "-o", str(tmp_path / plan), "--json"])
        assert rc == 0
        summaries.append(json.loads(capsys.readouterr().out))
    a, b = summaries
    assert a["n_lines"] == b["n_lines"] and a["epochs"] == b["epochs"]
    assert b["rms_residual"] == pytest.approx(a["rms_residual"], rel=1e-9)
    with pytest.raises(SystemExit):
        main(["clone", "phoenix-10kK-hpf", "--plan", "maybe", "-o", str(tmp_path)])


def test_bad_arguments(tmp_path, capsys):
    assert main(["clone", "phoenix-10kK-hpf", "--prominence", "1.5", "-o", str(tmp_path)]) == 2
    assert "prominence" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="neither a file nor an embedded template"):
        main(["clone", "no-such-thing", "-o", str(tmp_path)])
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"garbage" * 50)
    with pytest.raises(SystemExit, match="could not read"):
        main(["clone", str(bad), "-o", str(tmp_path)])


def _tiny_clone_file(path):
    """A one-line clone file near 8670 Å (nothing is fitted with it)."""
    import numpy as np

    from blase_specutils.core.clone import LineCloneModel

    model = LineCloneModel(np.array([8670.0]), np.log([0.1]), np.log([0.05]), np.log([0.01]))
    return SpectralClone(model).save(path)


def test_output_that_is_a_file_is_an_argument_error(tmp_path, capsys):
    """``-o`` naming an existing file (or a path through one): exit code 2 and a message, before any work."""
    afile = tmp_path / "afile"
    afile.write_text("")
    grid = tmp_path / "grid.csv"
    grid.write_text("file,teff\nx.ecsv,5000\n")
    for out in (afile, afile / "sub"):
        for argv in (["clone", "phoenix-10kK-hpf"], ["demo"], ["fit", "data.fits", "--stellar", "c.fits"],
                     ["fit-many", "data.fits", "--stellar", "c.fits"], ["clone-grid", str(grid)]):
            assert main([*argv, "-o", str(out)]) == 2, argv
            err = capsys.readouterr().err
            assert f"-o/--output {out}: {afile} is an existing file, not a folder" in err, argv
    assert afile.read_text() == ""


def test_table_in_micrometres_without_a_unit_is_refused(tmp_path, capsys):
    """A unitless wavelength column is read as Å: numbers like 1.05 (µm) are refused with a way out."""
    import numpy as np

    wl = np.linspace(1.054, 1.056, 300)
    flux = 1 - 0.1 * np.exp(-(((wl - 1.055) / 2e-5) ** 2))
    csv, aa = tmp_path / "um_nounit.csv", tmp_path / "aa_nounit.csv"
    csv.write_text("wavelength,flux\n" + "".join(f"{w:.7f},{f:.6f}\n" for w, f in zip(wl, flux)))
    aa.write_text("wavelength,flux\n" + "".join(f"{w:.3f},{f:.6f}\n" for w, f in zip(wl * 1e4, flux)))
    with pytest.raises(SystemExit, match=r"um_nounit.csv has no unit.*below 100 Å\); they look like µm.*ECSV"):
        main(["clone", str(csv), "-o", str(tmp_path / "out")])
    clone = _tiny_clone_file(tmp_path / "clone.fits")
    with pytest.raises(SystemExit, match="they look like µm"):
        main(["fit", str(csv), "--stellar", str(clone), "-o", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # the same spectrum in Å is plausible: read (with the warning) and not refused here
    with pytest.warns(UserWarning, match="assuming Å"):
        assert main(["fit", str(aa), "--stellar", str(clone), "--rv-range", "-5", "-o", str(tmp_path / "o")]) == 2
    assert "rv_range must be > 0" in capsys.readouterr().err


def test_fit_settings_are_argument_errors(tmp_path, capsys):
    """Bad fit settings: exit code 2 and the parameter named, for ``fit`` and ``fit-many`` (no job runs)."""
    import astropy.units as u
    import numpy as np
    from specutils import Spectrum

    clone = _tiny_clone_file(tmp_path / "clone.fits")
    data = tmp_path / "data.fits"
    wl = np.linspace(8660, 8680, 200)
    Spectrum(spectral_axis=wl * u.AA, flux=np.ones(wl.size) * u.one).write(data, format="tabular-fits")
    for command in ("fit", "fit-many"):
        for flags, message in ((["--rv-range", "-5"], "rv_range must be > 0"),
                               (["--vsini", "nan"], "vsini must be finite"),
                               (["--regularization", "-1"], "regularization must be finite and >= 0"),
                               (["--continuum-degree", "-1"], "continuum_degree must be >= 0")):
            out = tmp_path / command / flags[0].strip("-")
            assert main([command, str(data), "--stellar", str(clone), *flags, "-o", str(out), "-q"]) == 2
            assert message in capsys.readouterr().err, (command, flags)
            assert not list(out.glob("*_fit.fits")) and not (out / "summary.ecsv").exists()


def test_templates_listing(capsys):
    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    assert "phoenix-10kK-hpf" in out and "psg-igrins" in out


@pytest.mark.medium
def test_full_demo_converges_without_warnings(tmp_path, capsys):
    """The demo on its own defaults: stopped by the plateau rule, not the epoch cap, and no warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = main(["demo", "-o", str(tmp_path), "--json", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stop_reason"] == "plateau" and summary["epochs"] < 2000
    assert summary["fidelity"]["rms"] < 0.002


@pytest.mark.slow
def test_demo_fit(tmp_path, capsys):
    """``demo --fit``: the shipped HR 4829 order fitted with the fresh clone, figure written; no
    parameter at a bound or scan edge, and the RV and v sin i of this fast rotator's single order
    flagged as resting on the continuum and on one or two lines (on stderr, one line per flag as
    ``fit`` does, not as a Python warning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = main(["demo", "--fit", "-o", str(tmp_path), "--json", "-q"])
    assert rc == 0
    out = capsys.readouterr()
    fit = json.loads(out.out)["fit"]
    assert "rv_depends_on_continuum" in fit["flag_codes"] and fit["rv_continuum_spread_kms"] > 3.0
    assert "vsini_from_few_lines" in fit["flag_codes"] and "warning: [vsini_from_few_lines]" in out.err
    assert set(fit["flag_codes"]) <= {"rv_depends_on_continuum", "rv_moved_by_lines", "rv_from_few_lines",
                                      "vsini_differs_between_halves", "vsini_from_few_lines"}
    assert "warning: [rv_depends_on_continuum]" in out.err
    assert 100 < fit["vsini_kms"] < 170 and fit["chi2_reduced"] < 2
    assert (tmp_path / "hr4829-hpf_fit.png").exists()


def test_exit_codes(tmp_path, capsys):
    """One table for all commands: usage 2, bad input 3 (a SystemExit that names the problem)."""
    from blase_specutils.cli import EXIT_CODES, EXIT_DATA, EXIT_USAGE

    assert "exit codes" in EXIT_CODES
    with pytest.raises(SystemExit) as err:
        main(["clone", str(tmp_path / "none.fits"), "-o", str(tmp_path)])
    assert err.value.code == EXIT_DATA
    with pytest.raises(SystemExit) as err:
        main(["fit", str(tmp_path / "none.fits"), "--stellar", str(tmp_path / "none.fits"), "-o", str(tmp_path)])
    assert err.value.code == EXIT_DATA
    with pytest.raises(SystemExit) as err:
        main(["clone", "phoenix-10kK-hpf", "--no-such-option"])
    assert err.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as err:
        main(["clone", "phoenix-10kK-hpf", "--order", "3", "-o", str(tmp_path)])
    assert err.value.code == EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_clone_reads_a_goldilocks_order(tmp_path, capsys):
    """``clone`` reads what ``fit`` reads: one order of an HPF Goldilocks file, chosen with --order."""
    from conftest import SHARED_DATA, _need

    from blase_specutils.cli import EXIT_DATA, EXIT_USAGE

    path = _need(SHARED_DATA / "hpf" / "Goldilocks_20210517T054403_v1.0_0060.spectra.fits")
    with pytest.raises(SystemExit) as err:
        main(["clone", str(path), "-o", str(tmp_path)])
    assert err.value.code == EXIT_USAGE and "--order" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["clone", str(path), "--order", "40", "-o", str(tmp_path)])
    assert err.value.code == EXIT_DATA
    rc = main(["clone", str(path), "--order", "8", "--no-flatten", "--band", "9070", "9100", "--buffer", "2",
               "--epochs", "20", "--residual-passes", "0", "-o", str(tmp_path), "--json", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_lines"] > 5 and summary["clone_file"].endswith("_order08_clone.fits")


def test_fit_wasp69_template_only(tmp_path, capsys, blase03_clone_path):
    from conftest import SHARED_DATA, _need

    data = _need(SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits")
    rc = main(["fit", str(data), "--stellar", str(blase03_clone_path), "--template-only", "--rv-range", "40",
               "-o", str(tmp_path), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert -11 < s["rv_kms"] < -8 and s["n_lines_changed"] == 0
    assert s["template_matching"]["chi2_reduced"] > 50
    for key in ("result_file", "line_table", "figure"):
        assert (tmp_path / s[key].split("/")[-1]).exists()


def test_fit_bad_arguments(tmp_path, blase03_clone_path):
    with pytest.raises(SystemExit, match="no clone file"):
        main(["fit", str(blase03_clone_path), "--stellar", str(tmp_path / "none.fits")])
    with pytest.raises(SystemExit, match="no data file"):
        main(["fit", str(tmp_path / "none.fits"), "--stellar", str(blase03_clone_path)])


def test_fit_telluric_only(tmp_path, capsys, telfit_window_clone, hr4829_water_window):
    """``fit DATA --telluric CLONE`` without --stellar: a telluric-only fit; RV and v sin i are null."""
    from astropy.nddata import StdDevUncertainty
    from specutils import Spectrum

    from blase_specutils import TransferResult

    clone_path = telfit_window_clone.save(tmp_path / "telfit_window.fits")
    d = hr4829_water_window
    data = tmp_path / "hr4829_window.fits"
    Spectrum(spectral_axis=d.spectral_axis, flux=d.flux,
             uncertainty=StdDevUncertainty(d.uncertainty.array)).write(data, format="tabular-fits")
    rc = main(["fit", str(data), "--telluric", str(clone_path), "--epochs", "60", "--tune-telluric", "-o",
               str(tmp_path / "out"), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["components"] == "telluric" and s["rv_kms"] is None and s["vsini_kms"] is None
    assert s["template_matching"]["rv"] is None and s["telluric_power"] > 0
    assert s["chi2_reduced"] < s["template_matching"]["chi2_reduced"]
    assert s["n_lines"] == telfit_window_clone.n_lines
    back = TransferResult.load(s["result_file"])
    assert back.chi2_reduced == pytest.approx(s["chi2_reduced"], rel=1e-12)
    # the human-readable report copes with the missing RV
    rc = main(["fit", str(data), "--telluric", str(clone_path), "--template-only", "-o", str(tmp_path / "out2")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "RV n/a" in out and "telluric power" in out


def test_fit_needs_a_clone(tmp_path, capsys, blase03_clone_path):
    rc = main(["fit", str(blase03_clone_path), "-o", str(tmp_path)])
    assert rc == 2
    assert "--stellar CLONE, --telluric CLONE, or both" in capsys.readouterr().err
