"""The reference backend: the op contract in plain PyTorch ops, and the fast fallback built from them.

``ReferenceOps`` is the oracle of every other backend. Written for clarity and exactness, not speed:
arithmetic in fp32 (float64 for float64 buffers), norms accumulated in fp64, results rounded once to the
buffer's dtype, noise from ``tsam_fast.rng`` (fp32 normals whatever the buffer dtype). The formulas are
those of docs/design.md §7.

``FastReferenceOps`` is what ``backend="reference"`` (and ``"auto"`` wherever no fused backend runs: MPS,
XPU, float64, a machine without a compiler) actually runs. Same results bit for bit, same PyTorch ops,
three changes of schedule (docs/design.md §7, "The fast fallback"):

* every element-wise op runs chunk by chunk (``CHUNK`` elements), so its temporaries stay in cache;
* the Philox words come from ``rng.philox4x32_int64`` (one wrapping int64 multiply per product), in
  chunks, compiled with ``torch.compile`` where a compiler works (``generator_info()`` says which);
  Box-Muller stays in eager ops, the very kernels the oracle calls;
* the noise of a random start is generated once per step and bucket: ``noise_sqnorm`` keeps it (fp32,
  one buffer per bucket, ``held_bytes``) and the ``perturb`` / ``tilt_accumulate`` that follow with the
  same seed use it instead of generating it again.

Element-wise ops are position-independent (each element's value depends only on its inputs), so a chunk
of a result equals the same slice of the whole; reductions are not, so they run unchunked over the same
tensors as the oracle. ``tests/test_reference_fast.py`` checks both paths against ``ReferenceOps``.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Dict, Optional, Tuple

import torch

from .. import rng
from .base import Backend
from .contract import flat_runs, run_triples

_F32 = torch.float32


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 buffers (the fused backends' contract); float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else _F32


def _noise(runs, seed, n, device):
    """The bucket's noise as one fp32 buffer of ``n`` elements (generated, never cached); 0 outside the runs."""
    xi = torch.zeros(n, dtype=_F32, device=device)
    for buf_off, glob_off, length in run_triples(runs):
        rng.normal(seed, glob_off, length, out=xi[buf_off:buf_off + length])
    return xi


def _gather(theta) -> torch.Tensor:
    """The flat space of a ``theta`` list as one new tensor (the oracle computes on it, then scatters)."""
    return torch.cat([t.reshape(-1) for t in theta]) if len(theta) else torch.empty(0)


def _scatter(theta, flat: torch.Tensor) -> None:
    """``theta`` (the list) <- ``flat``, tensor by tensor; nothing outside the tensors is written."""
    offset = 0
    for t in theta:
        t.copy_(flat[offset:offset + t.numel()])
        offset += t.numel()


class ReferenceOps:
    """The ops of the contract over plain tensors, with the schemas' arguments (``contract.OPS``; ``runs``
    are flat triples, ``theta`` a list of tensors). See ``Backend`` for how the step engine calls them.
    Each op computes on the flat space of ``theta`` gathered into one tensor and writes it back: the
    plainest statement of the formula, whatever the list."""

    @staticmethod
    def noise_sqnorm(runs, seed, device):
        """``sum(xi**2)`` over the runs, accumulated and returned in fp64 on ``device`` (the fused backends
        return it rounded to fp32; the engine rounds it to its scalar dtype, so float64 steps keep it)."""
        total = torch.zeros((), dtype=torch.float64, device=device)
        for _, glob_off, length in run_triples(runs):
            total += rng.normal(seed, glob_off, length, device=device).double().square().sum()
        return total

    @staticmethod
    def sqnorm(x, scale=None):
        """``sum((scale * x)**2)`` over the flat space of the list ``x`` (``scale`` may be None),
        accumulated in fp64: a 0-dim fp32 tensor (float64 for a float64 ``x``)."""
        y = _gather(x).double()
        if scale is not None:
            y = y * scale.double()
        return y.square().sum().to(_compute_dtype(x[0]))

    @staticmethod
    def _perturbed(theta0, runs, seed, coef):
        if seed is None:
            return theta0
        xi = _noise(runs, seed, theta0.numel(), theta0.device)
        ct = _compute_dtype(theta0)
        return theta0.to(ct) + coef.to(ct) * xi.to(ct)

    @staticmethod
    def perturb(theta, theta0, runs, seed, coef, save_backup):
        """``theta0 <- theta`` if ``save_backup``; then ``theta <- theta0 + coef * xi`` (``theta0`` if no seed)."""
        if save_backup:
            theta0.copy_(_gather(theta))
        _scatter(theta, ReferenceOps._perturbed(theta0, runs, seed, coef))

    @staticmethod
    def fill_noise(out, runs, seed, coef):
        """``out <- coef * xi`` (``out``: fp32, float64 for float64 buckets)."""
        out.copy_(coef.to(out.dtype) * _noise(runs, seed, out.numel(), out.device).to(out.dtype))

    @staticmethod
    def leapfrog(theta, grad, kick, drift, momentum=None, precond=None):
        """With ``momentum``: ``v <- v + kick*g; theta <- theta + drift*v``. Without: ``theta <- theta +
        drift*kick*P*g`` with ``P = precond**2`` (or 1)."""
        flat = _gather(theta)
        ct = _compute_dtype(flat)
        g = grad.to(ct)
        if momentum is None:
            step = kick.to(ct) * g
            if precond is not None:
                step = step * precond.to(ct).square()
        else:
            momentum.add_(kick.to(momentum.dtype) * g.to(momentum.dtype))
            step = momentum.to(ct)
        _scatter(theta, flat.to(ct) + drift.to(ct) * step)

    @staticmethod
    def _accumulated(acc, grad, a, b, first):
        ct = acc.dtype  # fp32, or float64 for float64 buckets
        update = b.to(ct) * grad.to(ct)
        return update if first else a.to(ct) * acc + update

    @staticmethod
    def tilt_accumulate(acc, grad, a, b, first, theta, theta0, runs, seed, coef):
        """``A <- a*A + b*g`` (``b*g`` when ``first``; A not read), then ``theta <- theta0 + coef*xi``."""
        acc.copy_(ReferenceOps._accumulated(acc, grad, a, b, first))
        ReferenceOps.perturb(theta, theta0, runs, seed, coef, save_backup=False)

    @staticmethod
    def finalize(acc, grad, a, b, inv_z, first, theta, theta0):
        """``grad <- (a*A + b*g) * inv_z`` (A not read when ``first``) and ``theta <- theta0``."""
        grad.copy_(ReferenceOps._accumulated(acc, grad, a, b, first) * inv_z.to(acc.dtype))
        _scatter(theta, theta0)


