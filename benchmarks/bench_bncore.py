"""Time bncore's batch normalization against PyTorch's own kernel.

    .venv/bin/python benchmarks/bench_bncore.py            # CPU table and proxy; CUDA if present
    .venv/bin/python benchmarks/bench_bncore.py --quick    # small sizes, a few seconds
    .venv/bin/python benchmarks/bench_bncore.py --proxy    # the CPU proxy only
    .venv/bin/python benchmarks/bench_bncore.py --device cuda   # the GPU table only
    .venv/bin/python benchmarks/bench_bncore.py --profile  # where bncore.torch spends its time

Modes: ``train`` is forward and backward in training mode (the gradients of input, weight
and bias, and the running statistics updated); ``eval`` is the forward pass in evaluation
mode. ``vs torch`` is the time over ``torch.nn.functional.batch_norm``'s on the same device,
shape, dtype and mode. ``% copy`` compares the bandwidth of the bytes an ideal
implementation must move (eval: read x, write y; train: x read for the statistics and to
normalize, y written, x and dy read for the reductions and for dx, dx written: 8 tensors)
with that of ``x.clone()``, measured on the same tensor in the same rounds.

**The CPU table** (float32 (8192, 1024) and (64, 256, 28, 28); CPU wall-clock, median of
the repeats) compares bncore.torch and bncore.numpy with torch.

**The CPU proxy**, which any machine can run: the aten operations that one training step of
bncore.torch's plain path dispatches (target: at most 30; both counts are printed), and the time
of a training step on a tiny batch, (8, 16, 4, 4), over torch.nn's (target: at most 4x).

**The GPU table** (CUDA only): the shapes of ``GPU_ROWS``, each in float32 and bfloat16,
timed with CUDA events (median of 15, implementations called in turn): torch, bncore.torch's
fused Triton path as it chooses (its path in ``path``), each of its two paths forced
(``blocks``: one program per channel block; ``split``: the rows cut among programs), and its
plain path. ``launches`` counts the GPU kernels of one fused training step with the
profiler. Then the host time per call on a tiny batch, and the targets, row by row: the
fused path at most 1.0x torch's time, at least 80% of the copy bandwidth on the
(256, 64, 112, 112) rows, at most 6 launches per training step, host time at most 1.5x
torch's. ``--dry-run`` runs the same code on CPU tensors through Triton's interpreter, on
small shapes: a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bncore.torch as bt

try:
    import bncore.numpy as bnp
except ImportError:  # the NumPy back end is optional here
    bnp = None

FULL_SHAPES = [(8192, 1024), (64, 256, 28, 28)]
QUICK_SHAPES = [(1024, 256), (16, 64, 14, 14)]
TENSORS_MOVED = {"train": 8, "eval": 2}
TARGETS = {"bncore.torch": 1.5, "bncore.numpy": 3.0}  # on CPU, times torch's

PROXY_SHAPE = (8, 16, 4, 4)
PROXY_TARGETS = {"aten operations": 30, "tiny step vs torch": 4.0}

GPU_ROWS = [  # (shape, memory format); each in float32 and bfloat16
    ((8192, 1024), "-"),
    ((64, 256, 28, 28), "NCHW"),
    ((64, 256, 28, 28), "channels_last"),
    ((128, 512, 14, 14), "channels_last"),
    ((32, 2048, 7, 7), "channels_last"),
    ((256, 64, 112, 112), "channels_last"),
    ((256, 64, 112, 112), "NCHW"),
]
DRY_RUN_ROWS = [((300, 10), "-"), ((4, 6, 5, 3), "NCHW"), ((24, 6, 5, 5), "channels_last")]
GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BANDWIDTH_SHAPE = (256, 64, 112, 112)  # the rows that must reach 80% of the copy bandwidth
MAX_LAUNCHES = 6
MAX_HOST_RATIO = 1.5
BLOCKS_MAX_ELEMENTS = 1 << 22  # forcing channel blocks on larger channel blocks takes long


# ----------------------------------------------------------------------------------------
# Steps and timers
# ----------------------------------------------------------------------------------------


def torch_steps(fn, x, dy):
    """The train and eval steps of a batch_norm function with F.batch_norm's signature.

    Parameters and running statistics are float32, as under mixed precision.
    """
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


def with_settings(fn, use_fused=True, force_split=None):
    """bncore.torch's batch_norm with the fused kernels off, or one of their paths forced."""

    def call(*args):
        bt.use_fused = use_fused
        if force_split is not None:
            from bncore import _triton

            _triton.force_split = force_split
        try:
            return fn(*args)
        finally:
            bt.use_fused = True
            if force_split is not None:
                _triton.force_split = None

    return call


