"""Models made from models: a subset of a clone's lines, lines added, several clones joined.

:class:`LineEditing` is a part of :class:`~.clone.LineCloneModel`: each method returns a new model
with copied (detached) parameters and the same settings, engine options included; the lines of
the Appendix C.4 wing correction keep their corrections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .clone import LineCloneModel

__all__ = ["LineEditing"]


def _as_tensor(x, dtype, device) -> Tensor:
    """A private copy: the caller's arrays and tensors are never changed by training."""
    return torch.as_tensor(np.asarray(x, dtype=np.float64) if not torch.is_tensor(x) else x.detach()).to(
        dtype=dtype, device=device
    ).clone()


class LineEditing:
    """Subsets, added lines and joined clones of a :class:`~.clone.LineCloneModel`."""

    def subset(self, lines) -> "LineCloneModel":
        """A new model holding only ``lines`` (indices or a boolean mask), with the same settings.

        Parameters are copied (detached); broad-line wing corrections follow their lines.
        """
        idx = torch.as_tensor(lines, device=self.lam_centers.device)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        idx = idx.long()
        old_to_new = torch.full((self.n_lines,), -1, dtype=torch.long, device=idx.device)
        old_to_new[idx] = torch.arange(idx.numel(), device=idx.device)
        keep_broad = old_to_new[self.broad_lines] >= 0
        new = type(self)(
            self.lam_centers.detach()[idx], self.log_amplitudes.detach()[idx], self.log_sigmas.detach()[idx],
            self.log_gammas.detach()[idx], mode=self.mode, profile=self.profile, emission=self.emission,
            tune=self.tuned, wing_tolerance=self.wing_tolerance, far_field=self.far_field,
            broad_lines=old_to_new[self.broad_lines][keep_broad].tolist(), dtype=self.dtype,
            device=self.lam_centers.device, engine=self.engine,
        )
        with torch.no_grad():
            for name in ("wing_alpha", "wing_log_lt", "wing_log_b"):
                getattr(new, name).copy_(getattr(self, name).detach()[keep_broad])
        return new

    def with_lines(self, lam_centers, log_amplitudes, log_sigmas, log_gammas) -> tuple["LineCloneModel", Tensor]:
        """A new model with the given lines added, all lines sorted by centre, the same settings.

        Parameters are copied (detached); the broad lines keep their wing corrections.

        Returns
        -------
        model : LineCloneModel
        order : Tensor
            For each line of the new model, its index in the old lines followed by the added
            ones (``order[k] >= self.n_lines`` marks an added line).
        """
        dev = self.lam_centers.device
        extra = [_as_tensor(x, t.dtype, dev) for x, t in zip(
            (lam_centers, log_amplitudes, log_sigmas, log_gammas),
            (self.lam_centers, self.log_amplitudes, self.log_sigmas, self.log_gammas))]
        if any(x.ndim != 1 or x.shape != extra[0].shape for x in extra):
            raise ValueError("the added lines' parameters must be 1-D arrays of one length")
        if not all(bool(torch.isfinite(x).all()) for x in extra):
            raise ValueError("the added lines' parameters must be finite")
        joined = [torch.cat([old.detach(), x]) for old, x in zip(
            (self.lam_centers, self.log_amplitudes, self.log_sigmas, self.log_gammas), extra)]
        order = torch.argsort(joined[0], stable=True)
        old_to_new = torch.empty_like(order)
        old_to_new[order] = torch.arange(order.numel(), device=dev)
        new = type(self)(
            *(x[order] for x in joined), mode=self.mode, profile=self.profile, emission=self.emission,
            tune=self.tuned, wing_tolerance=self.wing_tolerance, far_field=self.far_field,
            broad_lines=old_to_new[self.broad_lines].tolist(), dtype=self.dtype, device=dev, engine=self.engine,
        )
        with torch.no_grad():
            for name in ("wing_alpha", "wing_log_lt", "wing_log_b"):
                getattr(new, name).copy_(getattr(self, name).detach())
        return new, order

    @classmethod
    def concatenate(cls, models: Sequence["LineCloneModel"]) -> tuple["LineCloneModel", Tensor]:
        """One model holding the lines of several (e.g. one clone per molecule), sorted by centre.

        The models must share mode, profile and emission; the first one's wing tolerance, far-field
        setting, engine options and tuned groups are kept. Parameters are copied (detached); broad lines keep their
        wing corrections.

        Returns
        -------
        model : LineCloneModel
        component : Tensor of int
            For each line of the new model, the index of the model it came from.
        """
        models = list(models)
        if not models:
            raise ValueError("concatenate needs at least one model")
        first = models[0]
        for m in models[1:]:
            if (m.mode, m.profile, m.emission) != (first.mode, first.profile, first.emission):
                raise ValueError("models to concatenate must share mode, profile and emission; got "
                                 f"{(first.mode, first.profile, first.emission)} and {(m.mode, m.profile, m.emission)}")
        dev = first.lam_centers.device
        cat = lambda name: torch.cat([getattr(m, name).detach().to(dev, first.dtype if name != "lam_centers"  # noqa: E731
                                                                       else torch.float64) for m in models])
        centers, amps, sigmas, gammas = (cat(n) for n in ("lam_centers", "log_amplitudes", "log_sigmas", "log_gammas"))
        component = torch.cat([torch.full((m.n_lines,), k, dtype=torch.long, device=dev) for k, m in enumerate(models)])
        offsets = np.cumsum([0] + [m.n_lines for m in models[:-1]])
        broad = torch.cat([m.broad_lines.to(dev) + int(o) for m, o in zip(models, offsets)])
        order = torch.argsort(centers, stable=True)
        old_to_new = torch.empty_like(order)
        old_to_new[order] = torch.arange(order.numel(), device=dev)
        new = cls(centers[order], amps[order], sigmas[order], gammas[order], mode=first.mode,
                             profile=first.profile, emission=first.emission, tune=first.tuned,
                             wing_tolerance=first.wing_tolerance, far_field=first.far_field,
                             broad_lines=old_to_new[broad].tolist(), dtype=first.dtype, device=dev,
                             engine=first.engine)
        with torch.no_grad():
            for name in ("wing_alpha", "wing_log_lt", "wing_log_b"):
                getattr(new, name).copy_(torch.cat([getattr(m, name).detach().to(dev) for m in models]))
        return new, component[order]
