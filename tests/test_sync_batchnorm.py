"""bncore.torch.SyncBatchNorm: in one process against torch.nn.BatchNorm*, and over 2 and 3 gloo
processes on 127.0.0.1 against BatchNorm on the concatenated batch.

The multi-process tests start their processes with bncore.distributed.run_on_local_processes,
which stops every process within its time limit; the worker functions are at the top level of
this module so that the spawned processes can import them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import bncore.torch as bt
from bncore.distributed import run_on_local_processes
from bncore.torch import SyncBatchNorm

LAUNCH_TIMEOUT = 90   # seconds for one launch of processes; the tests' own limit is above it


# ------------------------------------------------------------------ shared data

def case_data(case: dict):
    """The whole batch of a case, the same in every process: two training steps' (x, dy) and
    gamma, beta. x: (sum(sizes), C, *rest) float64, every channel with its own offset."""
    gen = torch.Generator().manual_seed(case["seed"])
    n, c = sum(case["sizes"]), case["channels"]
    shape = (n, c, *case.get("rest", ()))
    view = (1, c) + (1,) * len(case.get("rest", ()))
    steps = []
    for _ in range(2):
        offset = 4 * torch.rand(c, generator=gen, dtype=torch.float64).view(view) - 2
        spread = 0.5 + 2 * torch.rand(c, generator=gen, dtype=torch.float64).view(view)
        x = offset + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
        steps.append((x, torch.randn(shape, generator=gen, dtype=torch.float64)))
    gamma = 0.5 + torch.rand(c, generator=gen, dtype=torch.float64)
    beta = torch.randn(c, generator=gen, dtype=torch.float64)
    return steps, gamma, beta


def make_layer(cls, case):
    layer = cls(case["channels"], dtype=torch.float64, **case.get("options", {}))
    _, gamma, beta = case_data(case)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(gamma)
        if layer.bias is not None:
            layer.bias.copy_(beta)
    return layer


def run_case(layer, case, part):
    """Two training steps and one evaluation on the rows `part` of each step's batch."""
    steps, _, _ = case_data(case)
    record = {"y": [], "dx": [], "dw": [], "db": []}
    for x_all, dy_all in steps:
        x = x_all[part].clone().requires_grad_()
        y = layer(x)
        (y * dy_all[part]).sum().backward()
        record["y"].append(y.detach().numpy())
        record["dx"].append(x.grad.numpy())
        for key, p in (("dw", layer.weight), ("db", layer.bias)):
            record[key].append(None if p is None or p.grad is None else p.grad.numpy().copy())
        layer.zero_grad(set_to_none=True)
    layer.eval()
    record["eval"] = None
    if layer.running_mean is not None:  # without, evaluation uses each process's own batch
        with torch.no_grad():
            record["eval"] = layer(steps[0][0][part]).numpy()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buffer = getattr(layer, name)
        record[name] = None if buffer is None else buffer.numpy().copy()
    return record


def reference_class(case):
    return nn.BatchNorm2d if len(case.get("rest", ())) == 2 else nn.BatchNorm1d


def assert_matches_concatenated(case, per_process):
    """The processes' records together equal BatchNorm's record on the whole batch."""
    ref = run_case(make_layer(reference_class(case), case), case, slice(None))
    for step in range(2):
        for key in ("y", "dx"):
            ours = np.concatenate([r[key][step] for r in per_process])
            np.testing.assert_allclose(ours, ref[key][step], rtol=1e-10, atol=1e-12,
                                       err_msg=f"{key} at step {step} of {case}")
        for key in ("dw", "db"):
            if ref[key][step] is None:
                assert all(r[key][step] is None for r in per_process)
                continue
            parts = [r[key][step] for r in per_process if r[key][step] is not None]
            np.testing.assert_allclose(sum(parts), ref[key][step], rtol=1e-10, atol=1e-12,
                                       err_msg=f"summed {key} at step {step} of {case}")
    if ref["eval"] is not None:
        np.testing.assert_allclose(np.concatenate([r["eval"] for r in per_process]),
                                   ref["eval"], rtol=1e-10, atol=1e-12,
                                   err_msg=f"evaluation of {case}")
    for r in per_process:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if ref[name] is None:
                assert r[name] is None
            else:
                np.testing.assert_allclose(r[name], ref[name], rtol=1e-12, atol=1e-14,
                                           err_msg=f"{name} of {case}")


