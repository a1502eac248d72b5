"""The numbers that set the package's behaviour, in one place.

Each constant carries a comment saying what it sets and, where a measurement chose it, where that
measurement is recorded (``benchmarks/RESULTS.md``). They are values read by the code, never
switches assigned at run time: a setting a user may change travels as an argument or an options
object (``EngineOptions``, the clone and fit settings).
"""

from __future__ import annotations

# --- cloning ---------------------------------------------------------------------------------

#: Lines wider than this many times the median FWHM of the first detection are broad: they get the
#: Appendix C.4 wing correction (``n_broad="auto"``), and residual passes add no line that wide.
BROAD_FWHM_FACTOR = 25.0
#: With ``n_broad="auto"``, at most this many of the broad lines (the broadest) get the wing correction.
MAX_AUTO_BROAD_LINES = 40
#: Residual passes go on only while each lowers the RMS residual by at least this fraction.
RESIDUAL_PASS_MIN_GAIN = 0.05
#: Share of the epoch budget given to the first training stage when residual passes follow.
FIRST_STAGE_SHARE = 0.25
#: The first stage trains at least this many epochs (or the whole budget, if smaller) before any
#: residual pass: a residual read off a barely trained clone shows its start, not missing lines.
MIN_FIRST_STAGE_EPOCHS = 100
#: Fewest epochs of a residual pass; a budget too small for one pass runs none.
MIN_PASS_EPOCHS = 50
#: White-noise level of the GP likelihood in cloning (the typical clone residual).
CLONE_GP_NOISE = 0.005
#: Widest zoom panel of ``SpectralClone.plot`` (Å).
MAX_ZOOM_WIDTH_AA = 20.0
#: Beer's-law powers a log-mode telluric clone is trained for (``clone_spectrum(powers=...)``): from
#: a night 50 times drier than the template to the template itself.
TELLURIC_CLONE_POWERS = (0.02, 0.05, 0.15, 0.4, 1.0)
#: Margin (Å) added on each side of the data's range before the band of a cached template clone is
#: rounded out to 10 Å: room for the RV range of a stellar fit (150 km/s is 5 Å at 1 µm) and for
#: lines whose wings reach in.
TEMPLATE_CLONE_MARGIN_AA = 40.0

# --- fitting ---------------------------------------------------------------------------------

#: Degree of the per-order wavelength correction fitted by default (``calibration_degree="auto"``)
#: when only telluric clones are fitted. On the IGRINS A0V standard (benchmarks/RESULTS.md, IGRINS
#: section of 2026-12-07, second run) it took the CO2-band orders 11 and 13 from χ²_red 8.2 and 13.2
#: to 1.7 and 2.3: the old PLP wavelength solution is off by about 1 km/s there.
AUTO_CALIBRATION_DEGREE = 1

#: A fitted wavelength correction that reaches more than this many times its Gaussian pull (1 km/s)
#: at a fitted pixel is flagged ``wavelength_correction_large``: 20 of the 24 IGRINS A0V orders stay
#: under it (orders 2, 10, 15 and 25 pass it); data in the wrong frame (22 km/s off) are flagged.
WAVELENGTH_CORRECTION_FLAG_PULLS = 2.0

#: Telluric line parameters tuned by default in a telluric-only fit, and by ``--tune-telluric``: the
#: amplitudes and the widths (IGRINS A0V median χ²_red 1.9 -> 1.1, HR 4829 water order 12 14.2 -> 4.7;
#: benchmarks/RESULTS.md). The Beer's-law powers and R keep their template-matching values meanwhile.
TELLURIC_ONLY_TUNED = ("amplitude", "sigma", "gamma")

#: Depth ε below which a line is not seen by a pixel: a line whose profile stays shallower than this
#: at every fitted pixel is held at its clone values in the line stage (``core.stages``): about the
#: noise of one pixel at S/N 1000, so that any line the data can see stays free.
UNSEEN_LINE_DEPTH = 1e-3

#: Lowest resolving power R a fit accepts: the cost of the LSF convolution grows as 1/R² and the
#: method needs resolved lines; R = 1000 is already a low-resolution spectrograph.
MIN_RESOLVING_POWER = 1000.0

