"""Small real observed spectra shipped with the package, one call away as a ``Spectrum``.

Three échelle orders, cut from the project's reference data (provenance and licences in
``data/README.md`` next to the files), so that every example of the README and the docs runs
after ``pip install``:

``"hr4829-hpf"``
    HR 4829, a rapidly rotating A-type telluric standard, HPF order 17 (10448-10582 Å),
    reduced with muler's ``remove_nans().deblaze().normalize()``.
``"wasp69-hpf"``
    WASP 69, a K5 dwarf (v sin i ≈ 2 km/s), a continuum-normalized HPF stack (8656-8768 Å):
    the order the blasé paper fits.
``"a0v-igrins"``
    The A0V standard of an IGRINS H-band night, one order (16518-16676 Å) without Brackett
    lines: telluric water and OH-free absorption, blaze-normalized, edges masked.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.nddata import StdDevUncertainty
from specutils import Spectrum

__all__ = ["EXAMPLES", "load_example", "example_path"]

#: name -> (file, one-line description, instrument's resolving power)
EXAMPLES: dict[str, dict] = {
    "hr4829-hpf": dict(
        file="hr4829_hpf_order17.fits",
        description="HR 4829 (A-type telluric standard, v sin i ~ 130 km/s), HPF order 17, 10448-10582 Å",
        resolving_power=55000.0,
    ),
    "wasp69-hpf": dict(
        file="wasp69_hpf_stack.fits",
        description="WASP 69 (K5 dwarf, v sin i ~ 2 km/s), HPF stack of one order, 8656-8768 Å",
        resolving_power=55000.0,
    ),
    "a0v-igrins": dict(
        file="a0v_igrins_order17.fits",
        description="A0V telluric standard, IGRINS H band, one order, 16518-16676 Å",
        resolving_power=45000.0,
    ),
}


def example_path(name: str) -> Path:
    """The path of a shipped example file (a FITS file that :func:`blase_specutils.read_spectrum`
    and the command line read too).

    Parameters
    ----------
    name : str
        One of :data:`EXAMPLES`.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        Unknown name.
    """
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose one of {sorted(EXAMPLES)}")
    return Path(str(files(__name__).joinpath("data", EXAMPLES[name]["file"])))


def load_example(name: str) -> Spectrum:
    """Load a shipped observed spectrum as a specutils ``Spectrum``.

    Parameters
    ----------
    name : {"hr4829-hpf", "wasp69-hpf", "a0v-igrins"}
        Which example (see :data:`EXAMPLES`).

    Returns
    -------
    Spectrum
        Vacuum wavelengths in Å (ascending), dimensionless normalized flux, a ``StdDevUncertainty``
        and a mask (True: bad pixel). ``meta`` holds the FITS ``header`` (observation keywords and
        provenance: ``SRCFILE``, ``REDUCED``, ``LICENSE``), ``example`` (the name),
        ``description`` and ``resolving_power`` (the instrument's nominal R).

    Raises
    ------
    ValueError
        Unknown name.

    Examples
    --------
    >>> import blase_specutils as bs
    >>> order = bs.load_example("wasp69-hpf")
    >>> order.spectral_axis.unit
    Unit("Angstrom")
    """
    from astropy.io import fits

    from ..spectra import to_vacuum

    path = example_path(name)
    with fits.open(path) as hdul:
        header = hdul[0].header.copy()
        table = hdul["SPECTRUM"].data
        wavelength = np.asarray(table["WAVELENGTH"], dtype=np.float64)
        flux = np.asarray(table["FLUX"], dtype=np.float64)
        sigma = np.asarray(table["UNCERTAINTY"], dtype=np.float64)
        mask = np.asarray(table["MASK"], dtype=bool)
    info = EXAMPLES[name]
    spectrum = Spectrum(
        spectral_axis=wavelength * u.AA,
        flux=flux * u.dimensionless_unscaled,
        uncertainty=StdDevUncertainty(sigma),
        mask=mask,
        meta={"header": header, "example": name, "description": info["description"],
              "resolving_power": info["resolving_power"], "file": str(path)},
    )
    return to_vacuum(spectrum)
