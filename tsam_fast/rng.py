"""Counter-based noise: the Philox4x32-10 of docs/design.md §4 + Box-Muller, in plain PyTorch integer ops.

This is the definition every backend reproduces (docs/design.md §4):

* The normal for global flat element ``i`` of one noise stream comes from Philox4x32 with 10 rounds,
  key = (seed low 32 bits, seed high 32 bits), counter = (c low, c high, 0, 0) with ``c = i // 4``.
  The four output words become uniforms exactly as Triton's ``uint_to_uniform_float`` does, Box-Muller
  turns (u1, u2) and (u3, u4) into four normals, and element ``i`` takes normal ``i % 4``. This is
  Triton's ``tl.randn4x(seed, c)``: one Philox call per four elements.
* ``stream_seed(seed, step, sample, stream)`` is the documented function that derives the key of one
  stream from the user's seed, the optimizer step counter, the sample index and a stream tag. Seeds
  are 63-bit so that they fit a signed int64 argument of any backend.

The integer part is exact everywhere: 32x32-bit products are split into 16-bit halves, so no int64
product overflows. Every function of the Philox core works on Python ints as well as on int64
tensors, which gives the host its scalar draws (the ``ball`` radius) from the same code.
"""

from __future__ import annotations

import math
import struct

import torch

__all__ = [
    "STREAM_START",
    "STREAM_MOMENTUM",
    "STREAM_RADIUS",
    "STREAM_SELECT",
    "stream_seed",
    "philox4x32",
    "philox4x32_int64",
    "words_to_uniform",
    "randn4x",
    "normal",
    "host_uniform",
]

# Stream tags: independent noise streams drawn in one sample of one step.
STREAM_START = 0  # xi of the random start
STREAM_MOMENTUM = 1  # HMC momentum v ~ N(0, sigma^2 I)
STREAM_RADIUS = 2  # the scalar u ~ U(0, 1) of the "ball" start
STREAM_SELECT = 3  # u ~ U(0, 1) of the tilt-sampled backward's k-th draw ("sample" = k)

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_M63 = 0x7FFFFFFFFFFFFFFF

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest scale with INT32_MAX * scale < 1 in fp32
TWO_PI = 6.283185307179586
MIN_UNIFORM = 1.0e-7

# Counters per chunk when generating normals: bounds the temporaries of the reference generator.
_CHUNK = 1 << 16


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_seed(seed: int, step: int, sample: int, stream: int) -> int:
    """The Philox key of one noise stream, as a 63-bit int.

    ``splitmix64(splitmix64(splitmix64(seed) ^ step) ^ (sample * 4 + stream))``, masked to 63 bits,
    with all arithmetic modulo 2**64. A fixed function of its four arguments, so a run resumed from a
    state_dict (which stores ``seed`` and ``step``) draws the same noise.
    """
    h = _splitmix64(seed & _M64)
    h = _splitmix64(h ^ (step & _M64))
    h = _splitmix64(h ^ ((sample * 4 + stream) & _M64))
    return h & _M63


def _mulhilo(a: int, x):
    """(high, low) 32-bit halves of ``a * x`` for a 32-bit constant ``a`` and 32-bit ``x``.

    Split ``a`` into 16-bit halves so every intermediate stays below 2**49 (exact in int64).
    """
    p_lo = x * (a & 0xFFFF)
    p_hi = x * (a >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 (Salmon et al., SC'11) on 32-bit words held in Python ints or int64 tensors.

    Round structure and constants are those of Triton's ``philox_impl``.
    """
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox4x32_int64(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0, k1,
                     rounds: int = 10):
    """``philox4x32`` for int64 tensors, with each 32x32-bit product taken whole: the same words, fewer ops.

    ``x * a`` (both below 2**32) needs 64 bits; in int64 it wraps modulo 2**64, which leaves all 64 bits
    of the product intact, so ``hi = (p >> 32) & M32`` and ``lo = p & M32`` (the arithmetic shift's sign
    bits are masked off). One multiply instead of two per product: what the reference backend's fast
    path runs (eager or compiled). The keys may be ints or 0-dim int64 tensors (a compiled caller passes
    tensors, so a new seed does not recompile). Tested word for word against ``philox4x32``.
    """
    for _ in range(rounds):
        pb = c2 * PHILOX_ROUND_B
        pa = c0 * PHILOX_ROUND_A
        c0, c1, c2, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def words_to_uniform(w: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: bitcast to int32, x < 0 -> ~x, times the scale (fp32)."""
    s = w - ((w >> 31) << 32)  # the int32 bit pattern's signed value
    s = torch.where(s < 0, ~s, s)
    return s.to(torch.float32) * UNIFORM_SCALE


def _box_muller(u1: torch.Tensor, u2: torch.Tensor):
    r = torch.sqrt(torch.log(torch.clamp_min(u1, MIN_UNIFORM)) * -2.0)
    th = u2 * TWO_PI
    return r * torch.cos(th), r * torch.sin(th)


def randn4x(seed: int, counters: torch.Tensor):
    """Four fp32 normals per int64 counter: the reference for Triton's ``tl.randn4x(seed, counters)``."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    zero = torch.zeros_like(counters)
    w = philox4x32(counters & _M32, (counters >> 32) & _M32, zero, zero, k0, k1)
    u = [words_to_uniform(x) for x in w]
    n1, n2 = _box_muller(u[0], u[1])
    n3, n4 = _box_muller(u[2], u[3])
    return n1, n2, n3, n4


def normal(seed: int, start: int, n: int, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 normals of global elements ``start .. start + n - 1`` of the stream ``seed``.

    Element ``i`` takes normal ``i % 4`` of counter ``i // 4``, so any slice of the global index
    space gets the same numbers whichever way the elements are bucketed or sharded.
    """
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return out
    first = start // 4
    last = (start + n - 1) // 4
    done = 0
    for c_lo in range(first, last + 1, _CHUNK):
        c_hi = min(c_lo + _CHUNK, last + 1)
        counters = torch.arange(c_lo, c_hi, dtype=torch.int64, device=out.device)
        block = torch.stack(randn4x(seed, counters), dim=1).reshape(-1)
        lo = max(start - 4 * c_lo, 0)
        take = min(block.numel() - lo, n - done)
        out[done:done + take] = block[lo:lo + take]
        done += take
    return out


def _fp32(x: float) -> float:
    """Round a Python float to the nearest fp32 value (ties to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def host_uniform(seed: int) -> float:
    """One uniform from word 0 of counter 0 of stream ``seed``, in plain Python ints and floats (no tensor,
    no device work): ``words_to_uniform`` of that word, bit for bit."""
    w = philox4x32(0, 0, 0, 0, seed & _M32, (seed >> 32) & _M32)[0]
    signed = w - (1 << 32) if w >> 31 else w
    if signed < 0:
        signed = ~signed
    # fp32(signed) * fp32(scale): the double product of two fp32 values is exact, so one rounding to fp32
    # gives the correctly rounded fp32 product, as the tensor version computes it
    return _fp32(_fp32(float(signed)) * _fp32(UNIFORM_SCALE))


def log_uniform_radius(u: float, d: int) -> float:
    """``u ** (1 / d)`` without underflow for huge ``d`` (the radius factor of the ``ball`` start)."""
    return math.exp(math.log(max(u, MIN_UNIFORM)) / max(d, 1))
