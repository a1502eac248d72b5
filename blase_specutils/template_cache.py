"""Clones of the embedded templates by name, made once per band and cached on disk.

``blase-specutils fit DATA --stellar phoenix-10kK-hpf --telluric telfit-hpf`` clones each named
template over the data's wavelength range (plus margins) with the package's defaults and keeps the
clone in a cache folder, so that the next fit of the same band reads it back in a second.

Where the cache lives: ``$BLASE_SPECUTILS_CACHE`` if set, else ``$XDG_CACHE_HOME/blase_specutils``,
else ``~/.cache/blase_specutils``. Each file name carries a key made of the template's name, the
band, the clone settings used here, every default of :func:`~blase_specutils.clone_spectrum` and
the package version: a new package version or new clone defaults give new keys, so stale clones
are never reused (old files stay until you delete the folder).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from pathlib import Path

from . import __version__
from .constants import TELLURIC_CLONE_POWERS, TEMPLATE_CLONE_MARGIN_AA
from .templates import PSG_MOLECULES, TEMPLATES, template_info

__all__ = ["cache_folder", "template_clone", "TEMPLATE_CLONE_MARGIN_AA"]



def cache_folder() -> Path:
    """The folder of the cached template clones (see the module docstring)."""
    env = os.environ.get("BLASE_SPECUTILS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "blase_specutils"


def _settings(name: str) -> dict:
    """The clone settings of a template: its Teff and flattening for stellar models; no flattening
    (transmission is already normalised) and log mode for PSG (Beer's law exactly, Eq. A2), trained
    for the powers :data:`TELLURIC_CLONE_POWERS`."""
    info = template_info(name)
    settings = {"prominence": 0.01, "flatten": info["kind"] != "telluric"}
    if info.get("teff"):
        settings["teff"] = float(info["teff"])
    if name.startswith("psg"):
        settings["mode"] = "log"
        settings["powers"] = list(TELLURIC_CLONE_POWERS)
    return settings


def _key(name: str, band: tuple[float, float], settings: dict) -> str:
    from .cloning import clone_spectrum

    # settings= and engine= (None by default) choose no clone of their own: left out, the keys of the
    # clones cached before they existed stay valid
    defaults = {k: repr(p.default) for k, p in inspect.signature(clone_spectrum).parameters.items()
                if p.default is not inspect.Parameter.empty and k not in ("settings", "engine")}
    blob = json.dumps({"template": name, "band": band, "settings": settings, "defaults": defaults,
                       "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def template_clone(name: str, wavelength_range: tuple[float, float], *, progress: bool = True,
                   folder: str | Path | None = None, molecule: str | None = None):
    """The clone of an embedded template over a wavelength range, from the cache or made now.

    Parameters
    ----------
    name : str
        An embedded template (``blase_specutils.templates.TEMPLATES``: ``phoenix-10kK-hpf``,
        ``telfit-hpf``, ``psg-igrins``).
    wavelength_range : (float, float)
        The data's range in Å; the clone covers it ± :data:`TEMPLATE_CLONE_MARGIN_AA`, rounded out
        to 10 Å, within the template's band.
    progress : bool
        Progress bars while cloning.
    folder : str or Path, optional
        The cache folder (default :func:`cache_folder`).
    molecule : str, optional
        ``psg-igrins`` only: clone the column of one molecule (H2O, CO2, O3, N2O, CO, CH4, O2; see
        :func:`~blase_specutils.load_template`) instead of the total; ``meta["molecule"]`` of the
        clone names it, and its cache file is its own.

    Returns
    -------
    SpectralClone

    Raises
    ------
    ValueError
        An unknown template, a range outside the template's band, or a molecule the template does
        not have.
    """
    from .cloning import CloneFileError, SpectralClone, clone_spectrum
    from .templates import load_template

    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    lo_t, hi_t = TEMPLATES[name]["band"]
    lo = max(lo_t, 10.0 * math.floor((float(wavelength_range[0]) - TEMPLATE_CLONE_MARGIN_AA) / 10.0))
    hi = min(hi_t, 10.0 * math.ceil((float(wavelength_range[1]) + TEMPLATE_CLONE_MARGIN_AA) / 10.0))
    if not lo < hi:
        raise ValueError(f"the data ({wavelength_range[0]:.1f}-{wavelength_range[1]:.1f} Å) lie outside the band of "
                         f"the template {name!r} ({lo_t:.0f}-{hi_t:.0f} Å)")
    settings = _settings(name)
    if molecule is not None and (name != "psg-igrins" or molecule not in PSG_MOLECULES):
        raise ValueError(f"molecule {molecule!r}: only 'psg-igrins' has per-molecule columns, one of {PSG_MOLECULES}")
    stem = name if molecule is None else f"{name}-{molecule}"
    folder = cache_folder() if folder is None else Path(folder)
    path = folder / f"{stem}_{lo:.0f}-{hi:.0f}_{_key(stem, (lo, hi), settings)}.fits"
    if path.exists():
        try:
            return SpectralClone.load(path)
        except (CloneFileError, ValueError, OSError):
            pass  # a damaged cache file is made again
    import astropy.units as u

    spec = load_template(name, molecule=molecule)
    kw = dict(settings)
    if "teff" in kw:
        kw["teff"] = kw["teff"] * u.K
    clone = clone_spectrum(spec, band=(lo, hi) * u.AA, progress=progress, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    clone.save(path, overwrite=True)
    return clone
