"""FSDP2 in the layout: which parameters are sharded, where each rank's shard sits, and the checks that
reject what TSAM cannot optimise correctly (docs/design.md §6). ``check_parameter`` vets each parameter
(complex, not floating point, sharded other than by fully_shard); ``sharding_of`` finds a parameter's
``Sharding`` (the row block this rank holds); ``_fsdp_modules_of`` finds the FSDP2 modules that
``FlatLayout.reshard`` reshards.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


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