# ------------------------------------------------------------------ workers (in the processes)

def compare_worker(rank, world_size, cases):
    results = []
    for case in cases:
        start = sum(case["sizes"][:rank])
        part = slice(start, start + case["sizes"][rank])
        results.append(run_case(make_layer(SyncBatchNorm, case), case, part))
    return {"records": results, "listening": listening_addresses()}


def listening_addresses() -> list[str]:
    """Local addresses of this process's listening TCP sockets (Linux /proc), e.g.
    '0100007F:9C41' for 127.0.0.1."""
    if not os.path.isdir("/proc/self/fd"):
        return []
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:   # 0A: LISTEN
                    found.append(fields[1])
    return found


def state(layer):
    """A copy of the layer's buffers and parameters, to tell whether a call changed them."""
    return [t.clone() for t in (layer.running_mean, layer.running_var,
                                layer.num_batches_tracked, layer.weight, layer.bias)]


def bad_input_worker(rank, world_size):
    """Each scenario: what this process raised (type, message) and whether the layer's state
    was left unchanged; then a good step must still work on every process."""
    layer = SyncBatchNorm(3, dtype=torch.float64)
    layer(torch.randn(4, 3, dtype=torch.float64))  # buffers away from their defaults

    scenarios = {
        "wrong channels on 1": torch.randn(4, 5 if rank == 1 else 3, dtype=torch.float64),
        "integer input on 0": (torch.ones(4, 3, dtype=torch.long) if rank == 0
                               else torch.randn(4, 3, dtype=torch.float64)),
        "one value over all": torch.randn(1 if rank == 0 else 0, 3, dtype=torch.float64),
    }
    out = {}
    for name, x in scenarios.items():
        before = state(layer)
        try:
            layer(x)
            raised = None
        except Exception as err:
            raised = (type(err).__name__, str(err))
        same = all(torch.equal(a, b) for a, b in zip(before, state(layer), strict=True))
        out[name] = (raised, same)
    before = state(layer)
    x = torch.randn(3, 3, dtype=torch.float64)
    if rank == 0:
        x[0, 1] = float("nan")
    y = layer(x)
    out["nan on 0"] = (bool(torch.isnan(y[:, 1]).all()),
                       all(torch.equal(a, b) for a, b in zip(before, state(layer), strict=True)))
    y = layer(torch.randn(2 + rank, 3, dtype=torch.float64))  # the group still works
    out["good step"] = bool(torch.isfinite(y).all())
    return out


def ddp_worker(rank, world_size, sizes, seed):
    """A converted torch net inside DistributedDataParallel: its averaged gradients."""
    model = reference_model(seed)
    model = SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    x, target = reference_batch(seed, sum(sizes))
    start = sum(sizes[:rank])
    part = slice(start, start + sizes[rank])
    loss = ((ddp(x[part]) - target[part]) ** 2).sum()
    loss.backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters()}


def reference_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()


def reference_batch(seed, n):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(n, 5, generator=gen, dtype=torch.float64),
            torch.randn(n, 2, generator=gen, dtype=torch.float64))


def failing_worker(rank, world_size):
    if rank == 1:
        raise ArithmeticError("rank 1 gives up")
    time.sleep(60)   # rank 0 would wait for a long time: it must be stopped


def sleeping_worker(rank, world_size, seconds):
    time.sleep(seconds)
    return rank


def pid_worker(rank, world_size):
    return os.getpid()


def unpicklable_worker(rank, world_size):
    return lambda: rank   # a lambda cannot be pickled


@pytest.mark.timeout(60)
def test_a_result_that_cannot_be_sent_back_is_reported_not_lost():
    with pytest.raises(RuntimeError, match="(?s)failed.*pickle"):
        run_on_local_processes(unpicklable_worker, 2, timeout=50)


