"""Frames at the boundary of a fit: air or vacuum wavelengths, a velocity tagged on the spectral
axis, and the observatory or barycentric frame of the data.

The fit itself works in one frame only: vacuum wavelengths (every clone and template of the
package is in vacuum), on the observatory's spectral axis, where telluric lines sit at rest and the
star moves by its measured radial velocity. Everything that comes in another frame is brought into
that one here, once, before any fitting, and what was done is recorded in a :class:`FitFrames`
that the result reports (``TransferResult.frames``, its ``summary()`` and ``fit --json``).

What each template and reader assumes
-------------------------------------
* Templates (:func:`~blase_specutils.load_template`): the PHOENIX 10 kK HPF model, the TelFit HPF
  and PSG IGRINS transmissions and the MOOG 4250 K synthesis are in vacuum wavelengths; the
  stellar models are at rest, the telluric ones at rest in the observatory frame.
* :func:`~blase_specutils.io.read_orders` on an HPF Goldilocks file (muler's ``HPFSpectrum``):
  vacuum, observatory frame (the frame a fit assumes by default), the FITS header in ``meta``.
* :func:`~blase_specutils.io.read_igrins_plp` and ``read_orders`` on an IGRINS PLP
  ``.spec_a0v.fits``: vacuum, observatory frame (``meta['blase_specutils_frame']``), the primary
  header in ``meta``; order numbers are the file's rows (``meta['order']``).
* :func:`~blase_specutils.io.read_spectrum`: air where the file says so (``CTYPE1 = 'AWAV'``,
  ``AIRORVAC``, ``AIR``), else vacuum; the frame is unstated unless the user gives ``frame``
  (the WASP 69 HPF stack, a stack of exposures, appears to be barycentric already: its fitted RV,
  -10.4 km/s, is WASP 69's systemic velocity, -9.6 km/s, whereas adding its header's correction,
  -27.5 km/s, the correction of one exposure of the stack, would give -37.9 km/s).

Velocity conventions
--------------------
* The fitted RV follows the optical convention of the forward model: a line at rest wavelength
  :math:`\\lambda_0` is seen at :math:`\\lambda_0 (1 + v/c)`.
* A velocity tagged on the input's spectral axis (specutils' ``radial_velocity`` or
  ``redshift`` of a ``Spectrum``) has the specutils meaning: the velocity of the target relative
  to the observer, for the axis as given (the velocity that ``Spectrum.shift_spectrum_to`` takes
  out when shifting to ``radial_velocity=0``). The fit takes it as the known part of the star's
  velocity: the RV scan, its bound and the line selection are centred on it, the fitted RV is the
  rest, and ``rv_total = rv_tagged + rv`` exactly, with ``rv_tagged = c z`` from the axis'
  redshift z (for a tag given as a velocity v, specutils' relativistic Doppler formula makes
  ``c z`` exceed v by about v²/2c: 0.017 km/s at 100 km/s).
* The barycentric correction :math:`v_\\mathrm{corr}` is astropy's
  (``SkyCoord.radial_velocity_correction``, kind ``"barycentric"``, optical convention
  :math:`v_\\mathrm{corr} = c z_b`, Wright & Eastman 2014): the barycentric RV is
  :math:`v + v_\\mathrm{corr} + v\\,v_\\mathrm{corr}/c` for a measured (observatory) RV v.
  Data said to be in the barycentric frame had their axis multiplied by
  :math:`1 + v_\\mathrm{corr}/c`; they are divided by it here, so that telluric lines are back at
  rest. (muler's ``rv_shift`` multiplies by the relativistic factor; the two differ by
  :math:`v_\\mathrm{corr}^2/2c`, under 2 m/s for any ground-based correction.)
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import astropy.units as u
import numpy as np
from specutils import Spectrum

from .constants import (FRAME_CHECK_MIN_DCHI2, FRAME_CHECK_MIN_KMS, FRAME_CHECK_POWERS, FRAME_CHECK_RATIO,
                        MAX_BARYCENTRIC_CORRECTION_KMS)
from .core.clone import SPEED_OF_LIGHT_KMS
from .spectra import WAVELENGTH_FRAME_KEY, rebuild_like, to_vacuum, wavelength_to_angstrom

__all__ = ["FitFrames", "FRAMES", "UNSTATED", "default_frame", "telluric_frame_flags", "check_frame_settings", "OBSERVATORIES", "MAX_BARYCENTRIC_CORRECTION_KMS", "prepare_orders",
           "barycentric_correction", "to_observatory", "velocity_tag", "barycentric_rv"]

#: The frames the data may be given in: ``"observatory"`` (as recorded by the spectrograph: telluric
#: lines at rest; every HPF Goldilocks and IGRINS pipeline product) or ``"barycentric"`` (the axis
#: already shifted by the barycentric correction, e.g. by muler's ``barycentric_correct``).
FRAMES = ("observatory", "barycentric")

#: The frame recorded when the user said none and the data are not a pipeline product known to be
#: as recorded: fitted on the axis as given (telluric lines at rest on it), no barycentric RV.
UNSTATED = "unstated"

#: Classes (by name, so that muler need not be imported) of spectra that are pipeline products as
#: recorded at the telescope: their frame is the observatory's unless the user says otherwise.
OBSERVATORY_CLASSES = ("HPFSpectrum", "IGRINSSpectrum")

#: Key of ``Spectrum.meta`` by which a reader says the frame of what it read (``read_igrins_plp``).
FRAME_KEY = "blase_specutils_frame"

# MAX_BARYCENTRIC_CORRECTION_KMS (km/s, the largest accepted): blase_specutils.constants

#: Geodetic positions (longitude °E, latitude °N, height m) of the telescopes whose spectrographs this
#: package reads, for files that name the telescope (``TELESCOP``) or observatory (``OBSERVAT``) but
#: give no ``OBSGEO-*`` position; astropy's own site registry needs a download. Rounded to 0.0001°
#: (10 m): the barycentric correction changes by under 0.1 m/s over 100 m.
OBSERVATORIES: dict[str, tuple[float, float, float]] = {
    "het": (-104.0149, 30.6814, 2026.0),                # Hobby-Eberly Telescope (HPF)
    "hobby-eberly": (-104.0149, 30.6814, 2026.0),
    "harlan j. smith": (-104.0223, 30.6716, 2075.0),    # McDonald 2.7 m (IGRINS 2014-2016)
    "mcdonald": (-104.0223, 30.6716, 2075.0),           # the observatory, when no telescope is named
    "gemini south": (-70.7367, -30.2408, 2722.0),       # IGRINS 2020-
    "gemini-south": (-70.7367, -30.2408, 2722.0),
    "gemini north": (-155.4691, 19.8238, 4213.0),       # IGRINS-2
    "gemini-north": (-155.4691, 19.8238, 4213.0),
    "ldt": (-111.4222, 34.7444, 2360.0),                # Lowell Discovery Telescope (IGRINS 2016-2019)
    "lowell discovery telescope": (-111.4222, 34.7444, 2360.0),
    "dct": (-111.4222, 34.7444, 2360.0),
}


@dataclass
class FitFrames:
    """The frames of the data of one fit, and what was done to bring them into the fit's frame.

    Attributes
    ----------
    frame : str
        The frame the data were given in: ``"observatory"``, ``"barycentric"``, or
        ``"unstated"`` (fitted on the axis as given; no barycentric RV is reported).
    wavelength_frames : tuple of str
        Per order (the user's order), how the wavelengths became vacuum ones
        (``meta['blase_specutils_wavelength_frame']``), e.g. ``"vacuum (converted from air)"``.
    rv_tagged : float
        c z (km/s) of the velocity tagged on the input's spectral axis (0 without one).
    barycentric_correction : float or None
        The barycentric correction used (km/s), or None where none was given or found.
    barycentric_source : str
        Where the correction came from ("given by the user", the header keywords and site used), or
        why there is none.
    """

    frame: str = "observatory"
    wavelength_frames: tuple[str, ...] = ()
    rv_tagged: float = 0.0
    barycentric_correction: float | None = None
    barycentric_source: str = "not computed"
    notes: list[str] = field(default_factory=list)

    @property
    def air(self) -> bool:
        """Whether any order was converted from air wavelengths."""
        return any("from air" in f for f in self.wavelength_frames)

    @property
    def wavelength_frame(self) -> str:
        """The orders' wavelength frame in words (one value, or ``"mixed: ..."``)."""
        kinds = sorted(set(self.wavelength_frames))
        if not kinds:
            return "vacuum (assumed)"
        return kinds[0] if len(kinds) == 1 else "mixed: " + "; ".join(kinds)

    def rv_total(self, rv: float) -> float:
        """The star's velocity relative to the observer of the data's axis: tagged + fitted (km/s)."""
        return self.rv_tagged + float(rv)

    def rv_observatory(self, rv: float) -> float:
        """The measured RV (km/s): the total, on the observatory's axis (the fit's frame)."""
        return self.rv_total(rv)

    def rv_barycentric(self, rv: float) -> float | None:
        """The barycentric RV (km/s) of a fitted ``rv``; None without a correction or where the
        data's frame is unstated (a stack of exposures is often barycentric already: the
        correction of its header's exposure would then be applied twice)."""
        if self.barycentric_correction is None or self.frame == UNSTATED:
            return None
        return barycentric_rv(self.rv_observatory(rv), self.barycentric_correction)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the file's ``FRAMES`` keyword and the summary)."""
        return {"frame": self.frame, "wavelength_frames": list(self.wavelength_frames),
                "air": self.air, "rv_tagged_kms": self.rv_tagged,
                "barycentric_correction_kms": self.barycentric_correction,
                "barycentric_source": self.barycentric_source, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict) -> "FitFrames":
        """The inverse of :meth:`to_dict`; raises ValueError or TypeError on a malformed dict."""
        if not isinstance(d, dict):
            raise TypeError(f"frames must be a JSON object, got {type(d).__name__}")
        frame = d.get("frame", "observatory")
        if frame not in (*FRAMES, UNSTATED):
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        wf = d.get("wavelength_frames", [])
        if not isinstance(wf, list) or not all(isinstance(x, str) for x in wf):
            raise TypeError("wavelength_frames must be a list of strings")
        tag = d.get("rv_tagged_kms", 0.0)
        bc = d.get("barycentric_correction_kms")
        for name, v in (("rv_tagged_kms", tag), ("barycentric_correction_kms", bc)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if tag is None:
            raise ValueError("rv_tagged_kms must be a finite number, got None")
        src = d.get("barycentric_source", "")
        notes = d.get("notes", [])
        if not isinstance(src, str) or not isinstance(notes, list):
            raise TypeError("barycentric_source must be a string and notes a list")
        return cls(frame=frame, wavelength_frames=tuple(wf), rv_tagged=float(tag),
                   barycentric_correction=None if bc is None else float(bc), barycentric_source=src,
                   notes=[str(n) for n in notes])


def barycentric_rv(rv_observatory: float, correction: float) -> float:
    """Barycentric RV (km/s) of a measured RV and a barycentric correction, both km/s (optical
    convention): :math:`v + v_\\mathrm{corr} + v\\,v_\\mathrm{corr}/c` (astropy's formula)."""
    v, b = float(rv_observatory), float(correction)
    return v + b + v * b / SPEED_OF_LIGHT_KMS


# ------------------------------------------------------------------------------ velocity tags
def velocity_tag(orders: Sequence[Spectrum]) -> float:
    """c z (km/s) of the velocity tagged on the orders' spectral axes (0 where none is).

    Raises
    ------
    ValueError
        The orders carry different tags (one exposure has one velocity; untag or tag them alike).
    """
    tags = []
    for s in orders:
        z = getattr(s.spectral_axis, "redshift", None)
        z = 0.0 if z is None else float(u.Quantity(z).value)
        if not math.isfinite(z):
            raise ValueError(f"the spectral axis carries a non-finite redshift {z!r}")
        tags.append(SPEED_OF_LIGHT_KMS * z)
    if not tags:
        return 0.0
    if max(tags) - min(tags) > 1e-9:
        raise ValueError(
            "the orders carry different radial velocities on their spectral axes ("
            + ", ".join(f"{t:.6g}" for t in sorted(set(tags)))
            + " km/s as c z); one exposure has one velocity: tag them alike (set_radial_velocity_to) or not at all"
        )
    return float(tags[0])


# ------------------------------------------------------------------------------ barycentric correction
def _header(spectrum: Spectrum):
    meta = getattr(spectrum, "meta", None) or {}
    header = meta.get("header") if hasattr(meta, "get") else None
    return header if header is not None and hasattr(header, "get") else {}


def _observation_time(h):
    """(astropy Time at mid-exposure, the keywords used) or raises ValueError."""
    from astropy.time import Time, TimeDelta

    start, used = None, ""
    try:
        if isinstance(h.get("DATE-OBS"), str) and "T" in h["DATE-OBS"]:
            start, used = Time(h["DATE-OBS"], format="isot", scale="utc"), "DATE-OBS"
        elif isinstance(h.get("DATE-OBS"), str) and isinstance(h.get("TIME-OBS") or h.get("UT"), str):
            key = "TIME-OBS" if isinstance(h.get("TIME-OBS"), str) else "UT"
            start, used = Time(f"{h['DATE-OBS'].strip()}T{h[key].strip()}", format="isot", scale="utc"), f"DATE-OBS+{key}"
        elif isinstance(h.get("MJD-OBS"), (int, float)) and not isinstance(h.get("MJD-OBS"), bool):
            start, used = Time(float(h["MJD-OBS"]), format="mjd", scale="utc"), "MJD-OBS"
        elif isinstance(h.get("JD-OBS"), (int, float)) and not isinstance(h.get("JD-OBS"), bool):
            start, used = Time(float(h["JD-OBS"]), format="jd", scale="utc"), "JD-OBS"
    except ValueError as err:
        raise ValueError(f"the header's observation time cannot be read ({err})") from err
    if start is None:
        raise ValueError("the header has no observation time (DATE-OBS with a time, MJD-OBS or JD-OBS)")
    end = h.get("DATE-END")
    if isinstance(end, str) and "T" in end:
        try:
            stop = Time(end, format="isot", scale="utc")
            if stop > start:
                return start + (stop - start) / 2, f"{used} and DATE-END (mid-exposure)"
        except ValueError:
            pass
    for key in ("EXPTIME", "ITIME", "ELAPSED"):
        t = h.get(key)
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < float(t) < 1e5:
            return start + TimeDelta(float(t) / 2.0, format="sec"), f"{used} + {key}/2 (mid-exposure)"
    return start, f"{used} (exposure start: no EXPTIME/ITIME/DATE-END)"


_SEXAGESIMAL = re.compile(r"^\s*[+-]?\d{1,3}[:\s]\d{1,2}[:\s]\d{1,2}(\.\d*)?\s*$")


def _target(h):
    """(SkyCoord, the keywords used) or raises ValueError."""
    from astropy.coordinates import SkyCoord

    pairs = (("QRA", "QDEC"), ("OBJRA", "OBJDEC"), ("RA", "DEC"), ("TELRA", "TELDEC"))
    for ra_key, dec_key in pairs:
        ra, dec = h.get(ra_key), h.get(dec_key)
        if isinstance(ra, str) and isinstance(dec, str) and _SEXAGESIMAL.match(ra) and _SEXAGESIMAL.match(dec):
            return SkyCoord(ra, dec, unit=(u.hourangle, u.deg), frame="icrs"), f"{ra_key}/{dec_key} (h:m:s, d:m:s)"
        if ra_key == "OBJRA" and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (ra, dec)):
            return SkyCoord(float(ra) * u.deg, float(dec) * u.deg, frame="icrs"), "OBJRA/OBJDEC (degrees)"
    raise ValueError("the header has no target coordinates it states unambiguously (QRA/QDEC or RA/DEC as "
                     "sexagesimal strings, or OBJRA/OBJDEC in degrees)")


def _site(h):
    """(EarthLocation, words) or raises ValueError."""
    from astropy.coordinates import EarthLocation

    xyz = [h.get(f"OBSGEO-{c}") for c in "XYZ"]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xyz):
        return EarthLocation.from_geocentric(*[float(v) for v in xyz], unit=u.m), "OBSGEO-X/Y/Z"
    for key in ("TELESCOP", "OBSERVAT"):
        name = h.get(key)
        if isinstance(name, str) and name.strip():
            k = name.strip().lower()
            hit = OBSERVATORIES.get(k) or next((v for n, v in OBSERVATORIES.items() if n in k), None)
            if hit is not None:
                lon, lat, height = hit
                return (EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, height * u.m),
                        f"{key} = {name.strip()!r} (lon {lon}°, lat {lat}°, {height:.0f} m)")
    raise ValueError("the header names no known site (OBSGEO-X/Y/Z, or TELESCOP/OBSERVAT naming one of "
                     f"{sorted(set(OBSERVATORIES))})")


