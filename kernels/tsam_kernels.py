"""The @triton.jit kernels of the Triton backend: one kernel per op of the contract (``backends/contract.py``).

Layout of the work (docs/design.md §5). An op's buffers are the ``theta`` list (the parameters' own
storages, each 1-D contiguous, anywhere in memory) and flat buffers of the bucket's length (theta0,
grad, A, v, precond, out, scale). Every op is one launch over *tiles* of ``BLOCK`` elements cut from
*runs*; a tile never straddles two runs:

* A run is a row ``(buffer offset B, global offset G, length n)`` plus, for the ops that take a
  ``theta`` list, the data pointer of its tensor: the ops with a list have exactly one run per tensor
  (``B`` = the tensor's offset in the bucket's flat space), so a tile lies inside one tensor. Element
  ``g`` of a tile (``G <= g < G + n``) is element ``g - G`` of that tensor and position ``g + (B - G)``
  of every flat buffer.
* Noise tiles (``noise_sqnorm``, ``perturb``, ``fill_noise``, ``tilt_accumulate``) cover *global*
  indices and start on a multiple of 4: tile ``t`` of a run covers ``g = A + t*BLOCK + k`` with
  ``A = G - G % 4``. Its normals are then exactly ``tl.randn4x(seed, g // 4)`` for ``BLOCK/4``
  consecutive counters, interleaved (n1 n2 n3 n4 n1 n2 ...): one Philox call per four elements, no
  shuffle across lanes. Lanes with ``g`` outside ``[G, G + n)`` are masked.
* Plain tiles (``sqnorm``, ``leapfrog``, ``finalize``, and ``perturb``/``tilt_accumulate`` without noise)
  use the same rows with ``G = B`` (global index = flat position) and ``A = G``: tile ``t`` of a tensor
  starts at its element ``t*BLOCK``.
* With one non-empty run (one tensor, or a flat op over one run) the run's numbers are kernel
  arguments and ``theta_ptr`` is that tensor. With several (``MULTI_RUN``) the kernel finds its run by a
  scalar binary search over a small int64 table on the device (``RUN_FIELDS`` columns per run) and
  addresses the tensor through the pointer in its row (``PTR_COL``, cast to ``theta_ptr``'s type: there
  ``theta_ptr`` is a tensor of the list, passed for its element type only).
* A tile that lies wholly inside its run loads and stores without a mask; only partial tiles (the ends
  of each run) are masked. Triton cannot prove the alignment of a pointer read from the table or of an
  offset that is not a specialised argument, so the launcher checks it on the host (every tensor's
  start and every run's flat start, seen from its first tile, and every flat buffer on a 16-byte
  boundary) and, when all are, sets ``ALIGNED``: each tile's first address then carries
  ``tl.multiple_of(., 16)``, which with the ``tl.arange`` lanes gives 16-byte vector accesses in whole
  tiles (checked on the PTX for sm_90, fp32 and bf16). Without it the accesses are scalar.

Hygiene: ``program_id(0).to(tl.int64)`` before any multiplication (buffers over 2**31 elements), masks
wherever a lane can fall outside its run, all arithmetic in fp32, one rounding to the stored dtype
(no FMA contraction: the launchers pass ``enable_fp_fusion=False``). Scalars (norm coefficients, tilt
weights) are 0-dim fp32 device tensors read through pointers. Reductions are two-stage and
deterministic: each program of a fixed-size grid (grid-stride over the tiles) writes one fp32 partial,
and one program sums the partials in fp64. ``tl.constexpr`` is used only for block sizes and real mode switches.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of the device run table: first tile of the run, A (the run's first tile's first global index),
# B - G (flat position minus global index), G, G + n, and the data pointer of the run's tensor (0 for the
# ops without a theta list).
RUN_FIELDS = tl.constexpr(6)
PTR_COL = tl.constexpr(5)

# Integer arguments Triton must not specialise on (value 1 -> constexpr, multiple of 16 -> hint): each
# specialisation compiles another kernel, and the alignment the hints would give is the launcher's
# ``ALIGNED`` (checked on the host, also for the multi-run table's values, which Triton cannot see).
_TILE_ARGS = ["n_runs", "search_steps", "a_start", "shift", "g_lo", "g_hi"]
_NOISE_ARGS = ["seed"] + _TILE_ARGS


@triton.jit
def _locate_tile(tile, runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                 MULTI_RUN: tl.constexpr, BLOCK: tl.constexpr):
    """(first global index of tile ``tile``, flat shift B - G, global lower and upper bound of its run,
    the run's table row (``runs_ptr`` with one run))."""
    if MULTI_RUN:
        # largest r with first_tile[r] <= tile (first_tile is ascending, first_tile[0] == 0)
        lo = tile * 0
        hi = lo + n_runs
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            go_right = tl.load(runs_ptr + mid * RUN_FIELDS) <= tile
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        row = runs_ptr + lo * RUN_FIELDS
        g_start = tl.load(row + 1) + (tile - tl.load(row)) * BLOCK
        return g_start, tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), row
    else:
        # ``zero +`` widens to int64 (an argument equal to 1 arrives as a constexpr, without ``.to``)
        zero = tile * 0
        return zero + a_start + tile * BLOCK, zero + shift, zero + g_lo, zero + g_hi, runs_ptr


