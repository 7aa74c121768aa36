"""The step's collectives (docs/design.md §6, §6.1, §8.6): named reductions packed into one all-reduce per
process group, and the tags that tell every rank when their all-reduces paired different evaluations.

A reduction is asked for by name -- ``{"noise": parts, "g0": parts}`` -- and comes back by name: per-bucket
partial sums of squares become their sum over all trainable parameters (a sharded bucket's part summed over
the shard group, a replicated bucket's counted once); a loss is averaged over the data-parallel ranks (so
every rank derives the same tilt weights), with a non-finite flag and the evaluation's tag in the same
collective.
"""

from __future__ import annotations

import functools
import zlib
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["Collectives", "loss_group"]

# bits of each field of an all-reduce's tag (docs/design.md §6.1): runs and positions that differ by less
# than 256 are always told apart; two different configurations collide with probability 2**-16
_TAG_BITS = {"config": 16, "attempt": 8, "position": 8}


@functools.lru_cache(maxsize=8)
def _fingerprint(config, seed: int) -> int:
    """What must agree across ranks for their steps to be the same step: the step's options and the seed."""
    return zlib.crc32(repr((config.items(), seed)).encode())


def _tag_fields(bits: List[float]) -> Dict[str, int]:
    out, i = {}, 0
    for kind, n in _TAG_BITS.items():
        out[kind] = sum(int(round(b)) << k for k, b in enumerate(bits[i:i + n]))
        i += n
    return out