def barycentric_correction(spectrum: Spectrum) -> tuple[float, str]:
    """The barycentric correction of an exposure from its FITS header (``meta['header']``).

    Reads the mid-exposure time (``DATE-OBS`` plus half of ``EXPTIME``/``ITIME``, or the middle
    of ``DATE-OBS``-``DATE-END``; ``MJD-OBS``/``JD-OBS``), the target (``QRA``/``QDEC`` of HPF
    files and ``RA``/``DEC`` as sexagesimal strings, ``OBJRA``/``OBJDEC`` in degrees of IGRINS
    files; ICRS/J2000) and the site (``OBSGEO-X/Y/Z``, else ``TELESCOP``/``OBSERVAT`` looked up
    in :data:`OBSERVATORIES`), and asks astropy (``SkyCoord.radial_velocity_correction``,
    ``kind="barycentric"``; no download). muler's own ``estimate_barycorr`` (muler 0.5.6) is
    missing (it is defined under the name ``f``, so ``barycentric_correct`` raises
    AttributeError) and needs astropy's online site registry.

    Returns
    -------
    (float, str)
        The correction in km/s (add it to a measured RV, see :func:`barycentric_rv`) and the
        keywords and site used.

    Raises
    ------
    ValueError
        The header lacks the time, the target or the site (the message says which).
    """
    h = _header(spectrum)
    if not h:
        raise ValueError("the spectrum has no FITS header in meta['header']")
    when, t_used = _observation_time(h)
    target, c_used = _target(h)
    site, s_used = _site(h)
    v = target.radial_velocity_correction(kind="barycentric", obstime=when, location=site).to_value(u.km / u.s)
    return float(v), f"from the header: {t_used}, {c_used}, site {s_used}; astropy radial_velocity_correction"


