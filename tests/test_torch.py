"""bncore.torch against PyTorch's own batch normalization, gradcheck and properties.

Every test runs on each device: "cuda" is reported as skipped where there is none. The
references are built only with what the installed torch has (torch.nn.BatchNorm*d takes
``bias=`` from 2.13 on, and some versions' CUDA kernels refuse a weight without a bias), so
the tests pass on the pinned torch and on older CUDA builds alike.

The fused Triton kernels are tested on CUDA, and, where there is no GPU but Triton is
installed, on CPU tensors through Triton's interpreter.
"""

import functools
import importlib.util
import inspect
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import bncore.torch as bt
from benchmarks.bench_bncore import aten_operations, module_step

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Without a GPU, Triton's interpreter runs the fused kernels on CPU tensors. It has to be
# chosen before Triton is first imported, and it holds for the whole process: so only here.
if HAS_TRITON and not HAS_CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = HAS_TRITON and not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1"

# What the installed torch offers, for building the references.
TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.BatchNorm1d.__init__).parameters
TORCH_REPR_HAS_BIAS = "bias=" in repr(torch.nn.BatchNorm1d(1))

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")],
    ),
]
on_devices = pytest.mark.parametrize("device", DEVICES)
# The two ways the fused kernels cut the work (bncore._triton.force_split)
PATHS = [False, True]  # bncore._triton.force_split
PATH_IDS = ["channel-blocks", "split"]

TOLERANCE = {  # (rtol, atol) against PyTorch
    torch.float64: (1e-9, 1e-11),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
    torch.int64: (0, 0),
}

# (our class, PyTorch's class, input shape)
MODULES = [
    (bt.BatchNorm1d, torch.nn.BatchNorm1d, (16, 5)),
    (bt.BatchNorm1d, torch.nn.BatchNorm1d, (6, 5, 7)),
    (bt.BatchNorm2d, torch.nn.BatchNorm2d, (4, 5, 3, 6)),
]
MODULE_IDS = ["1d-(N,C)", "1d-(N,C,L)", "2d-(N,C,H,W)"]

OPTIONS = [
    {},
    {"momentum": None},
    {"momentum": 0.5, "eps": 1e-3},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
]
OPTION_IDS = [",".join(f"{k}={v}" for k, v in o.items()) or "default" for o in OPTIONS]


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The tensors here are tiny: threads only add start-up and contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def torch_takes_half_affine(device: str) -> bool:
    """Whether F.batch_norm on this device takes a weight without a bias and a bias without a
    weight (the CUDA kernels of some torch versions refuse both)."""
    x, one = torch.ones(4, 2, device=device), torch.ones(2, device=device)
    try:
        F.batch_norm(x, None, None, one, None, training=True)
        F.batch_norm(x, None, None, None, one, training=True)
    except Exception:  # a probe: whatever the refusal raises
        return False
    return True


def reference_batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5):
    """F.batch_norm, with a constant 1 (or 0) for the missing weight (or bias) where this
    torch refuses one without the other: the same function of x and of the other one."""
    if (weight is None) != (bias is None) and not torch_takes_half_affine(x.device.type):
        if weight is None:
            weight = torch.ones_like(bias).detach()
        else:
            bias = torch.zeros_like(weight).detach()
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def torch_module(torch_cls, num_features, device, dtype=None, **options):
    """PyTorch's module with these options. ``bias=False`` on a torch without that argument
    (or whose kernels refuse it) is built as an affine module whose bias is a constant 0."""
    no_bias = options.get("bias", True) is False
    if no_bias and not (TORCH_HAS_BIAS_ARG and torch_takes_half_affine(device)):
        options = {k: v for k, v in options.items() if k != "bias"}
        module = torch_cls(num_features, device=device, dtype=dtype, **options)
        module.bias.requires_grad_(False)  # stays 0: never trained, never randomized
        return module
    return torch_cls(num_features, device=device, dtype=dtype, **options)


def needs_torch_bias_arg(options):
    if options.get("bias", True) is False and not TORCH_HAS_BIAS_ARG:
        pytest.skip("torch.nn.BatchNorm*d has no bias argument before torch 2.13")


def assert_close(actual, expected, dtype=None):
    if expected is None:
        assert actual is None
        return
    rtol, atol = TOLERANCE[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def module_pair(ours_cls, torch_cls, device, dtype=torch.float32, **options):
    """Our module and PyTorch's, with the same random parameters and running statistics."""
    gen = torch.Generator().manual_seed(0)
    theirs = torch_module(torch_cls, 5, device, dtype, **options)
    with torch.no_grad():
        for t in (theirs.weight, theirs.bias, theirs.running_mean):
            if t is not None and (t.requires_grad or t is theirs.running_mean):
                t.copy_(torch.randn(t.shape, generator=gen))
        if theirs.running_var is not None:
            theirs.running_var.copy_(torch.rand(5, generator=gen) + 0.5)
    ours = ours_cls(5, device=device, dtype=dtype, **options)
    names = ours.state_dict().keys()  # without a stand-in bias
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if k in names})
    return ours, theirs


