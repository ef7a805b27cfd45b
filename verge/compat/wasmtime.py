"""wasmtime-py as :mod:`verge.compute.runtime` and :mod:`verge.compute.host` use it beyond its
documented API: the raw C API in the private ``wasmtime._ffi`` and a few private names.

Why: a function request is a fresh Store, WASI context and instance. wasmtime does that
natively in ~17 µs (pooling allocator, pre-linked ``InstancePre``); wasmtime-py's wrappers
around the same calls cost ~150 µs more in Python (a managed object, typed pointers and a
type query per call). So the per-request path drives the C API itself (:class:`Sandbox`).

What is touched, and why (the runtime's docstring has the measurements):

* **The pooling allocator** (:func:`enable_pooling_allocator`): ``wasmtime.Config`` does not
  expose it; ``_ffi.wasmtime_pooling_allocation_config_*`` and
  ``wasmtime_pooling_allocation_strategy_set(config.ptr(), ...)`` do. Without these symbols
  the engine uses the default (on-demand) allocator: slower, still correct.
* **The per-request calls** (:data:`C_FUNCTIONS`, used by :class:`Sandbox` and
  :func:`wasi_config`): ``_ffi.dll``'s functions declared again over plain addresses
  (``c_void_p``): no typed pointer objects per call. The short ones keep the GIL
  (``PYFUNCTYPE``: cheaper than releasing it, and the caller cannot then wait for another
  thread to hand it back); the ones that run wasm release it (``CFUNCTYPE``), so the epoch
  ticker and host functions run meanwhile. Their C signatures are checked against
  ``_bindings.py`` (:func:`check`).
* **The WASI configuration** (:func:`wasi_config`): environment and argv as C arrays
  (:func:`c_strings`: one NUL-joined blob and one array of addresses into it; the address of
  a ``bytes`` object's data is ``id(blob)`` plus a fixed offset, the same in every CPython
  3.x), stdin as in-memory bytes (``wasm_byte_vec_new`` + ``wasi_config_set_stdin_bytes``,
  which takes ownership), stdout and stderr as files wasmtime opens by path and writes
  natively (a custom output stream, even a native one, costs more: it runs on a tokio task).
* **Failures as wasmtime-py exceptions** (only off the fast path): ``WasmtimeError._from_ptr``
  (an ``ExitTrap`` for a non-zero ``proc_exit``), ``Trap._from_ptr``, and the exception a
  Python host function raised, which wasmtime-py parks in ``wasmtime._func.LAST_EXCEPTION``.
* **Host functions** see the sandbox's store and memory as wasmtime-py objects
  (:meth:`Sandbox.store_view`, :meth:`Sandbox.memory`, ``Memory._from_raw``), and
  :func:`memory_address` gives a memory's host address:
  ``ctypes.addressof(memory.data_ptr(store).contents)`` (``data_ptr`` must keep returning a
  ``POINTER(c_ubyte)`` to the first byte).

When upgrading wasmtime: the C API (``_bindings.py``) is regenerated each release; compare
:func:`_c_signatures` with it, and look at ``_func.py`` (``LAST_EXCEPTION``), ``_error.py``
and ``_trap.py`` (``_from_ptr``), ``_memory.py`` (``_from_raw``, ``data_ptr``). Run
``tests/compat/test_wasmtime.py`` and ``tests/compute/test_runtime.py``; then move
``SUPPORTED``. (Compiled artefacts are keyed by the wasmtime version already: an upgrade
never loads a stale one.)
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import wasmtime
from wasmtime import _bindings, _func
from wasmtime import _ffi as ffi

from verge.compat import Expect, VersionRange

__all__ = [
    "C_FUNCTIONS",
    "POOLING_AVAILABLE",
    "POOLING_SETTERS",
    "SUPPORTED",
    "EnvArrays",
    "Sandbox",
    "StoreView",
    "address",
    "c_argv",
    "c_strings",
    "check",
    "enable_pooling_allocator",
    "memory_address",
    "wasi_config",
]

_MODULE = "verge/compat/wasmtime.py"
WASMTIME = VersionRange("wasmtime", minimum="50.0.1", below="51", tested="50.0.1", module=_MODULE)
SUPPORTED = (WASMTIME,)

_POOLING = "wasmtime_pooling_allocation_config_"
POOLING_SETTERS = {  # name -> C type of its value
    "total_memories": ctypes.c_uint32,
    "total_core_instances": ctypes.c_uint32,
    "total_tables": ctypes.c_uint32,
    "total_stacks": ctypes.c_uint32,
    "max_memory_size": ctypes.c_size_t,
    "table_elements": ctypes.c_size_t,
    "linear_memory_keep_resident": ctypes.c_size_t,
    "table_keep_resident": ctypes.c_size_t,
}
POOLING_AVAILABLE = hasattr(ffi, "wasmtime_pooling_allocation_strategy_set")

_VP = ctypes.POINTER


# --------------------------------------------------------------------------- the engine


def enable_pooling_allocator(config: wasmtime.Config, settings: Mapping[str, int]) -> bool:
    """Make ``config`` use the pooling allocator with these ``POOLING_SETTERS`` values.

    False (``config`` unchanged) when this wasmtime's C API has no pooling allocator.
    """
    if not POOLING_AVAILABLE:
        return False
    pool = ffi.wasmtime_pooling_allocation_config_new()
    try:
        for name, value in settings.items():
            getattr(ffi, f"{_POOLING}{name}_set")(pool, value)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pool)
    return True


# --------------------------------------------------------------------------- the C API


def _c_signatures() -> dict[str, tuple[list[Any], Any]]:
    """Every C function used: name -> (argument types, result type), as ``_bindings.py``
    declares them (checked by :func:`check`)."""
    config_p, wasi_p = _VP(ffi.wasm_config_t), _VP(ffi.wasi_config_t)
    pool_p, chars = _VP(ffi.wasmtime_pooling_allocation_config_t), _VP(ctypes.c_char)
    store_p, context_p = _VP(ffi.wasmtime_store_t), _VP(ffi.wasmtime_context_t)
    error_p, trap_pp = _VP(ffi.wasmtime_error_t), _VP(_VP(ffi.wasm_trap_t))
    i64 = ctypes.c_int64
    signatures: dict[str, tuple[list[Any], Any]] = {
        "wasmtime_store_new": (
            [_VP(ffi.wasm_engine_t), ctypes.c_void_p, ctypes.CFUNCTYPE(None, ctypes.c_void_p)],
            store_p,
        ),
        "wasmtime_store_context": ([store_p], context_p),
        "wasmtime_store_limiter": ([store_p, i64, i64, i64, i64, i64], None),
        "wasmtime_store_delete": ([store_p], None),
        "wasmtime_context_set_epoch_deadline": ([context_p, ctypes.c_uint64], None),
        "wasmtime_context_set_wasi": ([context_p, wasi_p], error_p),
        "wasi_config_new": ([], wasi_p),
        "wasi_config_delete": ([wasi_p], None),
        "wasi_config_set_env": ([wasi_p, ctypes.c_size_t, _VP(chars), _VP(chars)], ctypes.c_bool),
        "wasi_config_set_argv": ([wasi_p, ctypes.c_size_t, _VP(chars)], ctypes.c_bool),
        "wasm_byte_vec_new": (
            [_VP(ffi.wasm_byte_vec_t), ctypes.c_size_t, _VP(ffi.wasm_byte_t)],
            None,
        ),
        "wasi_config_set_stdin_bytes": ([wasi_p, _VP(ffi.wasm_byte_vec_t)], None),
        "wasi_config_set_stdout_file": ([wasi_p, chars], ctypes.c_bool),
        "wasi_config_set_stderr_file": ([wasi_p, chars], ctypes.c_bool),
        "wasmtime_instance_pre_instantiate": (
            [_VP(ffi.wasmtime_instance_pre_t), context_p, _VP(ffi.wasmtime_instance_t), trap_pp],
            error_p,
        ),
        "wasmtime_instance_export_get": (
            [
                context_p,
                _VP(ffi.wasmtime_instance_t),
                chars,
                ctypes.c_size_t,
                _VP(ffi.wasmtime_extern_t),
            ],
            ctypes.c_bool,
        ),
        "wasmtime_func_call": (
            [
                context_p,
                _VP(ffi.wasmtime_func_t),
                _VP(ffi.wasmtime_val_t),
                ctypes.c_size_t,
                _VP(ffi.wasmtime_val_t),
                ctypes.c_size_t,
                trap_pp,
            ],
            error_p,
        ),
        "wasmtime_memory_data_size": ([context_p, _VP(ffi.wasmtime_memory_t)], ctypes.c_size_t),
        "wasmtime_error_exit_status": ([error_p, _VP(ctypes.c_int)], ctypes.c_bool),
        "wasmtime_error_delete": ([error_p], None),
        f"{_POOLING}new": ([], pool_p),
        f"{_POOLING}delete": ([pool_p], None),
        "wasmtime_pooling_allocation_strategy_set": ([config_p, pool_p], None),
    }
    for name, value_type in POOLING_SETTERS.items():
        signatures[f"{_POOLING}{name}_set"] = ([pool_p, value_type], None)
    return signatures


# the calls that run wasm (or may): these release the GIL
_RUN_WASM = frozenset(
    {"wasmtime_instance_pre_instantiate", "wasmtime_func_call", "wasmtime_store_delete"}
)


def _plain(ctype: Any) -> Any:
    """The C type as an address-taking ctypes type: any pointer becomes ``c_void_p``."""
    if ctype is not None and issubclass(ctype, (ctypes._Pointer, ctypes._CFuncPtr)):
        return ctypes.c_void_p
    return ctype


class _CFunctions:
    """The per-request C functions over plain addresses; ``<name>_nogil`` releases the GIL."""

    def __init__(self) -> None:
        for name, (argtypes, restype) in _c_signatures().items():
            if "pooling" in name:  # (engine set-up: through _ffi)
                continue
            plain = [_plain(restype), *map(_plain, argtypes)]
            setattr(self, name, ctypes.PYFUNCTYPE(*plain)((name, ffi.dll)))
            if name in _RUN_WASM:
                setattr(self, f"{name}_nogil", ctypes.CFUNCTYPE(*plain)((name, ffi.dll)))


C_FUNCTIONS = _CFunctions()
_C = C_FUNCTIONS


# --------------------------------------------------------------------------- C strings

_PROBE = b"probe"
# where a bytes object's data starts, from its id() (CPython: the object header)
_BYTES_DATA = ctypes.cast(ctypes.c_char_p(_PROBE), ctypes.c_void_p).value - id(_PROBE)  # type: ignore[operator]

EnvArrays = tuple[int, int, int]  # (count, address of names[count], address of values[count])


def c_strings(parts: Sequence[str]) -> tuple[int, tuple[object, ...]]:
    """A ``char *[len(parts)]`` of ``parts`` (UTF-8; unencodable characters replaced):
    (its address, the objects that must stay alive while it is used).

    One NUL-joined blob and one array of addresses into it: the cheapest form found (this
    runs on every request). A bytes object's data always ends with a NUL of its own.
    """
    text = "\0".join(parts)
    blob = text.encode("utf-8", "replace")
    if len(blob) == len(text):  # ASCII: the lengths are the strings'
        steps = [len(p) + 1 for p in parts]
    else:
        steps = [len(p.encode("utf-8", "replace")) + 1 for p in parts]
    starts = list(accumulate(steps, initial=id(blob) + _BYTES_DATA))
    starts.pop()  # one past the end
    pointers = array("Q", starts)
    return pointers.buffer_info()[0], (blob, pointers)


def c_argv(name: str) -> tuple[int, tuple[object, ...]]:
    """argv = [name] as a C array for :func:`wasi_config`: (address, keep-alive); build once."""
    return c_strings([name])


# --------------------------------------------------------------------------- WASI


def wasi_config(
    envs: Sequence[EnvArrays],
    argv: int,
    stdin: bytes,
    stdout_path: bytes,
    stderr_path: bytes,
) -> int:
    """A ``wasi_config_t *`` giving exactly the variables of ``envs`` (in order), ``argv``
    (a one-string array, :func:`c_argv`), ``stdin`` in memory, and stdout and stderr written
    by wasmtime to the files at the two paths (created or truncated). The caller owns it
    until :meth:`Sandbox.set_wasi`.

    ValueError: a name or value is not valid UTF-8; OSError: an output file cannot be opened.
    """
    config = _C.wasi_config_new()
    try:
        for count, names, values in envs:
            if count and not _C.wasi_config_set_env(config, count, names, values):
                raise ValueError("environment is not valid UTF-8")
        _C.wasi_config_set_argv(config, 1, argv)
        if stdin:
            vec = ffi.wasm_byte_vec_t()
            _C.wasm_byte_vec_new(ctypes.addressof(vec), len(stdin), stdin)  # copies
            _C.wasi_config_set_stdin_bytes(config, ctypes.addressof(vec))  # takes ownership
        if not (
            _C.wasi_config_set_stdout_file(config, stdout_path)
            and _C.wasi_config_set_stderr_file(config, stderr_path)
        ):
            raise OSError("cannot open the output files")
    except BaseException:
        _C.wasi_config_delete(config)
        raise
    return config


# --------------------------------------------------------------------------- sandboxes

_EXTERN_OF = ffi.wasmtime_extern_t.of.offset
_ERROR_P, _TRAP_P = _VP(ffi.wasmtime_error_t), _VP(ffi.wasm_trap_t)
_CONTEXT_P = _VP(ffi.wasmtime_context_t)


class StoreView:
    """A Store as wasmtime-py's ``Memory`` methods take it (they only ask for its context)."""

    __slots__ = ("_pointer",)

    def __init__(self, context: int) -> None:
        self._pointer = ctypes.cast(context, _CONTEXT_P)

    def _context(self) -> Any:
        return self._pointer


