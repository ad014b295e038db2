"""The checker's end of the channel to a notebook's kernel.

A graded notebook's test cells run in the checker's process (the self-check's, or the
grader's), not in the notebook's kernel. They reach the notebook through ``nb``:
``nb.batchnorm_forward(x, gamma, beta)`` calls the notebook's function in the kernel and
returns what it returned, as plain data (exact ``float``, ``int``, ``bool``, ``str``, ``None``,
NumPy arrays and scalars of a plain dtype, and tuples, lists and dicts of these). Anything else
stays in the kernel and comes back as a :class:`Remote` handle, which can be called, have its
attributes read and set, be indexed, and be passed back to the notebook. Functions of the test
may be passed in (the kernel calls back), and arrays passed in stay linked: what either side
changes in place, the other sees, as in one process.

Whatever the notebook's code does to its own process, what reaches the checker is data that
the checker decodes itself (``bncore._notebook_server.decode_array``: ``.npy`` bytes, no
pickles). Expected values, reference implementations and comparisons stay in the checker.

Messages travel over the kernel's standard-input channel: for each test cell the checker sends
one execute request, ``__bncore_server__.serve()``, and the kernel asks for work with
``input()`` (about half a millisecond a call). See ``bncore/_notebook_server.py``.

>>> channel = NotebookChannel(kernel_manager)        # after the kernel has started
>>> channel.install()                                # before the notebook's first cell
>>> with channel.session(timeout=60) as nb:          # one test cell
...     out, cache = nb.batchnorm_forward(x, gamma, beta)
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bncore import _notebook_server as server

SERVER_SOURCE = Path(server.__file__).read_text(encoding="utf-8")
_INSTALL = (
    "def _bncore_install(source):\n"
    "    import types\n"
    "    module = types.ModuleType('bncore_notebook_server')\n"
    "    exec(compile(source, {filename!r}, 'exec'), module.__dict__)\n"
    "    module.install(get_ipython().user_ns)\n"
    "_bncore_install({source!r})\n"
    "del _bncore_install\n"
)
_SERVE = "__bncore_server__.serve()"
_GRACE = 5.0  # seconds an interrupted kernel gets to answer before it counts as stuck


class ChannelError(RuntimeError):
    """The notebook's kernel broke the channel: no answer, a malformed one, or it died."""


class KernelTimeout(ChannelError):
    """The notebook's code ran past the cell's time limit and was interrupted."""


class KernelStuck(ChannelError):
    """The kernel did not answer even after an interrupt: it has to be stopped."""


class NotebookError(Exception):
    """An exception raised by the notebook's code, seen from the checker. Its class also
    derives from the built-in exception of the same name (ValueError, NotImplementedError...),
    so a test can catch it as it would in one process."""

    notebook_traceback = ""
    raised_in = ""  # the notebook's function or class the test called, when known
    lookup = False  # raised while looking a name up, not by the notebook's code

    def explain(self) -> str:
        """The message for a failed test: the error, and where in the notebook it came from."""
        message = str(self)
        name = type(self).__name__
        if self.lookup:
            return message
        where = f"your {self.raised_in}" if self.raised_in else "the notebook's code"
        if name == "NotImplementedError" and not message:
            return f"{self.raised_in or 'a function'} is not written yet (it raises " \
                   "NotImplementedError)"
        return f"{message} (raised by {where})" if message else f"raised by {where}"


_error_classes: dict[str, type] = {}


def notebook_error(described: dict) -> NotebookError:
    """The exception to raise in the checker for an error the notebook's code raised."""
    name = str(described.get("type", "Exception"))
    base = getattr(builtins, name, None)
    if not (described.get("builtin") and isinstance(base, type)
            and issubclass(base, Exception)):
        base = Exception
    key = f"{base.__name__}:{name}"
    if key not in _error_classes:
        _error_classes[key] = type(name, (NotebookError, base), {"__module__": "notebook"})
    error = _error_classes[key](str(described.get("message", ""))[:4000])
    error.notebook_traceback = str(described.get("traceback", ""))[-6000:]
    return error


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


