"""SpectralClone.plot: an overview strip and zoom panels of at most 20 Å on the weakest and a typical window."""

from __future__ import annotations

import astropy.units as u
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def test_plot_has_an_overview_and_zoom_panels(phoenix_subband_clone):
    clone = phoenix_subband_clone
    fig = clone.plot(title="PHOENIX 10 kK")
    axes = fig.get_axes()
    assert len(axes) == 2 + 2 * 3
    zoom_tops = axes[2::2]
    titles = [a.get_title() for a in zoom_tops]
    assert titles[0].startswith("weakest 1") and titles[1].startswith("weakest 2") and titles[2].startswith("typical")
    for a in zoom_tops:
        lo, hi = a.get_xlim()
        assert hi - lo <= 20.0 * 1.11  # matplotlib's 5 % margins on each side of a 20 Å window
    worst = clone.worst_windows(1)
    assert f"{worst['start'][0].value:.0f}-{worst['end'][0].value:.0f} Å" in titles[0]
    plt.close(fig)


def test_plot_follows_matplotlib_conventions(phoenix_subband_clone):
    clone = phoenix_subband_clone
    fig, ax = plt.subplots(2, 1)
    assert clone.plot(ax=ax) is fig and len(fig.get_axes()) == 2  # given axes: the overview only
    mine = plt.figure()
    assert clone.plot(fig=mine, n_zoom=1) is mine and len(mine.get_axes()) == 4
    assert len(clone.plot(n_zoom=0).get_axes()) == 2
    with pytest.raises(ValueError, match="at most 20"):
        clone.plot(zoom_width=50 * u.AA)
    sub = clone.plot(band=(10520, 10560) * u.AA, n_zoom=2)
    lo, hi = sub.get_axes()[2].get_xlim()
    assert 10520 - 2 <= lo and hi <= 10560 + 2 and np.isfinite([lo, hi]).all()
    plt.close("all")
