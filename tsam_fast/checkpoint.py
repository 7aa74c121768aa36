"""A TSAM checkpoint: the base optimizer's state plus the step counter and seed (docs/design.md §8.2).

``CheckpointMixin`` gives ``TSAM`` what torch.optim users and trainers call to save and resume:
``state_dict``/``load_state_dict`` (also through torch.distributed.checkpoint, which keeps only "state" and
"param_groups"), pickling and deep copies, and the base-optimizer-only step torch.distributed.checkpoint
makes to create state before loading into it.
"""

from __future__ import annotations

import torch

from .engine import Session

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    def state_dict(self) -> dict:
        """The base optimizer's state_dict plus ``"tsam"``: the step counter and seed.

        Callable tilts (schedules) are code, not state: they are saved as None and the optimizer's
        own schedule is kept on load. Taken during a step, it is the state as of theta0 (a step changes
        the state only when it finishes), like a plain optimizer's before its ``step()``; the model's
        parameters are perturbed then: save the model inside ``with opt.unperturbed():``.
        """
        sd = self.base_optimizer.state_dict()
        for group in sd["param_groups"]:
            if callable(group.get("tilt")):
                group["tilt"] = None
        sd["tsam"] = {"step": self._step_count, "seed": self.seed}
        # also in every group: torch.distributed.checkpoint keeps only "state" and "param_groups"
        for group in sd["param_groups"]:
            group.update(tsam_step=self._step_count, tsam_seed=self.seed)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        groups = [dict(g) for g in sd.get("param_groups", ())]
        in_groups = [{"step": g.pop("tsam_step"), "seed": g.pop("tsam_seed")} for g in groups
                     if "tsam_step" in g and "tsam_seed" in g]
        sd["param_groups"] = groups
        tsam = sd.pop("tsam", None) or (in_groups[0] if in_groups else None)
        if tsam is None:
            raise ValueError("not a TSAM state_dict (no 'tsam' entry); for a plain base-optimizer "
                             "state_dict use opt.base_optimizer.load_state_dict(...)")
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in sd.get("state", {}).items():
            if not isinstance(index, int) or index >= len(params):
                continue  # the base optimizer reports group/parameter count mismatches itself
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                    raise ValueError(
                        f"this state_dict does not fit the optimizer's parameters: parameter {index} has shape "
                        f"{tuple(params[index].shape)} but its saved {key!r} has shape {tuple(value.shape)}; "
                        "load it into an optimizer built on the same model")
        tilts = [g["tilt"] for g in self.param_groups]
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group, tilt in zip(self.param_groups, tilts):
            if group.get("tilt") is None:
                group["tilt"] = tilt
        self._step_count = int(tsam["step"])
        self.seed = int(tsam["seed"])
        self._session.loaded()  # every rank resumes from here: their runs are numbered alike again
        self._invalidate_layout()

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy``: everything but the flat layout, the backend handles and a step in
        progress, which are rebuilt on the next step (a deep copy owns copies of the parameters, so it
        repacks those)."""
        state = dict(self.__dict__)
        state["_layout"] = None
        state["_backends"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_session" not in state:  # pickled before the engine kept its own state
            session = self.__dict__["_session"] = Session()
            session.attempts = state.get("_attempts", 0)
            session.broken = state.get("_broken")
        self.__dict__.setdefault("_last_tilt", None)
        for name in ("_run", "_attempts", "_tags_seen", "_broken", "_step_start_state", "_constants", "_correction",
                     "last_losses", "last_weights", "last_ess", "last_loss_range"):
            self.__dict__.pop(name, None)

    def _initializing_state(self) -> bool:
        """``step()`` without a closure is an error, except the call torch.distributed.checkpoint makes to
        create the base optimizer's state before loading into it: no step in progress, every learning rate
        0 and every trainable parameter's gradient present and zero. That call steps the base optimizer
        alone (which moves nothing) and is not a TSAM step (the step counter does not advance)."""
        if self._session.live_run() is not None or any(float(g.get("lr", 0.0)) != 0.0 for g in self.param_groups):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.requires_grad]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads if g is not None]
        return bool(grads) and len(local) == len(grads) and not any(bool(g.any()) for g in local)