def run_step(module, x, dy):
    """Output and the gradients of (output * dy).sum() for input, weight and bias."""
    x = x.clone().requires_grad_()
    module.zero_grad()
    out = module(x)
    out.backward(dy)
    grad = lambda t: None if t is None else t.grad  # noqa: E731
    return out.detach(), x.grad, grad(module.weight), grad(module.bias)


def assert_same_state(ours, theirs, dtype=None):
    for name in ("running_mean", "running_var"):
        assert_close(getattr(ours, name), getattr(theirs, name), dtype)
    if theirs.num_batches_tracked is None:
        assert ours.num_batches_tracked is None
    else:
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


# ----------------------------------------------------------------------------------------
# Against torch.nn and torch.nn.functional
# ----------------------------------------------------------------------------------------


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), MODULES, ids=MODULE_IDS)
def test_module_matches_torch_in_training_then_eval(
    ours_cls, torch_cls, shape, options, dtype, device
):
    ours, theirs = module_pair(ours_cls, torch_cls, device, dtype, **options)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        if step == 3:
            ours.eval()
            theirs.eval()
        x = (3 * torch.randn(shape, generator=gen) + 2).to(device, dtype)
        dy = torch.randn(shape, generator=gen).to(device, dtype)
        for a, b in zip(run_step(ours, x, dy), run_step(theirs, x, dy), strict=True):
            assert_close(a, b)
        assert_same_state(ours, theirs)


@on_devices
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("module_dtype", ["float32", "same"])
@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), MODULES, ids=MODULE_IDS)
def test_low_precision_input_keeps_its_dtype(
    ours_cls, torch_cls, shape, module_dtype, dtype, device
):
    param_dtype = torch.float32 if module_dtype == "float32" else dtype
    ours, theirs = module_pair(ours_cls, torch_cls, device, param_dtype)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        if step == 2:
            ours.eval()
            theirs.eval()
        x = (3 * torch.randn(shape, generator=gen) + 2).to(device, dtype)
        dy = torch.randn(shape, generator=gen).to(device, dtype)
        out, dx, dw, db = run_step(ours, x, dy)
        expected = run_step(theirs, x, dy)
        assert out.dtype == dx.dtype == dtype
        assert dw.dtype == db.dtype == param_dtype
        for a, b in zip((out, dx, dw, db), expected, strict=True):
            assert_close(a.float(), b.float(), dtype)
        assert_same_state(ours, theirs, dtype)


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(16, 5), (6, 5, 7), (4, 5, 3, 6)])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("mode", ["train", "train-no-stats", "eval"])
def test_functional_matches_torch(mode, affine, shape, dtype, device):
    gen = torch.Generator().manual_seed(3)
    make = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    x, dy = 3 * make(*shape) + 2, make(*shape)
    weight = make(5).requires_grad_() if "weight" in affine else None
    bias = make(5).requires_grad_() if "bias" in affine else None
    stats = [make(5), make(5).abs() + 0.5] if mode != "train-no-stats" else [None, None]
    theirs_stats = [None if s is None else s.clone() for s in stats]
    training = mode != "eval"
    results = []
    for fn, (rm, rv) in ((bt.batch_norm, stats), (reference_batch_norm, theirs_stats)):
        xg = x.clone().requires_grad_()
        out = fn(xg, rm, rv, weight, bias, training, 0.3, 1e-4)
        inputs = [t for t in (xg, weight, bias) if t is not None]
        results.append((out, *torch.autograd.grad(out, inputs, dy), rm, rv))
    for a, b in zip(*results, strict=True):
        assert_close(a, b)


@on_devices
def test_channels_last_input_keeps_its_memory_format(device):
    x = torch.randn(4, 6, 5, 3, device=device).contiguous(memory_format=torch.channels_last)
    ours, theirs = bt.BatchNorm2d(6, device=device), torch.nn.BatchNorm2d(6, device=device)
    out = ours(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, theirs(x))
    assert_same_state(ours, theirs)


