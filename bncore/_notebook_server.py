"""The notebook's side of the channel between a graded notebook's kernel and its checker.

The checker (the self-check, or the grader) runs a notebook's test cells in its own process.
The notebook's kernel runs everything else: the student's answers and the locked set-up cells.
When a test calls ``nb.batchnorm_forward(x, gamma, beta)``, the call crosses to the kernel, runs
there, and what it returns crosses back as plain data. This file is the kernel's end: its text
is executed in the kernel before the first cell (no import of bncore is needed there), and it
defines ``__bncore_server__``.

The two ends talk through the kernel's standard input: while a test cell runs, the checker
sends one execute request, ``__bncore_server__.serve()``, and the kernel then asks for its work
with ``input()``. Each message is JSON. The checker imports this module for the codec below,
which both ends share: ``encode_array`` / ``decode_array`` carry NumPy arrays as ``.npy``
bytes (never pickles), and only arrays of a plain dtype (bool, integer, float, complex).

Values cross as:

* ``None``, ``bool``, ``int``, ``str``, ``float`` (``{"float": "nan"}`` for NaN and infinities),
  ``complex`` (``{"complex": [re, im]}``) -- exact types only, never subclasses;
* ``{"nd": "<base64 .npy>"}`` an array, ``{"nd": ..., "scalar": true}`` a NumPy scalar;
* ``{"tuple": [...]}``, ``{"list": [...]}``, ``{"dict": [[key, value], ...]}``;
* ``{"linked": k}`` an array the checker passed in: both ends hold a copy, and changes on
  either side are sent with the next message (``"sync"``), so that in-place updates behave as
  they would in one process;
* ``{"remote": k, "type": "ClassName"}`` any other object: it stays in the kernel, and the
  checker gets a handle it can call, read attributes of and pass back;
* ``{"callback": k}`` (checker to kernel) a function of the checker's: calling it in the
  kernel asks the checker to run it.
"""

from __future__ import annotations

import base64
import builtins
import io
import json
import math
import sys
import traceback
from typing import Any

try:
    import numpy as np
except ImportError:  # reported by the cells that need it; the channel still works
    np = None  # type: ignore[assignment]

PLAIN_KINDS = "biufc"  # the dtype kinds that may cross: bool, int, uint, float, complex
MAX_DEPTH = 32
#: The file name the kernel's copy of this code runs under (its frames are left out of the
#: tracebacks reported to the checker).
FILENAME = "<bncore notebook server>"
_OWN_FILES = (FILENAME, globals().get("__file__") or FILENAME)


def encode_array(array: Any) -> str:
    """A plain-dtype ndarray as base64 ``.npy`` bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.require(array, requirements="C"), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_array(text: str, max_bytes: int = 1 << 28) -> Any:
    """The ndarray of :func:`encode_array`; ValueError for anything but a plain-dtype array."""
    if np is None:
        raise ModuleNotFoundError("NumPy cannot be imported in this Python", name="numpy")
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) > max_bytes:
        raise ValueError(f"an array of {len(raw)} bytes is larger than the channel allows")
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    if type(array) is not np.ndarray or array.dtype.kind not in PLAIN_KINDS \
            or array.dtype.fields is not None or array.dtype.hasobject:
        raise ValueError(f"not a plain array: {type(array).__name__} {array.dtype}")
    return array


def encode_float(value: float) -> Any:
    return value if math.isfinite(value) else {"float": repr(value)}


def is_plain_array(value: Any) -> bool:
    return np is not None and type(value) is np.ndarray and value.dtype.kind in PLAIN_KINDS \
        and value.dtype.fields is None


def is_numpy_scalar(value: Any) -> bool:
    return np is not None and isinstance(value, np.generic) \
        and type(value).__module__ == "numpy" and np.dtype(type(value)).kind in PLAIN_KINDS


_MISSING = object()


class _Callback:
    """A function of the checker's, called from the kernel."""

    def __init__(self, server: NotebookServer, key: int) -> None:
        self._server, self._key = server, key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._server.call_back(self._key, args, kwargs)

    def __repr__(self) -> str:
        return f"<test function {self._key}>"