@triton.jit
def _at(ptr, start, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The ``BLOCK`` consecutive pointers ``ptr + start + k``. With ALIGNED the first is declared a
    multiple of 16 bytes (the launcher checked it), so whole tiles get 16-byte vector accesses."""
    first = ptr + start
    if ALIGNED:
        first = tl.multiple_of(first, 16)
    return first + tl.arange(0, BLOCK)


@triton.jit
def _span(tile, runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
          MULTI_RUN: tl.constexpr, BLOCK: tl.constexpr):
    """Tile ``tile``: (its first global index g0, its first flat position, its run's G, the row, the mask
    of its lanes inside the run, whether it lies wholly inside the run and so needs no mask)."""
    g0, sh, lo, hi, row = _locate_tile(tile, runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                                       MULTI_RUN, BLOCK)
    g = g0 + tl.arange(0, BLOCK)
    return g0, g0 + sh, lo, row, (g >= lo) & (g < hi), (g0 >= lo) & (g0 + BLOCK <= hi)


@triton.jit
def _theta_at(theta_ptr, row, g0, lo, MULTI_RUN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The pointers of a tile's lanes in its tensor of the theta list: element ``g - G`` of the tensor
    in the tile's row (``theta_ptr`` itself with one run)."""
    if MULTI_RUN:
        return _at(tl.load(row + PTR_COL).to(theta_ptr.dtype), g0 - lo, ALIGNED, BLOCK)
    else:
        return _at(theta_ptr, g0 - lo, ALIGNED, BLOCK)


@triton.jit
def _noise_tile(seed, g_start, BLOCK: tl.constexpr):
    """Standard normals of global elements ``g_start .. g_start + BLOCK - 1`` (``g_start % 4 == 0``).

    Element ``g`` takes normal ``g % 4`` of ``tl.randn4x(seed, g // 4)`` (docs/design.md §4).
    """
    counters = g_start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    n1, n2, n3, n4 = tl.randn4x(seed, counters)
    return tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))


@triton.jit
def _rounded(x, ptr):
    """fp32 ``x`` rounded to nearest even in the element type of ``ptr`` (the one rounding of a result).

    bf16 is rounded by hand, as PyTorch does (add 0x7FFF plus the lowest kept bit, drop 16 bits; NaN
    kept a quiet NaN): Triton's CPU interpreter truncates fp32 -> bf16, and the GPU's cvt.rn gives the
    same bits as this. fp16 and fp32 use the ordinary conversion.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        kept = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        kept = tl.where(x != x, 0x7FC0, kept)
        return kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _ld(ptrs, mask, MASKED: tl.constexpr, other):
    """Load; masked only in a run's partial tiles, so that whole tiles keep vector loads whatever the
    run's length (a mask whose bounds are not multiples of 16 defeats vectorisation)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    else:
        return tl.load(ptrs)