@on_devices
def test_non_contiguous_input_and_expanded_gradient(device):
    base = torch.randn(7, 12, device=device, dtype=torch.float64)
    x = base.t()[:, ::2]  # (12, 4) with strides (1, 24)
    w = torch.randn(4, device=device, dtype=torch.float64)
    grads = []
    for fn in (bt.batch_norm, reference_batch_norm):
        xg = x.detach().requires_grad_()
        fn(xg, None, None, w, None, True).pow(3).sum().backward()
        grads.append(xg.grad)
        xg.grad = None
        fn(xg, None, None, w, None, True).sum().backward()  # an expanded (stride 0) gradient
        grads.append(xg.grad)
    assert_close(grads[0], grads[2])
    assert_close(grads[1], grads[3])


@pytest.mark.parametrize("block_elements", [1, 7, 50, 200])
@pytest.mark.parametrize("channels_last", [False, True])
def test_block_by_block_passes_agree_with_torch(block_elements, channels_last, monkeypatch):
    # CPU only, as the blocks are: whole samples, or a sample cut along its channels (or its
    # rows, for channels_last). Uneven blocks must not change anything.
    monkeypatch.setattr(bt, "_BLOCK_ELEMENTS", block_elements)
    for ours_cls, torch_cls, shape in MODULES:
        ours, theirs = module_pair(ours_cls, torch_cls, "cpu", torch.float64)
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        dy = torch.randn(shape, dtype=torch.float64)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for a, b in zip(run_step(ours, x, dy), run_step(theirs, x, dy), strict=True):
            assert_close(a, b)
        assert_same_state(ours, theirs)


# ----------------------------------------------------------------------------------------
# The module interface: state dicts, reset, repr
# ----------------------------------------------------------------------------------------


@on_devices
@pytest.mark.parametrize("options", OPTIONS[:1] + OPTIONS[3:], ids=OPTION_IDS[:1] + OPTION_IDS[3:])
@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), MODULES[1:], ids=MODULE_IDS[1:])
def test_state_dict_loads_both_ways(ours_cls, torch_cls, shape, options, device):
    needs_torch_bias_arg(options)
    x = torch.randn(shape, device=device)
    trained_theirs = torch_cls(5, device=device, **options)
    trained_ours = ours_cls(5, device=device, **options)
    for _ in range(2):
        trained_theirs(x * 2 + 1)
        trained_ours(x * 2 + 1)
    fresh_ours = ours_cls(5, device=device, **options)
    fresh_theirs = torch_cls(5, device=device, **options)
    fresh_ours.load_state_dict(trained_theirs.state_dict())  # strict: same names and shapes
    fresh_theirs.load_state_dict(trained_ours.state_dict())
    assert trained_ours.state_dict().keys() == trained_theirs.state_dict().keys()
    for ours, theirs in ((fresh_ours, trained_theirs), (trained_ours, fresh_theirs)):
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for key, value in ours.state_dict().items():
            assert value.dtype == theirs.state_dict()[key].dtype
            assert_close(value, theirs.state_dict()[key])
        assert_close(ours.eval()(x), theirs.eval()(x))


@on_devices
def test_state_dict_from_before_num_batches_tracked_loads(device):
    # PyTorch's version-1 state dicts have no num_batches_tracked; they load with 0.
    state = torch.nn.BatchNorm1d(5, device=device).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    ours = bt.BatchNorm1d(5, device=device)
    ours.num_batches_tracked.fill_(3)
    ours.load_state_dict(state)
    assert ours.num_batches_tracked.item() == 0


@on_devices
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_repr_parameters_and_buffers_match_torch(options, device):
    needs_torch_bias_arg(options)
    pairs = ((bt.BatchNorm1d, torch.nn.BatchNorm1d), (bt.BatchNorm2d, torch.nn.BatchNorm2d))
    for ours_cls, torch_cls in pairs:
        ours = ours_cls(5, device=device, **options)
        theirs = torch_cls(5, device=device, **options)
        ours_repr = repr(ours)
        if not TORCH_REPR_HAS_BIAS:  # torch before 2.13 does not print it
            ours_repr = ours_repr.replace(f", bias={ours.bias is not None}", "")
        assert ours_repr == repr(theirs)
        describe = lambda named: [(n, t.shape, t.dtype, t.device) for n, t in named]  # noqa: E731
        assert describe(ours.named_parameters()) == describe(theirs.named_parameters())
        assert describe(ours.named_buffers()) == describe(theirs.named_buffers())


@on_devices
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_counts_but_changes_no_statistic_like_torch(momentum, device):
    ours, theirs = (cls(3, momentum=momentum, device=device)
                    for cls in (bt.BatchNorm1d, torch.nn.BatchNorm1d))
    x = torch.randn(6, 3, device=device)
    for m in (ours, theirs):
        m(torch.empty(0, 3, device=device))
        m(x)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@on_devices
