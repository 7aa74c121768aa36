"""Host launchers of the Triton kernels: argument checks, run tables, block sizes and grids.

Every launcher takes the arguments of an op of the contract (``tsam_fast/backends/contract.py``; ``runs``
as a tuple of triples, which ``ops.py`` converts from the ops' flat ``int[]``) and launches one
kernel (two for a reduction) on the buffers' device, over the whole ``theta`` list ("multi-tensor
apply"); none reads a device value on the host.

The work is cut into tiles that each lie inside one run (``tsam_kernels``): for an op with a ``theta``
list, one run per tensor, with the tensor's data pointer in the run's row, so a kernel addresses each
tensor of the list directly (the list is never gathered into a buffer of ours). A layout with more than
one non-empty run has a small int64 table on the device, copied from pinned memory asynchronously
the first time and cached (``_TILE_CACHE``), keyed on the runs, the list's ``(data_ptr, numel)`` pairs,
the block size, element size and device: it is rebuilt only when a tensor's storage moves. One non-empty
run (one tensor) needs no table: its numbers are kernel arguments. The launcher also decides ``ALIGNED``
(16-byte vector accesses, see ``tsam_kernels``) from the cached layout and the flat buffers' pointers.

Block sizes are chosen per size, not autotuned: the in-place kernels must not be (an autotuner's trial
launches would apply the update several times), and the reductions use a fixed grid so that their
result does not depend on the device. The numbers below are untuned defaults (no block-size sweep has
been run on a GPU; the benchmark that offered one, ``bench/gpu_bench.py --sweep``, was folded into
``bench/throughput.py --mode gpu`` without it).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence, Tuple

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
_VECTOR_BYTES = 16  # the alignment ALIGNED promises (every tile's first address)


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


# -- tiles ----------------------------------------------------------------------------------------


class Tiles(NamedTuple):
    """How a bucket's runs map to tiles (see ``tsam_kernels``): the kernel arguments, and what the
    launcher needs besides them."""

    num_tiles: int
    table: Optional[torch.Tensor]  # int64 [R, RUN_FIELDS] on the device; None for one non-empty run
    n_runs: int
    search_steps: int
    a_start: int
    shift: int
    g_lo: int
    g_hi: int
    aligned: bool  # every run's first tile starts on 16 bytes in its tensor and in the flat buffers
    first: int  # index of the first non-empty tensor of the list: theta_ptr (its element type)

    def args(self, dummy: torch.Tensor):
        table = self.table if self.table is not None else dummy
        return (table, self.n_runs, self.search_steps, self.a_start, self.shift, self.g_lo, self.g_hi)

    @property
    def multi(self) -> bool:
        return self.table is not None


_TILE_CACHE: "OrderedDict[tuple, Tiles]" = OrderedDict()
_TILE_CACHE_SIZE = 256


def _check_runs(runs, n: int) -> Tuple[Tuple[int, int, int], ...]:
    """Runs of a flat op (``noise_sqnorm``, ``fill_noise``): any order, together tiling ``[0, n)``."""
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


def _list_runs(runs, sizes: Sequence[int], name: str) -> Tuple[Tuple[int, int, int], ...]:
    """Runs of an op with a ``theta`` list: exactly one ``(offset_i, global_offset >= 0, len(theta[i]))``
    per tensor, in order."""
    runs = tuple((int(b), int(g), int(k)) for b, g, k in runs)
    if len(runs) != len(sizes):
        raise ValueError(f"runs must hold one (buffer_offset, global_offset, length) triple per tensor of "
                         f"{name} ({len(sizes)} tensors), got {len(runs)} runs")
    offset = 0
    for i, ((b, g, k), m) in enumerate(zip(runs, sizes)):
        if b != offset or k != m or g < 0:
            raise ValueError(f"runs[{i}] = {(b, g, k)} must be ({offset}, global_offset >= 0, {m}): one run per "
                             f"tensor of {name}, in order, at its offset in the flat space and of its length")
        offset += m
    return runs


def _device_table(rows, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=torch.int64)
    assert host.shape[1] == int(K.RUN_FIELDS.value)
    if device.type == "cuda":  # asynchronous copy from pinned memory: no host sync, even the first time
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _plan(runs, block: int, device: torch.device, elem: int, quantum: int, ptrs=None) -> Tiles:
    """Tiles of the non-empty ``runs``: each run's tiles start at ``A = G - G % quantum`` (4: noise tiles
    on Philox counters; 1: plain tiles at the tensor's start). ``ptrs[i]``: the data pointer of run i's
    tensor (None: a flat op). ``elem``: the smallest element size of the op's buffers, in bytes."""
    rows, tiles, aligned, first = [], 0, True, None
    for i, (b, g, k) in enumerate(runs):
        if k == 0:
            continue
        a = g - g % quantum
        ptr = 0 if ptrs is None else ptrs[i]
        rows.append((tiles, a, b - g, g, g + k, ptr))
        tiles += triton.cdiv(g + k - a, block)
        # the first tile's first lane (a), in the flat buffers and in the tensor (before it when a < g)
        aligned = aligned and (b - (g - a)) * elem % _VECTOR_BYTES == 0 and \
            (ptr - (g - a) * elem) % _VECTOR_BYTES == 0
        first = i if first is None else first
    aligned = aligned and block * elem % _VECTOR_BYTES == 0
    if not rows:  # nothing to do (the launchers return before launching)
        return Tiles(0, None, 0, 0, 0, 0, 0, 0, aligned, 0)
    if len(rows) == 1:
        _, a, shift, lo, hi, _ = rows[0]
        return Tiles(tiles, None, 1, 0, a, shift, lo, hi, aligned, first)
    return Tiles(tiles, _device_table(rows, device), len(rows), (len(rows) - 1).bit_length(), 0, 0, 0, 0,
                 aligned, first)