#: every floating dtype: the reference runs float64 buckets too (in float64 math)
REFERENCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# -- the fast fallback ---------------------------------------------------------------------------------

logger = logging.getLogger("tsam_fast")

#: elements per chunk of an element-wise op (1 MiB of fp32): its temporaries stay in cache
CHUNK = 1 << 18
#: Philox counters per call of the generator (4 normals each: 1 MiB of fp32)
GEN_COUNTERS = 1 << 16
#: generation calls of at least this many counters go through the compiled generator when there is one;
#: smaller ones (small models, the test suite) run eagerly and never pay for a compilation
COMPILE_MIN_COUNTERS = 1 << 14
#: buckets of at least this many elements keep their noise and fp64 scratch between ops; smaller ones
#: regenerate (cheap at that size) and hold nothing
KEEP_MIN = 1 << 16
#: ``TSAM_FAST_COMPILE=0`` keeps the generator eager (what a machine without a compiler gets)
COMPILE_ENV = "TSAM_FAST_COMPILE"

_M32 = 0xFFFFFFFF


def _uniform_pairs(c_lo: torch.Tensor, k0, k1, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Philox uniforms of counters ``c_lo + idx`` as Box-Muller's two arguments, both pairs at once:
    ``ua = (u1, u3)`` and ``ub = (u2, u4)``, each of shape (2, len(idx)), fp32 (rng.randn4x's words)."""
    c = idx + c_lo
    zero = torch.zeros_like(c)
    w0, w1, w2, w3 = rng.philox4x32_int64(c & _M32, c >> 32, zero, zero, k0, k1)
    return (torch.stack((rng.words_to_uniform(w0), rng.words_to_uniform(w2))),
            torch.stack((rng.words_to_uniform(w1), rng.words_to_uniform(w3))))


class NoiseGenerator:
    """``rng.normal`` bit for bit, faster: Philox in chunks of ``GEN_COUNTERS`` counters (compiled with
    ``torch.compile`` when available and the call is large enough), Box-Muller in the oracle's eager ops.

    The integer part is exact on any path; the float part runs the same eager kernels as ``rng.normal``
    (log, sqrt, cos, sin and products: element-wise, so computing (u1, u3) together changes no bit).
    Compiled Box-Muller is not used: inductor's vectorised log/sin/cos differ from eager's in the last bit.
    """

    def __init__(self, compile: Optional[bool] = None):
        env = os.environ.get(COMPILE_ENV, "").strip().lower()
        self._want_compile = (env not in ("0", "false", "no", "off")) if compile is None else compile
        self._why_eager = None if self._want_compile else f"{COMPILE_ENV}={env or '0'}"
        self._compiled: Dict[str, object] = {}  # device type -> compiled _uniform_pairs, or None (failed)
        self._idx: Dict[torch.device, torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- which path ------------------------------------------------------------------------------

    def info(self, device_type: str = "cpu") -> str:
        """One line: how the generator runs on ``device_type`` now."""
        fn = self._compiled.get(device_type, "untried")
        if not self._want_compile:
            return f"eager chunked Philox ({self._why_eager})"
        if fn is None:
            return f"eager chunked Philox (torch.compile unavailable: {self._why_eager})"
        if fn == "untried":
            return (f"chunked Philox, compiled with torch.compile on first use above {COMPILE_MIN_COUNTERS * 4} "
                    "elements (eager if that fails)")
        return "chunked Philox compiled with torch.compile (inductor); Box-Muller eager"

    def compiled(self, device_type: str) -> Optional[bool]:
        """True/False once tried on ``device_type``, None before."""
        fn = self._compiled.get(device_type, "untried")
        return None if fn == "untried" else fn is not None

    def _uniforms_fn(self, device: torch.device, m: int):
        if not self._want_compile or m < COMPILE_MIN_COUNTERS:
            return _uniform_pairs
        fn = self._compiled.get(device.type, "untried")
        if fn == "untried":
            with self._lock:
                fn = self._compiled.get(device.type, "untried")
                if fn == "untried":
                    fn = self._compiled[device.type] = self._try_compile(device)
        return _uniform_pairs if fn is None else fn

    def _try_compile(self, device: torch.device):
        """``torch.compile(_uniform_pairs)``, checked word for word against the eager function on a probe;
        None (and the reason, logged once) where there is no compiler or the check fails."""
        logger.info("tsam_fast: compiling the reference backend's noise generator for %s (once per process; "
                    "inductor caches it on disk)", device.type)
        try:
            fn = torch.compile(_uniform_pairs, dynamic=True, fullgraph=True)
            idx = torch.arange(1001, dtype=torch.int64, device=device)
            c_lo = torch.tensor(2**33 + 7, dtype=torch.int64, device=device)
            seed = 2**40 + 12345
            keys = (torch.tensor(seed & _M32, device=device), torch.tensor(seed >> 32, device=device))
            got, want = fn(c_lo, *keys, idx), _uniform_pairs(c_lo, seed & _M32, seed >> 32, idx)
            if not all(torch.equal(g, w) for g, w in zip(got, want)):
                raise RuntimeError("the compiled generator's uniforms differ from the eager ones")
            return fn
        except Exception as exc:  # no compiler, unsupported device, ...: recorded and reported, not hidden
            self._why_eager = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            logger.warning("tsam_fast: the reference backend runs its noise generator eagerly (%s)", self._why_eager)
            return None

    # -- generation ------------------------------------------------------------------------------

    def _arange(self, device: torch.device) -> torch.Tensor:
        idx = self._idx.get(device)
        if idx is None or idx.numel() < GEN_COUNTERS:
            idx = self._idx[device] = torch.arange(GEN_COUNTERS, dtype=torch.int64, device=device)
        return idx

    def normal_(self, out: torch.Tensor, seed: int, start: int) -> torch.Tensor:
        """``out`` (1-D contiguous fp32) <- ``rng.normal(seed, start, out.numel())``."""
        n = out.numel()
        if n == 0:
            return out
        device = out.device
        first, last = start // 4, (start + n - 1) // 4
        fn = self._uniforms_fn(device, min(last + 1 - first, GEN_COUNTERS))
        compiled = fn is not _uniform_pairs
        k0, k1 = seed & _M32, (seed >> 32) & _M32
        if compiled:  # tensors: a new seed must not recompile
            k0, k1 = torch.tensor(k0, device=device), torch.tensor(k1, device=device)
        idx_all = self._arange(device)
        done = 0
        for c_lo in range(first, last + 1, GEN_COUNTERS):
            m = min(GEN_COUNTERS, last + 1 - c_lo)
            lo = max(start - 4 * c_lo, 0)  # first element wanted within this block of 4m
            take = min(4 * m - lo, n - done)
            base = torch.tensor(c_lo, dtype=torch.int64, device=device) if compiled else c_lo
            ua, ub = fn(base, k0, k1, idx_all[:m])
            # Box-Muller as rng._box_muller, in the same eager kernels, on both pairs at once
            rad = torch.sqrt(torch.log(torch.clamp_min(ua, rng.MIN_UNIFORM)) * -2.0)
            th = ub * rng.TWO_PI
            direct = lo == 0 and take == 4 * m
            block = out[done:done + take] if direct else torch.empty(4 * m, dtype=torch.float32, device=device)
            quad = block.view(m, 2, 2).permute(1, 0, 2)  # [pair, counter, cos|sin]: n1 n2 n3 n4 per counter
            torch.mul(rad, torch.cos(th), out=quad[..., 0])
            torch.mul(rad, torch.sin(th), out=quad[..., 1])
            if not direct:
                out[done:done + take] = block[lo:lo + take]
            done += take
        return out

    def fill_range(self, out: torch.Tensor, runs, seed: int, lo: int) -> torch.Tensor:
        """``out`` <- the bucket's noise at buffer positions ``lo .. lo + len(out)`` (0 outside the runs)."""
        hi = lo + out.numel()
        pos = lo
        for buf_off, glob_off, length in run_triples(runs):
            a, b = max(buf_off, lo), min(buf_off + length, hi)
            if a >= b:
                continue
            if a > pos:
                out[pos - lo:a - lo].zero_()
            self.normal_(out[a - lo:b - lo], seed, glob_off + (a - buf_off))
            pos = b
        if pos < hi:
            out[pos - lo:].zero_()
        return out


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
            for lo, hi in _chunks(length, 4 * GEN_COUNTERS):
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
