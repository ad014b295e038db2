"""Fused Triton kernels for bncore.torch on CUDA: the same three operations as its plain path.

- ``channel_mean(x)``: the per-channel mean;
- ``centered_sums(x, mean, dy=None)``: with ``xc = x - mean``, ``(sum(xc), sum(xc**2))``, or
  ``(sum(dy), sum(dy * xc))`` with ``dy``;
- ``affine_centered(x, mean, scale, shift, dy=None, dy_scale=None, out_dtype=None)``:
  ``(x - mean) * scale + shift (+ dy * dy_scale)``, per channel.

Each is one kernel launch (the sums add a tiny ``torch.sum`` over the partial results), and
reads every element once: the training forward reads ``x`` three times and writes ``y`` once,
the backward reads ``x`` and ``dy`` twice and writes ``dx`` once, with no temporaries.
Statistics accumulate in float32. The plain path in :mod:`bncore.torch` is the reference
these kernels are tested against.

The input is viewed as (N, C, S) with S the product of the spatial axes, with any strides, so
contiguous and channels_last tensors need no copy. 2-d (N, C) input is viewed as (1, C, N).
Importing this module imports Triton; :mod:`bncore.torch` does so only for CUDA input.
With ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly), for testing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sums_kernel(x_ptr, dy_ptr, mean_ptr, out1_ptr, out2_ptr,
                 N, C, S, sxn, sxc, sxs, sdn, sdc, sds, tiles_per_n, tiles_per_program,
                 MODE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # With xc = x - mean: MODE 0: sum(x); 1: sum(xc) and sum(xc^2); 2: sum(dy) and sum(dy * xc).
    # Program (i, j) covers channels [i * BLOCK_C, (i + 1) * BLOCK_C) and a range of
    # (n, s-tile) pairs; it writes its partial sums to row j of out1 (and out2).
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    mean = tl.load(mean_ptr + cs, mask=c_mask, other=0.0) if MODE != 0 else 0.0
    acc1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    start = pid_r * tiles_per_program
    stop = tl.minimum(start + tiles_per_program, N * tiles_per_n)
    for t in range(start, stop):
        n = (t // tiles_per_n).to(tl.int64)
        s = ((t % tiles_per_n) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        mask = (s < S)[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + n * sxn + s[:, None] * sxs + cs[None, :] * sxc, mask=mask,
                    other=0.0).to(tl.float32)
        if MODE == 0:
            acc1 += x
        else:
            xc = tl.where(mask, x - mean[None, :], 0.0)
            if MODE == 1:
                dy = xc
            else:
                dy = tl.load(dy_ptr + n * sdn + s[:, None] * sds + cs[None, :] * sdc,
                             mask=mask, other=0.0).to(tl.float32)
            acc1 += dy
            acc2 += dy * xc
    tl.store(out1_ptr + pid_r * C + cs, tl.sum(acc1, axis=0), mask=c_mask)
    if MODE != 0:
        tl.store(out2_ptr + pid_r * C + cs, tl.sum(acc2, axis=0), mask=c_mask)


@triton.jit
def _affine_kernel(x_ptr, dy_ptr, out_ptr, mean_ptr, scale_ptr, shift_ptr, dy_scale_ptr,
                   C, S, sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos, tiles_per_n,
                   HAS_DY: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # out = (x - mean) * scale + shift (+ dy * dy_scale) on one (s-tile, channel-tile).
    t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    n = (t // tiles_per_n).to(tl.int64)
    s = ((t % tiles_per_n) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    mask = (s < S)[:, None] & c_mask[None, :]
    mean = tl.load(mean_ptr + cs, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + cs, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + cs, mask=c_mask, other=0.0)
    x = tl.load(x_ptr + n * sxn + s[:, None] * sxs + cs[None, :] * sxc, mask=mask,
                other=0.0).to(tl.float32)
    out = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_DY:
        dy_scale = tl.load(dy_scale_ptr + cs, mask=c_mask, other=0.0)
        dy = tl.load(dy_ptr + n * sdn + s[:, None] * sds + cs[None, :] * sdc, mask=mask,
                     other=0.0).to(tl.float32)
        out += dy * dy_scale[None, :]
    tl.store(out_ptr + n * son + s[:, None] * sos + cs[None, :] * soc,
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _ncs(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` viewed as (N, C, S), and the view's strides; (N, C) becomes (1, C, N)."""
    n, c = t.shape[:2]
    if t.dim() == 2:
        return t, (0, t.stride(1), t.stride(0))
    try:
        v = t.view(n, c, -1)
    except RuntimeError:  # strides that do not merge: copy
        v = t.contiguous().view(n, c, -1)
    return v, v.stride()


