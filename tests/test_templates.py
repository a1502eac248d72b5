import astropy.units as u
import numpy as np
import pytest

from blase_specutils import TEMPLATES, load_template


@pytest.mark.parametrize("name,unit,lo,hi,npix", [
    ("phoenix-10kK-hpf", u.AA, 8038.0, 12849.0, 338649),
    ("telfit-hpf", u.AA, 8079.0, 12786.0, 57344),
    ("psg-igrins", u.um, 1.4, 2.5, 57983),
])
def test_embedded_templates_load_with_units(name, unit, lo, hi, npix):
    s = load_template(name)
    assert s.spectral_axis.unit == unit
    assert s.flux.unit == u.dimensionless_unscaled
    assert s.flux.size == npix
    assert s.spectral_axis.value[0] == pytest.approx(lo, abs=0.05 * (hi - lo))
    assert s.spectral_axis.value[-1] == pytest.approx(hi, abs=0.05 * (hi - lo))
    assert np.all(np.isfinite(s.flux.value))
    assert s.meta["template"] == name


def test_phoenix_grid_is_the_papers_native_grid(phoenix_10k):
    wl = phoenix_10k.spectral_axis.to_value(u.AA)
    sel = (wl >= 8049) & (wl <= 12815)
    assert sel.sum() == 335851


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template"):
        load_template("vega")
    assert set(TEMPLATES) == {"phoenix-10kK-hpf", "telfit-hpf", "psg-igrins"}
