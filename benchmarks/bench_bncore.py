"""Time bncore's batch normalization against PyTorch's own kernel.

    .venv/bin/python benchmarks/bench_bncore.py            # full sizes: CPU, and CUDA if present
    .venv/bin/python benchmarks/bench_bncore.py --quick    # small sizes, a few seconds
    .venv/bin/python benchmarks/bench_bncore.py --profile  # where bncore.torch spends its time

Measured, in one run, for float32 input of shape (8192, 1024) and (64, 256, 28, 28):

- ``train``: forward and backward in training mode (the gradients of input, weight and bias,
  and the running statistics updated);
- ``eval``: the forward pass in evaluation mode (running statistics);

for ``bncore.numpy`` (CPU), ``bncore.torch`` and ``torch.nn.functional.batch_norm``; on CUDA
also bncore.torch's plain path beside its fused Triton path, and channels_last input.

Each time is the median of the repeats after a few warm-up calls; the implementations (and
the copy) are called in turn, so that all of them see the same load on a shared machine.
``vs torch`` is the time over torch's time on the same device, shape and mode. ``GB/s``
counts the bytes an ideal implementation must move (eval: read x, write y; train: x read for
the statistics and to normalize, y written, x and dy read for the reductions and for dx, dx
written: 8 tensors), and ``% copy`` compares it with the bandwidth of ``x.clone()``, measured
on the same tensor in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import bncore.torch as bt

try:
    import bncore.numpy as bnp
except ImportError:  # the NumPy back end is optional here
    bnp = None

FULL_SHAPES = [(8192, 1024), (64, 256, 28, 28)]
QUICK_SHAPES = [(1024, 256), (16, 64, 14, 14)]
TENSORS_MOVED = {"train": 8, "eval": 2}
TARGETS = {"bncore.torch": 1.5, "bncore.numpy": 3.0}  # on CPU, times torch's


def median_seconds(fns, device, warmup, repeats):
    """The median time of each function, called in turn so that all see the same load."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, times, strict=True):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def torch_steps(fn, x, dy):
    """The train and eval steps of a batch_norm function with F.batch_norm's signature."""
    c = x.shape[1]
    make = lambda fill: torch.full((c,), fill, device=x.device)  # noqa: E731
    weight, bias = make(1.0).requires_grad_(), make(0.0).requires_grad_()
    running_mean, running_var = make(0.0), make(1.0)
    xg = x.detach().requires_grad_()

    def train():
        out = fn(xg, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        return torch.autograd.grad(out, (xg, weight, bias), dy)

    def evaluate():
        with torch.no_grad():
            return fn(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5)

    return {"train": train, "eval": evaluate}


def numpy_steps(x, dy):
    x, dy = x.numpy(), dy.numpy()
    c = x.shape[1]
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    running_mean, running_var = np.zeros(c, np.float32), np.ones(c, np.float32)

    def train():
        _, cache = bnp.batch_norm_forward(x, gamma, beta)
        return bnp.batch_norm_backward(dy, cache)

    def evaluate():
        return bnp.batch_norm_inference(x, running_mean, running_var, gamma, beta)

    return {"train": train, "eval": evaluate}


def with_plain_path(fn):
    """bncore.torch's batch_norm with the fused kernels switched off."""

    def plain(*args):
        bt.use_fused = False
        try:
            return fn(*args)
        finally:
            bt.use_fused = True

    return plain


def implementations(device, x, dy):
    """(name, steps) pairs; the first one is the baseline."""
    impls = [("torch", torch_steps(F.batch_norm, x, dy)), ("bncore.torch", None)]
    if device == "cuda":
        fused = bt._ops_for(x) is not bt._PlainOps
        impls[1] = ("bncore.torch (Triton)" if fused else "bncore.torch (no Triton)",
                    torch_steps(bt.batch_norm, x, dy))
        if fused:
            plain = torch_steps(with_plain_path(bt.batch_norm), x, dy)
            impls.append(("bncore.torch (plain)", plain))
    else:
        impls[1] = ("bncore.torch", torch_steps(bt.batch_norm, x, dy))
        if bnp is not None:
            impls.append(("bncore.numpy", numpy_steps(x, dy)))
    return impls


def cases(device, shapes):
    for shape in shapes:
        yield shape, "", torch.contiguous_format
        if device == "cuda" and len(shape) == 4:
            yield shape, " channels_last", torch.channels_last


def run(devices, shapes, warmup, repeats):
    rows, ratios = [], []
    for device in devices:
        for shape, label, memory_format in cases(device, shapes):
            gen = torch.Generator().manual_seed(0)
            x, dy = (
                torch.randn(shape, generator=gen).to(device).contiguous(memory_format=memory_format)
                for _ in range(2)
            )
            nbytes = x.numel() * x.element_size()
            impls = implementations(device, x, dy)
            for mode in ("train", "eval"):
                fns = [x.clone] + [steps[mode] for _, steps in impls]
                copy_s, *times = median_seconds(fns, device, warmup, repeats)
                copy_bw = 2 * nbytes / copy_s
                print(f"{device} {shape}{label} {mode}: x.clone() moves {copy_bw / 1e9:.1f} GB/s",
                      flush=True)
                for (name, _), seconds in zip(impls, times, strict=True):
                    bandwidth = TENSORS_MOVED[mode] * nbytes / seconds
                    rows.append((device, f"{shape}{label}", mode, name, seconds * 1e3,
                                 seconds / times[0], bandwidth / 1e9, 100 * bandwidth / copy_bw))
                    if device == "cpu" and name in TARGETS:
                        ratios.append((name, shape, mode, seconds / times[0]))
    return rows, ratios


def print_table(rows):
    header = ("device", "shape", "mode", "implementation", "median ms", "vs torch", "GB/s",
              "% copy")
    cells = [header] + [
        (d, s, m, n, f"{ms:.2f}", f"{r:.2f}x", f"{bw:.1f}", f"{pc:.0f}%")
        for d, s, m, n, ms, r, bw, pc in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        # text columns to the left, numbers to the right
        padded = [c.ljust(widths[i]) if i < 4 else c.rjust(widths[i]) for i, c in enumerate(row)]
        print("  ".join(padded))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def print_targets(ratios):
    for name, limit in TARGETS.items():
        mine = [(shape, mode, r) for n, shape, mode, r in ratios if n == name]
        if not mine:
            print(f"{name}: not measured")
            continue
        worst = max(mine, key=lambda t: t[2])
        verdict = "met" if worst[2] <= limit else "MISSED"
        print(f"{name}: target {limit}x torch on CPU {verdict} (worst {worst[2]:.2f}x, "
              f"{worst[1]} at {worst[0]})")


def profile(shape):
    """The operations of one bncore.torch training step on CPU, by total time."""
    x = torch.randn(shape)
    steps = torch_steps(bt.batch_norm, x, torch.randn(shape))
    steps["train"]()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        steps["train"]()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--profile", action="store_true", help="profile one bncore.torch step")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: its own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.profile:
        for shape in shapes:
            profile(shape)
        return
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if not torch.cuda.is_available():
        if "cuda" in devices:
            print("CUDA not available: the CUDA rows (and the Triton path) are not measured")
        devices = [d for d in devices if d != "cuda"]
        if not devices:
            return
    repeats = args.repeats or (3 if args.quick else 9)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32; "
          f"median of {repeats} after 2 warm-ups")
    if bnp is None:
        print("bncore.numpy not found: its rows are not measured")
    rows, ratios = run(devices, shapes, warmup=2, repeats=repeats)
    print()
    print_table(rows)
    if not args.quick:  # at the small sizes, per-call overhead decides, not the kernels
        print()
        print_targets(ratios)


if __name__ == "__main__":
    main()