# ------------------------------------------------------------------------------ frames
def to_observatory(spectrum: Spectrum, correction_kms: float) -> Spectrum:
    """A barycentric-frame spectrum back on the observatory's axis: its spectral axis (as
    wavelength) divided by :math:`1 + v_\\mathrm{corr}/c`, in its own unit and order; the same
    class, flux, uncertainty, mask, meta and velocity tag."""
    axis = spectrum.spectral_axis
    wl = wavelength_to_angstrom(axis) / (1.0 + float(correction_kms) / SPEED_OF_LIGHT_KMS)
    new_axis = (wl * u.AA).to(axis.unit, equivalencies=u.spectral())
    return rebuild_like(spectrum, spectral_axis=new_axis, flux=spectrum.flux, uncertainty=spectrum.uncertainty,
                        mask=spectrum.mask, meta=dict(getattr(spectrum, "meta", None) or {}))


def _given_correction(value) -> float:
    if isinstance(value, u.Quantity):
        try:
            v = float(value.to_value(u.km / u.s))
        except (u.UnitConversionError, TypeError) as err:
            raise u.UnitsError(f"barycentric_correction must be a velocity, e.g. -21.9 * u.km / u.s, "
                               f"got {value!r}") from err
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        v = float(value)
    else:
        raise TypeError(f"barycentric_correction must be a Quantity (km/s) or a number in km/s, got "
                        f"{type(value).__name__}")
    if not math.isfinite(v) or abs(v) > MAX_BARYCENTRIC_CORRECTION_KMS:
        raise ValueError(f"barycentric_correction = {v} km/s: a ground-based correction lies within "
                         f"±{MAX_BARYCENTRIC_CORRECTION_KMS:g} km/s (Earth's orbit and rotation); was it in m/s?")
    return v


