"""The channel between a checked notebook's kernel and the checker (bncore.channel and
bncore._notebook_server): what crosses is plain data, decoded by the checker itself.

The codec tests run in this process (the kernel's end is an ordinary class); the last tests
start a real kernel and take a few seconds.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import textwrap
import time

import numpy as np
import pytest

from bncore import _notebook_server as server
from bncore.channel import ChannelError, Codec, KernelTimeout, NotebookChannel, Remote


class _Owner:
    """A channel stand-in: records the requests its handles would send."""

    def __init__(self):
        self.requests = []

    def request(self, op, **fields):
        self.requests.append((op, fields))
        raise AssertionError(f"the test asked the notebook for {op} {fields}")


def roundtrip(value):
    """value, encoded by the checker, decoded and re-encoded by the kernel, decoded again."""
    owner = _Owner()
    checker, kernel = Codec(owner), server.NotebookServer({})
    wire = json.loads(json.dumps(checker.encode(value)))
    back = json.loads(json.dumps(kernel.encode(kernel.decode(wire))))
    return checker.decode(back)


def test_plain_values_cross_unchanged_with_their_types():
    values = [None, True, 0, -7, 2**70, 1.5, float("inf"), "text", 1 + 2j,
              np.arange(6, dtype=np.int64).reshape(2, 3), np.ones(3, dtype=np.float32),
              np.array([True, False]), np.array([1 + 1j]), np.float32(2.5), np.int8(-3),
              (1, [2.0, {"a": (None, "b")}], {3: np.zeros(2)}), range(2, 9, 3)]
    for value in values:
        got = roundtrip(value)
        if isinstance(value, np.ndarray):
            assert type(got) is np.ndarray and got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)
        elif isinstance(value, np.generic):
            assert type(got) is type(value) and got == value
        elif isinstance(value, range):
            assert list(got) == list(value)
        else:
            assert got == value and type(got) is type(value), (value, got)
    assert np.isnan(roundtrip(float("nan")))


def test_objects_that_lie_stay_in_the_kernel():
    class Always(int):
        def __eq__(self, other):
            return True

    class LyingArray(np.ndarray):
        def __eq__(self, other):
            return np.ones(np.shape(other), dtype=bool)

    class Lazy:
        def __array__(self, dtype=None, copy=None):
            raise AssertionError("never called in the checker")

    kernel, checker = server.NotebookServer({}), Codec(_Owner())
    for liar in (Always(3), np.zeros(3).view(LyingArray), Lazy()):
        got = checker.decode(json.loads(json.dumps(kernel.encode(liar))))
        assert isinstance(got, Remote)
        assert not got == 3 and not np.array_equal(got, np.zeros(3))


def test_a_handle_never_asks_the_notebook_for_special_attributes():
    owner = _Owner()
    handle = Remote(owner, 1, "Lazy", False)
    array = np.asarray(handle)  # NumPy probes __array_interface__, __array__ ...
    assert array.dtype == object and owner.requests == []
    with pytest.raises(AttributeError):
        _ = handle.__array_interface__


def _npy(array, allow_pickle=False) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("answer", [
    {"nd": _npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)},  # a pickle
    {"nd": _npy(np.zeros(2, dtype=[("a", "f8"), ("b", "i4")]))},          # structured
    {"nd": base64.b64encode(pickle.dumps([1, 2])).decode()},              # not .npy at all
    {"float": "1e308"}, {"complex": ["x", 1]}, {"tuple": "abc"}, {"dict": [[[1], 2]]},
    {"unknown": 1}, {}, [1, 2], {"list": [{"nd": "%%%"}]},
])
def test_malformed_answers_are_refused(answer):
    with pytest.raises(ChannelError):
        Codec(_Owner()).decode(answer)


def test_nesting_is_bounded():
    deep = 0
    for _ in range(200):
        deep = {"list": [deep]}
    with pytest.raises(ChannelError, match="nested too deeply"):
        Codec(_Owner()).decode(deep)


def test_linked_arrays_follow_changes_on_both_sides():
    checker, kernel = Codec(_Owner()), server.NotebookServer({})
    mine = np.zeros(3)
    theirs = kernel.decode(json.loads(json.dumps(checker.encode(mine))))
    theirs += 1.0  # the notebook's code changes its argument in place
    checker.sync_in(kernel.sync_out())
    np.testing.assert_array_equal(mine, [1.0, 1.0, 1.0])
    mine *= 5.0  # the test changes an array it passed earlier
    kernel.sync_in(checker.sync_out())
    np.testing.assert_array_equal(theirs, [5.0, 5.0, 5.0])
    assert checker.encode(mine) == {"linked": 1}  # passed again: the same array there


# --- through a real kernel -------------------------------------------------------------------


NOTEBOOK_CODE = textwrap.dedent('''
    import os
    import numpy as np

    def scale(x, factor=2.0):
        print("scaling", x.shape)
        return x * factor, {"factor": factor}

    class Counter:
        def __init__(self):
            self.seen = []
        def add(self, z):
            self.seen.append(z)
            return self
        def total(self):
            return float(sum(z.sum() for z in self.seen))

    def sweep(fn, items):
        return [fn(i) for i in items]

    def not_yet(x):
        raise NotImplementedError()

    def bad(x):
        raise ValueError("x must be positive")

    def forever():
        while True:
            pass

    def uses_helper(x):
        return helper(x) + 1

    def helper(x):
        return x

    def die():
        os._exit(1)
''')


@pytest.fixture
def kernel():
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    reply = kc.execute_interactive(NOTEBOOK_CODE, timeout=60)
    assert reply["content"]["status"] == "ok"
    channel = NotebookChannel(km)
    channel.install()
    yield km, channel
    channel.close()
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def test_calls_handles_callbacks_and_prints_cross_the_channel(kernel):
    _, channel = kernel
    with channel.session(timeout=30) as nb:
        out, info = nb.scale(np.arange(3.0), factor=3.0)
        np.testing.assert_array_equal(out, [0.0, 3.0, 6.0])
        assert info == {"factor": 3.0}
        counter = nb.Counter()
        assert counter.add(np.ones(2)) is counter
        assert counter.total() == 2.0
        assert nb.sweep(lambda i: i * 10, [1, 2]) == [10, 20]
        with nb.replaced("helper", lambda x: 100):
            assert nb.uses_helper(1) == 101
        assert nb.uses_helper(1) == 2
        start = time.perf_counter()
        for _ in range(50):
            nb.helper(1)
        per_call = (time.perf_counter() - start) / 50
    assert per_call < 0.05, f"a call takes {per_call * 1000:.1f} ms"
    assert "scaling (3,)" in "".join(o.get("text", "") for o in channel.outputs)


def test_errors_of_the_notebook_are_raised_as_their_own_kind(kernel):
    _, channel = kernel
    with channel.session(timeout=30) as nb:
        with pytest.raises(ValueError, match="x must be positive") as raised:
            nb.bad(1)
        assert "raise ValueError" in raised.value.notebook_traceback
        with pytest.raises(NotImplementedError) as raised:
            nb.not_yet(1)
        assert raised.value.explain() == "not_yet is not written yet (it raises " \
            "NotImplementedError)"
        with pytest.raises(NameError, match="not defined in the notebook"):
            _ = nb.no_such_function


def test_a_call_past_the_time_limit_is_interrupted(kernel):
    _, channel = kernel
    with channel.session(timeout=1.0) as nb:
        with pytest.raises(KernelTimeout):
            nb.forever()
    with channel.session(timeout=10) as nb:  # the kernel is still there
        assert nb.helper(5) == 5


def test_a_kernel_that_dies_breaks_the_channel(kernel):
    _, channel = kernel
    with pytest.raises(ChannelError):
        with channel.session(timeout=10) as nb:
            nb.die()