def test_reset_running_stats_and_parameters(device):
    m = bt.BatchNorm1d(5, device=device)
    m(torch.randn(8, 5, device=device) * 3 + 1)
    with torch.no_grad():
        m.weight.mul_(2)
        m.bias.add_(1)
    m.reset_running_stats()
    fresh = torch.nn.BatchNorm1d(5, device=device)
    assert torch.equal(m.running_mean, fresh.running_mean)
    assert torch.equal(m.running_var, fresh.running_var)
    assert m.num_batches_tracked.item() == 0
    assert not torch.equal(m.weight, fresh.weight)
    m.reset_parameters()
    assert torch.equal(m.weight, fresh.weight) and torch.equal(m.bias, fresh.bias)


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------


@on_devices
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 2, 4)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(shape, training, device):
    gen = torch.Generator().manual_seed(4)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    x, w, b = (t.requires_grad_() for t in (make(*shape) * 2 + 1, make(3), make(3)))
    rm, rv = make(3), make(3).abs() + 0.5

    def fn(x, w, b):
        return bt.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)

    assert torch.autograd.gradcheck(fn, (x, w, b))


@on_devices
def test_double_backward_is_refused(device):
    x = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    out = bt.batch_norm(x, None, None, training=True)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------
# Bad input: a clear error, raised before any state changes (design.md's table)
# ----------------------------------------------------------------------------------------


@on_devices
@pytest.mark.parametrize(
    ("cls", "shape"),
    [(bt.BatchNorm1d, (4, 5, 3, 2)), (bt.BatchNorm1d, (5,)), (bt.BatchNorm2d, (4, 5, 3))],
)
def test_wrong_number_of_dimensions_raises_naming_both_shapes(cls, shape, device):
    m = cls(5, device=device)
    before = state_of(m)
    with pytest.raises(ValueError) as info:
        m(torch.randn(shape, device=device))
    assert str(shape) in str(info.value)
    assert cls._input_shapes in str(info.value)
    assert_state_unchanged(m, before)


@on_devices
def test_wrong_channel_count_raises_naming_both_shapes(device):
    m = bt.BatchNorm2d(5, device=device)
    before = state_of(m)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(4, 6, 3, 3\)"):
        m(torch.randn(4, 6, 3, 3, device=device))
    assert_state_unchanged(m, before)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    with pytest.raises(ValueError, match=r"\(4, 6\).*\(5,\)"):
        bt.batch_norm(torch.randn(4, 6, device=device), rm, rv, training=True)
    assert rm.eq(0).all() and rv.eq(1).all()


@on_devices
@pytest.mark.parametrize(
    ("ours_cls", "torch_cls", "shape"),
    [
        (bt.BatchNorm1d, torch.nn.BatchNorm1d, (1, 5)),
        (bt.BatchNorm1d, torch.nn.BatchNorm1d, (1, 5, 1)),
        (bt.BatchNorm2d, torch.nn.BatchNorm2d, (1, 5, 1, 1)),
    ],
)
def test_one_value_per_channel_in_training_raises(ours_cls, torch_cls, shape, device):
    ours, theirs = module_pair(ours_cls, torch_cls, device)
    before = state_of(ours)
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(x)
    assert_state_unchanged(ours, before)
    # Evaluation uses the running statistics: one value per channel is fine, as in PyTorch.
    assert_close(ours.eval()(x), theirs.eval()(x))


@on_devices
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_raises_type_error(dtype, device):
    m = bt.BatchNorm1d(5, device=device)
    before = state_of(m)
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(4, 5, dtype=dtype, device=device))
    assert_state_unchanged(m, before)


@on_devices
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_non_positive_eps_raises(eps, device):
    with pytest.raises(ValueError, match="eps"):
        bt.BatchNorm1d(5, eps=eps)
    m = bt.BatchNorm1d(5, device=device)
    m.eps = eps  # set after construction: caught at the forward, before the state changes
    before = state_of(m)
    with pytest.raises(ValueError, match="eps"):
        m(torch.randn(4, 5, device=device))
    assert_state_unchanged(m, before)
    with pytest.raises(ValueError, match="eps"):
        bt.batch_norm(torch.randn(4, 5, device=device), m.running_mean, m.running_var, eps=eps)


@on_devices
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_non_finite_input_reaches_output_but_not_running_stats(bad, momentum, device):
    ours, theirs = module_pair(bt.BatchNorm1d, torch.nn.BatchNorm1d, device, momentum=momentum)
    x = torch.randn(8, 5, device=device)
    ours(x), theirs(x)  # one good step first
    before = state_of(ours)
    x_bad = torch.randn(8, 5, device=device)
    x_bad[3, 1] = bad
    out = ours(x_bad)
    assert out[:, 1].isnan().all()
    assert_close(out[:, [0, 2, 3, 4]], theirs(x_bad)[:, [0, 2, 3, 4]])
    assert_state_unchanged(ours, before)
    assert theirs.running_mean[1].isnan() or theirs.running_var[1].isnan()  # PyTorch's, poisoned
    ours(x), theirs.load_state_dict(before), theirs(x)  # and the next good step carries on
    assert_same_state(ours, theirs)


