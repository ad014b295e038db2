"""Compile bncore.torch's Triton kernels for a Hopper GPU (sm_90) on a machine without one.

    .venv/bin/python benchmarks/compile_kernels.py           # every path, dtype and option
    .venv/bin/python benchmarks/compile_kernels.py --quick   # one case of each kernel variant

Triton's interpreter, which the tests use where there is no GPU, checks what the kernels
compute but not that they compile: it runs their Python, where the compiler sees typed IR
(arguments equal to 1 become constants, globals must be constexpr, ...). This script runs
bncore.torch's fused path on CPU tensors with every launch turned into a compilation: a
stand-in driver tells Triton the target, and Triton compiles down to a cubin with the ptxas it
ships, as it would on the GPU. It prints each kernel variant's registers and spills (read with
the cuobjdump Triton ships) and exits 1 if any compilation fails or any kernel spills.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time

if "triton" in sys.modules or os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run it in a fresh process, without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

import bncore.torch as bt
from bncore import _triton

MULTIPROCESSORS = 132  # an H100 or H200: the split path's grid depends on it
CASES = [  # (shape, channels_last)
    ((300, 10), False), ((8, 5, 7), False), ((4, 6, 5, 3), False), ((24, 6, 5, 5), True),
    ((12, 70, 4, 4), True), ((2, 3), False), ((64, 1), False), ((3, 16, 1, 1), False),
    ((64, 256, 28, 28), False), ((8192, 1024), False), ((64, 256, 28, 28), True),
]
QUICK_CASES = [((64, 256, 28, 28), False), ((8192, 1024), False)]
OPTIONS = [{}, {"momentum": None}, {"affine": False}, {"bias": False},
           {"track_running_stats": False}]


class TargetOnly:
    """What Triton asks of the driver to compile (not to launch)."""

    def __init__(self, capability=90, warp_size=32):
        self.target = GPUTarget("cuda", capability, warp_size)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class Compiling:
    """Stands for a kernel: kernel[grid](...) compiles it for those arguments."""

    def __init__(self, name, kernel, compiled):
        self.name, self.kernel, self.compiled = name, kernel, compiled

    def __getitem__(self, grid):
        def compile_for(*args, **kwargs):
            flags = ",".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper() and v is True)
            self.compiled.setdefault(id(self.kernel.warmup(*args, grid=grid, **kwargs)),
                                     (self.name, flags, args[0].dtype))

        return compile_for


def resources(kernel) -> str:
    """cuobjdump's resource line for a compiled kernel: registers, stack, local memory."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        out = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if "REG:" in x), "")
    return " ".join(f for f in line.split() if f.split(":")[0] in ("REG", "STACK", "LOCAL"))


def run_case(shape, channels_last, dtype, split, options):
    """A training step and an evaluation step with their backward passes."""
    _triton.force_split = split
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    module = (bt.BatchNorm2d if x.dim() == 4 else bt.BatchNorm1d)(shape[1], **options)
    for training in (True, False):
        if training and x.numel() // shape[1] < 2:
            continue
        xg = x.clone().requires_grad_()
        out = module.train(training)(xg)
        out.backward(torch.ones_like(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one case of each variant")
    args = parser.parse_args()
    driver.set_active(TargetOnly())
    compiled = {}
    kernels = {}
    for name in dir(_triton):
        if name.endswith("_kernel"):
            kernels[name] = getattr(_triton, name)
            setattr(_triton, name, Compiling(name, kernels[name], compiled))
    _triton._multiprocessors = lambda device: MULTIPROCESSORS
    bt._FUSED_DEVICE = "cpu"
    start = time.perf_counter()
    cases = QUICK_CASES if args.quick else CASES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16, torch.float16]
    options = [{}] if args.quick else OPTIONS
    for (shape, cl), dtype, split, opts in itertools.product(cases, dtypes, [False, True],
                                                           options):
        if dtype != torch.float32 and opts:
            continue
        run_case(shape, cl, dtype, split, opts)
    seconds = time.perf_counter() - start
    spilled = []
    kernels_by_id = {}
    for kernel in kernels.values():
        for cached in kernel.device_caches[0][0].values():
            kernels_by_id[id(cached)] = cached
    for key, (name, flags, dtype) in sorted(compiled.items(), key=lambda kv: kv[1][0]):
        usage = resources(kernels_by_id[key])
        print(f"{name:20} {str(dtype):15} {usage:28} {flags}")
        if "LOCAL:0" not in usage:
            spilled.append(name)
    print(f"{len(compiled)} kernel variants compiled for sm_90 in {seconds:.0f} s; "
          f"{len(spilled)} spill registers to local memory")
    sys.exit(1 if spilled else 0)


if __name__ == "__main__":
    main()
