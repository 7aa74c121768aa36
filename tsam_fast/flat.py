"""The layout of a step: each (param group, device, dtype) bucket's parameters and the optimizer's flat
buffers beside them (docs/design.md §5).

Parameters keep their own storage. TSAM never re-points ``p.data``: the ops take the bucket's parameters
as a list of tensors, each parameter's storage seen flat (``storage_view``), and write them in place, one
dispatch per op over the whole list. What the optimizer owns lives in flat buffers of the bucket's length:
theta0 (``backup``), the tilt accumulator, HMC's momentum, ``shared_ascent``'s anchor, ``tilt_every``'s
cache, and the gradient. ``FlatLayout`` (here) builds the buckets (``bucket.Bucket``: one bucket's list
and buffers) and keeps their gradients; FSDP2 parameters are recognised and checked in ``sharding``.

What the layout guarantees:

* A user's tensors stay theirs: a checkpoint, a sub-module's state dict, a Hogwild worker's shared
  parameters or ``vector_to_parameters`` see exactly what plain ``torch.optim`` would leave.
* Global element indices (the noise counters) follow param-group order, then parameter order, over every
  parameter of the optimizer, frozen ones included, so a parameter's noise does not depend on how
  parameters are bucketed and does not change when another layer is frozen or unfrozen. Element ``k`` of
  a dense parameter is the ``k``-th element of its storage (its memory format kept, channels_last
  included); a parameter that is not dense (a strided view) is worked on through a contiguous copy of
  ours, row-major, written back after every move.
* Frozen parameters (``requires_grad=False``) are never touched. A parameter object reached twice (tied
  weights) is worked on once.
* Gradients are views of the bucket's flat ``grad`` (as DDP's ``gradient_as_bucket_view``): the ops read
  one buffer. A gradient hook records which parameters received a gradient in each evaluation (a parameter
  that received none in a whole step gets ``grad = None`` so the base optimizer skips it) and rejects
  sparse gradients; a gradient the user set to None or replaced is brought back into the buffer.
* If a parameter's storage, dtype, device or shape changed since the layout was built (``p.data = ...``,
  ``model.to()``, ``vector_to_parameters``), ``stale()`` names it and the optimizer rebuilds the layout
  before the next step, as ``torch.optim`` simply goes on with the new tensor.
* FSDP2 (``fully_shard``) parameters: the list holds their local shards, FSDP's own storage; their noise
  runs start at each element's index in the unsharded parameter, and ``p.grad`` is a DTensor over the flat
  gradient (docs/design.md §6). Other sharded parameters are rejected.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from .bucket import Bucket, _storage_strides, storage_view
from .sharding import Sharding, _fsdp_modules_of, check_parameter


class _GradHook:
    """Marks a trainable parameter touched when it receives a gradient; rejects sparse gradients.

    A plain parameter gets the C++ extension's hook when the extension is loaded (``_mark_gradients``: no
    Python call in the backward), else this one as a tensor hook (called with the gradient). A sharded
    (FSDP2) parameter is not in the autograd graph (its unsharded twin is), so it gets this one as a
    post-accumulate-grad hook, which FSDP2 calls on the sharded parameter once the reduce-scattered
    gradient is in ``.grad``."""

    __slots__ = ("layout", "index")

    def __init__(self, layout: "FlatLayout", index: int):
        self.layout = weakref.ref(layout)
        self.index = index

    def __call__(self, grad: torch.Tensor):
        layout = self.layout()
        if layout is None or not layout.active:
            return None
        if grad.layout != torch.strided:
            raise RuntimeError(_sparse_message(layout.names[self.index], grad.layout))
        layout.marks[self.index] = 1
        return None


# at::Layout's order: the C++ hook writes 1 + the gradient's layout
_LAYOUTS = ("torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch._mkldnn", "torch.sparse_csc",
            "torch.sparse_bsr", "torch.sparse_bsc", "torch.jagged")


def _sparse_message(name: str, layout) -> str:
    return (f"TSAM does not support sparse gradients (parameter {name} received a {layout} gradient); use dense "
            "gradients, e.g. nn.Embedding(..., sparse=False)")


#: C++ gradient hooks instead of Python ones. Off: with them, about one FSDP2 checkpoint test run in ten
#: aborted a rank at exit ("terminate called without an active exception", 2026-12-04; never with the
#: Python hooks in 28 runs); on until that is understood, they save 3-5 us per parameter per backward.
NATIVE_MARKS = False


def _native_marker():
    """The C++ extension's ``_mark_gradients`` when the extension is loaded here, else None (the Python hooks)."""
    ops = getattr(torch.ops, "tsam_fast", None)
    return getattr(ops, "_mark_gradients", None) if ops is not None and hasattr(ops, "_isa") else None


