"""Progress bars on stderr end full when training stops early (plateau), not part-way."""

from __future__ import annotations

import re


def test_bars_end_full_on_an_early_stop(phoenix_10k, capsys):
    import astropy.units as u

    from blase_specutils import clone_spectrum

    clone = clone_spectrum(phoenix_10k, band=(10500, 10510) * u.AA, buffer=2 * u.AA, teff=10000 * u.K, patience=10,
                           epochs=3000, residual_passes=0, progress=True)
    assert clone.history.stop_reason == "plateau" and clone.history.epochs_run < 3000
    err = capsys.readouterr().err
    last = {}
    for line in re.split(r"[\r\n]+", err):
        m = re.match(r"\s*(.+?):\s+(\d+)%\|.*\|\s*(\d+)/(\d+)", line)
        if m:
            last[m[1]] = (int(m[2]), int(m[3]), int(m[4]))
    assert last, "no progress bar on stderr"
    for desc, (percent, done, total) in last.items():
        assert percent == 100 and done == total, f"the bar {desc!r} ended at {done}/{total}"
