"""Fused Triton kernels for bncore.torch on CUDA: a training step in three to five launches.

:func:`forward` and :func:`backward` do the work of ``BatchNormFunction`` for CUDA input in
float32, float16 or bfloat16; the plain path in :mod:`bncore.torch` is their reference.

The input is seen as (N, C, S), S the product of the spatial axes, with the strides of a
contiguous or a channels-last tensor (other strides are copied to contiguous first). When the
rows of consecutive samples follow each other in memory (channels-last and 2-d input) they are
one run of N*S rows. A tile is BLOCK_S rows of BLOCK_C channels of one sample, read along the
axis that is contiguous in memory.

The work is cut in one of two ways, chosen by size in :func:`_plan`:

- **channel blocks** (small tensors): one program per block of channels reads all of its
  rows, so it holds its channels' statistics and goes on to normalize them (or to compute dx),
  re-reading rows that are still in cache. Training forward: 1 kernel, and 1 more to update the
  running statistics; backward: 1 kernel.
- **split** (large tensors): the rows of each channel block are cut among several programs,
  which write partial results; in the forward a finalize kernel (one program) merges them and
  updates the running statistics, and a third kernel normalizes; in the backward the programs
  of the second kernel merge the partial sums themselves, then compute dx. Forward: 3 kernels,
  backward: 2.

Evaluation is 1 kernel. The running statistics, ``num_batches_tracked`` and the guard that
leaves them untouched when a batch statistic is not finite are all done in the finalize
kernel, on the device. Statistics accumulate in float32: each program sums the deviations
from a shift (the mean of its first tile, so that an offset does not cancel the variance),
and partial results (count, mean, sum of squared deviations) are merged with Chan's formula.

Importing this module imports Triton; :mod:`bncore.torch` does so only for CUDA input.
With ``TRITON_INTERPRET=1`` set before the import, the kernels run on CPU tensors (slowly),
which is how the tests check them without a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Elements in a tile: 4096 float32 are 16 KiB, 16 values for each of 256 threads (8 warps).
# With 4 warps the reductions' accumulators take 110 to 150 registers a thread, which leaves
# room for few programs on a multiprocessor to hide the memory's latency; with 8, 55 to 105.
_TILE = 4096
_NUM_WARPS = 8
# A channel block of at most this many elements is one program's (the channel-block path);
# up to _CHANNEL_BLOCK_MAX when there are enough channel blocks to fill the GPU.
_CHANNEL_BLOCK_SMALL = 1 << 16
_CHANNEL_BLOCK_MAX = 1 << 18
# The split path aims at this many programs per multiprocessor.
_WAVES = 4
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # float32's largest

#: None: choose the path by size; True or False: always split, or never (for benchmarks).
force_split: bool | None = None


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _tile(t, tiles_per_n, S, sn, ss, c_off, c_mask, BLOCK_S: tl.constexpr):
    """Offsets (BLOCK_S, BLOCK_C) and mask of tile t: rows of sample t // tiles_per_n."""
    n = t // tiles_per_n
    s = (t - n * tiles_per_n) * BLOCK_S + tl.arange(0, BLOCK_S)
    rows = tl.cast(n, tl.int64) * sn + s.to(tl.int64) * ss
    return rows[:, None] + c_off[None, :], (s < S)[:, None] & c_mask[None, :]


