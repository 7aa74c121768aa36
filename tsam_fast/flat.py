"""The layout of a step: each (param group, device, dtype) bucket's parameters and the optimizer's flat
buffers beside them (docs/design.md §5).

Parameters keep their own storage. TSAM never re-points ``p.data``: the ops take the bucket's parameters
as a list of tensors, each parameter's storage seen flat (``storage_view``), and write them in place, one
dispatch per op over the whole list. What the optimizer owns lives in flat buffers of the bucket's length:
theta0 (``backup``), the tilt accumulator, HMC's momentum, ``shared_ascent``'s anchor, ``tilt_every``'s
cache, and the gradient.

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

import math
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch


class _GradHook:
    """Marks a trainable parameter touched when it receives a gradient; rejects sparse gradients.

    A plain parameter gets it as a tensor hook (called with the gradient). A sharded (FSDP2) parameter
    is not in the autograd graph (its unsharded twin is), so it gets it as a post-accumulate-grad hook,
    which FSDP2 calls on the sharded parameter once the reduce-scattered gradient is in ``.grad``."""

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


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older layouts of torch.distributed
        return None
    return DTensor


class Sharding(NamedTuple):
    """Where a sharded parameter's local shard sits (FSDP2's ``Shard(0)`` over one mesh dimension).

    ``group``: the process group of the shard dimension (global norms are sums over it); ``row_start``:
    the first row of the unsharded parameter this rank holds; ``local``: the local shard, FSDP's own
    storage (perturbed and restored in place, never re-pointed)."""

    mesh: object
    placements: tuple
    group: object
    row_start: int
    local: torch.Tensor


_SHARDING_HELP = ("TSAM supports FSDP2 (torch.distributed.fsdp.fully_shard) on a 1-D mesh, and HSDP (a 2-D "
                  "replicate x shard mesh); shard the model with fully_shard")


def sharding_of(p: torch.Tensor, name: str) -> Optional[Sharding]:
    """None for a plain tensor; the shard layout of an FSDP2/HSDP parameter; raises for any other sharding
    (tensor parallelism, strided shards, FSDP1 flat parameters), which would make the step's norms and noise
    per-shard and silently wrong (docs/design.md §6)."""
    if getattr(p, "_fsdp_flattened", False) or type(p).__name__ == "FlatParameter":
        raise NotImplementedError(
            f"{name} is a flattened FSDP1 (FullyShardedDataParallel) parameter: each rank holds a slice of a "
            f"flat buffer TSAM cannot map back to parameters. {_SHARDING_HELP} instead (or use "
            "DistributedDataParallel)")
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return None
    from torch.distributed.tensor import Replicate, Shard
    mesh, placements = p.device_mesh, tuple(p.placements)
    kinds = tuple("shard0" if type(pl) is Shard and pl.dim == 0 else
                  "replicate" if isinstance(pl, Replicate) else repr(pl) for pl in placements)
    if kinds not in (("shard0",), ("replicate", "shard0")):
        raise NotImplementedError(
            f"{name} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh: tensor-parallel, "
            f"strided or partial placements are not supported. {_SHARDING_HELP}, which gives (Shard(dim=0),) "
            "or (Replicate(), Shard(dim=0))")
    dim = len(placements) - 1
    local = p.to_local()
    rows, world, rank = p.shape[0], mesh.size(dim), mesh.get_local_rank(dim)
    chunk = -(-rows // world)  # torch.chunk's split, which FSDP2 uses: ceil(rows / world) rows each
    start = min(rank * chunk, rows)
    if local.shape[0] != min(start + chunk, rows) - start or not local.is_contiguous():
        raise NotImplementedError(
            f"{name}: its local shard ({tuple(local.shape)}, contiguous={local.is_contiguous()}) is not the "
            f"contiguous row block [{start}, {start + chunk}) of {tuple(p.shape)} that fully_shard makes on "
            f"rank {rank} of {world}. {_SHARDING_HELP}")
    return Sharding(mesh, placements, mesh.get_group(dim), start, local)


def check_parameter(p: torch.Tensor, gi: int, pi: int) -> Optional[Sharding]:
    """Raise for parameters TSAM cannot optimise correctly (called at construction and when packing);
    returns the parameter's sharding (None when it is not sharded)."""
    if p.is_complex():
        raise ValueError(
            f"TSAM does not support complex parameters (group {gi}, parameter {pi}, {p.dtype}); "
            "optimize torch.view_as_real(p) through a real parameter instead")
    if p.requires_grad and not p.is_floating_point():
        raise ValueError(f"parameter {pi} of group {gi} has dtype {p.dtype}; TSAM needs floating point")
    # frozen parameters are never touched, whatever their sharding
    return sharding_of(p, f"parameter {pi} of group {gi}") if p.requires_grad else None


