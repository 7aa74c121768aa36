"""The reference noise: Philox known answers, Triton's tl.randn4x, the counter layout, the seed function."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tsam_fast import rng

M = 0xFFFFFFFF
# Known-answer vectors of Philox4x32-10 (Random123's kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    assert philox_ints(ctr, key) == want
    tensors = [torch.tensor([c, c], dtype=torch.int64) for c in ctr]
    out = rng.philox4x32(*tensors, *key)
    assert [int(t[1]) for t in out] == list(want)


def philox_ints(ctr, key):
    return tuple(rng.philox4x32(*ctr, *key))


def test_uniform_conversion_matches_triton_definition():
    words = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x12345678], dtype=torch.int64)
    u = rng.words_to_uniform(words)
    signed = [0, 1, 0x7FFFFFFF, -0x80000000, -1, 0x12345678]
    want = [float(torch.tensor(float(x if x >= 0 else -x - 1), dtype=torch.float32) * 4.6566127342e-10)
            for x in signed]
    assert u.tolist() == pytest.approx(want, rel=0, abs=0)
    assert float(u.max()) < 1.0 and float(u.min()) >= 0.0


def test_normal_layout_and_statistics():
    seed = rng.stream_seed(1, 2, 3, 0)
    full = rng.normal(seed, 0, 4096 + 13)
    for start, n in [(0, 1), (1, 7), (3, 10), (4095, 14), (17, 4000)]:
        assert torch.equal(rng.normal(seed, start, n), full[start:start + n])
    n1, n2, n3, n4 = rng.randn4x(seed, torch.arange(0, 1028))
    assert torch.equal(torch.stack([n1, n2, n3, n4], 1).reshape(-1)[:4109], full[:4109])
    big = rng.normal(seed, 10**12, 200_000)  # counters above 2**32 exercise the high counter word
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01
    assert not torch.equal(big[:1000], rng.normal(seed + 1, 10**12, 1000))


def test_stream_seed_is_a_fixed_63_bit_function():
    seeds = {rng.stream_seed(0, k, j, s) for k in range(4) for j in range(4) for s in range(3)}
    assert len(seeds) == 48 and all(0 <= x < 2**63 for x in seeds)
    assert rng.stream_seed(0, 0, 0, 0) == rng.stream_seed(0, 0, 0, 0)
    assert rng.stream_seed(2**70 + 5, 1, 0, 0) == rng.stream_seed(5, 1, 0, 0)  # seeds are taken mod 2**64


TRITON_CHECK = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
from tsam_fast import rng

@triton.jit
def draw(normals, words, seed, c0, n):
    offs = tl.arange(0, 256)
    mask = offs < n
    c = (c0 + offs).to(tl.int64)
    a, b, cc, d = tl.randn4x(seed, c)
    w1, w2, w3, w4 = tl.randint4x(seed, c)
    for k, (x, w) in enumerate([(a, w1), (b, w2), (cc, w3), (d, w4)]):
        tl.store(normals + offs * 4 + k, x, mask=mask)
        tl.store(words + offs * 4 + k, w.to(tl.int64) & 0xFFFFFFFF, mask=mask)

for seed, c0 in [(rng.stream_seed(9, 1, 2, 0), 0), (rng.stream_seed(0, 0, 0, 1), (1 << 33) - 100), (2**63 - 1, 7)]:
    normals, words = torch.empty(1024), torch.empty(1024, dtype=torch.int64)
    draw[(1,)](normals, words, seed, c0, 256)
    ctr = torch.arange(c0, c0 + 256)
    zero = torch.zeros_like(ctr)
    ref_words = torch.stack(rng.philox4x32(ctr & 0xFFFFFFFF, ctr >> 32, zero, zero, seed & 0xFFFFFFFF, seed >> 32), 1)
    assert torch.equal(words, ref_words.reshape(-1)), "Philox words differ from tl.randint4x"
    ref = rng.normal(seed, 4 * c0, 1024)
    err = (normals - ref).abs()
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(1.0)
    # libm differs (numpy in the interpreter, SLEEF in torch): allow 4 ulp of max(|x|, 1)
    assert bool((err <= 4 * ulp).all()), float((err / ulp).max())
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_reference_matches_triton_randn4x():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_host_uniform_is_the_tensor_uniform_bit_for_bit():
    """The ball start's radius draw is computed in plain Python; it equals the tensor path exactly."""
    for seed in [0, 1, 7, 2**31 - 1, 2**32 + 5, 2**63 - 1] + [rng.stream_seed(3, k, j, rng.STREAM_RADIUS)
                                                              for k in range(50) for j in range(4)]:
        w = rng.philox4x32(0, 0, 0, 0, seed & 0xFFFFFFFF, seed >> 32)[0]
        want = rng.words_to_uniform(torch.tensor([w], dtype=torch.int64))[0]
        got = rng.host_uniform(seed)
        assert torch.tensor(got, dtype=torch.float32).item() == want.item() and got == want.item(), seed