# ------------------------------------------------------------------ multi-process tests

CASES_2 = [
    {"seed": 0, "sizes": (3, 5), "channels": 4},
    {"seed": 1, "sizes": (1, 2), "channels": 3, "rest": (2, 2), "options": {"momentum": None}},
    {"seed": 2, "sizes": (4, 2), "channels": 3, "rest": (5,), "options": {"affine": False}},
    {"seed": 3, "sizes": (1, 2), "channels": 2},          # one value per channel on process 0
]
CASES_3 = [
    {"seed": 4, "sizes": (2, 0, 5), "channels": 4},       # an empty batch on process 1
    {"seed": 5, "sizes": (3, 1, 2), "channels": 3, "rest": (3, 2),
     "options": {"bias": False, "momentum": 0.3}},
    {"seed": 6, "sizes": (2, 3, 1), "channels": 2, "options": {"track_running_stats": False}},
]


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
@pytest.mark.parametrize("world_size, cases", [(2, CASES_2), (3, CASES_3)], ids=["2", "3"])
def test_sync_batch_norm_over_processes_equals_batch_norm_on_concatenated_batch(world_size,
                                                                                  cases):
    results = run_on_local_processes(compare_worker, world_size, (cases,),
                                     timeout=LAUNCH_TIMEOUT)
    for i, case in enumerate(cases):
        assert_matches_concatenated(case, [r["records"][i] for r in results])
    if os.path.isdir("/proc/self/fd"):   # Linux: every socket they listen on is 127.0.0.1's
        addresses = [a for r in results for a in r["listening"]]
        assert addresses, "found no listening socket to check"
        loopback = ("0100007F:", "0000000000000000FFFF00000100007F:")  # IPv4, IPv6-mapped
        assert all(a.startswith(loopback) for a in addresses), addresses


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_bad_input_on_one_process_raises_on_every_process_and_changes_nothing():
    results = run_on_local_processes(bad_input_worker, 2, timeout=LAUNCH_TIMEOUT)
    for rank, out in enumerate(results):
        (kind, message), same = out["wrong channels on 1"]
        assert same
        if rank == 1:
            assert kind == "ValueError" and "(4, 5)" in message and "SyncBatchNorm(3)" in message
        else:
            assert kind == "RuntimeError" and "[1]" in message
        (kind, message), same = out["integer input on 0"]
        assert same and kind == ("TypeError" if rank == 0 else "RuntimeError")
        (kind, message), same = out["one value over all"]
        assert same and kind == "ValueError" and "more than 1 value" in message
        nan_in_output, same = out["nan on 0"]
        assert nan_in_output and same, "NaN must reach the output but not the running stats"
        assert out["good step"]


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_ddp_averaged_gradients_equal_the_gradient_of_the_whole_batch():
    sizes, seed = (3, 5), 7
    grads = run_on_local_processes(ddp_worker, 2, (sizes, seed), timeout=LAUNCH_TIMEOUT)
    model = reference_model(seed)
    x, target = reference_batch(seed, sum(sizes))
    ((model(x) - target) ** 2).sum().backward()
    for name, p in model.named_parameters():
        for rank, g in enumerate(grads):   # DDP averages the local parts: 1/k of the sum
            np.testing.assert_allclose(g[name] * len(sizes), p.grad.numpy(), rtol=1e-10,
                                       atol=1e-12, err_msg=f"{name} on process {rank}")


@pytest.mark.timeout(60)
def test_a_failing_process_stops_them_all_and_reports_its_traceback():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)process 1 of 2 failed.*rank 1 gives up"):
        run_on_local_processes(failing_worker, 2, timeout=50)
    assert time.monotonic() - start < 40


@pytest.mark.timeout(60)
def test_processes_that_overrun_the_time_limit_are_killed():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="time limit"):
        run_on_local_processes(sleeping_worker, 2, (60,), timeout=5)
    assert time.monotonic() - start < 30


@pytest.mark.timeout(60)
def test_no_process_outlives_the_call():
    pids = run_on_local_processes(pid_worker, 2, timeout=50)
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_run_on_local_processes_rejects_a_world_of_no_process():
    with pytest.raises(ValueError, match="world_size"):
        run_on_local_processes(pid_worker, 0)