def _fsdp_modules_of(params) -> list:
    """The FSDP2 modules (``FSDPModule``) managing any of ``params``, found through FSDP2's registry of
    module states (``torch.distributed._composable_state``: the modules cannot be reached from a sharded
    parameter). Raises if torch's internals differ from what this expects, rather than train on stale
    unsharded copies."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
        ids = {id(p) for p in params}
        found = []
        for module in list(_module_state_mapping.keys()):
            if isinstance(module, FSDPModule):
                groups = module._get_fsdp_state()._fsdp_param_groups
                if any(id(fp.sharded_param) in ids for g in groups for fp in g.fsdp_params):
                    found.append(module)
        return found
    except (ImportError, AttributeError) as exc:  # pragma: no cover - another torch layout
        raise NotImplementedError(
            f"TSAM could not find the FSDP2 modules of its sharded parameters in this torch "
            f"({torch.__version__}: {exc}); it needs them to reshard the root module before a step") from exc


class Bucket:
    """One (param group, device, dtype) bucket: its parameters as the ops' list, and the flat buffers.

    ``theta``: what the ops write, one 1-D tensor per parameter (its storage seen flat; a staging copy for
    a parameter that is not dense, copied in by :meth:`pull` at a step's start and out by :meth:`publish`
    after every move). ``runs``: one ``(flat offset, global offset, length)`` triple per parameter, the
    ops' runs; ``noise_runs``: the same elements merged into maximal runs (what the norms of the noise
    are summed over, so a norm does not depend on where the parameters' boundaries fall)."""

    def __init__(self, group_index: int, device: torch.device, dtype: torch.dtype,
                 shard_group: Optional[object] = None):
        self.group_index = group_index
        self.device = device
        self.dtype = dtype
        #: the process group of the shard dimension (sums over the bucket are partial), or None
        self.shard_group = shard_group
        self.params: List[torch.Tensor] = []
        self.indices: List[int] = []  # positions of self.params in FlatLayout.params
        self.theta: List[torch.Tensor] = []
        self.grad_views: List[torch.Tensor] = []
        self.keys: List[tuple] = []  # what each parameter's storage was when the layout was built
        self.staged: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, our contiguous copy)
        self.runs: Tuple[Tuple[int, int, int], ...] = ()
        self.noise_runs: Tuple[Tuple[int, int, int], ...] = ()
        self.sizes: List[int] = []
        self.numel = 0
        self.grad: torch.Tensor = torch.empty(0)
        self.grads: List[torch.Tensor] = []  # [grad]: the flat gradient as the ops' one-tensor list
        self.backup: Optional[torch.Tensor] = None
        self.backup_parts: List[torch.Tensor] = []  # theta0 split like theta
        self.acc: Optional[torch.Tensor] = None
        self.momentum: Optional[torch.Tensor] = None
        self.anchor: Optional[torch.Tensor] = None
        self.cache: Optional[torch.Tensor] = None

    @property
    def sharded(self) -> bool:
        return self.shard_group is not None

    def pull(self) -> None:
        """Parameters that are not dense: their values (moved by the base optimizer) into our copies."""
        for p, stage in self.staged:
            stage.copy_(p.detach())

    def publish(self, quiet: bool = False) -> None:
        """Parameters that are not dense: our copies' moved values back into them (``quiet``: see
        :meth:`scatter`)."""
        for p, stage in self.staged:
            (p.data if quiet else p.detach()).copy_(stage)

    def restore(self) -> None:
        """theta <- theta0, exactly: the end of an abandoned step."""
        torch._foreach_copy_(self.theta, self.backup_parts)
        self.publish()

    def scatter(self, parts: List[torch.Tensor], quiet: bool = False) -> None:
        """theta <- ``parts`` (one tensor per parameter). ``quiet``: through ``.data``, which leaves the
        parameters' autograd version counters alone -- for a write that is undone, bit for bit, before the
        backward of a forward already taken reads the parameters (``StepRun.at_theta0``)."""
        torch._foreach_copy_([t.data for t in self.theta] if quiet else self.theta, parts)
        self.publish(quiet)

    def gather(self, out: torch.Tensor) -> None:
        """``out`` (a flat buffer of ours) <- the parameters' current values."""
        torch._foreach_copy_(list(out.split(self.sizes)), self.theta)

    def ensure_state(self, need_momentum: bool, need_anchor: bool = False, need_cache: bool = False) -> None:
        """Allocate theta0 (parameter dtype), A and, for HMC, v (fp32; float64 for a float64 bucket), and for
        ``shared_ascent`` the ascended point the starts are drawn around (parameter dtype): the only extra
        memory besides the gradient."""
        wide = torch.float64 if self.dtype == torch.float64 else torch.float32
        if self.backup is None:
            self.backup = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            self.backup_parts = list(self.backup.split(self.sizes))
            self.acc = torch.empty(self.numel, dtype=wide, device=self.device)
        if need_momentum and self.momentum is None:
            self.momentum = torch.empty(self.numel, dtype=wide, device=self.device)
        if need_anchor and self.anchor is None:
            self.anchor = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        if need_cache and self.cache is None:  # tilt_every > 1: g0, then the cached correction
            self.cache = torch.empty(self.numel, dtype=self.dtype, device=self.device)

    def state_bytes(self) -> int:
        """The optimizer's own buffers: theta0, A, v, the anchor, the cache and staging copies (the gradient
        buffer is the parameters' gradients, which any optimizer has)."""
        own = [self.backup, self.acc, self.momentum, self.anchor, self.cache] + [s for _, s in self.staged]
        return sum(t.numel() * t.element_size() for t in own if t is not None)


def _storage_strides(p: torch.Tensor) -> Tuple[int, ...]:
    """``p``'s strides if it is dense and non-overlapping (memory format kept), else contiguous ones."""
    return torch.empty_like(p, device="meta").stride()


def storage_view(p: torch.Tensor) -> Optional[torch.Tensor]:
    """``p``'s elements as a 1-D contiguous view of its own storage, in memory order (channels_last and
    other dense layouts included), or None if ``p`` is not dense and non-overlapping (a strided view)."""
    t = p.detach()
    if t.is_contiguous():
        return t.view(-1)
    if _storage_strides(t) != t.stride():
        return None
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


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
        self.touched = [False] * len(self.params)
        self.used = [False] * len(self.params)
        for i, p in enumerate(self.params):
            hook = _GradHook(self, i)
            sharded = i in self._sharded_indices
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
                    if bucket.sharded:
                        gview.to_local().copy_(g.to_local())
                    else:
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