class CheckerError(Exception):
    """An error that the checker's callback raised, seen from the kernel."""


class NotebookServer:
    """Answers the checker's requests inside the kernel (see the module docstring)."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.objects: dict[int, Any] = {}     # key -> object kept in the kernel (handles)
        self.keys: dict[int, int] = {}        # id(object) -> key
        self.linked: dict[int, list] = {}     # key -> [array, copy as last synced]
        self.linked_ids: dict[int, int] = {}  # id(array) -> key
        self.replaced: dict[str, Any] = {}    # name -> its value before a test replaced it
        self.input = builtins.input

    # -- the codec, kernel side --

    def encode(self, value: Any, depth: int = 0) -> Any:
        kind = type(value)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:
            return encode_float(value)
        if kind is complex:
            return {"complex": [encode_float(value.real), encode_float(value.imag)]}
        if np is not None and kind is np.ndarray and id(value) in self.linked_ids \
                and self.linked[self.linked_ids[id(value)]][0] is value:
            return {"linked": self.linked_ids[id(value)]}
        if is_plain_array(value):
            return {"nd": encode_array(value)}
        if is_numpy_scalar(value):
            return {"nd": encode_array(np.asarray(value)), "scalar": True}
        if kind is range:
            return {"range": [value.start, value.stop, value.step]}
        if depth < MAX_DEPTH:
            if kind is tuple or kind is list:
                return {kind.__name__: [self.encode(v, depth + 1) for v in value]}
            if kind is dict and all(type(k) in (str, int, float, bool) or k is None
                                    for k in value):
                return {"dict": [[self.encode(k), self.encode(v, depth + 1)]
                                 for k, v in value.items()]}
        return self.remote(value)

    def remote(self, value: Any) -> dict[str, Any]:
        key = self.keys.get(id(value))
        if key is None or self.objects.get(key) is not value:
            key = len(self.objects) + 1
            self.objects[key] = value
            self.keys[id(value)] = key
        named = isinstance(value, type) or type(value).__name__ in ("function", "method")
        name = getattr(value, "__qualname__", "") or getattr(value, "__name__", "") if named else ""
        return {"remote": key, "type": type(value).__qualname__, "callable": callable(value),
                "name": str(name)[:100]}

    def decode(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return [self.decode(v) for v in value] if isinstance(value, list) else value
        if "float" in value:
            return float(value["float"])
        if "complex" in value:
            return complex(*(self.decode(v) for v in value["complex"]))
        if "nd" in value:
            array = decode_array(value["nd"])
            if "link" in value:
                self.linked[value["link"]] = [array, array.copy()]
                self.linked_ids[id(array)] = value["link"]
            return array[()] if value.get("scalar") else array
        if "linked" in value:
            return self.linked[value["linked"]][0]
        if "tuple" in value:
            return tuple(self.decode(v) for v in value["tuple"])
        if "list" in value:
            return [self.decode(v) for v in value["list"]]
        if "range" in value:
            return range(*(int(v) for v in value["range"]))
        if "dict" in value:
            return {self.decode(k): self.decode(v) for k, v in value["dict"]}
        if "remote" in value:
            return self.objects[value["remote"]]
        if "callback" in value:
            return _Callback(self, value["callback"])
        if "name" in value:
            return self.lookup(value["name"])
        raise ValueError(f"cannot decode {sorted(value)}")

    def lookup(self, name: str) -> Any:
        try:
            return self.namespace[name]
        except KeyError:
            raise NameError(f"name {name!r} is not defined in the notebook: did its cell run, "
                            "and is the name spelled as in the instructions?") from None

    # -- linked arrays: changes travel with every message --

    def sync_out(self) -> dict[int, str]:
        changed = {}
        for key, (array, copy) in self.linked.items():
            if array.shape != copy.shape or not np.array_equal(array, copy, equal_nan=True):
                changed[key] = encode_array(array)
                self.linked[key][1] = array.copy()
        return changed

    def sync_in(self, changed: dict[str, str] | None) -> None:
        for key, text in (changed or {}).items():
            array = self.linked[int(key)][0]
            new = decode_array(text)
            if new.shape == array.shape:
                np.copyto(array, new, casting="unsafe")
            self.linked[int(key)][1] = array.copy()

    # -- requests --

    def handle(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        target: Any = self.decode(request["target"]) if "target" in request else None
        if op == "get":
            return self.lookup(request["name"])
        if op == "getattr":
            return getattr(target, request["name"])
        if op == "setattr":
            return setattr(target, request["name"], self.decode(request["value"]))
        if op == "call":
            args = [self.decode(a) for a in request.get("args", [])]
            kwargs = {k: self.decode(v) for k, v in request.get("kwargs", {}).items()}
            return target(*args, **kwargs)
        if op == "getitem":
            return target[self.decode(request["key"])]
        if op == "setitem":
            target[self.decode(request["key"])] = self.decode(request["value"])
            return None
        if op == "repr":
            return repr(target)[:300]
        if op == "isinstance":
            return isinstance(target, self.decode(request["class"]))
        if op == "replace":
            name = request["name"]
            self.replaced.setdefault(name, self.namespace.get(name, _MISSING))
            self.namespace[name] = self.decode(request["value"])
            return None
        if op == "restore":
            old = self.replaced.pop(request["name"], _MISSING)
            if old is _MISSING:
                self.namespace.pop(request["name"], None)
            else:
                self.namespace[request["name"]] = old
            return None
        raise ValueError(f"unknown request {op!r}")

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The reply to one request: its result or the error it raised."""
        try:
            self.sync_in(request.get("sync"))
            return {"kind": "result", "ok": self.encode(self.handle(request))}
        except BaseException as error:  # every error, SystemExit and interrupts too, is reported
            return {"kind": "result", "error": describe_error(error)}

    def exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a message to the checker and return its reply (a request or a callback's
        result), answering the requests that come first."""
        while True:
            message["sync"] = self.sync_out()
            streams = sys.stdout, sys.stderr
            for stream in streams:  # what was printed goes out first
                if getattr(stream, "_flush_pending", True):  # (ipykernel: only when written)
                    stream.flush()
            # ipykernel's input() flushes both streams again, each a round trip to its I/O
            # thread; with nothing left to flush, it is told there are none.
            sys.stdout = sys.stderr = None
            try:
                reply = json.loads(self.input(json.dumps(message)))
            finally:
                sys.stdout, sys.stderr = streams
            if reply["kind"] == "request":
                message = self.answer(reply)
            else:
                self.sync_in(reply.get("sync"))
                return reply

    def call_back(self, key: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        reply = self.exchange({"kind": "callback", "key": key,
                               "args": [self.encode(a) for a in args],
                               "kwargs": {k: self.encode(v) for k, v in kwargs.items()}})
        if "error" in reply:
            raise CheckerError(reply["error"]["message"])
        return self.decode(reply["ok"])

    def serve(self) -> None:
        """Answer the checker's requests until it says it is done (one test cell)."""
        self.input = builtins.input  # the kernel's own, set for this execute request
        self.forget_links()  # the arrays of the previous test cell
        for name in list(self.replaced):  # a test cell that stopped before putting them back
            self.handle({"op": "restore", "name": name})
        reply = self.exchange({"kind": "ready"})
        while reply["kind"] != "done":
            reply = self.exchange(self.answer(reply) if reply["kind"] == "request"
                                  else {"kind": "result", "error": describe_error(
                                      ValueError(f"unexpected {reply['kind']!r}"))})

    def forget_links(self) -> None:
        self.linked.clear()
        self.linked_ids.clear()


def describe_error(error: BaseException) -> dict[str, Any]:
    """An exception as plain data: its type, its message, and the traceback of the student's
    code (the frames of this file left out)."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if frame.filename not in _OWN_FILES]
    lines = traceback.format_list(frames[-8:])
    return {"type": type(error).__name__,
            "builtin": getattr(builtins, type(error).__name__, None) is type(error),
            "message": str(error)[:4000],
            "traceback": "".join(lines)[-6000:]}


def install(namespace: dict[str, Any]) -> None:
    """Define ``__bncore_server__`` in the notebook's namespace."""
    namespace["__bncore_server__"] = NotebookServer(namespace)