# ------------------------------------------------------------------ one process

OPTIONS = {
    "defaults": {}, "momentum-none": {"momentum": None}, "no-affine": {"affine": False},
    "no-bias": {"bias": False}, "no-tracking": {"track_running_stats": False},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS)
@pytest.mark.parametrize("rest", [(), (4,), (3, 2)], ids=["2d", "3d", "4d"])
def test_without_a_process_group_it_is_batch_norm(options, rest):
    case = {"seed": 11, "sizes": (6,), "channels": 3, "rest": rest, "options": options}
    ours = run_case(make_layer(SyncBatchNorm, case), case, slice(None))
    assert_matches_concatenated(case, [ours])


def test_backward_passes_gradcheck_in_float64():
    layer = SyncBatchNorm(3, dtype=torch.float64, track_running_stats=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer.eval()   # no running statistics: batch statistics in evaluation too
    assert torch.autograd.gradcheck(layer, (x,))


def test_float32_and_float16_inputs_keep_their_dtype():
    for dtype in (torch.float32, torch.float16):
        layer = SyncBatchNorm(3)
        x = (100 + torch.randn(8, 3, 4)).to(dtype)
        y = layer(x)
        ref = nn.BatchNorm1d(3)(x.float())
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, atol=2e-3 if dtype == torch.float16 else 1e-4,
                                   rtol=1e-3)


def test_state_dict_loads_both_ways_with_torch_modules():
    ours = SyncBatchNorm(4)
    ours(torch.randn(6, 4, 3, 3))
    theirs = nn.SyncBatchNorm(4)
    theirs.load_state_dict(ours.state_dict())
    for name, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], value)
    again = SyncBatchNorm(4)
    again.load_state_dict(nn.BatchNorm2d(4).state_dict())
    assert set(again.state_dict()) == set(ours.state_dict())


def test_convert_keeps_the_tensors_and_mode_of_torch_and_bncore_layers():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Sequential(nn.Flatten(), nn.Linear(12, 4), bt.BatchNorm1d(4)))
    net(torch.randn(5, 1, 4, 4))    # running statistics away from their defaults
    net[3][2].eval()
    old = [net[1], net[3][2]]
    tensors = [(m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked)
               for m in old]
    group = object()    # any object: it is only stored
    converted = SyncBatchNorm.convert_sync_batchnorm(net, process_group=group)
    assert converted is net
    new = [net[1], net[3][2]]
    for layer, before, kept in zip(new, old, tensors, strict=True):
        assert type(layer) is SyncBatchNorm and layer.process_group is group
        assert all(a is b for a, b in zip(kept, (layer.weight, layer.bias, layer.running_mean,
                                                 layer.running_var, layer.num_batches_tracked),
                                          strict=True))
        assert layer.training == before.training
        assert layer.num_features == before.num_features and layer.eps == before.eps
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[3][1], nn.Linear)


def test_convert_returns_a_new_layer_for_a_lone_batch_norm_without_bias():
    bn = nn.BatchNorm1d(3, bias=False, momentum=None, affine=True)
    converted = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(converted, SyncBatchNorm) and converted.bias is None
    assert converted.weight is bn.weight and converted.momentum is None


def test_sync_batch_norm_is_exported_by_bncore_torch():
    import bncore.distributed

    assert bt.SyncBatchNorm is bncore.distributed.SyncBatchNorm