def default_frame(orders: Sequence[Spectrum]) -> str:
    """``"observatory"`` for pipeline products as recorded (muler's ``HPFSpectrum`` and
    ``IGRINSSpectrum``, :func:`~blase_specutils.io.read_igrins_plp`), else ``"unstated"``."""
    def recorded(s) -> bool:
        meta = getattr(s, "meta", None) or {}
        said = meta.get(FRAME_KEY) if hasattr(meta, "get") else None
        return said == "observatory" or any(c.__name__ in OBSERVATORY_CLASSES for c in type(s).__mro__)

    return "observatory" if orders and all(recorded(s) for s in orders) else UNSTATED


def check_frame_settings(*, air=None, frame=None, barycentric_correction=None) -> None:
    """Check the frame settings of a fit before any data are read (as :func:`prepare_orders` would
    refuse them): ``air`` True, False or None; ``frame`` one of :data:`FRAMES` or None;
    ``barycentric_correction`` a velocity within ±31 km/s or None. Raises TypeError, ValueError
    or UnitsError naming the setting."""
    if air is not None and not isinstance(air, (bool, np.bool_)):
        raise TypeError(f"air must be True (air wavelengths), False (vacuum) or None (as the file says), got {air!r}")
    if frame is not None and (not isinstance(frame, str) or frame not in FRAMES):
        raise ValueError(f"frame must be one of {FRAMES} (the frame the data are in) or None (observatory for "
                         f"HPF/IGRINS pipeline spectra, else unstated), got {frame!r}")
    if barycentric_correction is not None:
        _given_correction(barycentric_correction)


