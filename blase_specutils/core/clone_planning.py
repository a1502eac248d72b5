"""Window plans of a clone: the line sums of an epoch without synchronising with the device.

:class:`Planning` is a part of :class:`~.clone.LineCloneModel`: :meth:`Planning.make_plan` makes
a :class:`~.plan.WindowPlan` (or a :class:`~.plan.ClonePlan` with wing-corrected lines) of the
model on a grid, and ``log_flux(..., plan=plan)`` evaluates it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import BroadLinePlan, ClonePlan, WindowPlan

__all__ = ["Planning"]


class Planning:
    """Window plans of a :class:`~.clone.LineCloneModel` (see :mod:`.plan`)."""

    def _planned_log_flux(self, wavelength: Tensor, radial_velocity, plan: WindowPlan | ClonePlan) -> Tensor:
        """Evaluate the model through ``plan``, after checking that the plan is this model's, on this grid and RV."""
        if not (torch.is_tensor(wavelength) and wavelength.data_ptr() == plan.wavelength.data_ptr()
                and wavelength.shape == plan.wavelength.shape):
            raise ValueError("this plan was made for another wavelength grid; make one with make_plan(wavelength)")
        if getattr(plan, "model_id", None) != id(self):
            raise ValueError("this plan was made by another model; make one with this model's make_plan")
        rv_plan = getattr(plan, "radial_velocity", None)
        same = radial_velocity is rv_plan or (not torch.is_tensor(radial_velocity) and not torch.is_tensor(rv_plan)
                                              and radial_velocity == rv_plan)
        if plan.frozen and not same:
            # a frozen plan's windows were computed for the RV it follows (GraphedEpoch)
            raise ValueError("this frozen plan follows another radial_velocity; evaluate it with the RV given "
                             "to make_plan, or make a plan for this one")
        lines = (self.shifted_centers(radial_velocity), self.log_amplitudes.exp(), self.log_sigmas.exp(),
                 self.log_gammas.exp())
        if isinstance(plan, ClonePlan):
            plan.check_lines(self.broad_lines)
            return plan.log_flux(*lines, *self._wing_parameters())
        return plan.log_flux(*lines)

    def make_plan(
        self, wavelength: Tensor, radial_velocity: Tensor | float | None = None, *, headroom: float = 1.25,
        kernel: str | None = None,
    ) -> WindowPlan | ClonePlan:
        r"""A :class:`~blase_specutils.core.plan.WindowPlan` of this model on ``wavelength`` (a
        :class:`~blase_specutils.core.plan.ClonePlan` when some lines have the Appendix C.4 wing
        correction: those take fixed-size windows of a
        :class:`~blase_specutils.core.plan.BroadLinePlan`).

        Pass it to :meth:`forward` / :meth:`log_flux` (``plan=``): the sums are those of the
        unplanned engine, computed without reading anything back from the device but one flag,
        which is what lets :class:`~blase_specutils.core.graphs.GraphedEpoch` record a whole epoch
        as a CUDA graph. The plan follows the model's parameters (and ``radial_velocity``, which may
        be a tensor that is being tuned).

        Parameters
        ----------
        wavelength : Tensor
            The pixel grid (Å, float64 tensor on the model's device) that will be evaluated.
        radial_velocity : Tensor or float, optional
            The RV (km/s) the model will be evaluated at.
        headroom : float
            Spare capacity of the GPU kernel's chunk table (see ``WindowPlan``).
        kernel : {"auto", "numba", "triton"}, optional
            The compiled kernel; default the model's ``engine.backend``. The plan takes its other
            kernel settings from the model's :attr:`engine`.
        """
        if not torch.is_tensor(wavelength) or wavelength.dtype != torch.float64 or \
                wavelength.device != self.lam_centers.device:
            raise TypeError("wavelength must be a float64 tensor on the model's device (a plan keeps this grid)")

        def source():
            return (self.shifted_centers(radial_velocity), self.log_amplitudes.exp(), self.log_sigmas.exp(),
                    self.log_gammas.exp())

        settings = dict(profile=self.profile, mode=self.mode, sign=self.sign, tolerance=self.wing_tolerance)
        if not self.broad_lines.numel():
            plan = WindowPlan(wavelength, source, far_field=self._far_field_settings(wavelength), half_widths=None,
                              kernel=kernel, headroom=headroom, engine=self.engine, **settings)
        else:
            plain, broad = self._line_split()

            def broad_source():
                return (*(t[broad] for t in source()), *self._wing_parameters())

            def plain_source():
                return tuple(t[plain] for t in source())

            part = None
            if plain.numel():
                part = WindowPlan(wavelength, plain_source, far_field=self._far_field_settings(wavelength),
                                  half_widths=None, kernel=kernel, headroom=headroom, engine=self.engine, **settings)
            plan = ClonePlan(wavelength, part, BroadLinePlan(wavelength, broad_source, headroom=headroom, **settings),
                             plain, broad)
        plan.radial_velocity = radial_velocity  # what a frozen plan must be evaluated at
        plan.model_id = id(self)
        return plan