class Sandbox:
    """Runs command modules, each in a fresh Store, one at a time: make one per thread.

    ``open`` (a store with a memory limit and an epoch deadline), ``set_wasi``,
    ``instantiate`` (an ``InstancePre``), ``call_start``, ``memory_size``, ``close``. Failures
    come back as wasmtime-py exceptions (``WasmtimeError``, ``ExitTrap``, ``Trap``, or the
    exception a Python host function raised), returned rather than raised.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine  # (kept alive: stores point into it)
        self._engine_at = address(engine)
        self.store = 0
        self.context = 0
        self.exit_code = 0
        self._instance = ffi.wasmtime_instance_t()
        self._memory = ffi.wasmtime_extern_t()
        self._start = ffi.wasmtime_extern_t()
        self._trap = ctypes.c_void_p()
        self._code = ctypes.c_int()
        at = ctypes.addressof
        self._instance_at = at(self._instance)
        self._memory_item_at, self._start_item_at = at(self._memory), at(self._start)
        self._memory_at = self._memory_item_at + _EXTERN_OF
        self._start_at = self._start_item_at + _EXTERN_OF
        self._trap_at, self._code_at = at(self._trap), at(self._code)

    def open(self, memory_bytes: int, deadline_ticks: int) -> None:
        """A fresh store: linear memory up to ``memory_bytes``, wasm stopped after the
        engine's epoch has moved ``deadline_ticks`` on."""
        if self.store:
            self.close()
        store = self.store = _C.wasmtime_store_new(self._engine_at, None, None)
        self.context = _C.wasmtime_store_context(store)
        _C.wasmtime_store_limiter(store, memory_bytes, -1, -1, -1, -1)
        _C.wasmtime_context_set_epoch_deadline(self.context, deadline_ticks)

    def set_deadline(self, ticks: int) -> None:
        _C.wasmtime_context_set_epoch_deadline(self.context, ticks)

    def set_wasi(self, config: int) -> None:
        """Give the store its WASI context (from :func:`wasi_config`; taken even on error)."""
        error = _C.wasmtime_context_set_wasi(self.context, config)
        if error:
            raise self._failure(error)

    def instantiate(self, pre: int) -> BaseException | None:
        """Instantiate an ``InstancePre`` (:func:`address` of it) of a command module (its
        ``memory`` and ``_start`` exports)."""
        error = _C.wasmtime_instance_pre_instantiate_nogil(
            pre, self.context, self._instance_at, self._trap_at
        )
        if error or self._trap.value:
            return self._failure(error)
        found = _C.wasmtime_instance_export_get(
            self.context, self._instance_at, b"memory", 6, self._memory_item_at
        ) and _C.wasmtime_instance_export_get(
            self.context, self._instance_at, b"_start", 6, self._start_item_at
        )
        if not found:  # (their kinds were checked when the module was loaded)
            return wasmtime.WasmtimeError("not a command module: no memory or _start export")
        return None

    def call_start(self) -> BaseException | None:
        """Run ``_start``: None when it returned or exited (status in ``exit_code``)."""
        self.exit_code = 0
        error = _C.wasmtime_func_call_nogil(
            self.context, self._start_at, None, 0, None, 0, self._trap_at
        )
        if error:
            if _C.wasmtime_error_exit_status(error, self._code_at):
                _C.wasmtime_error_delete(error)
                self.exit_code = self._code.value
                return None
            return self._failure(error)
        return self._failure(None) if self._trap.value else None

    def memory_size(self) -> int:
        """The instance's linear memory size in bytes (after ``instantiate``)."""
        return _C.wasmtime_memory_data_size(self.context, self._memory_at)

    def store_view(self) -> StoreView:
        """The open store as host functions use it (``Memory`` methods)."""
        return StoreView(self.context)

    def memory(self) -> wasmtime.Memory:
        """The instance's memory as a wasmtime-py ``Memory`` (for host functions)."""
        raw = ffi.wasmtime_memory_t.from_buffer_copy(self._memory.of.memory)
        return wasmtime.Memory._from_raw(raw)

    def close(self, release_gil: bool = False) -> None:
        """Drop the store (its instance, memory and WASI context); ``release_gil`` for a
        store with much memory to give back."""
        store, self.store, self.context = self.store, 0, 0
        if store:
            delete = _C.wasmtime_store_delete_nogil if release_gil else _C.wasmtime_store_delete
            delete(store)

    def _failure(self, error: int | None) -> BaseException:
        trap, self._trap.value = self._trap.value, None
        if error:
            failure: BaseException = wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, _ERROR_P))
        else:
            failure = wasmtime.Trap._from_ptr(ctypes.cast(trap, _TRAP_P))
        raised, _func.LAST_EXCEPTION = _func.LAST_EXCEPTION, None  # a host function's
        return raised if raised is not None else failure


