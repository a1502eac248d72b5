"""Inputs at the boundary (issue 21): readers that take a specutils ``format=`` or named columns and
reach the IGRINS PLP layout, clones from line tables, bands given as a ``SpectralRegion``, and a
command line whose user errors are one ``error:`` line carrying the frames in ``fit --json``.

Each test failed on the code before issue 21: ``read_spectrum``/``read_orders`` took no
``format``/``columns`` and could not read the IGRINS PLP file (``KeyError: 'DC-FLAG'``), there was
no ``SpectralClone.from_table``, a SpectralRegion was refused as a band, an output folder that
refuses files ended in a traceback, and ``fit --json`` had no barycentric RV.
"""

from __future__ import annotations

import json
import tempfile

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.table import QTable
from conftest import SHARED_DATA, _need
from specutils import SpectralRegion

from blase_specutils import SpectralClone, load_blase03
from blase_specutils.cli import main
from blase_specutils.io import is_igrins_plp, read_orders, read_spectrum
from blase_specutils.spectra import region_to_band

WASP69 = SHARED_DATA / "hpf" / "WASP_69_hpf_stack.fits"
IGRINS = SHARED_DATA / "igrins" / "SDCH_20201202_0059.spec_a0v.fits"


# ------------------------------------------------------------------------------ readers
def test_read_orders_reaches_the_igrins_plp_layout():
    path = _need(IGRINS)
    assert is_igrins_plp(path)
    orders = read_orders(path, [5, 3])
    assert [s.meta["order"] for s in orders] == [5, 3]  # file rows, in the sequence asked for
    assert orders[0].meta["extension"] == "TGT_SPEC" and orders[0].uncertainty is not None  # the .variance file
    assert orders[0].meta["header"]["TELESCOP"] == "Gemini South"
    assert orders[0].meta["blase_specutils_wavelength_frame"].startswith("vacuum")
    assert len(read_orders(path)) == 28
    a0v = read_orders(path, [5], extension="A0V_SPEC")[0]
    assert a0v.meta["extension"] == "A0V_SPEC" and a0v.uncertainty is None
    with pytest.raises(ValueError, match="IGRINS PLP file of several orders; read it with read_orders"):
        read_spectrum(path)


def test_format_and_columns_are_passed_through(tmp_path):
    wl = np.linspace(8000.0, 8010.0, 50)
    QTable({"LAMBDA_VAC": wl * u.AA, "F": np.ones(50), "IVAR": np.full(50, 1e4)}).write(tmp_path / "t.ecsv")
    with pytest.raises(ValueError, match="no wavelength and flux columns"):
        read_spectrum(tmp_path / "t.ecsv")
    s = read_spectrum(tmp_path / "t.ecsv", columns={"wavelength": "LAMBDA_VAC", "flux": "F", "ivar": "IVAR"})
    np.testing.assert_allclose(s.spectral_axis.to_value(u.AA), wl)
    assert type(s.uncertainty).__name__ == "InverseVariance"
    (one,) = read_orders(tmp_path / "t.ecsv", columns={"wavelength": "LAMBDA_VAC", "flux": "F"})
    assert one.uncertainty is None
    with pytest.raises(ValueError, match=r"\['NOPE'\] named in columns= are not in t.ecsv"):
        read_spectrum(tmp_path / "t.ecsv", columns={"wavelength": "NOPE", "flux": "F"})
    with pytest.raises(ValueError, match="columns needs 'wavelength' and 'flux'"):
        read_spectrum(tmp_path / "t.ecsv", columns={"flux": "F"})
    # a specutils reader by name: that reader alone, its error is the error
    with pytest.raises(ValueError, match="format='wcs1d-fits': No HDU with spectral data"):
        read_spectrum(_need(WASP69), format="wcs1d-fits")
    QTable({"wavelength": wl * u.AA, "flux": np.ones(50) * u.Jy}).write(tmp_path / "t.fits")
    s = read_spectrum(tmp_path / "t.fits", format="tabular-fits")
    assert s.flux.unit == u.Jy and s.flux.size == 50


# ------------------------------------------------------------------------------ line tables and bands
def test_a_clone_from_its_line_table_is_the_same_clone(blase03_clone_path):
    full = load_blase03(blase03_clone_path)
    sub = SpectralClone(full.model.subset(torch.arange(400)))
    table = sub.lines
    table.reverse()  # rows need not be sorted
    back = SpectralClone.from_table(table)
    axis = np.linspace(8060.0, 8160.0, 4000) * u.AA
    np.testing.assert_allclose(back.evaluate(axis).flux.value, sub.evaluate(axis).flux.value, rtol=0, atol=1e-12)
    assert back.meta["source"] == "line table" and back.model.mode == "linear"
    # a native line list in other units: centres in µm, widths in nm
    t = QTable({"center": table["center"].to(u.um), "amplitude": table["amplitude"],
                "sigma": table["sigma"].to(u.nm), "gamma": table["gamma"].to(u.nm)})
    np.testing.assert_allclose(SpectralClone.from_table(t).evaluate(axis).flux.value, sub.evaluate(axis).flux.value,
                               rtol=0, atol=1e-10)  # Å -> µm/nm -> Å rounds the last digits of the centres