def _key(p: torch.Tensor, sharded: bool) -> tuple:
    """What ``stale`` compares: the storage a parameter (a sharded one's local shard) works in, and its
    dtype, device and shape."""
    local = p.to_local() if sharded else p
    return (local.data_ptr(), p.dtype, p.device, tuple(p.shape))


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
    """The buckets of ``param_groups``' trainable parameters, their gradient buffers and hooks."""

    def __init__(self, param_groups, names: Optional[Dict[int, str]] = None):
        self.active = False
        self.signature = self.signature_of(param_groups)
        self.params: List[torch.Tensor] = []
        self.names: List[str] = []
        self.frozen: List[torch.Tensor] = []
        self.buckets: List[Bucket] = []
        self.shard_group = None  # the one shard-dimension process group of the sharded parameters
        self.mesh = None
        self._hook_handles = []
        by_key: Dict[Tuple, Bucket] = {}
        seen = set()
        global_offset = 0
        pending: Dict[int, List[Tuple[torch.Tensor, int, Optional[Sharding]]]] = {}
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                sharding = check_parameter(p, gi, pi)
                name = (names or {}).get(id(p), f"group {gi} parameter {pi}")
                if p.requires_grad:
                    if sharding is not None:
                        self._check_mesh(sharding, name)
                    key = (gi, p.device, p.dtype, sharding is not None)
                    if key not in by_key:
                        by_key[key] = Bucket(gi, p.device, p.dtype, sharding.group if sharding else None)
                        self.buckets.append(by_key[key])
                    pending.setdefault(id(by_key[key]), []).append((p, global_offset, sharding))
                    self.names.append(name)
                    self.params.append(p)
                else:
                    self.frozen.append(p)
                global_offset += p.numel()  # a DTensor's numel is the unsharded one
        self.total_numel = global_offset
        index_of = {id(p): i for i, p in enumerate(self.params)}
        for bucket in self.buckets:
            self._pack(bucket, pending[id(bucket)], index_of)
        self.fsdp_modules = _fsdp_modules_of(self.params) if self.shard_group is not None else []
        # which parameters received a gradient in the current call (0 none, 1 dense, 2 sparse: refused): one
        # byte each, written by the hooks; a ctypes view reads and writes them without tensor ops
        n = len(self.params)
        self._marks_tensor = torch.zeros(max(n, 1), dtype=torch.uint8)
        self.marks = (ctypes.c_uint8 * max(n, 1)).from_address(self._marks_tensor.data_ptr())
        self.used = 0  # bit i: parameter i received a gradient in some call of the step
        sharded_indices = self._sharded_indices
        native = _native_marker() if NATIVE_MARKS else None
        plain = [i for i in range(n) if i not in sharded_indices] if native is not None else []
        self._native = None
        if plain:
            hooked = [self.params[i] for i in plain]
            self._native = (hooked, native(hooked, self._marks_tensor, plain))
        for i, p in enumerate(self.params):
            sharded = i in sharded_indices
            if plain and not sharded:
                continue  # the C++ hook marks it
            hook = _GradHook(self, i)
            self._hook_handles.append(p.register_post_accumulate_grad_hook(hook) if sharded else p.register_hook(hook))

    def reshard(self) -> None:
        """Make every FSDP2 module of these parameters hold its sharded parameters, so the next forward
        all-gathers the shards TSAM moved. FSDP2 keeps the root module's parameters unsharded after a forward
        until its backward: after a forward-only pass (an evaluation, a tilt-sampled score) the module would
        otherwise go on computing with unsharded copies that miss the perturbation."""
        for module in self.fsdp_modules:
            module.reshard()

    def _check_mesh(self, sharding: Sharding, name: str) -> None:
        if self.mesh is None:
            self.mesh, self.shard_group = sharding.mesh, sharding.group
        elif sharding.mesh != self.mesh:
            raise NotImplementedError(
                f"{name} is sharded over {sharding.mesh}, another parameter over {self.mesh}: TSAM's norms "
                "span all parameters, so every sharded parameter must use the same device mesh (one "
                "fully_shard mesh for the model)")

    @staticmethod
    def signature_of(param_groups) -> Tuple:
        """What invalidates a layout: the parameter objects, their order, and which are trainable."""
        return tuple((id(p), p.requires_grad) for g in param_groups for p in g["params"])

    @property
    def trainable_numel(self) -> int:
        """Trainable elements of the (unsharded) model: d of docs/design.md §3."""
        return sum(p.numel() for p in self.params)

    @property
    def _sharded_indices(self) -> set:
        return {i for b in self.buckets if b.sharded for i in b.indices}

    def _pack(self, bucket: Bucket, members, index_of) -> None:
        """The bucket's list, runs and gradient views. A local shard's noise counters are its elements'
        indices in the unsharded parameter, so the perturbation does not depend on the world size or the
        sharding (docs/design.md §6)."""
        runs = []
        offset = 0
        for p, glob, sh in members:
            n = sh.local.numel() if sh is not None else p.numel()
            start = glob + sh.row_start * math.prod(p.shape[1:]) if sh is not None else glob
            runs.append((offset, start, n))
            bucket.sizes.append(n)
            offset += n
        bucket.numel = offset
        bucket.runs = tuple(runs)
        bucket.noise_runs = _merge_runs(runs)
        bucket.grad = torch.zeros(offset, dtype=bucket.dtype, device=bucket.device)
        bucket.grads = [bucket.grad]
        offset = 0
        for p, _, sh in members:
            n = bucket.sizes[len(bucket.theta)]
            if sh is not None:  # FSDP's local shard: contiguous (sharding_of checked it)
                from torch.distributed.tensor import DTensor
                theta = sh.local.view(-1)
                gview = DTensor.from_local(bucket.grad[offset:offset + n].view(sh.local.shape), sh.mesh,
                                           sh.placements, shape=p.shape, stride=p.stride(), run_check=False)
            else:
                theta = storage_view(p)
                strides = p.stride() if theta is not None else _storage_strides(p)
                if theta is None:  # not dense: a contiguous copy of ours, written back after every move
                    stage = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                    stage.copy_(p.detach())
                    bucket.staged.append((p, stage))
                    theta = stage.view(-1)
                gview = bucket.grad.as_strided(p.shape, strides, offset)
            if p.grad is not None:
                (gview.to_local() if sh is not None else gview).copy_(p.grad.to_local() if sh is not None else p.grad)
                p.grad = gview
            bucket.params.append(p)
            bucket.indices.append(index_of[id(p)])
            bucket.theta.append(theta)
            bucket.grad_views.append(gview)
            bucket.keys.append(_key(p, sh is not None))
            offset += n

    def remove_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        if self._native is not None:
            torch.ops.tsam_fast._unmark_gradients(*self._native)
            self._native = None

    def stale(self) -> Optional[str]:
        """The name of the first parameter whose storage, dtype, device or shape changed since the layout
        was built (``p.data = ...``, ``model.to()``, ``vector_to_parameters``), else None. A few pointer
        reads per parameter: checked at every step's start."""
        for bucket in self.buckets:
            for p, key, i in zip(bucket.params, bucket.keys, bucket.indices):
                if _key(p, bucket.sharded) != key:
                    return self.names[i]
        return None

    # -- gradients across closure calls ---------------------------------------------------------

    def begin_call(self) -> None:
        """Before a closure call: every trainable parameter's grad is its (zeroed) flat view."""
        for bucket in self.buckets:
            bucket.grad.zero_()
            for p, gview in zip(bucket.params, bucket.grad_views):
                if p.grad is not gview:
                    p.grad = gview
        ctypes.memset(self.marks, 0, len(self.params))

    def zero_grads_in_step(self) -> None:
        """``optimizer.zero_grad()`` called inside the closure: zero the views, keep them attached."""
        if any(bytes(self.marks)):
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
                    self.marks[i] = 0
                else:  # a fresh tensor: the closure set grads to None before backward
                    if g.layout != torch.strided:
                        raise RuntimeError(f"TSAM does not support sparse gradients ({self.names[i]})")
                    if bucket.sharded:
                        gview.to_local().copy_(g.to_local())
                    else:
                        gview.copy_(g)
                p.grad = gview
        marks = bytes(self.marks)[:len(self.params)]
        if marks.count(0) + marks.count(1) != len(marks):  # 1 + the layout of a non-strided gradient
            i = next(i for i, m in enumerate(marks) if m > 1)
            layout = _LAYOUTS[marks[i] - 1] if marks[i] - 1 < len(_LAYOUTS) else "non-strided"
            raise RuntimeError(_sparse_message(self.names[i], layout))
        self.used |= int.from_bytes(marks, "little")
        return any(marks)

    def begin_step(self) -> None:
        """A frozen parameter keeps no gradient (a stale one would let the base optimizer move it)."""
        for p in self.frozen:
            p.grad = None
        self.used = 0
        self.active = True

    def end_step(self) -> None:
        """Parameters that received no gradient in any call of the step get ``grad = None``."""
        self.active = False
        used = self.used.to_bytes(max(len(self.params), 1), "little")
        for i, p in enumerate(self.params):
            if not used[i]:
                p.grad = None
