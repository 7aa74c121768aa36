"""Flat parameter buffers: the parameters of each (param group, device, dtype) packed into one buffer.

After packing, ``p.data`` and ``p.grad`` of every trainable parameter are views into the bucket's
flat ``param`` and ``grad`` buffers, so each op of the contract is one pass over all of them.

What the layout guarantees:

* A parameter keeps its memory format when it is dense (contiguous, channels_last, ...): the view has
  its original strides. Other layouts are packed contiguously.
* Global element indices (the noise counters) follow param-group order, then parameter order, over
  every parameter of the optimizer, frozen ones included, so a parameter's noise does not depend on
  how parameters are bucketed and does not change when another layer is frozen or unfrozen.
* Frozen parameters (``requires_grad=False``) are not packed and never move. A parameter object
  reached twice (tied weights) is packed once.
* A gradient hook records which parameters received a gradient in each closure call (a parameter
  that received none in a whole step gets ``grad = None`` so the base optimizer skips it) and rejects
  sparse gradients before they are silently densified.
* If a parameter's ``.data`` no longer views the buffer (``model.to()``, ``.half()``, assignment), the
  next step raises instead of training a stale copy.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch


class _GradHook:
    """Tensor hook on a trainable parameter: marks it touched; rejects sparse gradients."""

    __slots__ = ("layout", "index")

    def __init__(self, layout: "FlatLayout", index: int):
        self.layout = weakref.ref(layout)
        self.index = index

    def __call__(self, grad: torch.Tensor):
        layout = self.layout()
        if layout is None or not layout.active:
            return None
        if grad.layout != torch.strided:
            raise RuntimeError(
                f"TSAM does not support sparse gradients (parameter {layout.names[self.index]} received a "
                f"{grad.layout} gradient); use dense gradients, e.g. nn.Embedding(..., sparse=False)")
        layout.touched[self.index] = True
        return None


def _is_sharded(p: torch.Tensor) -> bool:
    """A DTensor (FSDP2 ``fully_shard``, tensor parallelism) or a parameter FSDP1 has flattened."""
    if getattr(p, "_fsdp_flattened", False) or type(p).__name__ == "FlatParameter":
        return True
    if torch.distributed.is_available():
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - older layouts of torch.distributed
            return False
        return isinstance(p, DTensor)
    return False


def check_parameter(p: torch.Tensor, gi: int, pi: int) -> None:
    """Raise for parameters TSAM cannot optimise correctly (called at construction and when packing)."""
    if p.is_complex():
        raise ValueError(
            f"TSAM does not support complex parameters (group {gi}, parameter {pi}, {p.dtype}); "
            "optimize torch.view_as_real(p) through a real parameter instead")
    if p.requires_grad and _is_sharded(p):  # frozen ones are never touched
        raise NotImplementedError(
            f"TSAM does not support sharded parameters yet (group {gi}, parameter {pi} is a "
            f"{type(p).__name__} from FSDP / DTensor): each rank holds only a shard, so the perturbation and "
            "gradient norms would be per-shard and silently wrong. Use DistributedDataParallel (supported), "
            "or construct TSAM on an unsharded model")
    if p.requires_grad and not p.is_floating_point():
        raise ValueError(f"parameter {pi} of group {gi} has dtype {p.dtype}; TSAM needs floating point")


class Bucket:
    """One (param group, device, dtype) bucket: flat buffers and the parameters viewing them."""

    def __init__(self, group_index: int, device: torch.device, dtype: torch.dtype):
        self.group_index = group_index
        self.device = device
        self.dtype = dtype
        self.params: List[torch.Tensor] = []
        self.indices: List[int] = []  # positions of self.params in FlatLayout.params
        self.param_views: List[torch.Tensor] = []
        self.grad_views: List[torch.Tensor] = []
        self.runs: Tuple[Tuple[int, int, int], ...] = ()
        self.numel = 0
        self.param: torch.Tensor = torch.empty(0)
        self.grad: torch.Tensor = torch.empty(0)
        self.backup: Optional[torch.Tensor] = None
        self.acc: Optional[torch.Tensor] = None
        self.momentum: Optional[torch.Tensor] = None

    def ensure_state(self, need_momentum: bool) -> None:
        """Allocate theta0 (parameter dtype), A and, for HMC, v (fp32; float64 for a float64 bucket): the
        only extra memory."""
        wide = torch.float64 if self.dtype == torch.float64 else torch.float32
        if self.backup is None:
            self.backup = torch.empty_like(self.param)
            self.acc = torch.empty(self.numel, dtype=wide, device=self.device)
        if need_momentum and self.momentum is None:
            self.momentum = torch.empty(self.numel, dtype=wide, device=self.device)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.backup, self.acc, self.momentum) if t is not None)


def _storage_strides(p: torch.Tensor) -> Tuple[int, ...]:
    """``p``'s strides if it is dense and non-overlapping (memory format kept), else contiguous ones."""
    return torch.empty_like(p, device="meta").stride()


def _merge_runs(runs: List[Tuple[int, int, int]]) -> Tuple[Tuple[int, int, int], ...]:
    merged: List[List[int]] = []
    for buf, glob, n in runs:
        if n == 0:
            continue
        if merged and merged[-1][0] + merged[-1][2] == buf and merged[-1][1] + merged[-1][2] == glob:
            merged[-1][2] += n
        else:
            merged.append([buf, glob, n])
    return tuple(tuple(r) for r in merged)