@triton.jit
def _program_block(C, sc, tiles, tiles_per_program, BLOCK_C: tl.constexpr):
    """The work of program (pid(0), pid(1)): the channels cs of block pid(0), their mask and
    their offsets (stride sc), and the tiles [first, last) of program pid(1)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    first = tl.program_id(1) * tiles_per_program
    return cs, cs < C, cs.to(tl.int64) * sc, first, tl.minimum(first + tiles_per_program, tiles)


@triton.jit
def _partial_rows(p0, cs, c_mask, C, P, BLOCK_P: tl.constexpr):
    """Index (BLOCK_P, BLOCK_C) and mask of rows p0 to p0 + BLOCK_P of a block of P rows of
    partial results (P, C), for the channels cs."""
    ps = p0 + tl.arange(0, BLOCK_P)
    return ps[:, None] * C + cs[None, :], (ps < P)[:, None] & c_mask[None, :]


@triton.jit
def _normalize_tiles(x_ptr, y_ptr, w_ptr, b_ptr, mean, invstd, cs, c_mask, c_off, first, last,
                     tiles_per_n, S, sn, ss, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = (x - mean) * invstd * w + b on tiles [first, last) of the channels cs."""
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(first, last):
        off, mask = _tile(t, tiles_per_n, S, sn, ss, c_off, c_mask, BLOCK_S)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + bias[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, stats_ptr, part_ptr,
                    C, S, sn, sc, ss, tiles_per_n, tiles, tiles_per_program, eps,
                    FUSED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Statistics of channel block pid(0) over the tiles of program pid(1).

    Every program sums the deviations from the same shift, the mean of the channel's first
    tile. FUSED (one program per channel block): store mean, invstd and the biased variance
    in rows 0, 1 and 2 of stats (3, C), then y. Else: store (count, mean - shift, m2) of the
    program's rows in row pid(1) of part (3P + 1, C), in its blocks of P rows, m2 being the
    sum of the squared deviations from the program's mean; programs pid(1) == 0 store the
    shift in its last row.
    """
    pid_p = tl.program_id(1)
    cs, c_mask, c_off, first, last = _program_block(C, sc, tiles, tiles_per_program, BLOCK_C)
    # The shift: the mean of the first tile, close enough to the mean that the sums of the
    # deviations from it cancel no digits worth having, and small numbers to merge.
    off, mask = _tile(0, tiles_per_n, S, sn, ss, c_off, c_mask, BLOCK_S)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    shift = tl.sum(x, axis=0) / tl.maximum(tl.sum(mask.to(tl.float32), axis=0), 1.0)
    sum_d = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    sum_d2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    rows = tl.full((), 0, tl.int32)
    for t in range(first, last):
        off, mask = _tile(t, tiles_per_n, S, sn, ss, c_off, c_mask, BLOCK_S)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
        rows += tl.minimum(S - (t % tiles_per_n) * BLOCK_S, BLOCK_S)
    count = rows.to(tl.float32)
    deviation = tl.sum(sum_d, axis=0) / count  # mean - shift
    m2 = tl.sum(sum_d2, axis=0) - count * deviation * deviation
    if FUSED:
        mean = shift + deviation
        var = m2 / count
        var = tl.where(var < 0.0, 0.0, var)  # rounding; NaN stays NaN
        invstd = tl.rsqrt(var + eps)
        tl.store(stats_ptr + cs, mean, mask=c_mask)
        tl.store(stats_ptr + C + cs, invstd, mask=c_mask)
        tl.store(stats_ptr + 2 * C + cs, var, mask=c_mask)
        _normalize_tiles(x_ptr, y_ptr, w_ptr, b_ptr, mean, invstd, cs, c_mask, c_off, first,
                         last, tiles_per_n, S, sn, ss, HAS_W, HAS_B, BLOCK_S, BLOCK_C)
    else:
        row = pid_p * C + cs
        part_c = tl.num_programs(1) * C
        tl.store(part_ptr + row, count + tl.zeros([BLOCK_C], dtype=tl.float32), mask=c_mask)
        tl.store(part_ptr + part_c + row, deviation, mask=c_mask)
        tl.store(part_ptr + 2 * part_c + row, m2, mask=c_mask)
        if pid_p == 0:
            tl.store(part_ptr + 3 * part_c + cs, shift, mask=c_mask)


@triton.jit
def _merge_partials(part_ptr, cs, c_mask, C, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean (less the shift) and biased variance of the channels cs from the P partials
    (count, mean - shift, m2) in part (3P + 1, C): Chan's formula, in two passes."""
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        index, mask = _partial_rows(p0, cs, c_mask, C, P, BLOCK_P)
        n = tl.load(part_ptr + index, mask=mask, other=0.0)
        total += tl.sum(n, axis=0)
        weighted += tl.sum(n * tl.load(part_ptr + P * C + index, mask=mask, other=0.0), axis=0)
    total = tl.maximum(total, 1.0)  # 0 only in the lanes past the last channel
    deviation = weighted / total
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        index, mask = _partial_rows(p0, cs, c_mask, C, P, BLOCK_P)
        n = tl.load(part_ptr + index, mask=mask, other=0.0)
        d = tl.load(part_ptr + P * C + index, mask=mask, other=0.0) - deviation[None, :]
        part_m2 = tl.load(part_ptr + 2 * P * C + index, mask=mask, other=0.0)
        m2 += tl.sum(tl.where(mask, part_m2 + n * d * d, 0.0), axis=0)
    return deviation, m2 / total


@triton.jit
def _finalize_kernel(part_ptr, stats_ptr, rm_ptr, rv_ptr, nbt_ptr, C, P, eps, momentum, bessel,
                     MERGE: tl.constexpr, UPDATE: tl.constexpr, COUNT: tl.constexpr,
                     CUMULATIVE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program. MERGE: the partials and the shift in part (3P + 1, C) into mean, invstd
    and variance (stats rows 0-2). UPDATE: when every mean and unbiased
    variance is finite, move the running statistics towards them and add 1 to
    num_batches_tracked (COUNT); else change nothing. CUMULATIVE: momentum = 1 /
    num_batches_tracked."""
    bad = tl.full((), 0, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        if MERGE:
            deviation, var = _merge_partials(part_ptr, cs, c_mask, C, P, BLOCK_P, BLOCK_C)
            mean = tl.load(part_ptr + 3 * P * C + cs, mask=c_mask, other=0.0) + deviation
            var = tl.where(var < 0.0, 0.0, var)
            tl.store(stats_ptr + cs, mean, mask=c_mask)
            tl.store(stats_ptr + C + cs, tl.rsqrt(var + eps), mask=c_mask)
            tl.store(stats_ptr + 2 * C + cs, var, mask=c_mask)
        else:
            mean = tl.load(stats_ptr + cs, mask=c_mask, other=0.0)
            var = tl.load(stats_ptr + 2 * C + cs, mask=c_mask, other=0.0)
        finite = (tl.abs(mean) <= _FLT_MAX) & (var * bessel <= _FLT_MAX)  # False for NaN
        bad += tl.sum((c_mask & ~finite).to(tl.int32), axis=0)
    if UPDATE:
        tl.debug_barrier()  # the statistics stored above are read back by other threads
        if bad == 0:
            if COUNT:
                tracked = tl.load(nbt_ptr) + 1
                tl.store(nbt_ptr, tracked)
                if CUMULATIVE:
                    momentum = 1.0 / tracked.to(tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                c_mask = cs < C
                mean = tl.load(stats_ptr + cs, mask=c_mask, other=0.0)
                var = tl.load(stats_ptr + 2 * C + cs, mask=c_mask, other=0.0) * bessel
                rm = tl.load(rm_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
                rv = tl.load(rv_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
                rm = (1.0 - momentum) * rm + momentum * mean
                rv = (1.0 - momentum) * rv + momentum * var
                tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=c_mask)
                tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, stats_ptr,
                      C, S, sn, sc, ss, tiles_per_n, tiles, tiles_per_program, eps,
                      EVAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """y on the tiles of program pid(1). EVAL: from the running statistics (mean_ptr and
    var_ptr), whose mean and invstd programs pid(1) == 0 store in stats rows 0 and 1 for the
    backward; else from the mean and invstd in stats."""
    pid_p = tl.program_id(1)
    cs, c_mask, c_off, first, last = _program_block(C, sc, tiles, tiles_per_program, BLOCK_C)
    if EVAL:
        mean = tl.load(mean_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
        var = tl.load(var_ptr + cs, mask=c_mask, other=1.0).to(tl.float32)
        invstd = tl.rsqrt(var + eps)
        if pid_p == 0:
            tl.store(stats_ptr + cs, mean, mask=c_mask)
            tl.store(stats_ptr + C + cs, invstd, mask=c_mask)
    else:
        mean = tl.load(stats_ptr + cs, mask=c_mask, other=0.0)
        invstd = tl.load(stats_ptr + C + cs, mask=c_mask, other=0.0)
    _normalize_tiles(x_ptr, y_ptr, w_ptr, b_ptr, mean, invstd, cs, c_mask, c_off, first, last,
                     tiles_per_n, S, sn, ss, HAS_W, HAS_B, BLOCK_S, BLOCK_C)


@triton.jit
def _grad_tiles(x_ptr, dy_ptr, dx_ptr, w_ptr, dw_ptr, db_ptr, mean, invstd, sum_dy, sum_dy_xc,
                store_params, inv_count, cs, c_mask, c_off, first, last, tiles_per_n, S, sn,
                ss, TRAINING: tl.constexpr, HAS_W: tl.constexpr, NEED_DX: tl.constexpr,
                NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_S: tl.constexpr):
    """dw and db (when store_params), and dx on tiles [first, last) of the channels cs.

    Training: dx = scale * dy + (x - mean) * k + d, with scale = w * invstd,
    k = -scale * invstd^2 * sum(dy (x - mean)) / M and d = -scale * sum(dy) / M.
    Evaluation: dx = scale * dy.
    """
    if store_params:
        if NEED_DW:
            tl.store(dw_ptr + cs, (sum_dy_xc * invstd).to(dw_ptr.dtype.element_ty), mask=c_mask)
        if NEED_DB:
            tl.store(db_ptr + cs, sum_dy.to(db_ptr.dtype.element_ty), mask=c_mask)
    if NEED_DX:
        scale = invstd
        if HAS_W:
            scale = scale * tl.load(w_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
        k = -scale * invstd * invstd * sum_dy_xc * inv_count
        d = -scale * sum_dy * inv_count
        for t in range(first, last):
            off, mask = _tile(t, tiles_per_n, S, sn, ss, c_off, c_mask, BLOCK_S)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dx = dy * scale[None, :]
            if TRAINING:
                x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
                dx += (x - mean[None, :]) * k[None, :] + d[None, :]
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, stats_ptr, part_ptr, dw_ptr, db_ptr,
                     C, S, sn, sc, ss, tiles_per_n, tiles, tiles_per_program, inv_count,
                     FUSED: tl.constexpr, TRAINING: tl.constexpr, HAS_W: tl.constexpr,
                     NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum(dy) and sum(dy * (x - mean)) of channel block pid(0) over the tiles of program
    pid(1). FUSED (one program per channel block): then dw, db and dx. Else: store the sums
    in row pid(1) of part (2, P, C)."""
    pid_p = tl.program_id(1)
    cs, c_mask, c_off, first, last = _program_block(C, sc, tiles, tiles_per_program, BLOCK_C)
    mean = tl.load(stats_ptr + cs, mask=c_mask, other=0.0)
    invstd = tl.load(stats_ptr + C + cs, mask=c_mask, other=0.0)
    acc_dy = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    acc_dy_xc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for t in range(first, last):
        off, mask = _tile(t, tiles_per_n, S, sn, ss, c_off, c_mask, BLOCK_S)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dy_xc += tl.where(mask, dy * (x - mean[None, :]), 0.0)
    sum_dy = tl.sum(acc_dy, axis=0)
    sum_dy_xc = tl.sum(acc_dy_xc, axis=0)
    if FUSED:
        _grad_tiles(x_ptr, dy_ptr, dx_ptr, w_ptr, dw_ptr, db_ptr, mean, invstd, sum_dy,
                    sum_dy_xc, pid_p == 0, inv_count, cs, c_mask, c_off, first, last,
                    tiles_per_n, S, sn, ss, TRAINING, HAS_W, NEED_DX, NEED_DW, NEED_DB, BLOCK_S)
    else:
        row = pid_p * C + cs
        tl.store(part_ptr + row, sum_dy, mask=c_mask)
        tl.store(part_ptr + tl.num_programs(1) * C + row, sum_dy_xc, mask=c_mask)


@triton.jit
def _grad_input_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, stats_ptr, part_ptr, dw_ptr, db_ptr,
                       C, S, sn, sc, ss, tiles_per_n, tiles, tiles_per_program, inv_count, P,
                       HAS_PARTIALS: tl.constexpr, TRAINING: tl.constexpr,
                       HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                       NEED_DB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """dx on the tiles of program pid(1), after adding up the P partial sums in part
    (2, P, C) (HAS_PARTIALS); programs pid(1) == 0 store dw and db."""
    pid_p = tl.program_id(1)
    cs, c_mask, c_off, first, last = _program_block(C, sc, tiles, tiles_per_program, BLOCK_C)
    mean = tl.load(stats_ptr + cs, mask=c_mask, other=0.0)
    invstd = tl.load(stats_ptr + C + cs, mask=c_mask, other=0.0)
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_PARTIALS:
        for p0 in range(0, P, BLOCK_P):
            index, mask = _partial_rows(p0, cs, c_mask, C, P, BLOCK_P)
            sum_dy += tl.sum(tl.load(part_ptr + index, mask=mask, other=0.0), axis=0)
            sum_dy_xc += tl.sum(tl.load(part_ptr + P * C + index, mask=mask, other=0.0), axis=0)
    _grad_tiles(x_ptr, dy_ptr, dx_ptr, w_ptr, dw_ptr, db_ptr, mean, invstd, sum_dy, sum_dy_xc,
                pid_p == 0, inv_count, cs, c_mask, c_off, first, last,
                tiles_per_n, S, sn, ss, TRAINING, HAS_W, NEED_DX, NEED_DW, NEED_DB, BLOCK_S)


# ----------------------------------------------------------------------------------------
# Geometry, cached per shape, strides, dtype and device
# ----------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    layout: tuple[int, int, int, int, int]  # (N, S, stride of n, of c, of s) of the view
    block_s: int
    block_c: int
    c_tiles: int  # channel blocks
    tiles_per_n: int
    tiles: int  # tiles per channel block
    programs: int  # programs per channel block on the split path
    per_program: int  # tiles per program on the split path
    split: bool  # the split path for statistics and gradient sums (else channel blocks)


_plans: dict = {}
_sm_counts: dict = {}


def _layout(x: torch.Tensor):
    """x seen as (N, C, S): (N, S, stride of n, stride of c, stride of s), with the rows of
    consecutive samples merged (N = 1) where they follow each other in memory; None for
    strides that are neither contiguous nor channels-last."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if x.is_contiguous():
        sn, sc, ss = c * s, s, 1
    elif x.dim() > 2 and x.movedim(1, -1).is_contiguous():
        sn, sc, ss = s * c, 1, c
    elif x.dim() == 2 and x.t().is_contiguous():
        sn, sc, ss = 1, n, 1
    else:
        return None
    if s == 1:
        ss = sn
    if n == 1 or sn == s * ss:
        return 1, n * s, 0, sc, ss
    return n, s, sn, sc, ss


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter
        return 1
    count = _sm_counts.get(device)
    if count is None:
        count = _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def _plan(x: torch.Tensor) -> _Plan | None:
    """Tile sizes and grids for x; None where x must be copied to contiguous first."""
    key = (x.shape, x.stride(), x.dtype, x.device, force_split)
    plan = _plans.get(key, False)
    if plan is False:
        if len(_plans) > 1024:
            _plans.clear()
        plan = _plans[key] = _make_plan(x)
    return plan


def _make_plan(x: torch.Tensor) -> _Plan | None:
    layout = _layout(x)
    if layout is None:
        return None
    n, s, _, sc, _ = layout
    c = x.shape[1]
    if sc == 1 and c > 1:  # channels contiguous: wide tiles along C
        block_c = min(triton.next_power_of_2(c), 64)
        block_s = min(triton.next_power_of_2(s), _TILE // block_c)
    else:  # rows contiguous: long tiles along S
        block_s = min(triton.next_power_of_2(s), 1024)
        block_c = min(triton.next_power_of_2(c), _TILE // block_s)
    tiles_per_n = triton.cdiv(s, block_s)
    tiles = n * tiles_per_n
    c_tiles = triton.cdiv(c, block_c)
    target = _WAVES * _multiprocessors(x.device)
    per_program = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(target, c_tiles))))
    programs = triton.cdiv(tiles, per_program)
    block_elements = n * s * block_c
    if force_split is not None:
        split = force_split
    else:
        split = not (block_elements <= _CHANNEL_BLOCK_SMALL
                     or (block_elements <= _CHANNEL_BLOCK_MAX and c_tiles >= target // _WAVES))
    return _Plan(layout, block_s, block_c, c_tiles, tiles_per_n, tiles, programs, per_program,
                 split and programs > 1)


_workspaces: dict = {}


def _workspace(x: torch.Tensor, numel: int) -> torch.Tensor:
    """A float32 buffer for partial results, kept per device and stream: one kernel writes it
    and the next, on the same stream, reads it before anything else can."""
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
    key = (x.device, stream)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _workspaces[key] = torch.empty(numel, device=x.device, dtype=torch.float32)
    return buffer


# ----------------------------------------------------------------------------------------
# The two entry points
# ----------------------------------------------------------------------------------------


def forward(x, weight, bias, running_mean, running_var, nbt, training, momentum, eps):
    """The forward of ``BatchNormFunction`` (its arguments, checked already).

    Returns ``(y, x, stats)``: the output, the input as the kernels read it (a contiguous copy
    where its strides were neither contiguous nor channels-last), and a (3, C) float32 tensor
    holding the mean, invstd and (training only) the biased variance, for :func:`backward`.
    """
    plan = _plan(x)
    if plan is None:
        x = x.contiguous()
        plan = _plan(x)
    c = x.shape[1]
    _, s, sn, sc, ss = plan.layout
    y = torch.empty_like(x)
    stats = torch.empty((3, c), device=x.device, dtype=torch.float32)
    w = stats if weight is None else weight
    b = stats if bias is None else bias
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_S=plan.block_s,
                  BLOCK_C=plan.block_c, num_warps=_NUM_WARPS)
    split_grid = (plan.c_tiles, plan.programs)
    if not training:
        _normalize_kernel[split_grid](
            x, y, w, b, running_mean, running_var, stats, c, s, sn, sc, ss, plan.tiles_per_n,
            plan.tiles, plan.per_program, eps, EVAL=True, **common)
        return y, x, stats
    count = plan.layout[0] * s
    programs = plan.programs if plan.split else 1
    part = _workspace(x, (3 * programs + 1) * c) if plan.split else stats
    _forward_kernel[(plan.c_tiles, programs)](
        x, y, w, b, stats, part, c, s, sn, sc, ss, plan.tiles_per_n, plan.tiles,
        plan.per_program if plan.split else plan.tiles, eps, FUSED=not plan.split, **common)
    update = running_mean is not None
    if update or plan.split:
        _finalize_kernel[(1,)](
            part, stats, running_mean if update else stats, running_var if update else stats,
            stats if nbt is None else nbt, c, programs, eps,
            0.0 if momentum is None else momentum, count / (count - 1),
            MERGE=plan.split, UPDATE=update, COUNT=nbt is not None,
            CUMULATIVE=momentum is None, BLOCK_P=32, BLOCK_C=128, num_warps=_NUM_WARPS)
    if plan.split:
        _normalize_kernel[split_grid](
            x, y, w, b, stats, stats, stats, c, s, sn, sc, ss, plan.tiles_per_n, plan.tiles,
            plan.per_program, eps, EVAL=False, **common)
    return y, x, stats


def backward(dy, x, weight, stats, training, need_dx, need_dw, need_db, bias_dtype):
    """The backward of ``BatchNormFunction``: ``(dx, dw, db)``, None where not needed.

    ``x`` and ``stats`` are what :func:`forward` returned.
    """
    plan = _plan(x)
    dy_plan = _plan(dy)
    if dy_plan is None or dy_plan.layout != plan.layout:  # e.g. an expanded gradient
        dy = torch.empty_like(x).copy_(dy)
    c = x.shape[1]
    n, s, sn, sc, ss = plan.layout
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty(c, device=x.device, dtype=weight.dtype) if need_dw else None
    db = torch.empty(c, device=x.device, dtype=bias_dtype) if need_db else None
    args = (x, dy, stats if dx is None else dx, stats if weight is None else weight, stats)
    outputs = (stats if dw is None else dw, stats if db is None else db)
    geometry = (c, s, sn, sc, ss, plan.tiles_per_n, plan.tiles)
    flags = dict(TRAINING=training, HAS_W=weight is not None, NEED_DX=need_dx,
                 NEED_DW=need_dw, NEED_DB=need_db, BLOCK_S=plan.block_s, BLOCK_C=plan.block_c,
                 num_warps=_NUM_WARPS)
    inv_count = 1.0 / (n * s)
    if not (training or need_dw or need_db):  # evaluation, dx only: no sums
        _grad_input_kernel[(plan.c_tiles, plan.programs)](
            *args, stats, *outputs, *geometry, plan.per_program, inv_count, 1,
            HAS_PARTIALS=False, BLOCK_P=32, **flags)
    elif not plan.split:
        _backward_kernel[(plan.c_tiles, 1)](
            *args, stats, *outputs, *geometry, plan.tiles, inv_count, FUSED=True, **flags)
    else:
        part = _workspace(x, 2 * plan.programs * c)
        _backward_kernel[(plan.c_tiles, plan.programs)](
            *args, part, *outputs, *geometry, plan.per_program, inv_count, FUSED=False,
            **flags)
        _grad_input_kernel[(plan.c_tiles, plan.programs if need_dx else 1)](
            *args, part, *outputs, *geometry, plan.per_program, inv_count, plan.programs,
            HAS_PARTIALS=True, BLOCK_P=32, **flags)
    return dx, dw, db
