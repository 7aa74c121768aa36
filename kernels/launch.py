"""Host launchers of the Triton kernels: argument checks, run tables, block sizes and grids.

Every launcher takes the arguments of an op of the contract (``tsam_fast/backends/contract.py``; ``runs``
as a tuple of triples, which ``ops.py`` converts from the ops' flat ``int[]``) and launches one
kernel (two for a reduction) on the buffers' device; none reads a device value on the host. The first
call with a new ``runs`` layout of more than one run copies a small int64 table to the device (from
pinned memory, asynchronously) and caches it.

Block sizes are chosen per size, not autotuned: the in-place kernels must not be (an autotuner's trial
launches would apply the update several times), and the reductions use a fixed grid so that their
result does not depend on the device. The numbers below are untuned defaults (no block-size sweep has
been run on a GPU; the benchmark that offered one, ``bench/gpu_bench.py --sweep``, was folded into
``bench/throughput.py --mode gpu`` without it).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional, Tuple

import torch
import triton

from . import tsam_kernels as K

_F32 = torch.float32
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# Reductions: at most this many programs (grid-stride over the tiles), i.e. partial sums, summed in
# fp64 by one program. Fixed, so results are deterministic and identical on every device.
MAX_PARTIALS = 1024
_SMALL = 1 << 20  # buffers up to this many elements use the small configuration
# No fused multiply-adds: each product and sum is rounded as the reference backend rounds it, so the
# noise-free results are bit-identical to it (the kernels are memory-bound; FMA saves nothing here).
_EXACT = dict(enable_fp_fusion=False)


class Config(NamedTuple):
    block: int
    num_warps: int


# (plain element-wise, noise) configurations for small and large buffers.
_CONFIGS = {
    "plain": (Config(1024, 4), Config(4096, 8)),
    "noise": (Config(1024, 4), Config(2048, 8)),
}
_override: dict = {}


def config(kind: str, n: int) -> Config:
    """The block size and warps for an op of ``kind`` ("plain" or "noise") over ``n`` elements."""
    if kind in _override:
        return _override[kind]
    small, large = _CONFIGS[kind]
    return small if n <= _SMALL else large


def set_config(kind: str, cfg: Optional[Config]) -> None:
    """Benchmark hook: force a configuration for ``kind`` (None restores the size-based choice)."""
    if cfg is None:
        _override.pop(kind, None)
    else:
        _override[kind] = Config(*cfg)


# -- noise tiles --------------------------------------------------------------------------------


class Tiles(NamedTuple):
    """How a bucket's runs map to noise tiles (see ``tsam_kernels``): the kernel arguments."""

    num_tiles: int
    table: Optional[torch.Tensor]  # int64 [R, RUN_FIELDS] on the device; None for one run
    n_runs: int
    search_steps: int
    a_start: int
    shift: int
    g_lo: int
    g_hi: int

    def args(self, dummy: torch.Tensor):
        table = self.table if self.table is not None else dummy
        return (table, self.n_runs, self.search_steps, self.a_start, self.shift, self.g_lo, self.g_hi)

    @property
    def multi(self) -> bool:
        return self.table is not None


_TILE_CACHE: "OrderedDict[tuple, Tiles]" = OrderedDict()
_TILE_CACHE_SIZE = 256


def _check_runs(runs, n: int) -> Tuple[Tuple[int, int, int], ...]:
    runs = tuple((int(b), int(g), int(k)) for b, g, k in runs if int(k) > 0)
    covered = 0
    for b, g, k in sorted(runs):
        if b != covered or g < 0:
            raise ValueError(
                f"runs {runs!r} do not tile the bucket of {n} elements: every buffer position must lie in "
                "exactly one run (buffer_offset, global_offset >= 0, length)")
        covered = b + k
    if covered != n:
        raise ValueError(f"runs {runs!r} cover {covered} of the bucket's {n} elements; they must cover all")
    return runs


def _device_table(rows, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=torch.int64)
    assert host.shape[1] == int(K.RUN_FIELDS.value)
    if device.type == "cuda":  # asynchronous copy from pinned memory: no host sync, even the first time
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def noise_tiles(runs, n: int, block: int, device: torch.device) -> Tiles:
    """The (cached) noise-tile plan of a bucket of ``n`` elements with these runs."""
    key = (tuple(map(tuple, runs)), n, block, device)
    plan = _TILE_CACHE.get(key)
    if plan is not None:
        _TILE_CACHE.move_to_end(key)
        return plan
    runs = _check_runs(runs, n)
    rows, first = [], 0
    for b, g, k in runs:
        a = g - g % 4
        rows.append((first, a, b - g, g, g + k))
        first += triton.cdiv(g + k - a, block)
    if len(rows) == 1:
        _, a, shift, lo, hi = rows[0]
        plan = Tiles(first, None, 1, 0, a, shift, lo, hi)
    else:
        plan = Tiles(first, _device_table(rows, device), len(rows), (len(rows) - 1).bit_length(), 0, 0, 0, 0)
    _TILE_CACHE[key] = plan
    if len(_TILE_CACHE) > _TILE_CACHE_SIZE:
        _TILE_CACHE.popitem(last=False)
    return plan