class FlatLayout:
    """Packs the trainable parameters of ``param_groups`` into flat buckets and keeps them honest."""

    def __init__(self, param_groups, names: Optional[Dict[int, str]] = None):
        self.active = False
        self.signature = self.signature_of(param_groups)
        self.params: List[torch.Tensor] = []
        self.names: List[str] = []
        self.frozen: List[torch.Tensor] = []
        self.buckets: List[Bucket] = []
        self._hook_handles = []
        by_key: Dict[Tuple[int, torch.device, torch.dtype], Bucket] = {}
        seen = set()
        global_offset = 0
        pending: Dict[int, List[Tuple[torch.Tensor, int]]] = {}
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                check_parameter(p, gi, pi)
                if p.requires_grad:
                    key = (gi, p.device, p.dtype)
                    if key not in by_key:
                        by_key[key] = Bucket(gi, p.device, p.dtype)
                        self.buckets.append(by_key[key])
                    pending.setdefault(id(by_key[key]), []).append((p, global_offset))
                    self.names.append((names or {}).get(id(p), f"group {gi} parameter {pi}"))
                    self.params.append(p)
                else:
                    self.frozen.append(p)
                global_offset += p.numel()
        self.total_numel = global_offset
        index_of = {id(p): i for i, p in enumerate(self.params)}
        for bucket in self.buckets:
            self._pack(bucket, pending[id(bucket)], index_of)
        self.touched = [False] * len(self.params)
        self.used = [False] * len(self.params)
        for i, p in enumerate(self.params):
            self._hook_handles.append(p.register_hook(_GradHook(self, i)))

    @staticmethod
    def signature_of(param_groups) -> Tuple:
        """What invalidates a layout: the parameter objects, their order, and which are trainable."""
        return tuple((id(p), p.requires_grad) for g in param_groups for p in g["params"])

    @property
    def trainable_numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    def _pack(self, bucket: Bucket, members, index_of) -> None:
        runs = []
        offset = 0
        for p, glob in members:
            runs.append((offset, glob, p.numel()))
            offset += p.numel()
        bucket.numel = offset
        bucket.runs = _merge_runs(runs)
        bucket.param = torch.empty(offset, dtype=bucket.dtype, device=bucket.device)
        bucket.grad = torch.zeros(offset, dtype=bucket.dtype, device=bucket.device)
        offset = 0
        for p, _ in members:
            strides = _storage_strides(p)
            view = bucket.param.as_strided(p.shape, strides, offset)
            gview = bucket.grad.as_strided(p.shape, strides, offset)
            view.copy_(p.detach())
            if p.grad is not None:
                gview.copy_(p.grad)
            p.data = view
            if p.grad is not None:
                p.grad = gview
            bucket.params.append(p)
            bucket.indices.append(index_of[id(p)])
            bucket.param_views.append(view)
            bucket.grad_views.append(gview)
            offset += p.numel()

    def remove_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    def verify(self) -> None:
        """Raise if a parameter's data stopped viewing its bucket (moved, cast or reassigned)."""
        for bucket in self.buckets:
            base = bucket.param.untyped_storage().data_ptr()
            for p, view, i in zip(bucket.params, bucket.param_views, bucket.indices):
                if (p.device != bucket.device or p.dtype != bucket.dtype
                        or p.untyped_storage().data_ptr() != base
                        or p.storage_offset() != view.storage_offset() or p.shape != view.shape):
                    raise RuntimeError(
                        f"{self.names[i]} no longer views TSAM's flat buffer: its data was replaced after the "
                        f"optimizer was built (now {p.dtype} on {p.device}, was {bucket.dtype} on {bucket.device}), "
                        "e.g. by model.to(), .half(), load_state_dict(assign=True) or assigning p.data. "
                        "Move or convert the model first, then construct TSAM; to keep training state, "
                        "save opt.state_dict() and load it into the new optimizer.")

    # -- gradients across closure calls ---------------------------------------------------------

    def begin_call(self) -> None:
        """Before a closure call: every trainable parameter's grad is its (zeroed) flat view."""
        for bucket in self.buckets:
            bucket.grad.zero_()
            for p, gview in zip(bucket.params, bucket.grad_views):
                if p.grad is not gview:
                    p.grad = gview
        self.touched = [False] * len(self.params)

    def zero_grads_in_step(self) -> None:
        """``optimizer.zero_grad()`` called inside the closure: zero the views, keep them attached."""
        if any(self.touched):
            self.begin_call()

    def end_call(self) -> bool:
        """After a closure call: bring stray gradients back into the flat buffer; True if any arrived."""
        for bucket in self.buckets:
            for p, gview, i in zip(bucket.params, bucket.grad_views, bucket.indices):
                g = p.grad
                if g is gview:
                    continue
                if g is None:  # dropped by the user (zero_grad after backward): no gradient in this call
                    gview.zero_()
                    self.touched[i] = False
                else:  # a fresh tensor: the closure set grads to None before backward
                    if g.layout != torch.strided:
                        raise RuntimeError(f"TSAM does not support sparse gradients ({self.names[i]})")
                    gview.copy_(g)
                p.grad = gview
        any_grad = False
        for i, t in enumerate(self.touched):
            if t:
                self.used[i] = True
                any_grad = True
        return any_grad

    def begin_step(self) -> None:
        """A frozen parameter keeps no gradient (a stale one would let the base optimizer move it)."""
        for p in self.frozen:
            p.grad = None
        self.used = [False] * len(self.params)
        self.active = True

    def end_step(self) -> None:
        """Parameters that received no gradient in any call of the step get ``grad = None``."""
        self.active = False
        for i, p in enumerate(self.params):
            if not self.used[i]:
                p.grad = None