#: Largest ``rv_range`` (km/s), the half width of the RV scan: the fastest stars known move at
#: ~1,000 km/s; a larger known velocity is tagged on the spectral axis (``radial_velocity``).
MAX_RV_RANGE_KMS = 1000.0

#: Default bound of |RV| (km/s) of a :class:`~blase_specutils.core.transfer.TransferModel` built
#: directly (``fit_spectrum`` passes its ``rv_range`` instead).
DEFAULT_MAX_RV_KMS = 300.0

#: Physical upper bound of v sin i (km/s): the largest half width of the rotation kernel. The
#: fastest known rotators (early B and Be stars near break-up) reach 400-500 km/s.
MAX_VSINI_KMS = 600.0

#: Smallest starting v sin i (km/s): a smaller (or zero) start is raised to it, since v sin i is
#: tuned as its logarithm; 0.05 km/s is far below the resolution of any spectrograph (c/R).
MIN_START_VSINI_KMS = 0.05

#: The coarse v sin i scan that starts the optimiser: (first, last, count) of values log-spaced
#: from 2 to 400 km/s (ratio 1.50), evaluated jointly with the RV scan.
VSINI_SCAN_GEOMSPACE_KMS = (2.0, 400.0, 14)

#: The χ² scan of the telluric power X that starts template matching when X is tuned: (first,
#: last, count) of values log-spaced from 0.01 to 10 (ratio 1.105). Dry nights against a wet
#: template reach X ≈ 0.02 in water (the IGRINS A0V night against PSG's default atmosphere).
TELLURIC_POWER_SCAN_LOGSPACE = (0.01, 10.0, 70)

#: Step (km/s) of the RV scan.
RV_SCAN_STEP_KMS = 1.0

#: Rotation kernel of a fit at v sin i: half width max(factor × v sin i, v sin i + margin) km/s,
#: at most the v sin i bound; doubled (up to ``KERNEL_GROWTH_ROUNDS`` times) whenever v sin i
#: reaches it. A working size that keeps the cost of an epoch low, not a bound.
KERNEL_ROOM_FACTOR = 2.0
KERNEL_ROOM_MARGIN_KMS = 20.0
KERNEL_GROWTH_ROUNDS = 8

#: Starting v sin i (km/s) of the unused rotation kernel of a telluric-only model.
TELLURIC_ONLY_VSINI_KMS = 3.0

#: Flag rules of a fit (:class:`~blase_specutils.core.diagnostics.FitBounds`): an RV this close
#: (km/s) to its bound, or another parameter this close (relative) to its bound, counts as at it;
#: a tuned R above ``RESOLVING_POWER_RUNAWAY`` × its start, or a telluric power more than
#: ``TELLURIC_POWER_RUNAWAY`` from the best of its scan, ran away; a σ above
#: ``UNCONSTRAINED_FRACTION`` of the value (RV: of max(|RV|, ``RV_SCALE_FLOOR_KMS``)) is not
#: constrained; a clone must cover ``MIN_CLONE_COVERAGE`` of the good pixels.
RV_EDGE_TOLERANCE_KMS = 1.0
BOUND_TOLERANCE = 0.01
RESOLVING_POWER_RUNAWAY = 2.5
TELLURIC_POWER_RUNAWAY = 3.0
UNCONSTRAINED_FRACTION = 0.3
RV_SCALE_FLOOR_KMS = 10.0
MIN_CLONE_COVERAGE = 0.9

#: The continuum test of a stellar RV (``core.systematics.rv_by_continuum_degree``): after template
#: matching, the RV is found again with continuum polynomials of ``CONTINUUM_TEST_EXTRA_DEGREES``
#: more than the fit's own, on ``CONTINUUM_TEST_GRID`` RVs across ±w (the broadened line width). The
#: RV of a slow K dwarf (WASP 69) moves by 0.014 km/s; HR 4829's single HPF orders (broad, shallow
#: lines of an A star at 130-160 km/s) by 5-15 km/s, 13-21 times their σ from the curvature of χ²
#: (benchmarks/RESULTS.md, HR 4829 section of 2026-12-07, third session).
CONTINUUM_TEST_EXTRA_DEGREES = (2, 4)
CONTINUUM_TEST_GRID = 41

