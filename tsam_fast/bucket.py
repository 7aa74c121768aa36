"""One bucket of the layout (docs/design.md §5, "The layout"): a (param group, device, dtype) bucket's
parameters as the ops' list of tensors, each its own storage seen flat (``storage_view``), and the flat
buffers the optimizer owns beside them (theta0, the tilt accumulator, HMC's momentum, the anchor, the
cache, the gradient), with the copies between them (gather, scatter, restore, publish). ``FlatLayout``
(tsam_fast/flat.py) builds the buckets.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


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