def prepare_orders(orders: Sequence[Spectrum], *, air: bool | None = None, frame: str | None = None,
                   barycentric_correction=None) -> tuple[list[Spectrum], FitFrames]:
    """Bring the user's orders into the fit's frame: vacuum wavelengths, on the observatory's axis.

    Parameters
    ----------
    orders : sequence of Spectrum
        The user's orders, not modified.
    air : bool or None
        As in :func:`~blase_specutils.spectra.to_vacuum`: None (as the data say; vacuum where they
        say nothing), True (air wavelengths: converted), False (vacuum).
    frame : {"observatory", "barycentric"} or None
        The frame the data are in. ``"observatory"``: as recorded. ``"barycentric"``: the axis
        was shifted by the barycentric correction (muler's ``barycentric_correct``/``rv_shift``);
        it is shifted back, so a correction is required. None (default): ``"observatory"`` for
        HPF and IGRINS pipeline spectra (:func:`default_frame`), else ``"unstated"``: fitted on
        the axis as given, with no barycentric RV (metadata cannot tell a stacked or corrected
        spectrum from one as recorded; muler's ``barycentric_correct`` leaves ``meta`` as it was).
    barycentric_correction : Quantity or float (km/s), optional
        The correction to use (|v| <= 31 km/s); None: from the header of the first order
        (:func:`barycentric_correction`), where it has the time, target and site.

    Returns
    -------
    (list of Spectrum, FitFrames)
        The orders in vacuum on the observatory's axis (new objects of the user's classes) and
        the record of what was done.

    Raises
    ------
    ValueError
        An unknown frame; ``frame="barycentric"`` with no correction given or found; orders with
        different velocity tags; what :func:`~blase_specutils.spectra.to_vacuum` refuses.
    TypeError, astropy.units.UnitsError
        ``barycentric_correction`` of the wrong type or unit.
    """
    check_frame_settings(air=air, frame=frame, barycentric_correction=barycentric_correction)
    given = None if barycentric_correction is None else _given_correction(barycentric_correction)
    vacuum = [to_vacuum(s, air) for s in orders]
    frames = FitFrames(frame=default_frame(orders) if frame is None else frame,
                       wavelength_frames=tuple(str(s.meta.get(WAVELENGTH_FRAME_KEY)) for s in vacuum))
    if given is not None:
        frames.barycentric_correction, frames.barycentric_source = given, "given by the user"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # astropy's ERFA "dubious year" and IERS notes
                frames.barycentric_correction, frames.barycentric_source = barycentric_correction_of(vacuum[0])
        except ValueError as err:
            frames.barycentric_source = f"not available: {err}"
    if frames.frame == UNSTATED:
        frames.notes.append("the data's frame is unstated (say frame='observatory' or 'barycentric'): fitted on "
                            "the axis as given, no barycentric RV")
    if frames.frame == "barycentric":
        if frames.barycentric_correction is None:
            raise ValueError(
                "frame='barycentric' needs the barycentric correction to put the telluric lines back where they are "
                f"at rest, and none was given or found ({frames.barycentric_source.removeprefix('not available: ')}); "
                "give barycentric_correction=... (km/s), or fit data as recorded with frame='observatory'")
        vacuum = [to_observatory(s, frames.barycentric_correction) for s in vacuum]
    frames.rv_tagged = velocity_tag(vacuum)
    return vacuum, frames