def _cached(key, build) -> Tiles:
    plan = _TILE_CACHE.get(key)
    if plan is not None:
        _TILE_CACHE.move_to_end(key)
        return plan
    plan = _TILE_CACHE[key] = build()
    if len(_TILE_CACHE) > _TILE_CACHE_SIZE:
        _TILE_CACHE.popitem(last=False)
    return plan


def noise_tiles(runs, n: int, block: int, device: torch.device, elem: int = 4) -> Tiles:
    """The (cached) noise-tile plan of a flat op over a bucket of ``n`` elements with these runs
    (``elem``: the element size of its buffer)."""
    runs = tuple(map(tuple, runs))
    return _cached((runs, n, block, device, elem),
                   lambda: _plan(_check_runs(runs, n), block, device, elem, 4))


def list_tiles(theta, key: tuple, runs, block: int, device: torch.device, noise: bool, name: str = "theta") -> Tiles:
    """The (cached) tile plan of an op over the ``theta`` list (``key``: its ``(data_ptr, numel)`` pairs,
    from ``_param_list``): noise tiles over ``runs`` (one per tensor) when ``noise``, else plain tiles
    per tensor (``runs`` checked when given, their global offsets unused)."""
    if runs is not None:
        runs = tuple(map(tuple, runs))
    elem = theta[0].element_size()

    def build():
        sizes = key[1::2]
        checked = _list_runs(runs, sizes, name) if runs is not None else None
        if not noise:  # global index = flat position, tiles from each tensor's start
            checked, offset = [], 0
            for m in sizes:
                checked.append((offset, offset, m))
                offset += m
        return _plan(checked, block, device, elem, 4 if noise else 1, key[0::2])

    return _cached((noise, runs, key, block, device, elem), build)


def _aligned(tiles: Tiles, *buffers) -> bool:
    """ALIGNED: the plan's runs and every flat buffer (None: absent) start on 16 bytes."""
    return tiles.aligned and all(b is None or b.data_ptr() % _VECTOR_BYTES == 0 for b in buffers)


# -- checks -------------------------------------------------------------------------------------


def _scalar(name: str, t, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != _F32 or t.numel() != 1 or t.device != device:
        raise TypeError(f"{name} must be a 0-dim fp32 tensor on {device} (a device scalar), got "
                        f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape), t.device)}")
    return t


