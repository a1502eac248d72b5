"""Precomputed models that ship inside the ``muler`` package, each one call away as a Spectrum."""

from __future__ import annotations

from importlib.resources import files

import astropy.units as u
import numpy as np
from specutils import Spectrum

__all__ = ["TEMPLATES", "PSG_MOLECULES", "load_template", "template_info"]

#: name -> (file, description, band of interest in Å, Teff or None, default clone settings)
TEMPLATES = {
    "phoenix-10kK-hpf": dict(
        file="PHOENIX_10kK_hpf_template.csv",
        description="PHOENIX Teff = 10,000 K stellar model at native sampling over the HPF band (8038-12849 Å)",
        band=(8079.0, 12785.0),
        teff=10000.0,
        kind="stellar",
    ),
    "telfit-hpf": dict(
        file="telfit_HPFtemplate_temp286_hum050.csv",
        description="TelFit telluric transmission (286 K, 50 % humidity) at HPF sampling (8079-12786 Å)",
        band=(8079.0, 12786.0),
        teff=None,
        kind="telluric",
        lsf="instrument",
        note=("Its lines already have about HPF's instrumental width (a clone's lines: median FWHM 14 km/s, "
              "against 5.5 km/s for R = 55,000). Its spectrum carries meta['lsf'] = 'instrument', so its "
              "clones multiply in after the instrumental kernel of a fit and are not broadened twice."),
    ),
    "psg-igrins": dict(
        file="psg_trn_r100000_1.4_2.5_um.txt",
        description="PSG telluric transmission at R = 100,000, 1.4-2.5 µm (total of all molecules)",
        band=(14500.0, 18100.0),
        teff=None,
        kind="telluric",
    ),
}


def template_info(name: str) -> dict:
    """The metadata of an embedded template (file, description, band, teff, kind, and a caveat under
    ``note`` where there is one)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return dict(TEMPLATES[name])


def _read_csv(path, wl_col: str, flux_col: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path) as fh:
        header = fh.readline().strip().split(",")
    data = np.loadtxt(path, delimiter=",", skiprows=1)
    return data[:, header.index(wl_col)], data[:, header.index(flux_col)]


#: The line-absorbing molecules of the PSG template, its column order after the total.
PSG_MOLECULES = ("H2O", "CO2", "O3", "N2O", "CO", "CH4", "O2")
#: Its smooth columns (N2 collision-induced absorption, Rayleigh scattering, CIA): no lines to
#: clone; a fit's per-order continuum polynomial absorbs them.
PSG_SMOOTH = ("N2", "Rayleigh", "CIA")


def load_template(name: str, *, molecule: str | None = None) -> Spectrum:
    """Load an embedded precomputed model as a ``Spectrum`` with units.

    Parameters
    ----------
    name : {"phoenix-10kK-hpf", "telfit-hpf", "psg-igrins"}
        ``phoenix-10kK-hpf``: PHOENIX 10 kK stellar model (relative flux, Å).
        ``telfit-hpf``: TelFit telluric transmission for HPF (Å). Its lines already have about
        HPF's instrumental width: ``meta["lsf"] = "instrument"``, which its clones keep, so a fit
        multiplies them in after the instrumental kernel instead of broadening them twice.
        ``psg-igrins``: PSG telluric transmission 1.4-2.5 µm (µm axis), all molecules.
    molecule : str, optional
        ``psg-igrins`` only: the transmission of one molecule (one of :data:`PSG_MOLECULES`:
        H2O, CO2, O3, N2O, CO, CH4, O2) instead of the total, to clone each molecule on its own
        and fit one Beer's-law power per molecule (``fit_spectrum(..., telluric={"H2O": ...,
        "CO2": ...})``). ``meta["molecule"]`` names it.

    Returns
    -------
    Spectrum
        With ``meta["template"]`` naming it, ``meta["lsf"]`` (``"native"`` or ``"instrument"``: the
        resolution its lines carry) and ``meta["note"]`` where the template has a caveat.
    """
    info = template_info(name)
    if molecule is not None and name != "psg-igrins":
        raise ValueError(f"molecule= is for the per-molecule columns of 'psg-igrins'; {name!r} has one column")
    path = files("muler.templates").joinpath(info["file"])
    if name == "phoenix-10kK-hpf":
        wl, fl = _read_csv(path, "wave_ang", "flux")
        axis = wl * u.AA
    elif name == "telfit-hpf":
        wl, fl = _read_csv(path, "wavelength_A", "transmission")
        axis = wl * u.AA
    else:
        column = 1
        if molecule is not None:
            if molecule not in PSG_MOLECULES:
                raise ValueError(f"molecule must be one of {PSG_MOLECULES} (the smooth columns {PSG_SMOOTH} hold no "
                                 f"lines), got {molecule!r}")
            column = 2 + PSG_MOLECULES.index(molecule)
        data = np.loadtxt(path, comments="#", usecols=(0, column))
        wl, fl = data[:, 0], data[:, 1]
        axis = wl * u.um
    return Spectrum(
        spectral_axis=axis,
        flux=fl * u.dimensionless_unscaled,
        meta={"template": name, "description": info["description"], "lsf": info.get("lsf", "native"),
              **({"molecule": molecule} if molecule is not None else {}),
              **({"note": info["note"]} if "note" in info else {})},
    )