# FRAME_CHECK_RATIO, FRAME_CHECK_MIN_DCHI2, FRAME_CHECK_MIN_KMS, FRAME_CHECK_POWERS (when the frame
# check flags): blase_specutils.constants


def telluric_frame_flags(model, wavelength: np.ndarray, flux: np.ndarray, sigma: np.ndarray, good: np.ndarray,
                         model_flux: np.ndarray, frames: FitFrames) -> list:
    """Check the data's frame against the telluric lines: a ``telluric_frame`` flag when they fit
    better shifted by the barycentric correction (the data are then in the other frame).

    The telluric clone's transmission at the data pixels (X = 1, through the fitted LSF) is
    raised to the powers :data:`FRAME_CHECK_POWERS` where the fit put it, and shifted by the
    factor 1 + v_corr/c towards where it would be were the data in the other frame (data said to
    be in the observatory frame but barycentric have their telluric lines at λ (1 + v_corr/c);
    the reverse for the reverse mistake); each multiplies the fit's stellar-and-continuum part
    (the model divided by its fitted transmission, over pixels where that exceeds 0.05). When the
    best shifted χ² is below 70 % of the best unshifted one and lower by more than 25, the flag
    names the frame the tellurics point to. A fitted wavelength correction is left out of the
    transmission compared (it would move the lines towards either frame). Without a telluric clone, a correction, or with
    |v_corr| < 1 km/s: no check (an empty list).
    """
    from .core.transfer import FitFlag

    bc = frames.barycentric_correction
    at_pixels = getattr(model, "transmission_at_pixels", None)
    if bc is None or abs(bc) < FRAME_CHECK_MIN_KMS or model.telluric is None or at_pixels is None:
        return []
    import torch

    with torch.no_grad():
        fitted = at_pixels()
        power = model.log_telluric_power.detach().clone()
        calibration = getattr(model, "calibration_coeffs", None)
        saved = None if calibration is None else calibration.detach().clone()
        model.log_telluric_power.zero_()
        if calibration is not None:  # the lines at rest in the frame checked, not moved by a fitted correction
            calibration.zero_()
        try:
            one = at_pixels()
        finally:
            model.log_telluric_power.copy_(power)
            if calibration is not None:
                calibration.copy_(saved)
    if fitted is None or one is None:
        return []
    t_fit, t1 = fitted.detach().cpu().numpy(), np.clip(one.detach().cpu().numpy(), 1e-6, None)
    ok = good & np.isfinite(t_fit) & np.isfinite(t1) & (t_fit > 0.05)
    if ok.sum() < 10:
        return []
    wl = np.asarray(wavelength, dtype=np.float64)
    base = np.where(ok, model_flux / np.where(ok, t_fit, 1.0), 0.0)

    def best(trans: np.ndarray) -> float:
        chi2 = [float(np.sum(((flux[ok] - base[ok] * trans[ok] ** p) / sigma[ok]) ** 2)) for p in FRAME_CHECK_POWERS]
        return min(chi2)

    said = "observatory" if frames.frame == UNSTATED else frames.frame
    looks = "barycentric" if said == "observatory" else "observatory"
    factor = 1.0 + bc / SPEED_OF_LIGHT_KMS
    # the tellurics of barycentric data fitted as observatory data sit redwards by the factor; the reverse
    shifted = np.interp(wl / factor if looks == "barycentric" else wl * factor, wl, t1)
    c0, c1 = best(t1), best(shifted)
    if c1 < FRAME_CHECK_RATIO * c0 and c0 - c1 > FRAME_CHECK_MIN_DCHI2:
        frames.notes.append(f"the telluric lines point to the {looks} frame")
        return [FitFlag("telluric_frame", f"the telluric lines fit better shifted by the barycentric correction "
                        f"({bc:+.2f} km/s; best χ² over X {c0:.4g} -> {c1:.4g}): the data look {looks}, not {said}; "
                        f"fit again with frame={looks!r} (the telluric lines stay at rest in the observatory frame)",
                        "frame")]
    return []


#: The header-reading function under a name that does not clash with the keyword argument.
barycentric_correction_of = barycentric_correction