@on_devices
def test_non_finite_step_leaves_functional_running_stats_unchanged(device):
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    x = torch.randn(8, 5, device=device)
    x[0, 0] = float("nan")
    bt.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@on_devices
def test_evaluation_without_running_stats_raises_like_torch(device):
    x = torch.randn(4, 5, device=device)
    with pytest.raises(RuntimeError):  # the type as torch; its message depends on the device
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        bt.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="both be None"):
        bt.batch_norm(x, torch.zeros(5, device=device), None, training=True)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
@pytest.mark.cuda
@pytest.mark.parametrize("split", [None, False, True], ids=["plain", *PATH_IDS])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_step_does_not_synchronize_with_the_host(momentum, split, monkeypatch):
    if split is None:
        monkeypatch.setattr(bt, "use_fused", False)
    elif HAS_TRITON:
        from bncore import _triton

        monkeypatch.setattr(_triton, "force_split", split)
    else:
        pytest.skip("needs Triton")
    m = bt.BatchNorm2d(5, momentum=momentum, device="cuda")
    x = torch.randn(4, 5, 3, 3, device="cuda", requires_grad=True)
    m(x)  # warm up (lazy imports, kernel compilation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------


@on_devices
@pytest.mark.parametrize(
    ("dtype", "offset", "out_atol", "var_rtol"),
    [(torch.float64, 1e8, 1e-6, 1e-12), (torch.float32, 1e4, 2e-3, 1e-5)],
)
def test_large_offset_does_not_destroy_the_statistics(dtype, offset, out_atol, var_rtol, device):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(256, 4, 9, generator=gen, dtype=torch.float64) + offset).to(dtype)
    exact = x.double()  # the same numbers, normalized in float64 around their exact mean
    mean = exact.mean((0, 2), keepdim=True)
    var = (exact - mean).pow(2).mean((0, 2), keepdim=True)
    expected = (exact - mean) / torch.sqrt(var + 1e-5)
    rm, rv = torch.zeros(4, device=device, dtype=dtype), torch.zeros(4, device=device, dtype=dtype)
    out = bt.batch_norm(x.to(device), rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=out_atol)
    unbiased = var.flatten() * x[:, 0].numel() / (x[:, 0].numel() - 1)
    torch.testing.assert_close(rv.double().cpu(), unbiased, rtol=var_rtol, atol=0)
    torch.testing.assert_close(rm.double().cpu(), mean.flatten(), rtol=0, atol=out_atol)
    # The one-pass formula E[x^2] - E[x]^2 would lose the variance completely here:
    one_pass = (x.pow(2).mean((0, 2)) - x.mean((0, 2)).pow(2)).double()
    assert (one_pass - var.flatten()).abs().max() > 0.5


# ----------------------------------------------------------------------------------------
# Host work per call: the CPU proxy
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "shape"), [(bt.BatchNorm2d, (8, 16, 4, 4)),
                                            (bt.BatchNorm1d, (64, 16))], ids=["2d", "1d"])
def test_plain_training_step_takes_at_most_30_aten_operations(cls, shape):
    # A tiny batch costs what its operations cost to dispatch, one by one: PyTorch's own
    # training step takes 3 (native_batch_norm, its backward, an empty). Counted as the
    # benchmark's CPU proxy counts them.
    assert aten_operations(module_step(cls, shape)) <= 30


# ----------------------------------------------------------------------------------------
# Properties (hypothesis)
# ----------------------------------------------------------------------------------------

shapes = st.sampled_from([(2, 3), (5, 1), (7, 4), (3, 2, 5), (2, 3, 4, 4), (5, 2, 1, 3)])
seeds = st.integers(0, 2**31 - 1)


@on_devices
@settings(deadline=None, max_examples=25)
@given(shape=shapes, seed=seeds, a=st.floats(0.1, 100.0), b=st.floats(-1e3, 1e3))
def test_normalizing_a_x_plus_b_gives_the_same_output(shape, seed, a, b, device):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x.to(device)
    plain = bt.batch_norm(x, None, None, training=True, eps=1e-12)
    # eps scales with the variance (a^2): the invariance is exact, even for a channel whose
    # variance is near eps.
    moved = bt.batch_norm(a * x + b, None, None, training=True, eps=1e-12 * a * a)
    torch.testing.assert_close(moved, plain, rtol=1e-6, atol=1e-6)