def _whole(n: int, block: int) -> Tiles:
    """One run over the whole buffer, global index = buffer position (the noise-free variants)."""
    return Tiles(triton.cdiv(n, block), None, 1, 0, 0, 0, 0, n)


# -- checks -------------------------------------------------------------------------------------


def _scalar(name: str, t, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != _F32 or t.numel() != 1 or t.device != device:
        raise TypeError(f"{name} must be a 0-dim fp32 tensor on {device} (a device scalar), got "
                        f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape), t.device)}")
    return t


def _buffer(name: str, t: torch.Tensor, n: int, device: torch.device, dtype=None) -> torch.Tensor:
    if t.dim() != 1 or t.numel() != n or not t.is_contiguous() or t.device != device or \
            (dtype is not None and t.dtype != dtype) or t.dtype not in _FLOATS:
        want = f"{dtype}" if dtype is not None else "fp32/bf16/fp16"
        raise ValueError(f"{name} must be a contiguous 1-D {want} buffer of {n} elements on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t


def _tiling(runs, seed: Optional[int], n: int, device: torch.device) -> Tuple[Config, Tiles]:
    """Block config and tiles of an op that adds noise: noise tiles over the runs, or plain tiles when
    ``seed`` is None (no generator: the op only copies theta0)."""
    cfg = config("noise" if seed is not None else "plain", n)
    return cfg, noise_tiles(runs, n, cfg.block, device) if seed is not None else _whole(n, cfg.block)


def _tilt_buffers(acc, grad, theta, theta0, **scalars) -> Tuple[int, torch.device]:
    """Checks of the tilt update and finalize: theta0 and grad like theta, A fp32, the named scalars."""
    n, dev = theta.numel(), theta.device
    _buffer("theta", theta, n, dev)
    _buffer("theta0", theta0, n, dev, theta.dtype)
    _buffer("grad", grad, n, dev, theta.dtype)
    _buffer("acc", acc, n, dev, _F32)
    for name, t in scalars.items():
        _scalar(name, t, dev)
    return n, dev


def _seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"seed={seed} must be in [0, 2**63) (tsam_fast.rng.stream_seed)")
    return seed


class _on_device:
    """Launch on the buffers' GPU even when another one is current (no-op on the CPU interpreter)."""

    def __init__(self, device: torch.device):
        self.ctx = None
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            self.ctx = torch.cuda.device(device)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# -- launchers ----------------------------------------------------------------------------------


def _finish_reduction(partials: torch.Tensor, n_partials: int, device) -> torch.Tensor:
    out = torch.empty((), dtype=_F32, device=device)
    K.sum_partials_kernel[(1,)](out, partials, n_partials, BLOCK=MAX_PARTIALS, num_warps=4, **_EXACT)
    return out


def noise_sqnorm(runs, seed: int, device: torch.device) -> torch.Tensor:
    """``sum(xi**2)`` over the runs (the generator only)."""
    device = torch.device(device)
    n = sum(int(r[2]) for r in runs)
    if n == 0:
        return torch.zeros((), dtype=_F32, device=device)
    seed = _seed(seed)
    cfg = config("noise", n)
    tiles = noise_tiles(runs, n, cfg.block, device)
    grid = min(tiles.num_tiles, MAX_PARTIALS)
    partials = torch.empty(grid, dtype=_F32, device=device)
    with _on_device(device):
        K.noise_sqnorm_kernel[(grid,)](partials, seed, *tiles.args(partials), tiles.num_tiles,
                                       MULTI_RUN=tiles.multi, BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)
        return _finish_reduction(partials, grid, device)


