"""The reference backend's noise generator: ``rng.normal`` bit for bit, in chunks, compiled where it can be.

``NoiseGenerator`` makes the Philox words with ``rng.philox4x32_int64`` (one wrapping int64 multiply per
product), in chunks of ``GEN_COUNTERS`` counters, compiled with ``torch.compile`` where a compiler works
(``reference_fast.generator_info()`` says which); Box-Muller stays in eager ops, the very kernels the
oracle calls (docs/design.md §7, "The fast fallback").
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Dict, Optional, Tuple

import torch

from .. import rng
from .contract import run_triples

logger = logging.getLogger("tsam_fast")

#: Philox counters per call of the generator (4 normals each: 1 MiB of fp32)
GEN_COUNTERS = 1 << 16
#: generation calls of at least this many counters go through the compiled generator when there is one;
#: smaller ones (small models, the test suite) run eagerly and never pay for a compilation
COMPILE_MIN_COUNTERS = 1 << 14
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

