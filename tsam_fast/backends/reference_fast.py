"""The reference backend's fast path: the reference ops in cache-sized chunks, what it actually runs.

``FastReferenceOps`` is what ``backend="reference"`` (and ``"auto"`` wherever no fused backend runs: MPS,
XPU, float64, a machine without a compiler) actually runs. Same results bit for bit, same PyTorch ops,
three changes of schedule (docs/design.md §7, "The fast fallback"):

* every element-wise op runs chunk by chunk (``CHUNK`` elements), so its temporaries stay in cache;
* the Philox words come from ``rng.philox4x32_int64`` (one wrapping int64 multiply per product), in
  chunks, compiled with ``torch.compile`` where a compiler works (``generator_info()`` says which);
  Box-Muller stays in eager ops, the very kernels the oracle calls (``noise.NoiseGenerator``);
* the noise of a random start is generated once per step and bucket: ``noise_sqnorm`` keeps it (fp32,
  one buffer per bucket, ``held_bytes``) and the ``perturb`` / ``tilt_accumulate`` that follow with the
  same seed use it instead of generating it again.

Element-wise ops are position-independent (each element's value depends only on its inputs), so a chunk
of a result equals the same slice of the whole; reductions are not, so they run unchunked over the same
tensors as the oracle. ``tests/test_reference_fast.py`` checks both paths against ``ReferenceOps``.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch

from . import noise  # noise.GEN_COUNTERS read at each call: one setting for both rooms
from .base import Backend
from .contract import flat_runs, run_triples
from .noise import NoiseGenerator
from .reference import REFERENCE_DTYPES, ReferenceOps, _compute_dtype

#: elements per chunk of an element-wise op (1 MiB of fp32): its temporaries stay in cache
CHUNK = 1 << 18
#: buckets of at least this many elements keep their noise and fp64 scratch between ops; smaller ones
#: regenerate (cheap at that size) and hold nothing
KEEP_MIN = 1 << 16


def _chunks(n: int, size: Optional[int] = None):
    size = size or CHUNK
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)


def _pieces(theta, size: Optional[int] = None):
    """A ``theta`` list chunk by chunk: ``(tensor slice, lo, hi)``, ``lo .. hi`` its flat positions."""
    offset = 0
    for t in theta:
        n = t.numel()
        for a, b in _chunks(n, size):
            yield t[a:b], offset + a, offset + b
        offset += n


class FastReferenceOps(ReferenceOps):
    """The reference ops, chunked, with the fast generator and the kept noise of ``noise_sqnorm``.

    Each chunk runs the expressions of ``ReferenceOps`` on slices, so each element is computed by the same
    kernels from the same inputs: the results are those of ``ReferenceOps``, bit for bit. ``remember`` /
    ``recall`` hand a bucket's noise from ``noise_sqnorm`` to the ``perturb`` or ``tilt_accumulate`` of the
    same seed (the buffer is owned by the bucket's backend entry, referenced here weakly)."""

    def __init__(self, generator: Optional[NoiseGenerator] = None):
        self.generator = generator or NoiseGenerator()
        self._kept: Dict[tuple, tuple] = {}  # (runs, device) -> (seed, weakref to the fp32 noise buffer)

    # -- the kept noise --------------------------------------------------------------------------

    def remember(self, runs, seed: int, xi: torch.Tensor) -> None:
        self._kept = {k: v for k, v in self._kept.items() if v[1]() is not None}
        self._kept[(tuple(runs), xi.device)] = (seed, weakref.ref(xi))

    def recall(self, runs, seed: int, n: int, device: torch.device) -> Optional[torch.Tensor]:
        kept = self._kept.get((tuple(runs), device))
        if kept is None or kept[0] != seed:
            return None
        xi = kept[1]()
        return xi if xi is not None and xi.numel() == n else None

    def _xi(self, runs, seed, lo, hi, device, kept, scratch):
        if kept is not None:
            return kept[lo:hi]
        return self.generator.fill_range(scratch[:hi - lo], runs, seed, lo)

    # -- the ops ---------------------------------------------------------------------------------

    def noise_sqnorm(self, runs, seed, device, out: Optional[torch.Tensor] = None,
                     scratch: Optional[torch.Tensor] = None):
        """``sum(xi**2)`` over the runs, as ``ReferenceOps.noise_sqnorm``: fp64, one ``sum`` per run over a
        tensor holding the same values as the oracle's. With ``out`` (fp32, the bucket's length) the
        bucket's noise is left in it; with ``scratch`` (float64, as long) the squares are made there chunk
        by chunk instead of in two fresh run-sized fp64 temporaries (whose page faults cost more than the
        arithmetic on a CPU)."""
        device = torch.device(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for buf_off, glob_off, length in run_triples(runs):
            xi = (out[buf_off:buf_off + length] if out is not None
                  else torch.empty(length, dtype=torch.float32, device=device))
            if scratch is None:
                self.generator.normal_(xi, seed, glob_off)
                total += xi.double().square().sum()
                continue
            sq = scratch[buf_off:buf_off + length]
            for lo, hi in _chunks(length, 4 * noise.GEN_COUNTERS):
                self.generator.normal_(xi[lo:hi], seed, glob_off + lo)
                sq[lo:hi].copy_(xi[lo:hi])
                sq[lo:hi].square_()
            total += sq.sum()
        if out is not None:
            self._zero_gaps(out, runs)
        return total

    def sqnorm(self, x, scale=None, scratch: Optional[torch.Tensor] = None):
        """``ReferenceOps.sqnorm``; with ``scratch`` (float64, at least the list's length) the fp64 squares
        are made there chunk by chunk, then summed as one tensor, as the oracle sums them."""
        if scratch is None:
            return ReferenceOps.sqnorm(x, scale)
        n = 0
        for t, lo, hi in _pieces(x):
            sq = scratch[lo:hi]
            sq.copy_(t)
            if scale is not None:
                sq.mul_(scale[lo:hi])
            sq.square_()
            n = hi
        return scratch[:n].sum().to(_compute_dtype(x[0]))

    @staticmethod
    def _zero_gaps(out, runs):
        pos = 0
        for buf_off, _, length in run_triples(runs):
            if buf_off > pos:
                out[pos:buf_off].zero_()
            pos = buf_off + length
        if pos < out.numel():
            out[pos:].zero_()

    @staticmethod
    def _start(theta_c, theta0_c, c, xi, ct, tmp):
        """``theta <- theta0 + c * xi`` on one chunk, the oracle's expression; in the compute dtype the
        same two kernels write into ``tmp`` and ``theta`` instead of fresh temporaries."""
        if theta_c.dtype != ct:
            theta_c.copy_(theta0_c.to(ct) + c * xi.to(ct))
            return
        t = tmp[:theta_c.numel()]
        torch.mul(c, xi.to(ct), out=t)
        torch.add(theta0_c, t, out=theta_c)

    def _start_buffers(self, theta0, runs, seed, coef):
        """What a random start's chunked loop needs: the kept noise (or None), a noise scratch when it must be
        generated, the compute dtype, the coefficient in it and a chunk-sized temporary."""
        n = theta0.numel()
        kept = None if seed is None else self.recall(runs, seed, n, theta0.device)
        scratch = None if seed is None or kept is not None else torch.empty(min(n, CHUNK), device=theta0.device)
        ct = _compute_dtype(theta0)
        return kept, scratch, ct, coef.to(ct), torch.empty(min(n, CHUNK), dtype=ct, device=theta0.device)

    def _restart(self, t, lo, hi, theta0, runs, seed, start) -> None:
        """One chunk of a random start (``start``: ``_start_buffers``), or of ``theta <- theta0`` (no seed)."""
        if seed is None:
            t.copy_(theta0[lo:hi])
            return
        kept, scratch, ct, c, tmp = start
        self._start(t, theta0[lo:hi], c, self._xi(runs, seed, lo, hi, t.device, kept, scratch), ct, tmp)

    def perturb(self, theta, theta0, runs, seed, coef, save_backup):
        start = self._start_buffers(theta0, runs, seed, coef)
        for t, lo, hi in _pieces(theta):
            if save_backup:
                theta0[lo:hi].copy_(t)
            self._restart(t, lo, hi, theta0, runs, seed, start)

    def fill_noise(self, out, runs, seed, coef):
        n = out.numel()
        scratch = torch.empty(min(n, CHUNK), device=out.device)
        c = coef.to(out.dtype)
        for lo, hi in _chunks(n):
            out[lo:hi].copy_(c * self.generator.fill_range(scratch[:hi - lo], runs, seed, lo).to(out.dtype))

    def leapfrog(self, theta, grad, kick, drift, momentum=None, precond=None):
        ct = _compute_dtype(grad)
        if momentum is not None or grad.dtype != ct:
            for t, lo, hi in _pieces(theta):
                ReferenceOps.leapfrog([t], grad[lo:hi], kick, drift, None if momentum is None else momentum[lo:hi],
                                      None if precond is None else precond[lo:hi])
            return
        # the ascent move in the compute dtype: the oracle's kernels, in order, into two chunk buffers
        k, d = kick.to(ct), drift.to(ct)
        n = grad.numel()
        step, p2 = torch.empty(min(n, CHUNK), dtype=ct, device=grad.device), None
        if precond is not None:
            p2 = torch.empty(min(n, CHUNK), dtype=ct, device=grad.device)
        for th, lo, hi in _pieces(theta):
            t = step[:hi - lo]
            torch.mul(k, grad[lo:hi], out=t)
            if precond is not None:
                q = p2[:hi - lo]
                torch.square(precond[lo:hi].to(ct), out=q)
                t.mul_(q)
            torch.mul(d, t, out=t)
            th.add_(t)

    @staticmethod
    def _accumulate(acc_c, grad_c, a, b, first, tmp):
        """``a*A + b*g`` (``b*g`` when ``first``) of one chunk, the oracle's kernels, into ``tmp``."""
        ct = acc_c.dtype
        t = tmp[:acc_c.numel()]
        torch.mul(b.to(ct), grad_c.to(ct), out=t)
        if not first:
            t.add_(a.to(ct) * acc_c)  # (a*A) + (b*g): the oracle adds the update to the scaled accumulator
        return t

    def tilt_accumulate(self, acc, grad, a, b, first, theta, theta0, runs, seed, coef):
        start = self._start_buffers(theta0, runs, seed, coef)
        acc_tmp = torch.empty(min(acc.numel(), CHUNK), dtype=acc.dtype, device=acc.device)
        for t, lo, hi in _pieces(theta):
            acc[lo:hi].copy_(self._accumulate(acc[lo:hi], grad[lo:hi], a, b, first, acc_tmp))
            self._restart(t, lo, hi, theta0, runs, seed, start)

    def finalize(self, acc, grad, a, b, inv_z, first, theta, theta0):
        acc_tmp = torch.empty(min(acc.numel(), CHUNK), dtype=acc.dtype, device=acc.device)
        z = inv_z.to(acc.dtype)
        for t, lo, hi in _pieces(theta):
            g = self._accumulate(acc[lo:hi], grad[lo:hi], a, b, first, acc_tmp)
            if grad.dtype == acc.dtype:
                torch.mul(g, z, out=grad[lo:hi])
            else:
                grad[lo:hi].copy_(g * z)
            t.copy_(theta0[lo:hi])


class FastReferenceBackend(Backend):
    """The reference backend as the engine uses it: ``FastReferenceOps`` plus, per bucket of at least
    ``KEEP_MIN`` elements (freed with it), an fp32 buffer that carries a random start's noise from its norm to its use and, on a CPU, a float64
    scratch buffer for the squares of the fp64 norms (a fresh one would be page-faulted in on every call:
    CPU allocations of that size are not cached; other devices' caching allocators reuse the block)."""

    def __init__(self, ops: Optional[FastReferenceOps] = None):
        super().__init__("reference", ops or FastReferenceOps(), REFERENCE_DTYPES)
        self._held: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # bucket -> {name: tensor}

    def held_bytes(self, buckets=None) -> int:
        """The kept noise (4 bytes per element) and, on a CPU, the fp64 scratch (8) of live buckets of
        at least ``KEEP_MIN`` elements: of ``buckets`` when given, else of every live bucket this backend
        object has served (one object serves every optimizer that resolves ``"reference"``)."""
        held = list(self._held.items())
        if buckets is not None:
            ids = {id(b) for b in buckets}
            held = [(b, h) for b, h in held if id(b) in ids]
        return sum(t.numel() * t.element_size() for _, h in held for t in h.values())

    def _buffer(self, bucket, name: str, dtype: torch.dtype) -> torch.Tensor:
        held = self._held.setdefault(bucket, {})
        n = bucket.numel
        t = held.get(name)
        if t is None or t.numel() != n or t.device != bucket.device:
            t = held[name] = torch.empty(n, dtype=dtype, device=bucket.device)
        return t

    def _scratch(self, bucket) -> Optional[torch.Tensor]:
        if bucket.device.type != "cpu" or bucket.numel < KEEP_MIN:
            return None
        return self._buffer(bucket, "squares", torch.float64)

    def noise_sqnorm(self, bucket, seed: int) -> torch.Tensor:
        runs = flat_runs(bucket.noise_runs)
        if bucket.numel < KEEP_MIN:
            return self.ops.noise_sqnorm(runs, seed, bucket.device)
        xi = self._buffer(bucket, "noise", torch.float32)
        total = self.ops.noise_sqnorm(runs, seed, bucket.device, out=xi, scratch=self._scratch(bucket))
        self.ops.remember(flat_runs(bucket.runs), seed, xi)  # kept for the ops over the parameter list
        return total

    def grad_sqnorm(self, bucket, adaptive: bool = False) -> torch.Tensor:
        return self.ops.sqnorm(bucket.grads, bucket.backup if adaptive else None, scratch=self._scratch(bucket))

    def info(self, device_type: str = "cpu") -> str:
        return self.ops.generator.info(device_type)


_SHARED: Optional[FastReferenceOps] = None


def generator_info(device_type: str = "cpu") -> str:
    """How the reference backend generates noise here (compiled or eager, and why)."""
    return _shared_ops().generator.info(device_type)


def _shared_ops() -> FastReferenceOps:
    global _SHARED
    if _SHARED is None:
        _SHARED = FastReferenceOps()
    return _SHARED


def ReferenceBackend() -> Backend:  # noqa: N802 (kept as the historical constructor name)
    """The reference backend (the fast fallback; ``ReferenceOps`` stays the oracle)."""
    return FastReferenceBackend(_shared_ops())