def sqnorm(x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum((scale * x)**2)`` in fp32 (fp64 across programs)."""
    n = x.numel()
    _buffer("x", x, n, x.device)
    if scale is not None:
        _buffer("scale", scale, n, x.device, x.dtype)
    if n == 0:
        return torch.zeros((), dtype=_F32, device=x.device)
    cfg = config("plain", n)
    num_tiles = triton.cdiv(n, cfg.block)
    grid = min(num_tiles, MAX_PARTIALS)
    partials = torch.empty(grid, dtype=_F32, device=x.device)
    with _on_device(x.device):
        K.sqnorm_kernel[(grid,)](partials, x, scale if scale is not None else x, n, num_tiles,
                                 HAS_SCALE=scale is not None, BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)
        return _finish_reduction(partials, grid, x.device)


def perturb(theta, theta0, runs, seed: Optional[int], coef, save_backup: bool) -> None:
    n, dev = theta.numel(), theta.device
    _buffer("theta", theta, n, dev)
    _buffer("theta0", theta0, n, dev, theta.dtype)
    _scalar("coef", coef, dev)
    if n == 0:
        return
    cfg, tiles = _tiling(runs, seed, n, dev)
    with _on_device(dev):
        K.perturb_kernel[(tiles.num_tiles,)](
            theta, theta0, coef, _seed(seed) if seed is not None else 0, *tiles.args(theta),
            SAVE_BACKUP=bool(save_backup), HAS_NOISE=seed is not None, MULTI_RUN=tiles.multi,
            BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)


def fill_noise(out, runs, seed: int, coef) -> None:
    n, dev = out.numel(), out.device
    _buffer("out", out, n, dev, _F32)
    _scalar("coef", coef, dev)
    if n == 0:
        return
    cfg = config("noise", n)
    tiles = noise_tiles(runs, n, cfg.block, dev)
    with _on_device(dev):
        K.fill_noise_kernel[(tiles.num_tiles,)](out, coef, _seed(seed), *tiles.args(out),
                                                MULTI_RUN=tiles.multi, BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)


def leapfrog(theta, grad, kick, drift, momentum=None, precond=None) -> None:
    n, dev = theta.numel(), theta.device
    _buffer("theta", theta, n, dev)
    _buffer("grad", grad, n, dev, theta.dtype)
    _scalar("kick", kick, dev)
    _scalar("drift", drift, dev)
    if momentum is not None:
        _buffer("momentum", momentum, n, dev, _F32)
    if precond is not None:
        _buffer("precond", precond, n, dev, theta.dtype)
    if n == 0:
        return
    cfg = config("plain", n)
    with _on_device(dev):
        K.leapfrog_kernel[(triton.cdiv(n, cfg.block),)](
            theta, grad, kick, drift, momentum if momentum is not None else theta,
            precond if precond is not None else theta, n,
            HAS_MOMENTUM=momentum is not None, HAS_PRECOND=precond is not None,
            BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)


def tilt_accumulate(acc, grad, a, b, first: bool, theta, theta0, runs, seed: Optional[int], coef) -> None:
    n, dev = _tilt_buffers(acc, grad, theta, theta0, a=a, b=b, coef=coef)
    if n == 0:
        return
    cfg, tiles = _tiling(runs, seed, n, dev)
    with _on_device(dev):
        K.tilt_accumulate_kernel[(tiles.num_tiles,)](
            acc, grad, a, b, theta, theta0, coef, _seed(seed) if seed is not None else 0, *tiles.args(theta),
            FIRST=bool(first), HAS_NOISE=seed is not None, MULTI_RUN=tiles.multi,
            BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)


def finalize(acc, grad, a, b, inv_z, first: bool, theta, theta0) -> None:
    n, dev = _tilt_buffers(acc, grad, theta, theta0, a=a, b=b, inv_z=inv_z)
    if n == 0:
        return
    cfg = config("plain", n)
    with _on_device(dev):
        K.finalize_kernel[(triton.cdiv(n, cfg.block),)](
            acc, grad, a, b, inv_z, theta, theta0, n, FIRST=bool(first),
            BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)


# -- the generator alone ----------------------------------------------------------------------------


def _generate(seed: int, counters: torch.Tensor, normals: bool) -> torch.Tensor:
    n = counters.numel()
    out = torch.empty((n, 4), dtype=_F32 if normals else torch.int32, device=counters.device)
    if n:
        with _on_device(counters.device):
            K.generator_kernel[(triton.cdiv(n, 1024),)](out, counters.to(torch.int64).contiguous(), _seed(seed), n,
                                                        NORMALS=normals, BLOCK=1024, **_EXACT)
    return out


def philox_words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """int64 [len(counters), 4]: the Philox words of ``tl.randint4x(seed, counters)`` as unsigned values."""
    return _generate(seed, counters, normals=False).to(torch.int64) & 0xFFFFFFFF


def randn4x(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """fp32 [len(counters), 4]: ``tl.randn4x(seed, counters)``."""
    return _generate(seed, counters, normals=True)