class Collectives:
    """The all-reduces of one step. ``targets``: the step's buckets with their backends (``bucket.sharded``
    says which parts are shard sums); ``guard``: its non-finite flag travels with the losses; ``session``:
    whether this optimizer has checked a tag yet (the first is read at once); ``describe(position)``: "TSAM
    step k ... evaluation i (role)", for the messages."""

    def __init__(self, targets, device: torch.device, dtype: torch.dtype, pg, world: int, shard_group, guard,
                 config, seed: int, attempt: int, session, constants: Dict, describe):
        self.targets, self.device, self.dtype, self.guard = targets, device, dtype, guard
        self.pg, self.world = pg, world
        # a sharded model's norms are sums over the shard group; packed with the loss's all-reduce when that
        # group spans the same ranks (FSDP2 on a 1-D mesh), else one collective each (HSDP)
        self.shard_group = shard_group
        self.one_group = shard_group is not None and _same_ranks(shard_group, self.pg)
        self.fingerprint = _fingerprint(config, seed) if self.world > 1 else 0
        self.attempt, self.session, self._constants, self.describe = attempt, session, constants, describe
        self.tagged: List[Tuple[int, torch.Tensor]] = []  # (evaluation position, summed tag bits)
        self.out_of_step: Optional[torch.Tensor] = None  # a device flag, read at the end of the step

    def _total(self, parts: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """The sum of per-bucket reductions, in the step's scalar dtype on its device (None if no parts)."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0] if parts[0].dtype == self.dtype else parts[0].to(self.dtype)
        return torch.stack([p.to(self.device, self.dtype, non_blocking=self.device.type != "cpu")
                            for p in parts]).sum()

    def reduce(self, named: Dict[str, List[torch.Tensor]], loss: Optional[torch.Tensor] = None,
               position: int = -1) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """(the loss averaged over the ranks, {name: global sum}) from per-bucket partial sums; ``position``:
        the evaluation whose loss this is (its tag)."""
        if self.world == 1 and self.shard_group is None:  # one process: the sums of the parts, nothing else
            return loss, {name: self._total(parts) for name, parts in named.items()}
        names = list(named)
        sharded = [self._total([x for x, t in zip(named[n], self.targets) if t.bucket.sharded]) for n in names]
        plain = [self._total([x for x, t in zip(named[n], self.targets) if not t.bucket.sharded]) for n in names]
        dist = torch.distributed
        average = self.world > 1 and loss is not None
        shared = self.shard_group is not None and bool(names)
        with_loss = average and shared and self.one_group  # FSDP2 on a 1-D mesh: one all-reduce for all
        if average:  # the loss, (the shard norms if the group is the same,) a non-finite flag, the tag bits
            tag = self._tag_bits(position)
            head = [loss] + (sharded if with_loss else [])
            if self.guard.check:  # a rank's non-finite loss at an evaluation whose loss is not averaged
                head.append((~self.guard.finite).to(self.dtype))
            packed = torch.cat([torch.stack(head), tag])
            dist.all_reduce(packed, group=self.pg)
            n = len(packed) - len(tag)
            loss = packed[0]
            if with_loss:
                sharded = list(packed[1:1 + len(sharded)])
            if self.guard.check:
                self.guard.finite &= packed[n - 1] == 0
            self._check_tag(position, packed[n:], tag)
        if not with_loss and shared:
            packed = torch.stack(sharded)
            dist.all_reduce(packed, group=self.shard_group)
            sharded = list(packed)
        if average:
            loss = loss / self.world
        totals = [a if b is None else b if a is None else a + b for a, b in zip(sharded, plain)]
        return loss, dict(zip(names, totals))

    def _tag_bits(self, position: int) -> torch.Tensor:
        """An evaluation's tag as 0/1 values (docs/design.md §6.1): the configuration's fingerprint, the
        run's number and the evaluation's position, _TAG_BITS bits each, on the step's device (cached)."""
        parts = []
        for kind, value in (("config", self.fingerprint), ("attempt", self.attempt), ("position", position)):
            value &= (1 << _TAG_BITS[kind]) - 1
            bits = self._constants.get((kind, value))
            if bits is None:
                bits = self._constants[(kind, value)] = torch.tensor(
                    [(value >> i) & 1 for i in range(_TAG_BITS[kind])], dtype=self.dtype, device=self.device)
            parts.append(bits)
        return torch.cat(parts)

    def _check_tag(self, position: int, summed: torch.Tensor, own: torch.Tensor) -> None:
        """Every rank's bit i is the same iff the sum is 0 or the world size where this rank has 0 or 1:
        any rank that differs in any bit is seen by every rank. Kept on the device until the step's end."""
        off = (summed != own * self.world).any()
        self.out_of_step = off if self.out_of_step is None else self.out_of_step | off
        self.tagged.append((position, summed))
        if not self.session.tags_seen:  # the first one since construction: read at once, so that options that
            self.session.tags_seen = True  # differ between ranks fail every rank here, in the same collective
            error = self.desync_error()
            if error is not None:
                raise error

    def desync_error(self) -> Optional[RuntimeError]:
        """The error for an all-reduce that paired this rank's evaluation with another step or evaluation
        on another rank (read once, at the end of the step, with check_finite's read); None if all agree."""
        for position, summed in self.tagged:
            own = self._tag_bits(position)
            if bool((summed != own * self.world).any()):
                return RuntimeError(self._desync_message(self.describe(position), summed, own))
        return None

    def _desync_message(self, where: str, summed: torch.Tensor, own: torch.Tensor) -> str:
        mine = _tag_fields(own.tolist())
        if self.world == 2:  # the other rank's tag is the sum minus ours
            theirs = _tag_fields((summed - own).tolist())
            if theirs["config"] != mine["config"]:
                what = ("paired with a rank whose TSAM configuration differs (sampler, num_samples, seed, "
                        "tilt_every, backward_samples, ...): construct TSAM with the same options on every rank")
            else:
                what = (f"paired with the other rank's evaluation {theirs['position']} of its run "
                        f"{theirs['attempt'] + (self.attempt & ~255)}")
        else:
            what = "paired with a different evaluation, run or configuration on another rank"
        return (f"{where} {what}. A rank that catches an error in a step and goes on to its next batch, or a "
                "configuration that differs between ranks, does this; the collectives cannot be paired again. "
                "Parameters are back at theta0 and the optimizer state is unchanged on this rank, and every rank "
                "raises this at the end of the step: stop, and resume every rank from the last checkpoint "
                "(loading TSAM's state_dict renumbers the runs on every rank).")


def _same_ranks(a, b) -> bool:
    """Whether two process groups (None: the default group) span the same ranks."""
    dist = torch.distributed
    ranks = [dist.get_process_group_ranks(g if g is not None else dist.group.WORLD) for g in (a, b)]
    return ranks[0] == ranks[1]


def loss_group(process_group):
    """(group, world size) over which sample losses are averaged; world size 1 means no all-reduce."""
    if process_group is None:
        return None, 1
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if process_group == "auto":
            return None, 1
        raise RuntimeError("TSAM(process_group=...) was given but torch.distributed is not initialized; "
                           "call torch.distributed.init_process_group first, or pass process_group=None")
    group = None if process_group == "auto" else process_group
    return group, dist.get_world_size(group)

