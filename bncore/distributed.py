r"""Batch normalization across processes: :class:`SyncBatchNorm`, and a way to run it on a laptop.

In data-parallel training each of k processes holds a copy of the net and 1/k of every batch.
A plain batch-norm layer then normalizes each process's part with that part's own statistics.
``SyncBatchNorm`` normalizes with the statistics of the whole batch instead, so k processes with
batches of n compute exactly what one process computes with the k n examples together:

- forward: every process computes the count, mean and sum of squared deviations of its part,
  per channel; one ``all_gather`` gives every process everybody's, and each combines them
  (Chan et al.'s parallel formula, numerically safe) into the global mean and biased variance:

  .. math::

      N = \sum_r n_r, \qquad \mu = \frac{1}{N} \sum_r n_r \mu_r, \qquad
      \sigma^2 = \frac{1}{N} \Big( \sum_r M_r + \sum_r n_r (\mu_r - \mu)^2 \Big);

  the running statistics are updated with :math:`\mu` and the unbiased
  :math:`N \sigma^2 / (N - 1)`, the same on every process;
- backward: the input gradient needs two per-channel sums over the whole batch,
  :math:`\sum dy` and :math:`\sum dy\,(x - \mu)`; one ``all_reduce`` adds up the processes'
  parts. The weight and bias gradients stay local (each process's part of the sum), as in
  ``torch.nn.SyncBatchNorm``: data-parallel training averages the parameter gradients over the
  processes anyway.

Per-process batches may differ in size (even be empty). Synchronization happens only in
training mode, and only when ``torch.distributed`` is initialized with more than one process in
the group; otherwise the layer is an ordinary batch norm. Unlike torch's, it runs on CPU
(backend ``gloo``) as well as on CUDA (``nccl``).

:func:`run_on_local_processes` starts k processes on this machine, joins them in a ``gloo``
process group that listens on 127.0.0.1 only, runs a function in each and returns what they
return; it stops them all within a time limit, whatever happens.
"""

from __future__ import annotations

import datetime
import operator
import os
import pickle
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.types import Device

from bncore.torch import _BatchNorm, _channel_view, _compute_dtype, _reduce_dims

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue

__all__ = ["SyncBatchNorm", "run_on_local_processes"]

T = TypeVar("T")


# ------------------------------------------------------------------ statistics

def _local_moments(x: torch.Tensor, channels: int) -> torch.Tensor:
    """[count, mean (C), sum of squared deviations (C)] of this process's part, float64.

    Two passes in the compute dtype (mean first, then squared deviations from it).
    """
    count = x.numel() // channels if channels else 0
    out = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=x.device)
    out[0] = count
    if count:
        xc = x.to(_compute_dtype(x.dtype))
        mean = xc.mean(_reduce_dims(x))
        m2 = (xc - _channel_view(mean, x)).square().sum(_reduce_dims(x))
        out[1:1 + channels] = mean.double()
        out[1 + channels:] = m2.double()
    return out