#: The halves test of a stellar v sin i (``core.systematics.vsini_by_order_half``): after template
#: matching, v sin i is found again on the blue and the red half of every order, each on
#: ``HALVES_TEST_GRID`` values across v/``HALVES_TEST_VSINI_RANGE``-v·``HALVES_TEST_VSINI_RANGE`` at
#: the matched RV.
HALVES_TEST_GRID = 21
HALVES_TEST_VSINI_RANGE = 3.0

#: ``vsini_from_few_lines`` (``core.systematics.vsini_information_flags``): v sin i whose Fisher
#: information sits in fewer than this many independent broadened line widths of data: one or two
#: lines. One HPF order of HR 4829 (an A star at 130-170 km/s): 1.7-2.6 widths; one HPF order of
#: WASP 69 (K5 V, 2 km/s): 10.6, half of it 4.9-5.3 (benchmarks/RESULTS.md, HR 4829 section of
#: 2026-12-07, fourth session).
VSINI_MIN_INFORMATION_WIDTHS = 3.0

#: ``rv_from_few_lines`` (``core.systematics.rv_information_flags``): an RV whose Fisher information
#: sits in fewer than this many independent broadened line widths of data: one or two lines. One HPF
#: order of HR 4829 (an A star at 100-170 km/s), template matching: 0.6-6.6 widths, and every order
#: below 3 whose RV lands more than 10 km/s from the 22-order value; WASP 69's order: 24.6
#: (benchmarks/RESULTS.md, HR 4829 section of 2026-12-08).
RV_MIN_INFORMATION_WIDTHS = 3.0

#: The saturated-template rule (``core.systematics.telluric_saturation_flags``): a pixel where the
#: telluric clone at its own column (X = 1) transmits less than ``SATURATED_TEMPLATE_TRANSMISSION``
#: (0.1 %) but the fitted T^X more than ``SEEN_TRANSMISSION`` (5 %) rests on depths the template
#: does not record; an order with more than ``SATURATED_PIXEL_FRACTION`` of its fitted pixels so is
#: flagged ``telluric_template_saturated``. Measured on the IGRINS A0V standard with PSG (R = 100,000)
#: at X(H2O) ≈ 0.03 (benchmarks/RESULTS.md, IGRINS section of 2026-12-07, third session).
SATURATED_TEMPLATE_TRANSMISSION = 1e-3
SEEN_TRANSMISSION = 0.05
SATURATED_PIXEL_FRACTION = 0.05

#: Finite-difference steps of ``chi2_curvature``: RV in units of the broadened line width
#: :math:`w = \sqrt{(c/R)^2 + (v\sin i)^2}`, ln v sin i and ln X in natural-log units.
CURVATURE_STEPS = {"rv": 0.05, "vsini": 0.05, "telluric_power": 0.05}

#: Adam step sizes of ``fit_transfer`` relative to its learning rate ``lr`` (log parameters move by
#: ``lr``): the RV by ``lr`` × 5 km/s, the continuum coefficients by ``lr`` / 20, the
#: wavelength-correction coefficients by ``lr`` / 3 km/s and the line centres by ``lr`` / 30 Å.
RV_LR_FACTOR = 5.0
CONTINUUM_LR_DIVISOR = 20.0
CALIBRATION_LR_DIVISOR = 3.0
CENTERS_LR_DIVISOR = 30.0

#: Early stopping of the template-matching stage: epochs without improvement.
TEMPLATE_PATIENCE = 50

#: Adam's (β1, β2) in the line stage of ``fit_transfer``. The stage starts where template matching
#: left χ² (on WASP 69, 368 per pixel), and with Adam's usual β2 = 0.999 the running mean of the
#: squared gradient remembers those first gradients for about a thousand epochs, shrinking every
#: later step. β2 = 0.99 forgets them within about a hundred: at the default 4,000 epochs WASP 69
#: reaches χ²_red 2.59 against 2.82 (stopping on its plateau at 3,342 epochs), the README's A0V
#: order 1.124 against 1.129, HR 4829 order 17 1.445 against 1.454 (benchmarks/RESULTS.md, section
#: of 2026-12-08).
LINE_STAGE_ADAM_BETAS = (0.9, 0.99)