# --------------------------------------------------------------------------- instances


def address(managed: wasmtime.InstancePre | wasmtime.Engine) -> int:
    """The C pointer of a wasmtime-py object (valid while the object lives)."""
    return ctypes.cast(managed.ptr(), ctypes.c_void_p).value or 0


def memory_address(memory: wasmtime.Memory, store: Any) -> int:
    """The host address of byte 0 of a linear memory (bounds-check offsets against
    ``memory.data_len(store)``; the address may change when the memory grows)."""
    return ctypes.addressof(memory.data_ptr(store).contents)


# --------------------------------------------------------------------------- check


def check() -> None:
    """CompatError unless wasmtime has every C function (with its signature) and private
    name this module relies on; the pooling allocator counts as required."""
    expect = Expect("wasmtime", WASMTIME.installed(), _MODULE)
    for struct in (
        "wasm_byte_vec_t",
        "wasmtime_extern_t",
        "wasmtime_instance_t",
        "wasmtime_memory_t",
        "wasmtime_func_t",
    ):
        expect.that(isinstance(getattr(ffi, struct, None), type), f"_ffi.{struct}")
    for name, (argtypes, restype) in _c_signatures().items():
        expect.function(ffi, name)
        raw = expect.attribute(_bindings, f"_{name}", f"the C function {name}")
        expect.ctypes_function(raw, argtypes, restype, f"the C function {name}")
    expect.that(POOLING_AVAILABLE, "the pooling allocator's C API (gone)")
    expect.that(hasattr(ffi, "dll"), "_ffi.dll (gone)")
    expect.that(
        [name for name, _ in ffi.wasmtime_extern_t._fields_] == ["kind", "of"],
        "wasmtime_extern_t fields",
    )
    expect.that(hasattr(_func, "LAST_EXCEPTION"), "_func.LAST_EXCEPTION (gone)")
    expect.function(wasmtime.WasmtimeError, "_from_ptr", ["ptr"])
    expect.function(wasmtime.Trap, "_from_ptr", ["ptr"])
    expect.function(wasmtime.Memory, "_from_raw", ["mem"])
    expect.function(wasmtime.Config, "ptr", ["self"])
    expect.function(wasmtime.Engine, "ptr", ["self"])
    expect.function(wasmtime.InstancePre, "ptr", ["self"])
    expect.function(wasmtime.Memory, "data_ptr", ["self", "store"])
    expect.function(wasmtime.Memory, "data_len", ["self", "store"])
    probe = "check\0é"
    address, keep = c_strings([probe, "x"])
    first = ctypes.cast(address, _VP(ctypes.c_char_p))
    expect.that(
        (first[0], first[1]) == (b"check", b"x") and keep[0] == probe.encode() + b"\0x",
        "the layout of bytes objects (c_strings)",
    )