@pytest.mark.parametrize("edit, error, match", [
    (lambda t: t.remove_column("gamma"), ValueError, r"lacks column\(s\) \['gamma'\]"),
    (lambda t: t.__setitem__("sigma", np.ones(len(t))), u.UnitsError, "'sigma' needs a unit"),
    (lambda t: t.__setitem__("sigma", np.ones(len(t)) * u.s), u.UnitsError, "not a length"),
    (lambda t: t["amplitude"].__setitem__(3, -1 * u.AA), ValueError, "'amplitude' must be finite and > 0; row 3"),
    (lambda t: t["gamma"].__setitem__(2, np.nan * u.AA), ValueError, "row 2"),
    (lambda t: t["sigma"].__setitem__(1, 1e30 * u.AA), ValueError, "beyond e"),
])
def test_bad_line_tables_name_the_column_and_row(blase03_clone_path, edit, error, match):
    t = SpectralClone(load_blase03(blase03_clone_path).model.subset(torch.arange(10))).lines
    edit(t)
    with pytest.raises(error, match=match):
        SpectralClone.from_table(t)


def test_a_spectral_region_of_one_subregion_is_a_band():
    lo, hi = region_to_band(SpectralRegion(8680 * u.AA, 8720 * u.AA))
    assert lo == 8680 * u.AA and hi == 8720 * u.AA
    assert region_to_band((1, 2)) == (1, 2)
    with pytest.raises(ValueError, match="2 subregions .* pass one subregion"):
        region_to_band(SpectralRegion([(1.0 * u.um, 1.1 * u.um), (1.2 * u.um, 1.3 * u.um)]))


# ------------------------------------------------------------------------------ command line
@pytest.mark.medium
def test_an_output_folder_that_refuses_files_is_one_error_line(tmp_path, capsys, monkeypatch, blase03_clone_path):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    rc = main(["fit", str(_need(WASP69)), "--stellar", str(blase03_clone_path), "--template-only",
               "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("error:")
    assert "cannot write files into this folder" in err[0]


@pytest.mark.medium
def test_device_mps_is_one_error_line(tmp_path, capsys, blase03_clone_path):
    rc = main(["fit", str(_need(WASP69)), "--stellar", str(blase03_clone_path), "--template-only", "--device", "mps",
               "-o", str(tmp_path), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("error:") and "mps" in err[0]


@pytest.mark.medium
def test_fit_json_carries_both_rvs_and_the_correction(tmp_path, capsys, blase03_clone_path):
    rc = main(["fit", str(_need(WASP69)), "--stellar", str(blase03_clone_path), "--template-only", "--rv-range", "40",
               "--epochs", "0", "--frame", "observatory", "--barycentric-correction", "-27.5", "-o", str(tmp_path),
               "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["frame"] == "observatory" and s["barycentric_correction_kms"] == -27.5
    v = s["rv_observatory_kms"]
    assert s["rv_barycentric_kms"] == pytest.approx(v - 27.5 - v * 27.5 / 299792.458)
    assert s["barycentric_source"] == "given by the user" and s["wavelength_frame"].startswith("vacuum")
    assert s["n_outliers"] == 0


def test_spectral_region_bands_reach_clone_and_trim(phoenix_10k):
    """A one-subregion SpectralRegion is a band for trim and clone_spectrum; several subregions are refused."""
    import astropy.units as u
    import pytest
    from specutils import SpectralRegion

    from blase_specutils import clone_spectrum
    from blase_specutils.preprocessing import trim

    region = SpectralRegion(10500 * u.AA, 10520 * u.AA)
    cut = trim(phoenix_10k, region, 0 * u.AA)
    w = cut.spectral_axis.to_value(u.AA)
    assert w.min() >= 10500 and w.max() <= 10520
    clone = clone_spectrum(phoenix_10k, band=region, teff=10000 * u.K, epochs=20, residual_passes=0,
                           progress=False)
    assert clone.band == (10500.0, 10520.0)
    with pytest.raises(ValueError, match="subregions"):
        trim(phoenix_10k, region + SpectralRegion(10600 * u.AA, 10610 * u.AA), 0 * u.AA)