# --- spectra, frames and files ---------------------------------------------------------------

#: Flux outliers: a usable pixel further than this many robust σ from the robust local fit (and
#: isolated, and at least half the local flux level away from it; see ``spectra.flux_outliers``).
OUTLIER_SIGMA = 10.0
#: Half-width (pixels) of the running median that is the robust local fit of ``spectra.flux_outliers``.
OUTLIER_WINDOW = 3
#: An uncertainty below this fraction of its order's median σ is an outlier too (one such pixel
#: would outweigh the whole order in χ²).
SIGMA_FLOOR_FRACTION = 1e-3
#: Uncertainties must lie within these bounds (their inverse square must be a finite, nonzero float64).
SIGMA_LIMITS = (1e-150, 1e150)
#: Air wavelengths exist only above 2000 Å: below it wavelengths are given in vacuum by convention
#: (and the refractive-index formula has poles in the far UV).
AIR_MINIMUM_ANGSTROM = 2000.0
#: Largest |barycentric correction| accepted (km/s): the Earth's orbital speed (29.8 km/s) plus its
#: rotation (0.47 km/s) bound any ground-based correction by 30.3 km/s; a larger number is a unit
#: mistake (m/s for km/s).
MAX_BARYCENTRIC_CORRECTION_KMS = 31.0
#: A frame check flags when shifting the fitted telluric transmission by the barycentric correction
#: lowers χ² below this fraction of the fit's (and by more than :data:`FRAME_CHECK_MIN_DCHI2`).
FRAME_CHECK_RATIO = 0.7
#: ... and by at least this much in χ² (5 σ for one parameter).
FRAME_CHECK_MIN_DCHI2 = 25.0
#: Corrections below this (km/s; a fifth of HPF's resolution element) are too small to test.
FRAME_CHECK_MIN_KMS = 1.0
#: Powers X of the telluric transmission tried by the frame check, at each position.
FRAME_CHECK_POWERS = (0.25, 0.5, 1.0, 2.0, 4.0)

# --- posterior, GP and files -----------------------------------------------------------------

#: Largest |ln x| the loaders and line tables accept for line amplitudes (ln a), widths (ln σ, ln γ
#: in Å) and the wing parameters: e^±45 (3e-20 to 3.5e19) is far beyond any line of a real spectrum.
LOG_PARAMETER_LIMIT = 45.0
#: Wavelengths (Å) that a table whose wavelength column has no unit may plausibly hold; the reader
#: assumes Å, so numbers outside this range are in another unit (µm, m, Hz, ...).
PLAUSIBLE_ANGSTROM = (100.0, 1e7)

#: The SVI learning rate decays by this factor over a posterior run (tenfold).
POSTERIOR_LR_DECAY = 0.1
#: Posterior draws (at most) whose equivalent widths are integrated numerically when line widths are
#: latent (each costs a 4801-point integral per line).
POSTERIOR_EW_DRAWS = 200
#: A line is ``data_constrained`` when the data narrow its ln a 68 % interval to under this fraction
#: of the prior's.
POSTERIOR_CONSTRAINED_FRACTION = 0.5
#: The last SVI steps whose mean ELBO a posterior summary reports as ``final_elbo``.
POSTERIOR_FINAL_ELBO_STEPS = 50

#: Good pixels per order up to which a GP likelihood's ``method="auto"`` is exact (Cholesky); above,
#: scalable (KISS-GP): about where the scalable method becomes faster on a CPU.
GP_MAX_EXACT_SIZE = 3000
#: Without an ``order_index``, a GP likelihood starts a new order at every gap wider than this many
#: median pixel spacings.
GP_ORDER_GAP = 5.0
#: The default KISS-GP grid spacing is the lower bound of the length scale (or the initial length
#: scale) divided by this.
GP_GRID_PER_LENGTH_SCALE = 8.0
#: Lanczos iterations of the stochastic log-determinant (scalable method).
GP_LANCZOS_ITERATIONS = 30
#: Most conjugate-gradient iterations of a scalable solve.
GP_MAX_CG_ITERATIONS = 5000