def _geometry(x: torch.Tensor):
    """(N, S, C, BLOCK_S, BLOCK_C, tiles_per_n) for the (N, C, S) view of x."""
    c = x.shape[1]
    if x.dim() == 2:
        n, s = 1, x.shape[0]
    else:
        n, s = x.shape[0], x[0, 0].numel()
    _, (_, sc, ss) = _ncs(x)
    if sc == 1 and c > 1:  # channels are contiguous: wide tiles along C
        block_c = min(64, triton.next_power_of_2(c))
        block_s = max(1, min(2048 // block_c, triton.next_power_of_2(s)))
    else:  # each (n, c) row of S values is contiguous: long tiles along S
        block_s = min(512, triton.next_power_of_2(s))
        block_c = max(1, min(1024 // block_s, triton.next_power_of_2(c)))
    return n, s, c, block_s, block_c, triton.cdiv(s, block_s)


def _programs_per_channel_tile(x: torch.Tensor, channel_tiles: int, tiles: int) -> int:
    """Enough programs to fill the GPU a few times over."""
    if x.is_cuda:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:  # the interpreter
        target = 4
    return max(1, min(tiles, triton.cdiv(target, channel_tiles)))


def _sums(x, mean, dy, mode):
    n, s, c, block_s, block_c, tiles_per_n = _geometry(x)
    xv, (sxn, sxc, sxs) = _ncs(x)
    if dy is not None:
        dyv, (sdn, sdc, sds) = _ncs(dy)
    else:
        dyv, (sdn, sdc, sds) = xv, (0, 0, 0)
    channel_tiles = triton.cdiv(c, block_c)
    tiles = n * tiles_per_n
    programs = _programs_per_channel_tile(x, channel_tiles, tiles)
    per_program = triton.cdiv(tiles, programs)
    out1 = torch.zeros(programs, c, device=x.device, dtype=torch.float32)
    out2 = torch.zeros_like(out1) if mode != 0 else out1
    mean_arg = out1 if mean is None else mean.float().contiguous()
    _sums_kernel[(channel_tiles, programs)](
        xv, dyv, mean_arg, out1, out2, n, c, s, sxn, sxc, sxs, sdn, sdc, sds,
        tiles_per_n, per_program, MODE=mode, BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return out1.sum(0), out2.sum(0)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of x, shape (C,), float32."""
    total, _ = _sums(x, None, None, mode=0)
    return total / (x.numel() // x.shape[1])


def centered_sums(x: torch.Tensor, mean: torch.Tensor, dy: torch.Tensor | None = None):
    """Per channel, with ``xc = x - mean``: ``(sum(xc), sum(xc**2))``, or with ``dy``,
    ``(sum(dy), sum(dy * xc))``."""
    return _sums(x, mean, dy, mode=1 if dy is None else 2)


def affine_centered(x, mean, scale, shift, dy=None, dy_scale=None, out_dtype=None):
    """``(x - mean) * scale + shift`` (``+ dy * dy_scale``) per channel, in a new tensor."""
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    n, s, c, block_s, block_c, tiles_per_n = _geometry(x)
    xv, (sxn, sxc, sxs) = _ncs(x)
    ov, (son, soc, sos) = _ncs(out)
    if dy is not None:
        dyv, (sdn, sdc, sds) = _ncs(dy)
    else:
        dyv, (sdn, sdc, sds) = xv, (0, 0, 0)
    params = [p.float().contiguous() for p in (mean, scale, shift)]
    dy_scale = params[1] if dy_scale is None else dy_scale.float().contiguous()
    grid = (n * tiles_per_n, triton.cdiv(c, block_c))
    _affine_kernel[grid](
        xv, dyv, ov, *params, dy_scale, c, s, sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos,
        tiles_per_n, HAS_DY=dy is not None, BLOCK_S=block_s, BLOCK_C=block_c,
    )
    if ov.data_ptr() != out.data_ptr():  # out's strides did not merge: _ncs wrote a copy
        out.copy_(ov.view_as(out))
    return out
