"""Stacks of nets (bncore.experiments.StackedMLP, StackedCNN, train_stack): every member trains
exactly as the same net trained alone by train_classifier; ghost batch norm; the reporting
helpers; data-parallel training over gloo processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bncore.data import digits
from bncore.distributed import run_on_local_processes
from bncore.experiments import (
    GhostBatchNorm,
    Member,
    StackedCNN,
    StackedMLP,
    Table,
    data_parallel_training,
    gaussian_init_,
    largest_working,
    mean_std,
    mlp,
    placement_sweep,
    small_cnn,
    train_classifier,
    train_stack,
)

STEPS = 30


@pytest.fixture(scope="module")
def split():
    return digits()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def alone(model, split, seed, lr, image=False, batch_size=60):
    """The reference: one net, trained by train_classifier."""
    return train_classifier(model, split, STEPS, batch_size=batch_size, lr=lr, seed=seed,
                            eval_every=10, image=image)


def assert_member_matches(history, member, reference):
    np.testing.assert_allclose(history["test_acc"][member], reference["test_acc"], atol=1e-6)
    np.testing.assert_allclose(history["train_loss"][member][1:], reference["train_loss"][1:],
                               rtol=2e-4, atol=1e-5)


def test_train_classifier_makes_the_updates_of_torch_sgd(split):
    """train_classifier writes plain SGD out; torch.optim.SGD on the same batches is the
    oracle, to the last bit."""
    torch.manual_seed(0)
    net = mlp([64, 32, 32, 10], "sigmoid", bn="before")
    reference = [p.detach().clone() for p in net.parameters()]
    history = train_classifier(net, split, STEPS, lr=0.3, seed=4, eval_every=STEPS)
    X_train, y_train = torch.as_tensor(split.X_train, dtype=torch.float32), split.y_train
    twin = mlp([64, 32, 32, 10], "sigmoid", bn="before")
    with torch.no_grad():
        for p, q in zip(twin.parameters(), reference, strict=True):
            p.copy_(q)
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    batches = torch.Generator().manual_seed(4)
    for _ in range(STEPS):
        idx = torch.randint(len(X_train), (60,), generator=batches)
        loss = nn.functional.cross_entropy(twin(X_train[idx]), torch.as_tensor(y_train)[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, q in zip(net.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert history["train_loss"][-1] == loss.item()


def layer_norm_mlp(sizes, seed):
    """mlp(sizes) with one group norm of one group (layer norm over the units) before each
    ReLU: what a member with norm="ln" is."""
    torch.manual_seed(seed)
    layers = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.GroupNorm(1, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


def test_every_member_of_a_fully_connected_stack_trains_as_it_would_alone(split):
    sizes = [64, 32, 32, 10]
    members = [Member(norm=None, seed=1, lr=0.5, init_gain=1.0),
               Member(norm="bn", seed=2, lr=0.1),
               Member(norm="bn", seed=2, lr=0.3, init_gain=(1.0, 4.0, 4.0)),
               Member(norm="ln", seed=3, lr=0.2), Member(norm="ln", seed=6, lr=0.1)]
    history = train_stack(StackedMLP(sizes, members, "sigmoid"), split, STEPS, eval_every=10)

    torch.manual_seed(1)
    assert_member_matches(history, 0, alone(gaussian_init_(mlp(sizes, "sigmoid")), split, 1,
                                            0.5))
    torch.manual_seed(2)
    assert_member_matches(history, 1, alone(mlp(sizes, "sigmoid", bn="before"), split, 2, 0.1))
    torch.manual_seed(2)
    net = mlp(sizes, "sigmoid", bn="before")
    for layer, gain in zip([m for m in net if isinstance(m, nn.Linear)], (1.0, 4.0, 4.0),
                           strict=True):
        nn.init.normal_(layer.weight, 0.0, gain * layer.weight.shape[1] ** -0.5)
        nn.init.zeros_(layer.bias)
    assert_member_matches(history, 2, alone(net, split, 2, 0.3))
    for member, seed, lr in ((3, 3, 0.2), (4, 6, 0.1)):   # two of a kind, side by side
        net = layer_norm_mlp(sizes, seed)
        net[2] = nn.Sigmoid()
        net[5] = nn.Sigmoid()
        assert_member_matches(history, member, alone(net, split, seed, lr))


def test_every_member_of_a_convolutional_stack_trains_as_it_would_alone(split):
    members = [Member(norm="bn", seed=4, lr=0.1), Member(norm="gn", seed=5, lr=0.05),
               Member(norm="gn", seed=7, lr=0.1), Member(norm=None, seed=4, lr=0.2)]
    history = train_stack(StackedCNN(members, (8, 16), groups=4), split, STEPS,
                          batch_size=16, eval_every=10)
    torch.manual_seed(4)
    assert_member_matches(history, 0, alone(small_cnn((8, 16), bn="before"), split, 4, 0.1,
                                            image=True, batch_size=16))
    for member, seed, lr in ((1, 5, 0.05), (2, 7, 0.1)):   # two of a kind, side by side
        torch.manual_seed(seed)
        net = small_cnn((8, 16), bn="before")   # BatchNorm2d draws nothing: swap in GN
        net[1], net[5] = nn.GroupNorm(4, 8), nn.GroupNorm(4, 16)
        assert_member_matches(history, member, alone(net, split, seed, lr, image=True,
                                                     batch_size=16))
    torch.manual_seed(4)
    assert_member_matches(history, 3, alone(small_cnn((8, 16)), split, 4, 0.2, image=True,
                                            batch_size=16))


@pytest.mark.parametrize("arch, activation", [("mlp", "sigmoid"), ("cnn", "tanh")])
def test_members_normalize_before_or_after_the_activation_as_the_single_net_does(
        split, arch, activation):
    placements = ("after", None, "before", "after")   # runs of two kinds, one of them twice
    members = [Member(norm=p and "bn", placement=p or "before", seed=seed, lr=0.1)
               for p, seed in zip(placements, (3, 3, 3, 5), strict=True)]
    stack = (StackedMLP([64, 32, 32, 10], members, activation) if arch == "mlp"
             else StackedCNN(members, (8, 16), activation=activation))
    history = train_stack(stack, split, STEPS, batch_size=16, eval_every=10)
    for i, (placement, member) in enumerate(zip(placements, members, strict=True)):
        torch.manual_seed(member.seed)
        net = (mlp([64, 32, 32, 10], activation, bn=placement) if arch == "mlp"
               else small_cnn((8, 16), bn=placement, activation=activation))
        assert_member_matches(history, i, alone(net, split, member.seed, 0.1,
                                                image=arch == "cnn", batch_size=16))


def test_placement_sweep_pairs_the_placements_of_a_seed(split):
    sweep = placement_sweep("mlp", (None, "before", "after"), (0, 1), steps=STEPS, lr=0.1,
                            sizes=(64, 16, 10), eval_every=10, split=split)
    assert sweep["test_acc"].shape == (3, 2, len(sweep["step"])) and sweep["step"][-1] == STEPS
    for i, placement in enumerate(sweep["placements"]):
        for j, seed in enumerate(sweep["seeds"]):
            torch.manual_seed(seed)
            reference = alone(mlp([64, 16, 10], bn=placement), split, seed, 0.1)
            np.testing.assert_allclose(sweep["test_acc"][i, j], reference["test_acc"],
                                       atol=1e-6)


def test_members_of_one_seed_are_paired_and_a_diverging_member_harms_no_other(split):
    members = [Member(seed=0, lr=0.1), Member(seed=0, lr=1e4), Member(seed=0, lr=0.1)]
    history = train_stack(StackedMLP([64, 16, 10], members), split, STEPS, eval_every=10)
    np.testing.assert_array_equal(history["test_acc"][0], history["test_acc"][2])
    assert not history["final"]["train_loss"][1] < 10   # it diverged (inf, NaN or huge)...
    calm = train_stack(StackedMLP([64, 16, 10], members[:1]), split, STEPS, eval_every=10)
    np.testing.assert_allclose(history["train_loss"][0], calm["train_loss"][0],   # ...alone
                               rtol=1e-5)


def test_dropout_acts_in_training_only_and_only_on_its_members():
    torch.manual_seed(0)
    stack = StackedMLP([8, 16, 3], [Member(seed=0), Member(seed=0, dropout=0.5)])
    x = torch.randn(10, 1, 8).expand(-1, 2, -1)   # the same examples for both members
    stack.train()
    first, second = stack(x), stack(x)
    torch.testing.assert_close(first[:, 0], second[:, 0])          # no dropout: deterministic
    assert not torch.allclose(first[:, 1], second[:, 1])           # dropout: a new mask
    stack.eval()
    torch.testing.assert_close(stack(x)[:, 0], stack(x)[:, 1])     # same weights, no dropout


def test_ghost_batch_norm_normalizes_each_group_with_its_own_statistics():
    torch.manual_seed(0)
    layer = GhostBatchNorm(3, ghost=4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(12, 3, 5) * 3 + 1
    y = layer(x)
    for k in range(3):
        group = x[4 * k:4 * k + 4]
        expected = nn.functional.batch_norm(group, None, None, layer.weight, layer.bias,
                                            training=True)
        torch.testing.assert_close(y[4 * k:4 * k + 4], expected)
    full = nn.BatchNorm1d(3)
    full(x)
    torch.testing.assert_close(layer.running_mean, full.running_mean)
    torch.testing.assert_close(layer.running_var, full.running_var)
    assert layer.num_batches_tracked.item() == 1


def test_ghost_batch_norm_with_the_whole_batch_is_batch_norm_and_rejects_a_ragged_batch():
    layer, reference = GhostBatchNorm(3, ghost=8), nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    torch.testing.assert_close(layer(x), reference(x))
    with pytest.raises(ValueError, match="ghost batches of 8"):
        GhostBatchNorm(3, ghost=8)(torch.randn(12, 3))


@pytest.mark.parametrize("bad, match", [
    (dict(norm="batch"), "norm must be"), (dict(lr=0.0), "lr must be"),
    (dict(dropout=1.0), "dropout"), (dict(ghost=4), "ghost"),
    (dict(norm="bn", ghost=1), "ghost"), (dict(norm="bn", placement="inside"), "placement"),
])
def test_member_rejects_what_it_cannot_train(bad, match):
    with pytest.raises(ValueError, match=match):
        Member(**bad)


def test_reporting_helpers():
    assert mean_std([1.0, 2.0, 3.0]) == "2.0 ± 1.0"
    assert mean_std([0.5, 0.5], 1, scale=100) == "50.0 ± 0.0"
    assert largest_working([0.1, 1, 10], [[0.9, 0.9], [0.8, 0.2], [0.1, 0.1]], 0.5) == [1, 0.1]
    assert largest_working([0.1, 1], [[0.1], [0.2]], 0.5) == [None]
    table = Table(["a", "b"], [["x < 1", "2"]], caption="c & d")
    html = table._repr_html_()
    assert html.startswith("<table") and "<caption>c &amp; d</caption>" in html
    assert "x &lt; 1" in html and "<th>a</th>" in html
    assert repr(table).splitlines() == ["c & d", "a      b", "x < 1  2"]
    with pytest.raises(ValueError, match="one cell per column"):
        Table(["a", "b"], [["only one"]])


@pytest.mark.timeout(180)
def test_data_parallel_sync_batch_norm_trains_as_one_process_with_the_whole_batch(split):
    sizes, steps, per_process = [64, 16, 10], 20, 3
    members = [Member(norm="syncbn", seed=0, lr=0.2), Member(norm="bn", seed=0, lr=0.2)]
    history = run_on_local_processes(data_parallel_training, 2,
                                     (sizes, members, steps, per_process, 10), timeout=120)[0]
    reference = train_stack(StackedMLP(sizes, [Member(norm="bn", seed=0, lr=0.2),
                                               Member(norm="bn", ghost=per_process, seed=0,
                                                      lr=0.2)]),
                            split, steps, batch_size=2 * per_process, eval_every=10,
                            score_train=False)
    # SyncBN over 2 processes of 3 examples: the weights of batch norm over the 6
    np.testing.assert_allclose(history["final"]["test_loss"][0],
                               reference["final"]["test_loss"][0], rtol=1e-4)
    np.testing.assert_allclose(history["test_acc"][0], reference["test_acc"][0], atol=1e-6)
    # per-process BN normalizes 3 examples at a time: another net
    assert abs(history["final"]["test_loss"][1] - reference["final"]["test_loss"][0]) > 1e-3