@on_devices
@settings(deadline=None, max_examples=25)
@given(shape=shapes, seed=seeds, scale=st.floats(1e-2, 1e3))
def test_training_output_has_zero_mean_and_unit_variance(shape, seed, scale, device):
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    out = bt.batch_norm(x.to(device), None, None, training=True, eps=1e-5)
    dims = [0, *range(2, x.dim())]
    var = x.var(dims, unbiased=False).to(device)
    torch.testing.assert_close(out.mean(dims), torch.zeros_like(var), rtol=0, atol=1e-9)
    expected_var = var / (var + 1e-5)  # eps shrinks it a little below 1
    torch.testing.assert_close(out.var(dims, unbiased=False), expected_var, rtol=1e-9, atol=1e-12)


@on_devices
@settings(deadline=None, max_examples=30)
@given(
    shape=shapes,
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    training=st.booleans(),
    channels_last=st.booleans(),
)
def test_shape_dtype_and_memory_format_are_preserved(shape, dtype, training, channels_last, device):
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    cls = bt.BatchNorm2d if x.dim() == 4 else bt.BatchNorm1d
    m = cls(shape[1], device=device).train(training)
    out = m(x)
    out.backward(torch.ones_like(out))
    assert out.shape == x.shape and out.dtype == dtype and out.stride() == x.stride()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert m.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------
# The fused Triton path, against the plain path
# ----------------------------------------------------------------------------------------

FUSED_BACKENDS = [
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda,
               pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and Triton")],
    ),
    pytest.param(
        "interpreter",
        marks=pytest.mark.skipif(
            not INTERPRETER, reason="needs Triton, and no GPU (its interpreter then runs)"),
    ),
]