def _combine_moments(moments: torch.Tensor,
                     channels: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(N, mean, biased var) of the union of the parts: moments is (k, 1 + 2C), one row per
    process as made by :func:`_local_moments`. N is a Python int; mean and var (C,) float64."""
    counts = moments[:, 0]
    means, m2 = moments[:, 1:1 + channels], moments[:, 1 + channels:]
    total = int(counts.sum().item())
    if total == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=moments.device)
        return 0, zeros, zeros
    weights = (counts / total)[:, None]
    mean = (weights * means).sum(0)
    spread = m2.sum(0) + (counts[:, None] * (means - mean).square()).sum(0)
    return total, mean, spread / total


# ------------------------------------------------------------------ the autograd function

class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias, with the backward of batch norm whose
    statistics were taken over `count` values spread over the processes of `group`.

    apply(input, weight, bias, mean, invstd, count, group, batch_stats): mean and invstd are
    (C,) in the compute dtype; group is None when the batch is all on this process;
    batch_stats=False means the statistics are constants (evaluation with running stats).
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        count: int,
        group: dist.ProcessGroup | None,
        batch_stats: bool,
    ) -> torch.Tensor:
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(invstd.dtype)
        out = input.to(invstd.dtype) * _channel_view(scale, input) + _channel_view(shift, input)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.count, ctx.group, ctx.batch_stats = count, group, batch_stats
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        cdtype, dims = invstd.dtype, _reduce_dims(input)
        dy = grad_output.to(cdtype)
        xmu = input.to(cdtype) - _channel_view(mean, input)
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)  # this process's parts
        scale = invstd if weight is None else invstd * weight.to(cdtype)
        grad_input = grad_weight = grad_bias = None
        if need_input and ctx.batch_stats:
            total_dy, total_dy_xmu = sum_dy, sum_dy_xmu
            if ctx.group is not None:  # the mean and variance came from every process's x
                both = torch.cat([sum_dy, sum_dy_xmu])
                dist.all_reduce(both, dist.ReduceOp.SUM, group=ctx.group)
                total_dy, total_dy_xmu = both.split(len(sum_dy))
            n = max(ctx.count, 1)
            grad_input = _channel_view(scale, input) * (
                dy - _channel_view(total_dy / n, input)
                - xmu * _channel_view(invstd * invstd * total_dy_xmu / n, input))
            grad_input = grad_input.to(input.dtype)
        elif need_input:
            grad_input = (dy * _channel_view(scale, input)).to(input.dtype)
        if need_weight:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)  # local: DDP averages it
        if need_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


# ------------------------------------------------------------------ the module

class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over the whole batch of every process of a group;
    a drop-in for :class:`torch.nn.SyncBatchNorm` that also runs on CPU (``gloo``).

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, E and Var are the mean and biased variance of channel c over every example
    (and position) of every process in ``process_group``; see the module docstring for what
    is exchanged. Each process's ``weight.grad`` and ``bias.grad`` are its own part of the
    gradient; summed over the processes (or averaged, by DistributedDataParallel) they are
    the gradient of the whole batch. The running statistics use the global count N (the
    running variance is N / (N - 1) times the global biased variance) and agree on every
    process. Outside training, or without an initialized process group of more than one
    process, it is ordinary batch norm.

    Args: as :class:`torch.nn.SyncBatchNorm`: ``num_features`` (C), ``eps`` (must be > 0),
        ``momentum`` (None: cumulative average), ``affine``, ``track_running_stats``,
        ``process_group`` (None: the whole world), ``device``, ``dtype``, ``bias``.

    Shape: input (N, C, *), N may differ between processes and may be 0 on some; output the
    same shape and dtype.

    Bad input raises before anything changes, on every process of the group: a process whose
    input is rejected (wrong dimensions or channels, integer dtype) still takes part in the
    exchange, so that the others raise a RuntimeError naming it instead of waiting for it.
    A batch of one value per channel over all processes raises ValueError everywhere. A step
    whose global statistics are not finite leaves the running statistics and
    ``num_batches_tracked`` as they were, on every process.
    """

    process_group: dist.ProcessGroup | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: dist.ProcessGroup | None = None, device: Device = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True) -> None:
        num_features = operator.index(num_features)
        if num_features < 0:
            raise ValueError(f"num_features must be >= 0, got {num_features}")
        # The parameters, buffers, their reset and the eps check: bncore.torch's base class.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.process_group = process_group

    # -------------------------------------------------------------- checks

    def _problem_with(self, input: object) -> Exception | None:
        """The error that this input deserves, or None; raised by the caller, after the
        other processes have been told."""
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            return TypeError(f"{name} expects a torch.Tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            return TypeError(f"{name} expects floating-point input, got {input.dtype}; "
                             "convert it first, e.g. input.float()")
        if input.dim() < 2 or input.shape[1] != self.num_features:
            return ValueError(
                f"{name}({self.num_features}) expects input of shape (N, "
                f"{self.num_features}, *), got input of shape {tuple(input.shape)}")
        if not self.eps > 0:
            return ValueError(f"{name} eps must be positive, got {self.eps}")
        return None

    def _sync_group(self) -> dist.ProcessGroup | None:
        """The process group to synchronize over, or None for ordinary batch norm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if group is dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("SyncBatchNorm: this process is not a member of its process_group")
        return group if dist.get_world_size(group) > 1 else None

    # -------------------------------------------------------------- forward

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        problem = self._problem_with(input)
        group = self._sync_group()
        if problem is not None and group is None:
            raise problem
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:  # evaluation with the running statistics: nothing to share
            assert self.running_mean is not None and self.running_var is not None
            cdtype = _compute_dtype(input.dtype)
            mean = self.running_mean.to(cdtype, copy=True)
            invstd = torch.rsqrt(self.running_var.to(cdtype) + self.eps)
            return _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, invstd,
                                                0, None, False)
        count, mean, var = self._batch_statistics(input, problem, group)
        if self.training and self.track_running_stats:
            self._update_running_stats(count, mean, var)
        cdtype = _compute_dtype(input.dtype)
        invstd = torch.rsqrt(var + self.eps).to(cdtype)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean.to(cdtype),
                                            invstd, count, group, True)

    def _batch_statistics(
        self, input: torch.Tensor, problem: Exception | None, group: dist.ProcessGroup | None
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(N, mean, biased var) over the batch of every process in group (or of this one)."""
        channels = self.num_features
        with torch.no_grad():
            if problem is None:
                mine = _local_moments(input, channels)
            else:
                device = input.device if isinstance(input, torch.Tensor) else "cpu"
                mine = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=device)
            flag = torch.tensor([0.0 if problem is None else 1.0], dtype=torch.float64,
                                device=mine.device)
            payload = torch.cat([flag, mine])
            if group is None:
                everyone = payload[None]
            else:
                parts = [torch.empty_like(payload) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, payload, group=group)
                everyone = torch.stack(parts)
        if problem is not None:
            raise problem
        rejected = torch.nonzero(everyone[:, 0]).flatten().tolist()
        if rejected:
            raise RuntimeError(
                f"SyncBatchNorm: the input of process(es) {rejected} of the group was "
                "rejected there, so this step was abandoned on every process")
        count, mean, var = _combine_moments(everyone[:, 1:], channels)
        if count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input of shape "
                f"{tuple(input.shape)}" + (" (1 value over all processes)" if group else ""))
        return count, mean, var

    @torch.no_grad()
    def _update_running_stats(self, count: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        # Tensors: called with track_running_stats=True only, under which __init__ registered them.
        assert self.num_batches_tracked is not None
        if count == 0:  # an empty batch counts, as in torch, but has no statistics
            self.num_batches_tracked.add_(1)
            return
        unbiased = var * (count / (count - 1))
        if not (torch.isfinite(mean).all() and torch.isfinite(unbiased).all()):
            return  # the same decision on every process: they all see the same statistics
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.item()
        else:
            factor = self.momentum
        assert self.running_mean is not None and self.running_var is not None
        for running, stat in ((self.running_mean, mean), (self.running_var, unbiased)):
            running.mul_(1 - factor).add_(stat.to(running.dtype), alpha=factor)

    # -------------------------------------------------------------- conversion

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module,
                               process_group: dist.ProcessGroup | None = None) -> nn.Module:
        """Replace every batch-norm layer in module by a SyncBatchNorm, as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: torch's BatchNorm1d/2d/3d and
        SyncBatchNorm, bncore.torch's BatchNorm1d/2d and this class. The new layer takes over
        the old one's parameters and buffers (the same tensors: their values, running
        statistics and num_batches_tracked are kept) and its train/eval mode. Returns the
        module, or the new layer if module itself was a batch-norm layer.
        """
        converted = module
        # torch's batch-norm layers, and bncore.torch's (this class among them).
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm)):
            # torch's layers have the attributes that bncore.torch's base class declares (and
            # nn.Module does not).
            old = cast(_BatchNorm, module)
            converted = cls(old.num_features, old.eps, old.momentum, old.affine,
                            old.track_running_stats, process_group,
                            bias=getattr(module, "bias", None) is not None)
            if old.affine:
                converted.weight = old.weight
                converted.bias = old.bias
            converted.running_mean = old.running_mean
            converted.running_var = old.running_var
            converted.num_batches_tracked = old.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