def _buffer(name: str, t: torch.Tensor, n: int, device: torch.device, dtype=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a flat buffer (one tensor), got {type(t).__name__}")
    if t.dim() != 1 or t.numel() != n or not t.is_contiguous() or t.device != device or \
            (dtype is not None and t.dtype != dtype) or t.dtype not in _FLOATS:
        want = f"{dtype}" if dtype is not None else "fp32/bf16/fp16"
        raise ValueError(f"{name} must be a contiguous 1-D {want} buffer of {n} elements on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _param_list(name: str, theta) -> Tuple[int, torch.device, torch.dtype, tuple]:
    """Checks of a ``theta`` list (every tensor 1-D contiguous, one float dtype and device): its total
    length, device, dtype and cache key (the tensors' ``(data_ptr, numel)`` pairs, flattened)."""
    if isinstance(theta, torch.Tensor) or not isinstance(theta, (list, tuple)) or not theta:
        got = "an empty list" if isinstance(theta, (list, tuple)) else f"a {type(theta).__name__}"
        raise TypeError(f"{name} must be a non-empty list of 1-D tensors (the parameters' storages), got {got}")
    dev, dt = theta[0].device, theta[0].dtype
    if dt not in _FLOATS:
        raise ValueError(f"{name} must hold fp32, bf16 or fp16 tensors, got {dt}")
    index, key = theta[0].get_device(), []  # the device as an int: cheaper to compare, once per tensor
    for i, t in enumerate(theta):
        if not isinstance(t, torch.Tensor) or t.dtype is not dt or t.get_device() != index or t.dim() != 1 or \
                not t.is_contiguous():
            got = (t.dtype, tuple(t.shape), t.stride(), t.device) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}[{i}] must be a contiguous 1-D {dt} tensor on {dev} like {name}[0], got {got}")
        key += (t.data_ptr(), t.numel())
    n = sum(key[1::2])
    if _INTERPRETING and dev.type == "cuda" and sum(1 for m in key[1::2] if m) > 1:
        raise RuntimeError(f"the Triton interpreter copies a kernel's tensor arguments to the host, so it cannot "
                           f"follow the device pointers of a {name} list of several tensors on {dev}; run the "
                           f"interpreter on CPU tensors, or the compiled kernels on CUDA")
    return n, dev, dt, tuple(key)


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


def sqnorm(x, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum((scale * x)**2)`` over the flat space of the list ``x``, in fp32 (fp64 across programs)."""
    n, dev, dt, key = _param_list("x", x)
    if scale is not None:
        _buffer("scale", scale, n, dev, dt)
    if n == 0:
        return torch.zeros((), dtype=_F32, device=dev)
    cfg = config("plain", n)
    tiles = list_tiles(x, key, None, cfg.block, dev, noise=False, name="x")
    grid = min(tiles.num_tiles, MAX_PARTIALS)
    partials = torch.empty(grid, dtype=_F32, device=dev)
    x0 = x[tiles.first]
    with _on_device(dev):
        K.sqnorm_kernel[(grid,)](partials, x0, scale if scale is not None else x0, *tiles.args(partials),
                                 tiles.num_tiles, HAS_SCALE=scale is not None, MULTI_RUN=tiles.multi,
                                 ALIGNED=_aligned(tiles, scale), BLOCK=cfg.block, num_warps=cfg.num_warps,
                                 **_EXACT)
        return _finish_reduction(partials, grid, dev)


def perturb(theta, theta0, runs, seed: Optional[int], coef, save_backup: bool) -> None:
    n, dev, dt, key = _param_list("theta", theta)
    _buffer("theta0", theta0, n, dev, dt)
    _scalar("coef", coef, dev)
    cfg = config("noise" if seed is not None else "plain", n)
    tiles = list_tiles(theta, key, runs, cfg.block, dev, noise=seed is not None)
    if n == 0:
        return
    with _on_device(dev):
        K.perturb_kernel[(tiles.num_tiles,)](
            theta[tiles.first], theta0, coef, _seed(seed) if seed is not None else 0, *tiles.args(theta0),
            SAVE_BACKUP=bool(save_backup), HAS_NOISE=seed is not None, MULTI_RUN=tiles.multi,
            ALIGNED=_aligned(tiles, theta0), BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)


def fill_noise(out, runs, seed: int, coef) -> None:
    n, dev = out.numel(), out.device
    _buffer("out", out, n, dev, _F32)
    _scalar("coef", coef, dev)
    if n == 0:
        return
    cfg = config("noise", n)
    tiles = noise_tiles(runs, n, cfg.block, dev)
    with _on_device(dev):
        K.fill_noise_kernel[(tiles.num_tiles,)](out, coef, _seed(seed), *tiles.args(out), MULTI_RUN=tiles.multi,
                                                ALIGNED=_aligned(tiles, out), BLOCK=cfg.block,
                                                num_warps=cfg.num_warps, **_EXACT)


def leapfrog(theta, grad, kick, drift, momentum=None, precond=None) -> None:
    n, dev, dt, key = _param_list("theta", theta)
    _buffer("grad", grad, n, dev, dt)
    _scalar("kick", kick, dev)
    _scalar("drift", drift, dev)
    if momentum is not None:
        _buffer("momentum", momentum, n, dev, _F32)
    if precond is not None:
        _buffer("precond", precond, n, dev, dt)
    if n == 0:
        return
    cfg = config("plain", n)
    tiles = list_tiles(theta, key, None, cfg.block, dev, noise=False)
    with _on_device(dev):
        K.leapfrog_kernel[(tiles.num_tiles,)](
            theta[tiles.first], grad, kick, drift, momentum if momentum is not None else grad,
            precond if precond is not None else grad, *tiles.args(grad),
            HAS_MOMENTUM=momentum is not None, HAS_PRECOND=precond is not None, MULTI_RUN=tiles.multi,
            ALIGNED=_aligned(tiles, grad, momentum, precond), BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)


def _tilt_buffers(acc, grad, theta, theta0, **scalars) -> Tuple[int, torch.device, tuple]:
    """Checks of the tilt update and finalize: theta0 and grad like theta, A fp32, the named scalars."""
    n, dev, dt, key = _param_list("theta", theta)
    _buffer("theta0", theta0, n, dev, dt)
    _buffer("grad", grad, n, dev, dt)
    _buffer("acc", acc, n, dev, _F32)
    for name, t in scalars.items():
        _scalar(name, t, dev)
    return n, dev, key


def tilt_accumulate(acc, grad, a, b, first: bool, theta, theta0, runs, seed: Optional[int], coef) -> None:
    n, dev, key = _tilt_buffers(acc, grad, theta, theta0, a=a, b=b, coef=coef)
    cfg = config("noise" if seed is not None else "plain", n)
    tiles = list_tiles(theta, key, runs, cfg.block, dev, noise=seed is not None)
    if n == 0:
        return
    with _on_device(dev):
        K.tilt_accumulate_kernel[(tiles.num_tiles,)](
            acc, grad, a, b, theta[tiles.first], theta0, coef, _seed(seed) if seed is not None else 0,
            *tiles.args(acc), FIRST=bool(first), HAS_NOISE=seed is not None, MULTI_RUN=tiles.multi,
            ALIGNED=_aligned(tiles, acc, grad, theta0), BLOCK=cfg.block, num_warps=cfg.num_warps, **_EXACT)


def finalize(acc, grad, a, b, inv_z, first: bool, theta, theta0) -> None:
    n, dev, key = _tilt_buffers(acc, grad, theta, theta0, a=a, b=b, inv_z=inv_z)
    if n == 0:
        return
    cfg = config("plain", n)
    tiles = list_tiles(theta, key, None, cfg.block, dev, noise=False)
    with _on_device(dev):
        K.finalize_kernel[(tiles.num_tiles,)](
            acc, grad, a, b, inv_z, theta[tiles.first], theta0, *tiles.args(acc), FIRST=bool(first),
            MULTI_RUN=tiles.multi, ALIGNED=_aligned(tiles, acc, grad, theta0), BLOCK=cfg.block,
            num_warps=cfg.num_warps, **_EXACT)


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