def fix_interpreter_index():
    """Triton 3.6's interpreter turns a 1-element array into an int with int(), which NumPy
    2.4 refuses for arrays of one dimension; later Triton squeezes the array first."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "squeezes", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch.squeezes = True
    interpreter._patch_lang_tensor = patch


class Launches:
    """Counts the launches of each of bncore._triton's kernels, and the forward passes of
    the fused and the plain path."""

    def __init__(self, module, monkeypatch):
        self.counts = {}
        self.forwards = {"fused": 0, "plain": 0}
        self.launching = False
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, self._counting(name, getattr(module, name)))
        for path, owner, name in (("fused", module, "forward"), ("plain", bt, "_plain_forward")):
            monkeypatch.setattr(owner, name, self._counting_calls(path, getattr(owner, name)))

    def _counting_calls(self, path, function):
        def counting(*args):
            self.forwards[path] += 1
            return function(*args)

        return counting

    def _counting(self, name, kernel):
        launches = self

        class Counting:
            def __getitem__(self, grid):
                launches.counts[name] = launches.counts.get(name, 0) + 1
                return functools.partial(launches._launch, kernel[grid])

        return Counting()

    def _launch(self, launcher, *args, **kwargs):
        self.launching = True  # what the launch itself does (the interpreter copies tensors)
        try:
            return launcher(*args, **kwargs)
        finally:
            self.launching = False

    def total(self):
        return sum(self.counts.values())

    def reset(self):
        self.counts.clear()


@pytest.fixture(params=FUSED_BACKENDS)
def fused(request, monkeypatch):
    """(device, launches): bncore.torch running its fused kernels on that device, "cpu" for
    the interpreter; launches counts them."""
    from bncore import _triton

    if request.param == "interpreter":
        fix_interpreter_index()
        monkeypatch.setattr(bt, "_FUSED_DEVICE", "cpu")
    monkeypatch.setattr(bt, "use_fused", True)
    return ("cuda" if request.param == "cuda" else "cpu"), Launches(_triton, monkeypatch)


FUSED_CASES = [  # (shape, channels_last): each has more than one tile, so it can split
    ((300, 10), False),
    ((8, 5, 7), False),
    ((4, 6, 5, 3), False),
    ((24, 6, 5, 5), True),
    ((12, 70, 4, 4), True),
]


def fused_and_plain(device, launches, fn):
    """fn() with the fused kernels, then on the plain path; asserts that every forward of
    the first ran the kernels and none of the second did."""
    results = []
    for use_fused in (True, False):
        bt.use_fused = use_fused
        before = dict(launches.forwards)
        results.append(fn())
        ran = {path: launches.forwards[path] - before[path] for path in before}
        assert ran["fused" if use_fused else "plain"] > 0, ran
        assert ran["plain" if use_fused else "fused"] == 0, ran
    bt.use_fused = True
    return results


@pytest.mark.parametrize("split", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("shape", "channels_last"), FUSED_CASES)
def test_fused_path_matches_plain_path(fused, shape, channels_last, dtype, split, monkeypatch):
    from bncore import _triton

    device, launches = fused
    monkeypatch.setattr(_triton, "force_split", split)
    gen = torch.Generator().manual_seed(6)
    x = (3 * torch.randn(shape, generator=gen) + 2).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    assert _triton._plan(x).split == split
    cls = bt.BatchNorm2d if x.dim() == 4 else bt.BatchNorm1d

    def train_then_eval():
        m = cls(shape[1], device=device)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
        out, dx, dw, db = run_step(m, x, dy)
        m.eval()
        return out, dx, dw, db, m.running_mean, m.running_var, m.num_batches_tracked, m(x)

    ours, plain = fused_and_plain(device, launches, train_then_eval)
    assert ours[0].stride() == x.stride()
    for a, b in zip(ours, plain, strict=True):
        assert_close(a.float(), b.float(), dtype if a.dtype == dtype else torch.float32)


FUSED_OPTIONS = [
    {"momentum": None},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"dtype": torch.float16},  # half-precision parameters and running statistics
]


@pytest.mark.parametrize("split", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("options", FUSED_OPTIONS, ids=lambda o: ",".join(map(str, o.items())))
def test_fused_path_matches_plain_path_with_options(fused, options, split, monkeypatch):
    from bncore import _triton

    device, launches = fused
    monkeypatch.setattr(_triton, "force_split", split)
    gen = torch.Generator().manual_seed(8)
    dtype = options.get("dtype", torch.float32)
    x = (2 * torch.randn(6, 5, 4, 3, generator=gen) - 1).to(device, dtype)
    dy = torch.randn(6, 5, 4, 3, generator=gen).to(device, dtype)

    def three_steps():
        m = bt.BatchNorm2d(5, device=device, **options)
        steps = [run_step(m, x, dy), run_step(m, 2 * x + 1, dy)]
        steps.append(run_step(m.eval(), x, dy))
        state = [t for t in (m.running_mean, m.running_var, m.num_batches_tracked)
                 if t is not None]
        return [t for step in steps for t in step if t is not None] + state

    ours, plain = fused_and_plain(device, launches, three_steps)
    for a, b in zip(ours, plain, strict=True):
        assert_close(a.float(), b.float(), a.dtype if a.is_floating_point() else None)


@pytest.mark.parametrize("split", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_functional_matches_plain_for_odd_strides_and_gradients(fused, mode, split,
                                                                      monkeypatch):
    # A sliced input (copied to contiguous first), an expanded gradient (stride 0), a weight
    # without a bias, and no running statistics in training.
    from bncore import _triton

    device, launches = fused
    monkeypatch.setattr(_triton, "force_split", split)
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(10, 8, 6, 5, generator=gen).to(device)
    x = base[::2, 1:6, :, ::2]  # (5, 5, 6, 3), neither contiguous nor channels_last
    w = torch.linspace(0.5, 1.5, 5, device=device)
    stats = (None, None) if mode == "train" else (torch.randn(5, generator=gen).to(device),
                                                  torch.rand(5, generator=gen).to(device) + 0.5)

    def step():
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        out = bt.batch_norm(xg, *stats, wg, None, training=mode == "train")
        out.sum().backward()
        return out, xg.grad, wg.grad

    for a, b in zip(*fused_and_plain(device, launches, step), strict=True):
        assert_close(a, b)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's NumPy
@pytest.mark.parametrize("split", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_non_finite_batch_reaches_output_but_not_running_stats(fused, momentum, split,
                                                                     monkeypatch):
    from bncore import _triton

    device, _ = fused
    monkeypatch.setattr(_triton, "force_split", split)
    m = bt.BatchNorm1d(5, momentum=momentum, device=device)
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(10)).to(device)
    m(x)
    before = state_of(m)
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[3, 1] = bad
        out = m(x_bad)
        assert out[:, 1].isnan().all() and out[:, [0, 2, 3, 4]].isfinite().all()
        assert_state_unchanged(m, before)
    m(x)
    assert m.num_batches_tracked.item() == 2  # and the next good step carries on


@pytest.mark.parametrize("split", PATHS, ids=PATH_IDS)
def test_fused_large_offset_does_not_destroy_the_statistics(fused, split, monkeypatch):
    from bncore import _triton

    device, _ = fused
    monkeypatch.setattr(_triton, "force_split", split)
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 4, 36, generator=gen, dtype=torch.float64) + 1e4).float()
    exact = x.double()  # the same numbers, normalized in float64 around their exact mean
    mean, var = exact.mean((0, 2)), exact.var((0, 2), unbiased=False)
    expected = (exact - mean[:, None]) / torch.sqrt(var[:, None] + 1e-5)
    rm, rv = torch.zeros(4, device=device), torch.zeros(4, device=device)
    out = bt.batch_norm(x.to(device), rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(rv.double().cpu(), var * 2304 / 2303, rtol=1e-5, atol=0)
    torch.testing.assert_close(rm.double().cpu(), mean, rtol=0, atol=2e-3)


@pytest.mark.parametrize(("split", "train_launches"), [(False, (2, 1)), (True, (3, 2))],
                         ids=PATH_IDS)
def test_fused_launches_per_step(fused, split, train_launches, monkeypatch):
    # Training forward: statistics (and normalizing, on channel blocks), the finalize step
    # with the running statistics, and normalizing on the split path. Backward: one kernel on
    # channel blocks, two when split. Evaluation: one. No PyTorch operation computes anything
    # on the way: the only aten operations are the allocations of the outputs.
    from bncore import _triton

    class AtenCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not launches.launching:
                self.names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    device, launches = fused
    monkeypatch.setattr(_triton, "force_split", split)
    m = bt.BatchNorm2d(6, device=device)
    x = torch.randn(24, 6, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    run_step(m, x, dy)  # compiles the kernels
    x.requires_grad_()
    launches.reset()
    with AtenCalls() as calls:
        out = m(x)
        forward = launches.total()
        torch.autograd.grad(out, (x, m.weight, m.bias), dy)
    assert (forward, launches.total() - forward) == train_launches, launches.counts
    assert calls.names <= {"empty", "empty_like", "empty_strided"}, calls.names
    launches.reset()
    with torch.no_grad():
        m.eval()(x)
    assert launches.total() == 1


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA,
                    reason="needs Triton; with a GPU the CUDA tests compile the kernels")
def test_fused_kernels_compile_for_a_hopper_gpu():
    # The interpreter runs the kernels' Python; the compiler is stricter. This compiles each
    # kernel variant for sm_90 down to a cubin, with no GPU, and fails on any spill.
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "compile_kernels.py"), "--quick"],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# ----------------------------------------------------------------------------------------
# On CUDA only: host synchronization, CUDA graphs, torch.compile, kernels per step
# ----------------------------------------------------------------------------------------

def on_cuda_with_triton(test):
    test = pytest.mark.cuda(test)
    return pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and Triton")(test)


@on_cuda_with_triton
@pytest.mark.parametrize("split", PATHS, ids=PATH_IDS)
def test_cuda_graph_replays_a_fused_training_step(split, monkeypatch):
    from bncore import _triton

    monkeypatch.setattr(_triton, "force_split", split)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(16, 6, 8, 8, generator=gen).cuda()
    dy = torch.randn(16, 6, 8, 8, generator=gen).cuda()
    eager, graphed = bt.BatchNorm2d(6, device="cuda"), bt.BatchNorm2d(6, device="cuda")
    static_x = x.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernel compilation) outside the capture
        run_step(graphed, static_x, dy)
    torch.cuda.current_stream().wait_stream(stream)
    graphed.load_state_dict(eager.state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graphed(static_x)
        (static_dx,) = torch.autograd.grad(static_out, static_x, dy)
    for step in range(3):
        static_x.data.copy_(x * (step + 1))
        graph.replay()
        out, dx, _, _ = run_step(eager, x * (step + 1), dy)
        assert_close(static_out, out)
        assert_close(static_dx, dx)
    assert_same_state(graphed, eager)


@on_cuda_with_triton
def test_torch_compile_runs_the_fused_path():
    m = bt.BatchNorm2d(6, device="cuda")
    reference = bt.BatchNorm2d(6, device="cuda")
    compiled = torch.compile(m, backend="aot_eager")
    x = torch.randn(8, 6, 5, 5, device="cuda")
    dy = torch.randn_like(x)
    for a, b in zip(run_step(compiled, x, dy), run_step(reference, x, dy), strict=True):
        assert_close(a, b)
    assert_same_state(m, reference)


@on_cuda_with_triton
@pytest.mark.parametrize("split", PATHS, ids=PATH_IDS)
def test_cuda_training_step_runs_at_most_six_kernels(split, monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    from bncore import _triton

    monkeypatch.setattr(_triton, "force_split", split)
    m = bt.BatchNorm2d(64, device="cuda")
    x = torch.randn(32, 64, 16, 16, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    run_step(m, x, dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = m(x)
        torch.autograd.grad(out, (x, m.weight, m.bias), dy)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == (5 if split else 3), kernels  # the target: at most 6