# ------------------------------------------------------------------ k processes on one machine

# What a process of run_on_local_processes reports: (rank, True, its pickled result) or
# (rank, False, the traceback of its error).
_Report = tuple[int, Literal[True], bytes] | tuple[int, Literal[False], str]


def _loopback_interface() -> str:
    return "lo0" if sys.platform == "darwin" else "lo"


def _process_main(fn: Callable[..., object], rank: int, world_size: int, port: int,
                  timeout: float, args: tuple[Any, ...], results: Queue[_Report]) -> None:
    """One process of run_on_local_processes: join the group, run fn, report, leave."""
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()  # gloo listens on 127.0.0.1 only
    torch.set_num_threads(1)
    try:
        limit = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=limit)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=limit)
        try:
            # pickled here, not in the queue's feeder thread, so that an unpicklable result
            # is reported as this process's error instead of being lost
            results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_on_local_processes(fn: Callable[..., T], world_size: int, args: tuple[Any, ...] = (),
                           timeout: float = 120.0) -> list[T]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined in a gloo
    process group on this machine, and return their results, in rank order.

    Everything listens on 127.0.0.1 only: the rendezvous store (on a port the system picks)
    and gloo's connections. fn must be importable (defined at the top level of a module: the
    processes are started with "spawn") and return something picklable. Each process uses one
    thread. If a process raises, the others are stopped and RuntimeError carries its
    traceback; if they have not all finished after ``timeout`` seconds, all are killed and
    TimeoutError is raised. No process outlives the call.
    """
    import multiprocessing

    world_size = operator.index(world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    context = multiprocessing.get_context("spawn")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    processes: list[BaseProcess] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(world_size)
        port = listener.getsockname()[1]
        limit = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, timeout=limit,
                              wait_for_workers=False, master_listen_fd=listener.fileno())
        listener.detach()  # the store owns the socket now, and closes it when it goes
        results: Queue[_Report] = context.Queue()
        processes = [context.Process(target=_process_main, daemon=True,
                                     args=(fn, rank, world_size, port, timeout, args, results))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        out = _collect(results, processes, time.monotonic() + timeout)
        del store
        return out
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        listener.close()


def _collect(results: Queue[_Report], processes: Sequence[BaseProcess],
             deadline: float) -> list[Any]:
    """Each process's result in rank order; raises as soon as one fails, dies or is late."""
    out: dict[int, object] = {}
    while len(out) < len(processes):
        try:
            report = results.get(timeout=0.05)
        except queue_module.Empty:
            dead = [r for r, p in enumerate(processes) if r not in out and p.exitcode not in
                    (None, 0)]
            if dead:
                _stop(processes)
                raise RuntimeError(f"process {dead[0]} died with exit code "
                                   f"{processes[dead[0]].exitcode} before it reported") from None
            if time.monotonic() > deadline:
                _stop(processes)
                missing = sorted(set(range(len(processes))) - set(out))
                raise TimeoutError(f"processes {missing} had not finished when the time limit "
                                   "ran out; all were stopped") from None
            continue
        rank = report[0]
        if not report[1]:  # then report[2] is the traceback
            _stop(processes)
            raise RuntimeError(f"process {rank} of {len(processes)} failed:\n{report[2]}")
        out[rank] = pickle.loads(report[2])
    return [out[rank] for rank in range(len(processes))]


def _stop(processes: Sequence[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