def median_in_turn(fns, warmup, repeats, time_one):
    """The median of time_one(fn) for each function, after warmup calls of each: the
    functions are called in turn, round after round, so that all see the same load."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, measured in zip(fns, times, strict=True):
            measured.append(time_one(fn))
    return [statistics.median(t) for t in times]


def median_seconds(fns, device, warmup, repeats):
    """The median wall-clock time of each function, called in turn so that all see the
    same load; on CUDA, each call is followed by a synchronization."""

    def seconds(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return median_in_turn(fns, warmup, repeats, seconds)


def median_event_ms(fns, warmup, repeats):
    """The median time of each function between two CUDA events (ms), called in turn. The
    GPU is idle when a call starts, so a call bound by its launches counts its host time."""

    def ms(fn):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return median_in_turn(fns, warmup, repeats, ms)


def host_seconds_per_call(fns, device, warmup, repeats, calls=50):
    """The median time each function keeps the host busy per call: a block of calls with no
    synchronization inside, on a batch small enough that the GPU keeps up."""

    def seconds(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    medians = median_in_turn(fns, warmup, repeats, seconds)
    if device == "cuda":
        torch.cuda.synchronize()
    return medians


# ----------------------------------------------------------------------------------------
# The CPU table
# ----------------------------------------------------------------------------------------


def cpu_implementations(x, dy):
    """(name, steps) pairs; the first one is the baseline."""
    impls = [("torch", torch_steps(F.batch_norm, x, dy)),
             ("bncore.torch", torch_steps(bt.batch_norm, x, dy))]
    if bnp is not None:
        impls.append(("bncore.numpy", numpy_steps(x, dy)))
    return impls


def run_cpu(shapes, warmup, repeats):
    rows, ratios = [], []
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        x, dy = (torch.randn(shape, generator=gen) for _ in range(2))
        nbytes = x.numel() * x.element_size()
        impls = cpu_implementations(x, dy)
        for mode in ("train", "eval"):
            fns = [x.clone] + [steps[mode] for _, steps in impls]
            copy_s, *times = median_seconds(fns, "cpu", warmup, repeats)
            copy_bw = 2 * nbytes / copy_s
            for (name, _), seconds in zip(impls, times, strict=True):
                bandwidth = TENSORS_MOVED[mode] * nbytes / seconds
                rows.append(("cpu", f"{shape}", mode, name, f"{seconds * 1e3:.2f}",
                             f"{seconds / times[0]:.2f}x", f"{bandwidth / 1e9:.1f}",
                             f"{100 * bandwidth / copy_bw:.0f}%"))
                if name in TARGETS:
                    ratios.append((name, shape, mode, seconds / times[0]))
    return rows, ratios


def print_table(header, rows, text_columns):
    """A plain-text table: the first text_columns columns to the left, the rest right."""
    cells = [header] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def print_cpu_targets(ratios):
    for name, limit in TARGETS.items():
        mine = [(shape, mode, r) for n, shape, mode, r in ratios if n == name]
        if not mine:
            print(f"{name}: not measured")
            continue
        worst = max(mine, key=lambda t: t[2])
        verdict = "met" if worst[2] <= limit else "MISSED"
        print(f"{name}: target {limit}x torch on CPU {verdict} (worst {worst[2]:.2f}x, "
              f"{worst[1]} at {worst[0]})")


# ----------------------------------------------------------------------------------------
# The CPU proxy: operations per step, and a tiny step's time
# ----------------------------------------------------------------------------------------


class AtenCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def module_step(cls, shape, seed=0):
    """A training step of a BatchNorm2d-like module on a fresh (x, dy): the gradients of
    input, weight and bias."""
    gen = torch.Generator().manual_seed(seed)
    module = cls(shape[1])
    x = torch.randn(shape, generator=gen).requires_grad_()
    dy = torch.randn(shape, generator=gen)

    def step():
        return torch.autograd.grad(module(x), (x, module.weight, module.bias), dy)

    return step


def aten_operations(step) -> int:
    step()
    with AtenCount() as counter:
        step()
    return counter.count


def cpu_proxy(repeats):
    """(aten operations per training step, bncore and torch; tiny step times in seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny batch: threads would only add their start-up
    try:
        ours = module_step(bt.BatchNorm2d, PROXY_SHAPE)
        theirs = module_step(torch.nn.BatchNorm2d, PROXY_SHAPE)
        operations = aten_operations(ours), aten_operations(theirs)
        times = host_seconds_per_call([ours, theirs], "cpu", warmup=20, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    return operations, times


def print_proxy(operations, times):
    ratio = times[0] / times[1]
    limit_ops, limit_ratio = PROXY_TARGETS.values()
    print(f"CPU proxy, BatchNorm2d on {PROXY_SHAPE}, one thread:")
    print(f"  aten operations per training step: bncore.torch {operations[0]}, "
          f"torch.nn {operations[1]}; target at most {limit_ops}: "
          f"{'met' if operations[0] <= limit_ops else 'MISSED'}")
    print(f"  training step: bncore.torch {times[0] * 1e6:.0f} us, torch.nn "
          f"{times[1] * 1e6:.0f} us, {ratio:.2f}x; target at most {limit_ratio}x: "
          f"{'met' if ratio <= limit_ratio else 'MISSED'}")


# ----------------------------------------------------------------------------------------
# The GPU table
# ----------------------------------------------------------------------------------------


def gpu_inputs(shape, memory_format, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
    if memory_format == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy


def fused_variants(x):
    """(label, force_split) of the fused paths worth timing on x: the one it chooses, then
    each one forced, where it can run in reasonable time."""
    from bncore import _triton

    plan = _triton._plan(x) or _triton._plan(x.contiguous())
    chosen = "split" if plan.split else "blocks"
    variants = [(f"fused ({chosen})", None)]
    n, s = plan.layout[:2]
    if n * s * plan.block_c <= BLOCKS_MAX_ELEMENTS:
        variants.append(("blocks", False))
    if plan.programs > 1:
        variants.append(("split", True))
    return chosen, variants


def count_launches(step, device):
    """GPU kernels in one call of step, counted by the profiler (None off CUDA)."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def time_row(x, dy, device, warmup, repeats):
    """{mode: {name: seconds}} for one input, and the copy time, for each mode."""
    _, variants = fused_variants(x)
    impls = [("torch", torch_steps(F.batch_norm, x, dy))]
    impls += [(label, torch_steps(with_settings(bt.batch_norm, force_split=split), x, dy))
              for label, split in variants]
    impls.append(("plain", torch_steps(with_settings(bt.batch_norm, use_fused=False), x, dy)))
    result = {}
    for mode in ("train", "eval"):
        fns = [x.clone] + [steps[mode] for _, steps in impls]
        if device == "cuda":
            times = [ms / 1e3 for ms in median_event_ms(fns, warmup, repeats)]
        else:
            times = median_seconds(fns, device, warmup, repeats)
        result[mode] = dict(zip(["copy"] + [name for name, _ in impls], times, strict=True))
    launches = count_launches(impls[1][1]["train"], device)
    return result, launches


def run_gpu(rows, device, warmup, repeats):
    """The GPU table's rows and the target checks."""
    table, checks = [], []
    for shape, memory_format in rows:
        for dtype_name, dtype in GPU_DTYPES.items():
            x, dy = gpu_inputs(shape, memory_format, dtype, device)
            chosen, _ = fused_variants(x)
            result, launches = time_row(x, dy, device, warmup, repeats)
            nbytes = x.numel() * x.element_size()
            for mode, times in result.items():
                label = (f"{shape}", memory_format, dtype_name, mode)
                cells, row_checks = gpu_row(label, chosen, times, nbytes, launches)
                print("  ".join(cells), flush=True)  # as it goes, in case the run is cut short
                table.append(cells)
                checks += row_checks
            del x, dy
    return table, checks


def gpu_row(label, chosen, times, nbytes, launches):
    """The cells of one row of the GPU table, and its (label, target, met, value) checks."""
    shape, _, _, mode = label
    fused = next(v for k, v in times.items() if k.startswith("fused"))
    ratio = fused / times["torch"]
    percent = 100 * TENSORS_MOVED[mode] * nbytes / fused / (2 * nbytes / times["copy"])
    ms = [f"{times[name] * 1e3:.3f}" if name in times else "-"
          for name in ("torch", "fused", "blocks", "split", "plain")]
    ms[1] = f"{fused * 1e3:.3f}"
    cells = (*label, chosen, *ms, f"{ratio:.2f}x", f"{percent:.0f}%",
             str(launches) if launches is not None and mode == "train" else "-")
    name = " ".join(label)
    checks = [(name, "fused / torch <= 1.0", ratio <= 1.0, f"{ratio:.2f}x")]
    if shape == str(BANDWIDTH_SHAPE) and mode == "train":
        checks.append((name, ">= 80% of copy bandwidth", percent >= 80, f"{percent:.0f}%"))
    if launches is not None and mode == "train":
        checks.append((name, f"<= {MAX_LAUNCHES} launches per step", launches <= MAX_LAUNCHES,
                       str(launches)))
    return cells, checks


def host_time_check(device, repeats):
    """Host time per training step on a tiny batch: bncore's fused path against torch."""
    x, dy = gpu_inputs(PROXY_SHAPE, "NCHW", torch.float32, device)
    theirs = torch_steps(F.batch_norm, x, dy)["train"]
    ours = torch_steps(bt.batch_norm, x, dy)["train"]
    ours_s, theirs_s = host_seconds_per_call([ours, theirs], device, warmup=20, repeats=repeats)
    launches = count_launches(ours, device), count_launches(theirs, device)
    ratio = ours_s / theirs_s
    print(f"host time per training step on {PROXY_SHAPE}: bncore.torch {ours_s * 1e6:.0f} us, "
          f"torch {theirs_s * 1e6:.0f} us ({ratio:.2f}x); GPU kernels per step: "
          f"bncore.torch {launches[0]}, torch {launches[1]}")
    return ("tiny step host time", f"<= {MAX_HOST_RATIO}x torch", ratio <= MAX_HOST_RATIO,
            f"{ratio:.2f}x")


def gpu_report(device, rows, warmup, repeats):
    if device == "cuda":
        import triton

        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"Triton {triton.__version__}; CUDA events, median of {repeats}")
    else:
        print("dry run: CPU tensors through Triton's interpreter; the times mean nothing")
    table, checks = run_gpu(rows, device, warmup, repeats)
    header = ("shape", "format", "dtype", "mode", "path", "torch ms", "fused ms", "blocks ms",
              "split ms", "plain ms", "vs torch", "% copy", "launches")
    print()
    print_table(header, table, text_columns=5)
    print()
    checks.append(host_time_check(device, repeats))
    missed = [c for c in checks if not c[2]]
    for label, target, met, value in checks:
        print(f"{'met   ' if met else 'MISSED'} {target:28s} {value:>7s}  {label}")
    print(f"{len(checks) - len(missed)} of {len(checks)} targets met")


# ----------------------------------------------------------------------------------------


def profile(shape):
    """The operations of one bncore.torch training step on CPU, by total time."""
    x = torch.randn(shape)
    steps = torch_steps(bt.batch_norm, x, torch.randn(shape))
    steps["train"]()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        steps["train"]()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def prepare_dry_run():
    """Triton's interpreter, for the GPU table's code on CPU tensors."""
    if "triton" in sys.modules:
        raise SystemExit("--dry-run must choose Triton's interpreter before Triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):  # Triton 3.6's interpreter and NumPy 2.4: see tests/test_torch.py
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch
    bt._FUSED_DEVICE = "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--proxy", action="store_true", help="the CPU proxy only")
    parser.add_argument("--profile", action="store_true", help="profile one bncore.torch step")
    parser.add_argument("--dry-run", action="store_true",
                        help="the GPU table's code on CPU tensors, through Triton's interpreter")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: its own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.profile:
        for shape in shapes:
            profile(shape)
        return
    if args.dry_run:
        prepare_dry_run()
        gpu_report("cpu", DRY_RUN_ROWS, warmup=1, repeats=args.repeats or 2)
        return
    repeats = args.repeats or (3 if args.quick else 9)
    if args.proxy or args.device in ("cpu", "all"):
        operations, times = cpu_proxy(repeats=args.repeats or 21)
        print_proxy(operations, times)
        print()
    if args.proxy:
        return
    if args.device in ("cpu", "all"):
        print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32; "
              f"median of {repeats} after 2 warm-ups")
        if bnp is None:
            print("bncore.numpy not found: its rows are not measured")
        rows, ratios = run_cpu(shapes, warmup=2, repeats=repeats)
        print()
        print_table(("device", "shape", "mode", "implementation", "median ms", "vs torch",
                     "GB/s", "% copy"), rows, text_columns=4)
        if not args.quick:  # at the small sizes, per-call overhead decides, not the kernels
            print()
            print_cpu_targets(ratios)
        print()
    if args.device in ("cuda", "all"):
        if not torch.cuda.is_available():
            print("CUDA not available: the GPU table (and the Triton path) is not measured")
            return
        rows = GPU_ROWS[:2] if args.quick else GPU_ROWS
        gpu_report("cuda", rows, warmup=3, repeats=args.repeats or 15)


if __name__ == "__main__":
    main()