@pytest.mark.parametrize("first", ["bncore.distributed", "bncore.torch"])
def test_either_module_can_be_imported_first(first):
    # SyncBatchNorm builds on bncore.torch's base class, and bncore.torch re-exports it: a
    # fresh interpreter, so that neither module is loaded before the one named.
    code = (f"import {first}; import bncore.distributed, bncore.torch; "
            "assert bncore.torch.SyncBatchNorm is bncore.distributed.SyncBatchNorm; "
            "assert issubclass(bncore.distributed.SyncBatchNorm, bncore.torch._BatchNorm)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ bad input, one process

def assert_unchanged(layer, before):
    assert all(torch.equal(a, b) for a, b in zip(before, state(layer), strict=True))


@pytest.mark.parametrize("bad, error, match", [
    (torch.randn(4, 5), ValueError, r"SyncBatchNorm\(3\).*\(4, 5\)"),
    (torch.randn(4), ValueError, r"\(4,\)"),
    (torch.ones(4, 3, dtype=torch.long), TypeError, "floating-point"),
    (torch.randn(1, 3), ValueError, "more than 1 value"),
    ([[1.0, 2.0, 3.0]], TypeError, "torch.Tensor"),
])
def test_bad_input_raises_a_clear_error_and_changes_nothing(bad, error, match):
    layer = SyncBatchNorm(3)
    layer(torch.randn(4, 3))
    before = state(layer)
    with pytest.raises(error, match=match):
        layer(bad)
    assert_unchanged(layer, before)


def test_non_positive_eps_is_rejected():
    with pytest.raises(ValueError, match="eps"):
        SyncBatchNorm(3, eps=0.0)
    layer = SyncBatchNorm(3)
    layer.eps = -1.0
    before = state(layer)
    with pytest.raises(ValueError, match="eps"):
        layer(torch.randn(4, 3))
    assert_unchanged(layer, before)


def test_nan_reaches_the_output_but_never_the_running_statistics():
    layer = SyncBatchNorm(3)
    layer(torch.randn(4, 3))
    before = state(layer)
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    assert torch.isnan(layer(x)[:, 0]).all()
    assert_unchanged(layer, before)


def test_an_empty_batch_counts_and_changes_no_statistic():
    layer = SyncBatchNorm(3)
    y = layer(torch.randn(0, 3))
    assert y.shape == (0, 3) and layer.num_batches_tracked.item() == 1
    assert torch.equal(layer.running_mean, torch.zeros(3))


# ------------------------------------------------------------------ CUDA

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_without_a_process_group_it_is_batch_norm():
    case = {"seed": 12, "sizes": (6,), "channels": 3, "rest": (2, 2)}
    steps, gamma, beta = case_data(case)
    ours, ref = make_layer(SyncBatchNorm, case).cuda(), make_layer(nn.BatchNorm2d, case).cuda()
    for x, dy in steps:
        outs = []
        for layer in (ours, ref):
            xc = x.cuda().requires_grad_()
            y = layer(xc)
            (y * dy.cuda()).sum().backward()
            outs.append((y, xc.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[0][1], outs[1][1])
    torch.testing.assert_close(ours.running_var, ref.running_var)


def cuda_compare_worker(rank, world_size, cases):
    """compare_worker on the GPU: gloo carries CUDA tensors too (NCCL needs a GPU per
    process)."""
    results = []
    for case in cases:
        start = sum(case["sizes"][:rank])
        part = slice(start, start + case["sizes"][rank])
        layer = make_layer(SyncBatchNorm, case).cuda()
        steps, _, _ = case_data(case)
        record = {"y": [], "dx": [], "dw": [], "db": []}
        for x_all, dy_all in steps:
            x = x_all[part].cuda().requires_grad_()
            y = layer(x)
            (y * dy_all[part].cuda()).sum().backward()
            record["y"].append(y.detach().cpu().numpy())
            record["dx"].append(x.grad.cpu().numpy())
            for key, p in (("dw", layer.weight), ("db", layer.bias)):
                record[key].append(None if p is None else p.grad.cpu().numpy().copy())
            layer.zero_grad(set_to_none=True)
        layer.eval()
        with torch.no_grad():
            record["eval"] = layer(steps[0][0][part].cuda()).cpu().numpy()
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            record[name] = getattr(layer, name).cpu().numpy()
        results.append(record)
    return results


@pytest.mark.cuda
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_two_processes_equal_batch_norm_on_concatenated_batch():
    results = run_on_local_processes(cuda_compare_worker, 2, (CASES_2[:2],),
                                     timeout=LAUNCH_TIMEOUT)
    for i, case in enumerate(CASES_2[:2]):
        assert_matches_concatenated(case, [r[i] for r in results])