@triton.jit
def _st(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


# -- reductions ----------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_NOISE_ARGS + ["num_tiles"])
def noise_sqnorm_kernel(partials_ptr, seed, runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                        num_tiles, MULTI_RUN: tl.constexpr, BLOCK: tl.constexpr):
    """partials[pid] = sum of xi**2 over the noise tiles pid, pid + P, pid + 2P, ... (P programs)."""
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in range(pid, pid * 0 + num_tiles, nprog):
        g0, _, _, _, mask, _ = _span(tile, runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                                     MULTI_RUN, BLOCK)
        xi = _noise_tile(seed, g0, BLOCK)
        total += tl.where(mask, xi * xi, 0.0)
    tl.store(partials_ptr + pid, tl.sum(total, axis=0))


@triton.jit
def _squares(xs, scales, mask, HAS_SCALE: tl.constexpr, MASKED: tl.constexpr):
    y = _ld(xs, mask, MASKED, 0.0).to(tl.float32)
    if HAS_SCALE:
        y = y * _ld(scales, mask, MASKED, 0.0).to(tl.float32)
    return y * y


@triton.jit(do_not_specialize=_TILE_ARGS + ["num_tiles"])
def sqnorm_kernel(partials_ptr, x_ptr, scale_ptr, runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                  num_tiles, HAS_SCALE: tl.constexpr, MULTI_RUN: tl.constexpr, ALIGNED: tl.constexpr,
                  BLOCK: tl.constexpr):
    """partials[pid] = sum of (scale * x)**2 over the tiles pid, pid + P, ... (P programs) of the list x."""
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in range(pid, pid * 0 + num_tiles, nprog):
        g0, f0, lo, row, mask, whole = _span(tile, runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                                             MULTI_RUN, BLOCK)
        xs = _theta_at(x_ptr, row, g0, lo, MULTI_RUN, ALIGNED, BLOCK)
        scales = _at(scale_ptr, f0, ALIGNED, BLOCK)
        if whole:
            total += _squares(xs, scales, mask, HAS_SCALE, False)
        else:
            total += _squares(xs, scales, mask, HAS_SCALE, True)
    tl.store(partials_ptr + pid, tl.sum(total, axis=0))


@triton.jit(do_not_specialize=["n_partials"])
def sum_partials_kernel(out_ptr, partials_ptr, n_partials, BLOCK: tl.constexpr):
    """out (0-dim fp32) = sum of the n_partials <= BLOCK partials, added in fp64 (one program)."""
    offs = tl.arange(0, BLOCK)
    p = tl.load(partials_ptr + offs, mask=offs < n_partials, other=0.0)
    tl.store(out_ptr, tl.sum(p.to(tl.float64), axis=0).to(tl.float32))


# -- element-wise ops over noise tiles (plain tiles without noise) ----------------------------------


@triton.jit
def _perturb_tile(thetas, theta0s, coef_ptr, seed, g0, mask,
                  SAVE_BACKUP: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    if SAVE_BACKUP:
        t0 = _ld(thetas, mask, MASKED, None)
        _st(theta0s, t0, mask, MASKED)
    else:
        t0 = _ld(theta0s, mask, MASKED, None)
    if HAS_NOISE:
        xi = _noise_tile(seed, g0, BLOCK)
        new = t0.to(tl.float32) + tl.load(coef_ptr) * xi
        _st(thetas, _rounded(new, thetas), mask, MASKED)
    elif not SAVE_BACKUP:
        _st(thetas, t0, mask, MASKED)


@triton.jit(do_not_specialize=_NOISE_ARGS)
def perturb_kernel(theta_ptr, theta0_ptr, coef_ptr, seed, runs_ptr, n_runs, search_steps,
                   a_start, shift, g_lo, g_hi,
                   SAVE_BACKUP: tl.constexpr, HAS_NOISE: tl.constexpr, MULTI_RUN: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Random start: theta0 <- theta if SAVE_BACKUP; theta <- theta0 + coef * xi (theta0 if no noise)."""
    g0, f0, lo, row, mask, whole = _span(tl.program_id(0).to(tl.int64), runs_ptr, n_runs, search_steps,
                                         a_start, shift, g_lo, g_hi, MULTI_RUN, BLOCK)
    thetas = _theta_at(theta_ptr, row, g0, lo, MULTI_RUN, ALIGNED, BLOCK)
    theta0s = _at(theta0_ptr, f0, ALIGNED, BLOCK)
    if whole:
        _perturb_tile(thetas, theta0s, coef_ptr, seed, g0, mask, SAVE_BACKUP, HAS_NOISE, BLOCK, False)
    else:
        _perturb_tile(thetas, theta0s, coef_ptr, seed, g0, mask, SAVE_BACKUP, HAS_NOISE, BLOCK, True)


@triton.jit(do_not_specialize=_NOISE_ARGS)
def fill_noise_kernel(out_ptr, coef_ptr, seed, runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                      MULTI_RUN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """out (fp32) <- coef * xi (HMC's momentum draw)."""
    g0, f0, _, _, mask, whole = _span(tl.program_id(0).to(tl.int64), runs_ptr, n_runs, search_steps,
                                      a_start, shift, g_lo, g_hi, MULTI_RUN, BLOCK)
    outs = _at(out_ptr, f0, ALIGNED, BLOCK)
    xi = tl.load(coef_ptr) * _noise_tile(seed, g0, BLOCK)
    if whole:
        _st(outs, xi, mask, False)
    else:
        _st(outs, xi, mask, True)


@triton.jit
def _tilt_tile(accs, grads, a_ptr, b_ptr, thetas, theta0s, coef_ptr, seed, g0, mask,
               FIRST: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    upd = tl.load(b_ptr) * _ld(grads, mask, MASKED, None).to(tl.float32)
    if not FIRST:
        upd = tl.load(a_ptr) * _ld(accs, mask, MASKED, None) + upd
    _st(accs, upd, mask, MASKED)
    t0 = _ld(theta0s, mask, MASKED, None)
    if HAS_NOISE:
        xi = _noise_tile(seed, g0, BLOCK)
        new = t0.to(tl.float32) + tl.load(coef_ptr) * xi
        _st(thetas, _rounded(new, thetas), mask, MASKED)
    else:
        _st(thetas, t0, mask, MASKED)


@triton.jit(do_not_specialize=_NOISE_ARGS)
def tilt_accumulate_kernel(acc_ptr, grad_ptr, a_ptr, b_ptr, theta_ptr, theta0_ptr, coef_ptr, seed,
                           runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                           FIRST: tl.constexpr, HAS_NOISE: tl.constexpr, MULTI_RUN: tl.constexpr,
                           ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """A <- a*A + b*g (b*g when FIRST: A is not read) fused with the next start theta <- theta0 + coef*xi."""
    g0, f0, lo, row, mask, whole = _span(tl.program_id(0).to(tl.int64), runs_ptr, n_runs, search_steps,
                                         a_start, shift, g_lo, g_hi, MULTI_RUN, BLOCK)
    thetas = _theta_at(theta_ptr, row, g0, lo, MULTI_RUN, ALIGNED, BLOCK)
    accs = _at(acc_ptr, f0, ALIGNED, BLOCK)
    grads = _at(grad_ptr, f0, ALIGNED, BLOCK)
    theta0s = _at(theta0_ptr, f0, ALIGNED, BLOCK)
    if whole:
        _tilt_tile(accs, grads, a_ptr, b_ptr, thetas, theta0s, coef_ptr, seed, g0, mask,
                   FIRST, HAS_NOISE, BLOCK, False)
    else:
        _tilt_tile(accs, grads, a_ptr, b_ptr, thetas, theta0s, coef_ptr, seed, g0, mask,
                   FIRST, HAS_NOISE, BLOCK, True)


# -- plain element-wise ops -------------------------------------------------------------------------


@triton.jit
def _leapfrog_tile(thetas, grads, kick_ptr, drift_ptr, moms, preconds, mask,
                   HAS_MOMENTUM: tl.constexpr, HAS_PRECOND: tl.constexpr, MASKED: tl.constexpr):
    step = tl.load(kick_ptr) * _ld(grads, mask, MASKED, None).to(tl.float32)
    if HAS_MOMENTUM:
        step = _ld(moms, mask, MASKED, None) + step
        _st(moms, step, mask, MASKED)
    elif HAS_PRECOND:
        p = _ld(preconds, mask, MASKED, None).to(tl.float32)
        step = step * (p * p)
    new = _ld(thetas, mask, MASKED, None).to(tl.float32) + tl.load(drift_ptr) * step
    _st(thetas, _rounded(new, thetas), mask, MASKED)


@triton.jit(do_not_specialize=_TILE_ARGS)
def leapfrog_kernel(theta_ptr, grad_ptr, kick_ptr, drift_ptr, mom_ptr, precond_ptr,
                    runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                    HAS_MOMENTUM: tl.constexpr, HAS_PRECOND: tl.constexpr, MULTI_RUN: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """HMC: v <- v + kick*g; theta <- theta + drift*v.  Ascent: theta <- theta + drift*(kick*g*P**2)."""
    g0, f0, lo, row, mask, whole = _span(tl.program_id(0).to(tl.int64), runs_ptr, n_runs, search_steps,
                                         a_start, shift, g_lo, g_hi, MULTI_RUN, BLOCK)
    thetas = _theta_at(theta_ptr, row, g0, lo, MULTI_RUN, ALIGNED, BLOCK)
    grads = _at(grad_ptr, f0, ALIGNED, BLOCK)
    moms = _at(mom_ptr, f0, ALIGNED, BLOCK)
    preconds = _at(precond_ptr, f0, ALIGNED, BLOCK)
    if whole:
        _leapfrog_tile(thetas, grads, kick_ptr, drift_ptr, moms, preconds, mask, HAS_MOMENTUM, HAS_PRECOND, False)
    else:
        _leapfrog_tile(thetas, grads, kick_ptr, drift_ptr, moms, preconds, mask, HAS_MOMENTUM, HAS_PRECOND, True)


@triton.jit
def _finalize_tile(accs, grads, a_ptr, b_ptr, inv_z_ptr, thetas, theta0s, mask,
                   FIRST: tl.constexpr, MASKED: tl.constexpr):
    upd = tl.load(b_ptr) * _ld(grads, mask, MASKED, None).to(tl.float32)
    if not FIRST:
        upd = tl.load(a_ptr) * _ld(accs, mask, MASKED, None) + upd
    _st(grads, _rounded(upd * tl.load(inv_z_ptr), grads), mask, MASKED)
    _st(thetas, _ld(theta0s, mask, MASKED, None), mask, MASKED)


@triton.jit(do_not_specialize=_TILE_ARGS)
def finalize_kernel(acc_ptr, grad_ptr, a_ptr, b_ptr, inv_z_ptr, theta_ptr, theta0_ptr,
                    runs_ptr, n_runs, search_steps, a_start, shift, g_lo, g_hi,
                    FIRST: tl.constexpr, MULTI_RUN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """grad <- (a*A + b*g) * inv_z (A not read when FIRST) and theta <- theta0: the end of the step."""
    g0, f0, lo, row, mask, whole = _span(tl.program_id(0).to(tl.int64), runs_ptr, n_runs, search_steps,
                                         a_start, shift, g_lo, g_hi, MULTI_RUN, BLOCK)
    thetas = _theta_at(theta_ptr, row, g0, lo, MULTI_RUN, ALIGNED, BLOCK)
    accs = _at(acc_ptr, f0, ALIGNED, BLOCK)
    grads = _at(grad_ptr, f0, ALIGNED, BLOCK)
    theta0s = _at(theta0_ptr, f0, ALIGNED, BLOCK)
    if whole:
        _finalize_tile(accs, grads, a_ptr, b_ptr, inv_z_ptr, thetas, theta0s, mask, FIRST, False)
    else:
        _finalize_tile(accs, grads, a_ptr, b_ptr, inv_z_ptr, thetas, theta0s, mask, FIRST, True)


# -- the generator alone (tests compare it with tsam_fast.rng) --------------------------------------


@triton.jit(do_not_specialize=["seed", "n"])
def generator_kernel(out_ptr, counters_ptr, seed, n, NORMALS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i, 0..3] = ``tl.randn4x(seed, counters[i])`` (fp32) if NORMALS, else the four Philox4x32-10
    words of ``tl.randint4x(seed, counters[i])`` bit-cast to int32."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(counters_ptr + offs, mask=mask, other=0)
    if NORMALS:
        x0, x1, x2, x3 = tl.randn4x(seed, c)
    else:
        w0, w1, w2, w3 = tl.randint4x(seed, c)
        x0 = w0.to(tl.int32, bitcast=True)
        x1 = w1.to(tl.int32, bitcast=True)
        x2 = w2.to(tl.int32, bitcast=True)
        x3 = w3.to(tl.int32, bitcast=True)
    tl.store(out_ptr + offs * 4, x0, mask=mask)
    tl.store(out_ptr + offs * 4 + 1, x1, mask=mask)
    tl.store(out_ptr + offs * 4 + 2, x2, mask=mask)
    tl.store(out_ptr + offs * 4 + 3, x3, mask=mask)
