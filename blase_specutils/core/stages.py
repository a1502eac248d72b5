"""The procedure of a transfer-learning fit in the core: the loss, the stages and their record.

:func:`fit_transfer` runs the scans that start the optimiser, then the two training stages
(template matching with the lines frozen, then the lines), each through
:func:`~.training.train` with the parameters put back within their bounds after every step.
:class:`TransferFit` records what they did; :func:`transfer_loss` is the loss they minimise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..constants import (UNSEEN_LINE_DEPTH, CALIBRATION_LR_DIVISOR, CENTERS_LR_DIVISOR, CONTINUUM_LR_DIVISOR,
                         LINE_STAGE_ADAM_BETAS, RV_LR_FACTOR, TEMPLATE_PATIENCE)
from .clone import LineCloneModel
from .engine import window_half_widths
from .profiles import FWHM_GAUSSIAN_PER_SIGMA
from .training import TrainingHistory, train, use_plans

if TYPE_CHECKING:
    from .transfer import TransferModel

__all__ = ["transfer_loss", "fit_transfer", "TransferFit"]


def _l1_pull(param: Tensor, prior: Tensor | None, scale: float | None) -> Tensor | None:
    """Σ |param − prior| / scale, or None when there is no pull (no prior, no scale or a frozen param)."""
    if scale is None or prior is None or not param.requires_grad:
        return None
    return (param - prior).abs().sum() / scale


def transfer_loss(
    model: TransferModel,
    data: Tensor,
    weight: Tensor,
    *,
    log_amp_prior: Tensor | None = None,
    regularization: float | None = 5.0,
    width_prior: tuple[Tensor, Tensor] | None = None,
    width_regularization: float | None = None,
    likelihood: Callable[[Tensor], Tensor] | None = None,
    telluric_log_amp_prior: Tensor | None = None,
    telluric_regularization: float | None = 5.0,
    telluric_width_prior: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    r"""χ² plus the L1 pull :math:`\sum_j |\ln a_j - \ln \hat a_j| / \Lambda` (and the same pull on
    ln σ and ln γ if asked), for the stellar and the telluric lines.

    Parameters
    ----------
    model : TransferModel
    data, weight : Tensor
        Data flux at λ_D and 1/σ² per pixel (0 for masked pixels).
    log_amp_prior : Tensor, optional
        :math:`\ln\hat a` of the stellar clone.
    regularization : float or None
        Λ of the stellar amplitude pull (None: none).
    width_prior : (Tensor, Tensor), optional
        ln σ and ln γ of the stellar clone.
    width_regularization : float or None
        Λ of the width pulls, for the stellar and (with ``telluric_width_prior``) the telluric lines.
    likelihood : callable, optional
        Replaces χ²: it is called on the residual R = data − M(λ_D) at every pixel and returns a
        scalar on the χ² scale (twice a negative log-likelihood up to a constant); it handles its
        own noise model and masked pixels (``weight`` is then unused).
    telluric_log_amp_prior : Tensor, optional
        :math:`\ln\hat a` of the telluric clone.
    telluric_regularization : float or None
        Λ of the telluric amplitude pull (None: none).
    telluric_width_prior : (Tensor, Tensor), optional
        ln σ and ln γ of the telluric clone.

    Returns
    -------
    Tensor
        The scalar loss. A pull only acts on parameters that require grad (the tuned ones).
    """
    r = data - model()
    loss = (weight * r * r).sum() if likelihood is None else likelihood(r)
    terms = []
    st, tel = model.stellar, model.telluric
    if st is not None:
        terms.append(_l1_pull(st.log_amplitudes, log_amp_prior, regularization))
        if width_prior is not None:
            terms.append(_l1_pull(st.log_sigmas, width_prior[0], width_regularization))
            terms.append(_l1_pull(st.log_gammas, width_prior[1], width_regularization))
    if tel is not None:
        terms.append(_l1_pull(tel.log_amplitudes, telluric_log_amp_prior, telluric_regularization))
        if telluric_width_prior is not None:
            terms.append(_l1_pull(tel.log_sigmas, telluric_width_prior[0], width_regularization))
            terms.append(_l1_pull(tel.log_gammas, telluric_width_prior[1], width_regularization))
    terms.append(model.calibration_penalty())
    for t in terms:
        if t is not None:
            loss = loss + t
    return loss


class TransferFit:
    """Results of :func:`fit_transfer`: the stages' histories, χ² values and scans.

    Attributes
    ----------
    stages : dict of TrainingHistory
        ``"template"`` and ``"lines"``.
    chi2 : dict of float
        χ² at ``"start"``, after ``"template"`` and after ``"lines"``.
    rv_scan : (ndarray, ndarray) or None
        RVs (km/s) and χ² of the initial RV scan (with a v sin i scan: χ² at the best v sin i).
    vsini_scan : (ndarray, ndarray) or None
        v sin i values (km/s) of the initial scan and the lowest χ² over the RVs at each.
    rv_vsini_scan : (ndarray, ndarray, ndarray) or None
        RVs, v sin i values and the χ² grid (RVs × v sin i) of a joint scan.
    telluric_power_scan : (ndarray, ndarray) or None
        Powers X and χ² of the initial telluric-power scan.
    rv_continuum : dict of int to float, or None
        The RV of least χ² after template matching with the continuum polynomial of each degree
        (:func:`~blase_specutils.core.systematics.rv_by_continuum_degree`), when it was run.
    vsini_halves : dict of str to float, or None
        v sin i of least χ² after template matching on the blue and the red half of the orders
        (:func:`~blase_specutils.core.systematics.vsini_by_order_half`), when it was run.
    information_widths : dict of str to float, or None
        ``"rv"`` and ``"vsini"``: how many independent broadened line widths of data carry the
        information on each after template matching
        (:func:`~blase_specutils.core.systematics.rv_information_widths`,
        :func:`~blase_specutils.core.systematics.vsini_information_widths`), when they were counted.
    """

    def __init__(self) -> None:
        self.stages: dict[str, TrainingHistory] = {}
        self.chi2: dict[str, float] = {}
        self.rv_scan: tuple[np.ndarray, np.ndarray] | None = None
        self.vsini_scan: tuple[np.ndarray, np.ndarray] | None = None
        self.rv_vsini_scan: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.telluric_power_scan: tuple[np.ndarray, np.ndarray] | None = None
        self.rv_continuum: dict[int, float] | None = None
        self.vsini_halves: dict[str, float] | None = None
        self.information_widths: dict[str, float | None] | None = None


def _chi2(model: TransferModel, data: Tensor, weight: Tensor) -> float:
    with torch.no_grad():
        r = data - model()
        return float((weight * r * r).sum())


def _widths(clone: LineCloneModel | None) -> tuple[Tensor, Tensor] | None:
    if clone is None:
        return None
    return clone.log_sigmas.detach().clone(), clone.log_gammas.detach().clone()


def fit_transfer(
    model: TransferModel,
    data: Tensor,
    weight: Tensor,
    *,
    rv_scan: Sequence[float] | None = None,
    vsini_scan: Sequence[float] | None = None,
    template_epochs: int = 200,
    line_epochs: int = 500,
    tune_lines: Sequence[str] = ("amplitude",),
    tune_resolving_power: bool = False,
    regularization: float | None = 5.0,
    width_regularization: float | None = None,
    lr: float = 0.02,
    patience: int | None = 100,
    tune_vsini_with_lines: bool | None = None,
    progress: bool = True,
    likelihood: Callable[[Tensor], Tensor] | None = None,
    tune_telluric: Sequence[str] = (),
    tune_telluric_power: bool = True,
    telluric_regularization: float | None = 5.0,
    telluric_power_scan: Sequence[float] | None = None,
    plan: bool | str = "auto",
    tune_calibration: bool = False,
) -> TransferFit:
    """Fit in the order users need: RV scan, then extrinsic + continuum, then lines.

    Parameters
    ----------
    model : TransferModel
    data, weight : Tensor
        Data flux at λ_D and 1/σ² (0 where masked).
    rv_scan : sequence of float, optional
        RVs (km/s) for the initial χ² scan (not for a telluric-only model: ValueError), within
        ±``model.max_rv``.
    vsini_scan : sequence of float, optional
        v sin i values (km/s) scanned jointly with ``rv_scan`` (:meth:`TransferModel.scan_rv_vsini`;
        at the model's RV when ``rv_scan`` is None); the best pair starts template matching.
    template_epochs : int
        Adam epochs of the template-matching stage (RV, v sin i, continuum, the telluric power X,
        optionally R; all lines frozen).
    line_epochs : int
        Epochs of the line stage (lines plus the extrinsic and continuum parameters); 0 skips it.
    tune_lines : sequence of str
        Stellar line parameters tuned in the line stage (ignored without a stellar clone).
    regularization : float or None
        Λ of the L1 pull of the stellar ln a towards the clone (None: no pull).
    width_regularization : float or None
        Λ of an L1 pull of ln σ, ln γ (None: none), stellar and telluric.
    lr : float
        Adam learning rate (log parameters); the RV moves by steps of 5·lr km/s, line centres by
        lr/30 Å and the continuum coefficients by lr/20.
    patience : int or None
        Early stopping of the line stage after this many epochs without 0.01 % improvement.
    tune_vsini_with_lines : bool or None
        Keep v sin i free during the line stage. Default (None): free unless stellar line widths
        are tuned, because widths and v sin i are nearly degenerate; then v sin i keeps its
        template-matching value. By the same rule R keeps its template-matching value when any
        line widths are tuned, and the telluric power(s) X when the telluric widths are tuned.
    progress : bool
        Progress bars.
    likelihood : callable, optional
        Replaces χ² in the loss of both stages (see :func:`transfer_loss`); None (default): χ².
        If it is an ``nn.Module``, its trainable parameters (e.g. a Gaussian process's amplitude
        and length scale) are tuned together with the model at the rate ``lr``. The scans and
        the initial continuum stay χ² least squares; the χ² values in the result are always the
        plain χ².
    tune_telluric : sequence of str
        Telluric line parameters tuned in the line stage (default none: the telluric lines stay
        as cloned). They get their own L1 pull towards the telluric clone.
    tune_telluric_power : bool
        Tune the Beer's-law exponent X of the telluric transmission in both stages (when the model
        has a telluric clone).
    telluric_regularization : float or None
        Λ of the L1 pull of the telluric ln a towards the telluric clone (None: no pull).
    telluric_power_scan : sequence of float, optional
        Powers X (> 0) for a χ² scan after the RV scan (continuum solved at each); the best one
        starts template matching.
    plan : bool or "auto"
        Train both stages through window plans of the clones (:meth:`TransferModel.make_plans`);
        on a GPU each epoch is then one replay of a CUDA graph (not with a ``likelihood``, whose
        epochs run eagerly). The result is that of training without plans. ``"auto"``: on CUDA
        devices when the model's ``engine.plans_on_cuda`` is set; never on CPUs.
    tune_calibration : bool
        Tune the model's wavelength correction (``calibration_degree`` not None) in both stages:
        Adam with the rest, then a linear least-squares solve (:meth:`TransferModel.solve_calibration`)
        and the continuum solved again at the end of each stage (not with a ``likelihood``).

    Returns
    -------
    TransferFit
        The model is left holding the fitted parameters; the clones' tuned/frozen state and the
        power's ``requires_grad`` are restored. After every Adam step the parameters are put back
        within their bounds (:meth:`TransferModel.project_`).
    """
    want_plan = use_plans(plan, model.lam_z.device, model.engine)
    fit = TransferFit()
    st, tel = model.stellar, model.telluric
    prior = None if st is None else st.log_amplitudes.detach().clone()
    wprior = _widths(st)
    tprior = None if tel is None else tel.log_amplitudes.detach().clone()
    twprior = _widths(tel)
    _initial_scans(model, data, weight, fit, rv_scan=rv_scan, vsini_scan=vsini_scan,
                   telluric_power_scan=telluric_power_scan)
    fit.chi2["start"] = _chi2(model, data, weight)
    overrides = _step_sizes(model, lr)
    # stage 1: template matching (lines frozen)
    st_before = None if st is None else st.tuned
    tel_before = None if tel is None else tel.tuned
    power_before = model.log_telluric_power.requires_grad
    calibrate = _free_for_template_matching(model, tune_telluric_power=tune_telluric_power,
                                            tune_resolving_power=tune_resolving_power,
                                            tune_calibration=tune_calibration)
    extra = likelihood if isinstance(likelihood, nn.Module) else None
    plans = model.make_plans() if want_plan else None
    try:
        _fit_stages(model, data, weight, fit, template_epochs=template_epochs, line_epochs=line_epochs, lr=lr,
                    likelihood=likelihood, overrides=overrides, extra=extra, plans=plans, progress=progress,
                    tune_lines=tune_lines, tune_telluric=tune_telluric, tune_vsini_with_lines=tune_vsini_with_lines,
                    patience=patience, prior=prior, wprior=wprior, tprior=tprior, twprior=twprior,
                    regularization=regularization, width_regularization=width_regularization,
                    telluric_regularization=telluric_regularization, calibrate=calibrate)
    finally:
        model.calibration_coeffs.requires_grad_(False)
        if plans is not None:
            model.clear_plans()
    if st is not None:
        st.set_tuned(st_before)
    if tel is not None:
        tel.set_tuned(tel_before)
    model.log_telluric_power.requires_grad_(power_before)
    return fit


def _initial_scans(model: TransferModel, data: Tensor, weight: Tensor, fit: TransferFit, *,
                   rv_scan: Sequence[float] | None, vsini_scan: Sequence[float] | None,
                   telluric_power_scan: Sequence[float] | None) -> None:
    """Run the χ² scans that start the optimiser (RV × v sin i, RV alone, then the telluric power) and
    record them in ``fit``; without a scan, solve the continuum for the starting model."""
    if vsini_scan is not None:
        rvs = [float(model.rv.detach())] if rv_scan is None else list(rv_scan)
        _, _, grid = model.scan_rv_vsini(data, weight, rvs, list(vsini_scan))
        rvs, vs = np.asarray(rvs, dtype=float), np.asarray(vsini_scan, dtype=float)
        fit.rv_vsini_scan = (rvs, vs, grid)
        best_per_vsini = np.nanmin(grid, axis=0)
        fit.vsini_scan = (vs, best_per_vsini)
        if rv_scan is not None:  # the RV profile at the best v sin i, where it was evaluated
            col = grid[:, int(np.argmin(best_per_vsini))]
            done = np.isfinite(col)
            fit.rv_scan = (rvs[done], col[done])
    elif rv_scan is not None:
        best, chi2 = model.scan_rv(data, weight, list(rv_scan))
        fit.rv_scan = (np.asarray(rv_scan, dtype=float), chi2)
    else:
        model.solve_continuum(data, weight)
    if telluric_power_scan is not None:
        best, chi2 = model.scan_telluric_power(data, weight, list(telluric_power_scan))
        fit.telluric_power_scan = (np.asarray(telluric_power_scan, dtype=float), chi2)


def _step_sizes(model: TransferModel, lr: float) -> dict[str, float]:
    """Adam's learning rates of the parameters not in log units: the RV moves in km/s, centres in Å,
    continuum and calibration coefficients in their own units (the log parameters take ``lr``)."""
    overrides = {"rv": lr * RV_LR_FACTOR, "continuum_coeffs": lr / CONTINUUM_LR_DIVISOR,
                 "calibration_coeffs": lr / CALIBRATION_LR_DIVISOR}
    if model.stellar is not None:
        overrides["stellar.lam_centers"] = lr / CENTERS_LR_DIVISOR
    if model.telluric is not None:
        overrides["telluric.lam_centers"] = lr / CENTERS_LR_DIVISOR
    return overrides


def _free_for_template_matching(model: TransferModel, *, tune_telluric_power: bool, tune_resolving_power: bool,
                                tune_calibration: bool) -> bool:
    """Freeze the lines and free what template matching tunes (the telluric power, R and the
    wavelength correction when asked); returns whether the correction is tuned."""
    tel = model.telluric
    for clone in (model.stellar, tel):
        if clone is not None:
            clone.set_tuned(())
    model.log_telluric_power.requires_grad_(bool(tune_telluric_power) and tel is not None)
    model.inst.log_resolving_power.requires_grad_(bool(tune_resolving_power))
    calibrate = bool(tune_calibration) and model.calibration_degree is not None
    model.calibration_coeffs.requires_grad_(calibrate)
    return calibrate


def _joined(first: TrainingHistory, second: TrainingHistory) -> TrainingHistory:
    """One history of two consecutive training runs (the second's stop reason)."""
    best_second = second.best_loss < first.best_loss
    return TrainingHistory(loss=list(first.loss) + list(second.loss),
                           best_loss=second.best_loss if best_second else first.best_loss,
                           best_epoch=first.epochs_run + second.best_epoch if best_second else first.best_epoch,
                           epochs_run=first.epochs_run + second.epochs_run, stop_reason=second.stop_reason,
                           seconds=first.seconds + second.seconds)


def _log_mode(clone: LineCloneModel | None) -> bool:
    return clone is not None and clone.mode == "log"


def _hold_degenerate_globals(model: TransferModel, tune_lines: Sequence[str], tune_telluric: Sequence[str],
                             tune_vsini_with_lines: bool | None) -> list[tuple[Tensor, bool]]:
    """Freeze, for the line stage, the global parameters that the tuned line parameters make
    (nearly) degenerate, so that they keep their template-matching values: the RV when the stellar
    line centres are tuned (a common shift of every centre is the RV, and nothing pulls the centres
    towards the clone; on WASP 69 the line stage moved the RV from -9.73 to -9.20 km/s, with a σ of
    0.007 km/s, against -9.63 in the literature), v sin i when the
    stellar widths are tuned (unless ``tune_vsini_with_lines`` says otherwise), R when any widths are
    tuned (the instrumental kernel and every line's width), and the Beer's-law power(s) X when the
    telluric widths are tuned, or the amplitudes of a log-mode telluric clone (a line adds X·a·V to
    ln T: X and the amplitudes are exactly degenerate but for the L1 pull; in linear mode,
    (1 - Σ a V)^X, X also shapes the saturated lines and stays free). Without this, X and R drift
    along the degenerate direction as the line stage runs (on the IGRINS A0V order X(CH4) went
    0.64, 0.70, 0.80, 0.96 after 0, 300, 1000, 4000 line epochs). Returns (parameter, its
    ``requires_grad`` before) pairs to restore."""
    widths = {"sigma", "gamma"}
    stellar_widths, telluric_widths = bool(widths & set(tune_lines)), bool(widths & set(tune_telluric))
    if tune_vsini_with_lines is None:
        tune_vsini_with_lines = not stellar_widths
    held = [(model.rv, "center" not in tune_lines),
            (model.rot.log_vsini, bool(tune_vsini_with_lines)),
            (model.inst.log_resolving_power, not (stellar_widths or telluric_widths)),
            (model.log_telluric_power, not (telluric_widths or (tune_telluric and _log_mode(model.telluric))))]
    before = [(param, param.requires_grad) for param, _ in held]
    for param, keep_free in held:
        param.requires_grad_(param.requires_grad and keep_free)
    return before


def _hold_unseen_lines(model: TransferModel, weight: Tensor) -> list:
    """Hold, for the line stage, the telluric lines that no fitted pixel sees: those whose profile,
    broadened by the instrument, stays below a depth of ``UNSEEN_LINE_DEPTH`` ε at every pixel of
    weight > 0. The reach of a line is the engine's window half-width
    (:func:`~blase_specutils.core.engine.window_half_widths`: its Gaussian core or its Lorentzian
    wing down to ε, at least 6σ' + 6γ) for its area X a and the Gaussian width through the
    instrument, σ'² = σ² + (λ/(2.3548 R))². Such lines are kept for the model's completeness (the
    lines within ``buffer`` of the data), but tuning them would let their far wings trade against the
    continuum polynomial where nothing constrains them: on the IGRINS A0V order a line 37 Å beyond a
    masked edge grew until the fitted transmission sat 15 % below 1 across the order. The stellar
    lines stay free: on WASP 69 holding those beyond the order's ends moved χ²_red from 3.06 to
    between 2.7 and 3.5 depending on a single line at the edge, a change the data do not decide.
    Gradient hooks zero their updates; returns the hook handles to remove after the stage."""
    clone = model.telluric
    lam = model.lam_d[weight > 0]
    if clone is None or lam.numel() < 2:
        return []
    lam = torch.sort(lam).values
    with torch.no_grad():
        centers = clone.lam_centers
        sigma, gamma = clone.log_sigmas.exp(), clone.log_gammas.exp()
        r = float(model.resolving_power.detach())
        sigma_obs = (sigma.square() + (centers / (r * FWHM_GAUSSIAN_PER_SIGMA)).square()).sqrt()
        area = float(model.telluric_power.detach().max()) * clone.log_amplitudes.exp()
        reach = window_half_widths(area, sigma_obs, gamma, UNSEEN_LINE_DEPTH)
        k = torch.searchsorted(lam, centers).clamp(1, lam.numel() - 1)
        nearest = torch.minimum((lam[k] - centers).abs(), (lam[k - 1] - centers).abs())
        seen = (nearest <= reach).to(centers.dtype)
    if bool(seen.all()):
        return []
    return [param.register_hook(lambda g, m=seen: g * m)
            for param in (clone.lam_centers, clone.log_amplitudes, clone.log_sigmas, clone.log_gammas)
            if param.requires_grad]


def _fit_stages(model, data, weight, fit, *, template_epochs, line_epochs, lr, likelihood, overrides, extra, plans,
                progress, tune_lines, tune_telluric, tune_vsini_with_lines, patience, prior, wprior, tprior, twprior,
                regularization, width_regularization, telluric_regularization, calibrate=False) -> None:
    """The two training stages of :func:`fit_transfer` (template matching, then the lines)."""
    st, tel = model.stellar, model.telluric
    graph = None if likelihood is None else False  # a likelihood (e.g. a GP's Cholesky) may read values back

    def polish() -> None:  # the wavelength correction and the continuum by linear least squares
        if calibrate and likelihood is None:
            for _ in range(2):
                model.solve_calibration(data, weight)
                model.solve_continuum(data, weight)

    def bounds(epoch: int, loss: float) -> None:  # after each step: back within the bounds
        model.project_()

    if template_epochs:
        # with a wavelength correction, solved once half-way too: the powers and R found after it are
        # not biased by a miscalibrated wavelength scale (Adam's steps cannot resolve m/s)
        halves = [template_epochs // 2, template_epochs - template_epochs // 2] if calibrate else [template_epochs]
        for k, epochs in enumerate(h for h in halves if h):
            if k:
                polish()
            history = train(
                model, lambda: transfer_loss(model, data, weight, likelihood=likelihood), epochs=epochs, lr=lr,
                patience=TEMPLATE_PATIENCE, progress=progress, desc="template matching", lr_overrides=overrides,
                extra=extra, plans=plans, graph=graph, callback=bounds,
            )
            fit.stages["template"] = history if k == 0 else _joined(fit.stages["template"], history)
    polish()
    fit.chi2["template"] = _chi2(model, data, weight)
    # stage 2: lines, with everything else still free
    if line_epochs:
        if st is not None:
            st.set_tuned(tune_lines)
        if tel is not None:
            tel.set_tuned(tune_telluric)
        hooks = _hold_unseen_lines(model, weight)
        held = _hold_degenerate_globals(model, tune_lines if st is not None else (), tune_telluric if tel is not None
                                        else (), tune_vsini_with_lines)
        fit.stages["lines"] = train(
            model,
            lambda: transfer_loss(model, data, weight, log_amp_prior=prior, regularization=regularization,
                                  width_prior=wprior, width_regularization=width_regularization,
                                  likelihood=likelihood, telluric_log_amp_prior=tprior,
                                  telluric_regularization=telluric_regularization, telluric_width_prior=twprior),
            epochs=line_epochs, lr=lr, patience=patience, progress=progress, desc="transfer learning",
            lr_overrides=overrides, extra=extra, plans=plans, graph=graph, callback=bounds, betas=LINE_STAGE_ADAM_BETAS,
        )
        polish()
        fit.chi2["lines"] = _chi2(model, data, weight)
        for param, free in held:
            param.requires_grad_(free)
        for hook in hooks:
            hook.remove()
