"""bncore.torch against PyTorch's own batch normalization, gradcheck and properties.

Every test runs on each device: "cuda" is reported as skipped where there is none.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bncore.torch as bt

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")],
    ),
]
on_devices = pytest.mark.parametrize("device", DEVICES)

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


def assert_close(actual, expected, dtype=None):
    if expected is None:
        assert actual is None
        return
    rtol, atol = TOLERANCE[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def module_pair(ours_cls, torch_cls, device, dtype=torch.float32, **options):
    """Our module and PyTorch's, with the same random parameters and running statistics."""
    gen = torch.Generator().manual_seed(0)
    theirs = torch_cls(5, device=device, dtype=dtype, **options)
    with torch.no_grad():
        for t in (theirs.weight, theirs.bias, theirs.running_mean):
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen))
        if theirs.running_var is not None:
            theirs.running_var.copy_(torch.rand(5, generator=gen) + 0.5)
    ours = ours_cls(5, device=device, dtype=dtype, **options)
    ours.load_state_dict(theirs.state_dict())
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
    for fn, (rm, rv) in ((bt.batch_norm, stats), (F.batch_norm, theirs_stats)):
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
    for fn in (bt.batch_norm, F.batch_norm):
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
    pairs = ((bt.BatchNorm1d, torch.nn.BatchNorm1d), (bt.BatchNorm2d, torch.nn.BatchNorm2d))
    for ours_cls, torch_cls in pairs:
        ours = ours_cls(5, device=device, **options)
        theirs = torch_cls(5, device=device, **options)
        assert repr(ours) == repr(theirs)
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
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        bt.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="both be None"):
        bt.batch_norm(x, torch.zeros(5, device=device), None, training=True)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
@pytest.mark.cuda
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_step_does_not_synchronize_with_the_host(momentum):
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
    moved = bt.batch_norm(a * x + b, None, None, training=True, eps=1e-12)
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

FUSED_CASES = [  # (shape, channels_last)
    ((64, 10), False),
    ((8, 5, 7), False),
    ((4, 6, 5, 3), False),
    ((4, 6, 5, 3), True),
    ((3, 70, 2, 2), True),
]


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("shape", "channels_last"), FUSED_CASES)
def test_fused_path_matches_plain_path(shape, channels_last, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    x = (3 * torch.randn(shape, generator=gen) + 2).to("cuda", dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen).to("cuda", dtype)
    cls = bt.BatchNorm2d if x.dim() == 4 else bt.BatchNorm1d
    results = []
    for fused in (True, False):
        monkeypatch.setattr(bt, "use_fused", fused)
        m = cls(shape[1], device="cuda")
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
        out, dx, dw, db = run_step(m, x, dy)
        m.eval()
        results.append((out, dx, dw, db, m.running_mean, m.running_var, m(x)))
    assert bt._ops_for(x) is not bt._PlainOps  # the fused path really ran
    for a, b in zip(*results, strict=True):
        assert_close(a.float(), b.float(), dtype if a.dtype == dtype else torch.float32)


@pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton, and TRITON_INTERPRET=1 to run its kernels on the CPU",
)
@pytest.mark.parametrize(("shape", "channels_last"), FUSED_CASES)
def test_triton_kernels_match_plain_ops_in_the_interpreter(shape, channels_last):
    from bncore import _triton

    gen = torch.Generator().manual_seed(7)
    x, dy = 3 * torch.randn(shape, generator=gen) + 2, torch.randn(shape, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    mean = bt._channel_mean(x)
    scale, shift, dy_scale = torch.randn(3, c, generator=gen)
    fused, plain = _triton, bt._PlainOps
    assert_close(fused.channel_mean(x), mean)
    sums = fused.centered_sums(x, mean), plain.centered_sums(x, mean)
    for a, b in zip(*sums, strict=True):
        assert_close(a, b, torch.float32)
    sums = fused.centered_sums(x, mean, dy), plain.centered_sums(x, mean, dy)
    for a, b in zip(*sums, strict=True):
        assert_close(a, b)
    y = fused.affine_centered(x, mean, scale, shift)
    assert y.stride() == x.stride()
    assert_close(y, plain.affine_centered(x, mean, scale, shift))
    assert_close(
        fused.affine_centered(x, mean, scale, shift, dy, dy_scale),
        plain.affine_centered(x, mean, scale, shift, dy, dy_scale),
    )