class Remote:
    """An object that lives in the notebook's kernel (see the module's docstring): its
    attributes can be read and set, it can be called and indexed, and passed back. It is never
    asked for special attributes (``__array__``, ``__eq__``...): NumPy sees an opaque object."""

    __slots__ = ("_channel", "_key", "_type", "_callable", "_name")

    def __init__(self, channel: Any, key: int, type_name: str, is_callable: bool,
                 name: str = "") -> None:
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_type", type_name)
        object.__setattr__(self, "_callable", is_callable)
        object.__setattr__(self, "_name", name)

    def _ask(self, op: str, **fields: Any) -> Any:
        return self._channel.request(op, target={"remote": self._key}, **fields)

    def __getattr__(self, name: str) -> Any:
        if _dunder(name):  # NumPy and Python probe for these: never ask the notebook
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._ask("setattr", name=name, value=self._channel.encode(value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._ask("call", args=[self._channel.encode(a) for a in args],
                             kwargs={k: self._channel.encode(v) for k, v in kwargs.items()})
        except NotebookError as error:
            if not error.raised_in and self._name:
                error.raised_in = self._name
            raise

    def __getitem__(self, key: Any) -> Any:
        return self._ask("getitem", key=self._channel.encode(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._ask("setitem", key=self._channel.encode(key), value=self._channel.encode(value))

    def __repr__(self) -> str:
        return f"<{self._type} object in the notebook>"

    def isinstance_of(self, remote_class: Remote) -> bool:
        """``isinstance(obj, cls)`` evaluated in the notebook."""
        return self._ask("isinstance", **{"class": {"remote": remote_class._key}})


class Notebook:
    """``nb`` in a test cell run by the checker: the notebook's names, through the channel."""

    def __init__(self, channel: NotebookChannel) -> None:
        object.__setattr__(self, "_channel", channel)

    def __getattr__(self, name: str) -> Any:
        if _dunder(name):
            raise AttributeError(name)
        return self._channel.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a test cannot assign to the notebook's names")

    def __repr__(self) -> str:
        return "<the notebook's names>"

    @contextlib.contextmanager
    def replaced(self, name: str, value: Any) -> Iterator[None]:
        """Within the block, the notebook's ``name`` is ``value`` (a test's function, say)."""
        self._channel.request("replace", name=name, value=self._channel.encode(value))
        try:
            yield
        finally:
            self._channel.request("restore", name=name)


class NotebookChannel:
    """The checker's end of the channel to one kernel (see the module's docstring).

    ``kernel_manager`` is the kernel's manager (jupyter_client); ``interrupt`` a function that
    interrupts the kernel (default: the manager's ``interrupt_kernel``, run synchronously).
    """

    def __init__(self, kernel_manager: Any, interrupt: Callable[[], Any] | None = None,
                 max_output_bytes: int = 1 << 20) -> None:
        from jupyter_client.blocking import BlockingKernelClient

        self.km = kernel_manager
        self._interrupt = interrupt
        self.kc = BlockingKernelClient()
        self.kc.load_connection_info(kernel_manager.get_connection_info(session=True))
        self.kc.session.key = kernel_manager.session.key
        self.kc.start_channels()
        self.max_output_bytes = max_output_bytes
        self._reset()

    def _reset(self) -> None:
        self.outputs: list[dict] = []        # what the notebook printed during the session
        self._output_bytes = 0
        self.codec = Codec(self)
        self._callback_errors: list[BaseException] = []
        self._names: dict[str, Remote] = {}
        self._msg_id = None
        self._budget = math.inf  # seconds the notebook's code may still run in this session

    def encode(self, value: Any) -> Any:
        return self.codec.encode(value)

    def decode(self, value: Any) -> Any:
        return self.codec.decode(value)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.kc.stop_channels()

    # -- installing the kernel's end --

    def install(self, timeout: float = 30) -> None:
        """Define ``__bncore_server__`` in the kernel (before the notebook's first cell)."""
        code = _INSTALL.format(filename=server.FILENAME, source=SERVER_SOURCE)
        reply = self._execute(code, timeout)
        if reply["content"]["status"] != "ok":
            raise ChannelError(f"could not set up the notebook's kernel: "
                               f"{reply['content'].get('ename')}: {reply['content'].get('evalue')}")

    def run_code(self, code: str, timeout: float = 30) -> dict:
        """Execute the checker's own code in the kernel, silently; the execute reply."""
        return self._execute(code, timeout)

    def _execute(self, code: str, timeout: float) -> dict:
        msg_id = self.kc.execute(code, silent=True, store_history=False, allow_stdin=False)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KernelStuck("the kernel did not answer the checker")
            try:
                reply = self.kc.get_shell_msg(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: keep waiting
                self._check_alive()
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    # -- a session: one test cell --

    @contextlib.contextmanager
    def session(self, timeout: float) -> Iterator[Notebook]:
        """Serve one test cell: yields ``nb``. ``timeout`` bounds the notebook's time in it."""
        self._reset()
        self._budget = timeout
        self._msg_id = self.kc.execute(_SERVE, silent=True, store_history=False,
                                       allow_stdin=True)
        first = self._receive()
        if first.get("kind") != "ready":
            raise ChannelError(f"the notebook's kernel answered {first.get('kind')!r} "
                               "instead of starting")
        try:
            yield Notebook(self)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._msg_id is None:
            return
        msg_id, self._msg_id = self._msg_id, None
        with contextlib.suppress(Exception):
            self.kc.input(json.dumps({"kind": "done"}))
        deadline = time.monotonic() + _GRACE
        while time.monotonic() < deadline:
            try:
                reply = self.kc.get_shell_msg(timeout=0.5)
            except Exception:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                self._drain_iopub(msg_id)
                return

    # -- requests --

    def get(self, name: str) -> Any:
        if name in self._names:
            return self._names[name]
        try:
            value = self.request("get", name=name)
        except NotebookError as error:
            error.lookup = True
            raise
        if isinstance(value, Remote) and value._callable:
            self._names[name] = value  # a function or class: fetched once per test cell
        return value

    def request(self, op: str, **fields: Any) -> Any:
        """Send a request to the kernel and return its decoded result."""
        if self._msg_id is None:
            raise ChannelError("the notebook is reachable only while a test cell runs")
        errors_before = len(self._callback_errors)
        message = {"kind": "request", "op": op, **fields}
        while True:
            reply = self._exchange(message)
            if reply.get("kind") == "callback":
                message = self._run_callback(reply)
                continue
            break
        if len(self._callback_errors) > errors_before:
            raise self._callback_errors[errors_before]  # the test's own check failed in it
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            if error.get("type") == "KeyboardInterrupt" and self._budget <= 0:
                raise KernelTimeout("the notebook's code ran past the time limit and was "
                                    "interrupted")
            raise notebook_error(error)
        if "ok" not in reply:
            raise ChannelError("the notebook's kernel sent a malformed answer")
        return self.decode(reply["ok"])

    def _exchange(self, message: dict) -> dict:
        message["sync"] = self.codec.sync_out()
        self.kc.input(json.dumps(message))
        return self._receive()

    def _run_callback(self, reply: dict) -> dict:
        try:
            function = self.codec.callbacks[int(reply["key"])]
            args = [self.decode(a) for a in reply.get("args", [])]
            kwargs = {str(k): self.decode(v) for k, v in reply.get("kwargs", {}).items()}
            return {"kind": "callback-result", "ok": self.encode(function(*args, **kwargs))}
        except Exception as error:  # reported to the notebook, then raised here
            self._callback_errors.append(error)
            return {"kind": "callback-result", "error": server.describe_error(error)}

    def _receive(self) -> dict:
        """Wait for the kernel's next message, collecting what it prints meanwhile."""
        start = time.monotonic()
        try:
            return self._wait(start + self._budget)
        finally:
            self._budget -= time.monotonic() - start

    def _wait(self, deadline: float) -> dict:
        import zmq

        poller = zmq.Poller()
        stdin, iopub, shell = (self.kc.stdin_channel, self.kc.iopub_channel,
                               self.kc.shell_channel)
        for channel in (stdin, iopub, shell):
            poller.register(channel.socket, zmq.POLLIN)
        interrupted = None
        while True:
            now = time.monotonic()
            if interrupted is None and now > deadline:
                self.interrupt()
                interrupted = now
            elif interrupted is not None and now > interrupted + _GRACE:
                self._msg_id = None
                raise KernelStuck("the notebook's code ran past the time limit and could not "
                                  "be interrupted")
            wait = (deadline if interrupted is None else interrupted + _GRACE) - now
            events = dict(poller.poll(timeout=max(1, min(1000, int(wait * 1000) + 1))))
            if not events:
                self._check_alive()
                continue
            if iopub.socket in events:
                self._drain_iopub(self._msg_id)
            if shell.socket in events:
                reply = shell.get_msg(timeout=0)
                if reply["parent_header"].get("msg_id") == self._msg_id:
                    self._drain_iopub(self._msg_id)
                    content = reply["content"]
                    self._msg_id = None
                    if content.get("ename") == "KeyboardInterrupt" and interrupted is not None:
                        raise KernelTimeout("the notebook's code ran past the time limit")
                    raise ChannelError(
                        "the notebook's kernel stopped answering the tests "
                        f"({content.get('ename', 'no error')}: {content.get('evalue', '')})")
            if stdin.socket in events:
                request = stdin.get_msg(timeout=0)
                self._drain_iopub(self._msg_id)
                try:
                    message = json.loads(request["content"]["prompt"])
                    if not isinstance(message, dict):
                        raise ValueError("not an object")
                except ValueError as error:
                    raise ChannelError(f"the notebook's kernel sent a malformed message "
                                       f"({error})") from None
                self.codec.sync_in(message.get("sync"))
                return message

    def _drain_iopub(self, msg_id: str | None) -> None:
        while True:
            try:
                msg = self.kc.iopub_channel.get_msg(timeout=0)
            except Exception:  # queue.Empty: nothing more
                return
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                self._collect({"output_type": "stream", "name": content.get("name", "stdout"),
                               "text": str(content.get("text", ""))})
            elif kind in ("display_data", "update_display_data"):
                self._collect({"output_type": "display_data",
                               "data": dict(content.get("data", {})),
                               "metadata": dict(content.get("metadata", {}))})

    def _collect(self, output: dict) -> None:
        size = len(json.dumps(output, default=str))
        self._output_bytes += size
        if self._output_bytes <= self.max_output_bytes:
            self.outputs.append(output)

    def _check_alive(self) -> None:
        if not _call(self.km.is_alive):
            self._msg_id = None
            raise ChannelError("the notebook's kernel died")

    def interrupt(self) -> None:
        if self._interrupt is not None:
            self._interrupt()
        else:
            _call(self.km.interrupt_kernel)

class Codec:
    """The checker's side of the codec (the kernel's is in ``bncore._notebook_server``): what a
    test passes in, encoded; what the kernel sends back, decoded and checked. ``owner`` is the
    channel the :class:`Remote` handles it makes belong to."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.linked: dict[int, list] = {}   # key -> [array, copy as last synced]
        self.linked_ids: dict[int, int] = {}
        self.callbacks: dict[int, Callable[..., Any]] = {}
        self.remotes: dict[int, Remote] = {}  # one handle per object: `s.fit(X) is s` holds

    def sync_out(self) -> dict[str, str]:
        changed = {}
        for key, (array, copy) in self.linked.items():
            if array.shape != copy.shape or not np.array_equal(array, copy, equal_nan=True):
                changed[str(key)] = server.encode_array(array)
                self.linked[key][1] = array.copy()
        return changed

    def sync_in(self, changed: Any) -> None:
        if not isinstance(changed, dict):
            return
        for key, text in changed.items():
            entry = self.linked.get(int(key))
            if entry is None:
                continue
            new = server.decode_array(text)
            if new.shape == entry[0].shape:
                np.copyto(entry[0], new, casting="unsafe")
            entry[1] = entry[0].copy()

    def encode(self, value: Any, depth: int = 0) -> Any:
        """A value of the test's as the kernel will decode it."""
        kind = type(value)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:
            return server.encode_float(value)
        if kind is complex:
            return {"complex": [server.encode_float(value.real),
                                server.encode_float(value.imag)]}
        if isinstance(value, np.ndarray) and server.is_plain_array(np.asarray(value)):
            if type(value) is np.ndarray:
                key = self.linked_ids.get(id(value))
                if key is not None and self.linked[key][0] is value:
                    return {"linked": key}
                key = len(self.linked) + 1
                self.linked[key] = [value, value.copy()]
                self.linked_ids[id(value)] = key
                return {"nd": server.encode_array(value), "link": key}
            return {"nd": server.encode_array(np.asarray(value))}
        if server.is_numpy_scalar(value):
            return {"nd": server.encode_array(np.asarray(value)), "scalar": True}
        if isinstance(value, Remote):
            if value._channel is not self.owner:
                raise TypeError("that object belongs to another notebook")
            return {"remote": value._key}
        if depth < server.MAX_DEPTH:
            if kind is tuple or kind is list:
                return {kind.__name__: [self.encode(v, depth + 1) for v in value]}
            if kind is dict:
                return {"dict": [[self.encode(k), self.encode(v, depth + 1)]
                                 for k, v in value.items()]}
            if kind is range:
                return {"range": [value.start, value.stop, value.step]}
        if callable(value):
            key = len(self.callbacks) + 1
            self.callbacks[key] = value
            return {"callback": key}
        raise TypeError(f"a {kind.__name__} cannot be passed to the notebook: pass plain data "
                        "(numbers, strings, arrays, lists, dicts) or objects from the notebook")

    def decode(self, value: Any, depth: int = 0) -> Any:
        """What the kernel sent, as plain data and handles; ChannelError for anything else."""
        kind = type(value)
        if value is None or kind in (bool, int, float, str):
            return value
        if depth > server.MAX_DEPTH + 2:
            raise ChannelError("the notebook's answer is nested too deeply")
        if kind is list:  # JSON lists only appear inside the tagged forms below
            raise ChannelError("the notebook's kernel sent a malformed answer")
        if kind is not dict or len(value) == 0:
            raise ChannelError("the notebook's kernel sent a malformed answer")
        try:
            if "float" in value:
                text = value["float"]
                if text not in ("nan", "inf", "-inf"):
                    raise ValueError(text)
                return float(text)
            if "complex" in value:
                real, imag = (self.decode(v, depth + 1) for v in value["complex"])
                if type(real) is not float and type(real) is not int \
                        or type(imag) is not float and type(imag) is not int:
                    raise ValueError("complex parts")
                return complex(real, imag)
            if "nd" in value:
                array = server.decode_array(value["nd"])
                return array[()] if value.get("scalar") is True else array
            if "linked" in value:
                return self.linked[int(value["linked"])][0]
            if "tuple" in value:
                return tuple(self.decode(v, depth + 1) for v in _items(value["tuple"]))
            if "list" in value:
                return [self.decode(v, depth + 1) for v in _items(value["list"])]
            if "range" in value:
                return range(*(int(v) for v in _items(value["range"])))
            if "dict" in value:
                result = {}
                for pair in _items(value["dict"]):
                    k, v = _items(pair)
                    key = self.decode(k, depth + 1)
                    if type(key) not in (str, int, float, bool) and key is not None:
                        raise ValueError("dict key")
                    result[key] = self.decode(v, depth + 1)
                return result
            if "remote" in value:
                key = int(value["remote"])
                if key not in self.remotes:
                    self.remotes[key] = Remote(
                        self.owner, key, str(value.get("type", "object"))[:100],
                        value.get("callable") is True, str(value.get("name", ""))[:100])
                return self.remotes[key]
        except ChannelError:
            raise
        except (ValueError, TypeError, KeyError, OverflowError) as error:
            raise ChannelError(f"the notebook's kernel sent a malformed answer ({error})") \
                from None
        raise ChannelError("the notebook's kernel sent a malformed answer")


def _call(method: Callable[[], Any]) -> Any:
    """Call a kernel manager's method, synchronous or asynchronous alike."""
    import inspect

    if inspect.iscoroutinefunction(method):
        from jupyter_core.utils import run_sync

        return run_sync(method)()
    return method()


def _items(value: Any) -> list:
    if type(value) is not list:
        raise ValueError("expected a list")
    return value
