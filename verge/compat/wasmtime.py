"""wasmtime-py as :mod:`verge.compute.runtime` and :mod:`verge.compute.host` use it beyond its
documented API: the raw C API in the private ``wasmtime._ffi`` and a few private names.

What is touched, and why (the runtime's docstring has the measurements):

* **The pooling allocator** (:func:`enable_pooling_allocator`): ``wasmtime.Config`` does not
  expose it; ``_ffi.wasmtime_pooling_allocation_config_*`` and
  ``wasmtime_pooling_allocation_strategy_set(config.ptr(), ...)`` do. Pre-reserved instance
  slots make instantiate + teardown ~35 µs cheaper per request. Without these symbols the
  engine uses the default (on-demand) allocator: slower, still correct.
* **The WASI configuration** (:func:`wasi_config`): the environment and argv go in as C arrays
  (``wasi_config_set_env`` / ``_set_argv``; one NUL-joined blob and one pointer array cost
  about half of building two ``c_char_p`` arrays, on every request), stdin as in-memory bytes
  (``wasm_byte_vec_new`` + ``wasi_config_set_stdin_bytes``, which takes ownership), stdout and
  stderr as files wasmtime writes natively (``wasi_config_set_stdout_file`` /
  ``_stderr_file``: a Python callback costs ~40 µs per write).
* **One export by name** (:func:`export`): ``_ffi.wasmtime_instance_export_get`` on the
  private ``Store._context()`` and ``Instance._instance``, wrapped by the private
  ``wasmtime._extern.wrap_extern``, instead of building the whole export map (~15 µs). It
  falls back to ``instance.exports(store)`` when ``Instance._from_raw`` or the symbol is gone.
* **Guest memory** (:func:`memory_address`): the host address of a linear memory is
  ``ctypes.addressof(memory.data_ptr(store).contents)``: ``data_ptr`` must keep returning a
  ``POINTER(c_ubyte)`` to the first byte. Host functions read and write guest buffers there
  (after their own bounds check against ``data_len``).

When upgrading wasmtime: the C API (``_bindings.py``) is regenerated each release; compare the
signatures listed in ``_C_SIGNATURES`` with it, and look at ``_store.py`` (``_context``),
``_instance.py`` (``_instance``, ``_from_raw``), ``_extern.py`` (``wrap_extern``) and
``_memory.py`` (``data_ptr``). Run ``tests/compat/test_wasmtime.py`` and
``tests/compute/test_runtime.py``; then move ``SUPPORTED``. (Compiled artefacts are keyed by
the wasmtime version already: an upgrade never loads a stale one.)
"""

from __future__ import annotations

import array
import ctypes
import itertools
from collections.abc import Mapping
from typing import Any

import wasmtime
from wasmtime import _bindings, _extern
from wasmtime import _ffi as ffi

from verge.compat import Expect, VersionRange

__all__ = [
    "EXPORT_FAST",
    "POOLING_AVAILABLE",
    "POOLING_SETTERS",
    "SUPPORTED",
    "c_argv",
    "check",
    "enable_pooling_allocator",
    "export",
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
EXPORT_FAST = hasattr(wasmtime.Instance, "_from_raw") and hasattr(
    ffi, "wasmtime_instance_export_get"
)

_CharPP = ctypes.POINTER(ctypes.POINTER(ctypes.c_char))


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


# --------------------------------------------------------------------------- WASI


def wasi_config(
    env: list[tuple[str, str]],
    argv: tuple[object, object],
    stdin: bytes,
    stdout_path: ctypes.Array[ctypes.c_char],
    stderr_path: ctypes.Array[ctypes.c_char],
) -> wasmtime.WasiConfig:
    """A WASI configuration: exactly ``env``, ``argv`` (from :func:`c_argv`), ``stdin`` in
    memory, stdout and stderr written by wasmtime to the files at the two paths.

    ValueError: a name or value is not valid UTF-8; OSError: an output file cannot be opened.
    """
    config = wasmtime.WasiConfig()
    ptr = config.ptr()
    names, values, _keep = _c_string_arrays(env)
    if not ffi.wasi_config_set_env(ptr, len(env), names, values):
        raise ValueError("environment is not valid UTF-8")
    ffi.wasi_config_set_argv(ptr, 1, argv[0])
    if stdin:
        vec = ffi.wasm_byte_vec_t()
        data = ctypes.cast(ctypes.c_char_p(stdin), ctypes.POINTER(ctypes.c_uint8))
        ffi.wasm_byte_vec_new(ctypes.byref(vec), len(stdin), data)  # copies
        ffi.wasi_config_set_stdin_bytes(ptr, ctypes.byref(vec))  # takes ownership
    if not (
        ffi.wasi_config_set_stdout_file(ptr, stdout_path)
        and ffi.wasi_config_set_stderr_file(ptr, stderr_path)
    ):
        raise OSError("cannot open the output files")
    return config


def c_argv(name: str) -> tuple[object, object]:
    """argv = [name] as a C array for :func:`wasi_config` (and its keep-alive): build once."""
    arg = ctypes.c_char_p(name.encode())
    array_ = (ctypes.c_char_p * 1)(arg)
    return ctypes.cast(array_, _CharPP), (arg, array_)


def _c_string_arrays(env: list[tuple[str, str]]) -> tuple[object, object, tuple[object, ...]]:
    """(names, values, keep-alive) C arrays for ``wasi_config_set_env``.

    One NUL-joined blob and one array of pointers into it: about half the cost of
    building two ctypes ``c_char_p`` arrays (this runs on every request).
    """
    parts = [k.encode() for k, _ in env]
    parts += [v.encode("utf-8", "replace") for _, v in env]
    blob = b"\0".join(parts) + b"\0"
    base = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value or 0
    # (array from a list: several times faster than from an iterator)
    pointers = array.array(
        "Q", list(itertools.accumulate([len(p) + 1 for p in parts], initial=base))
    )
    pointers.pop()  # the address one past the blob
    addr = pointers.buffer_info()[0]
    names = ctypes.cast(ctypes.c_void_p(addr), _CharPP)
    values = ctypes.cast(ctypes.c_void_p(addr + 8 * len(env)), _CharPP)
    return names, values, (blob, pointers)


# --------------------------------------------------------------------------- instances


def export(store: wasmtime.Store, instance: wasmtime.Instance, name: bytes) -> Any:
    """One export of ``instance`` by name (KeyError if none), without the whole export map."""
    if not EXPORT_FAST:
        return instance.exports(store)[name.decode()]
    item = ffi.wasmtime_extern_t()
    found = ffi.wasmtime_instance_export_get(
        store._context(), ctypes.byref(instance._instance), name, len(name), ctypes.byref(item)
    )
    if not found:
        raise KeyError(name.decode())
    return _extern.wrap_extern(item)


def memory_address(memory: wasmtime.Memory, store: wasmtime.Store) -> int:
    """The host address of byte 0 of a linear memory (bounds-check offsets against
    ``memory.data_len(store)``; the address may change when the memory grows)."""
    return ctypes.addressof(memory.data_ptr(store).contents)


# --------------------------------------------------------------------------- check

_VP = ctypes.POINTER


def _c_signatures() -> dict[str, tuple[list[Any], Any]]:
    """Every C function used: name -> (argument types, result type)."""
    config_p, wasi_p = _VP(ffi.wasm_config_t), _VP(ffi.wasi_config_t)
    pool_p, chars = _VP(ffi.wasmtime_pooling_allocation_config_t), _VP(ctypes.c_char)
    signatures: dict[str, tuple[list[Any], Any]] = {
        "wasi_config_set_env": ([wasi_p, ctypes.c_size_t, _VP(chars), _VP(chars)], ctypes.c_bool),
        "wasi_config_set_argv": ([wasi_p, ctypes.c_size_t, _VP(chars)], ctypes.c_bool),
        "wasm_byte_vec_new": (
            [_VP(ffi.wasm_byte_vec_t), ctypes.c_size_t, _VP(ffi.wasm_byte_t)],
            None,
        ),
        "wasi_config_set_stdin_bytes": ([wasi_p, _VP(ffi.wasm_byte_vec_t)], None),
        "wasi_config_set_stdout_file": ([wasi_p, chars], ctypes.c_bool),
        "wasi_config_set_stderr_file": ([wasi_p, chars], ctypes.c_bool),
        "wasmtime_instance_export_get": (
            [
                _VP(ffi.wasmtime_context_t),
                _VP(ffi.wasmtime_instance_t),
                chars,
                ctypes.c_size_t,
                _VP(ffi.wasmtime_extern_t),
            ],
            ctypes.c_bool,
        ),
        f"{_POOLING}new": ([], pool_p),
        f"{_POOLING}delete": ([pool_p], None),
        "wasmtime_pooling_allocation_strategy_set": ([config_p, pool_p], None),
    }
    for name, value_type in POOLING_SETTERS.items():
        signatures[f"{_POOLING}{name}_set"] = ([pool_p, value_type], None)
    return signatures


def check() -> None:
    """CompatError unless wasmtime has every C function (with its signature) and private
    name this module relies on; the fast paths (pooling, one export) count as required."""
    expect = Expect("wasmtime", WASMTIME.installed(), _MODULE)
    for struct in ("wasm_byte_vec_t", "wasmtime_extern_t", "wasmtime_instance_t"):
        expect.that(isinstance(getattr(ffi, struct, None), type), f"_ffi.{struct}")
    for name, (argtypes, restype) in _c_signatures().items():
        expect.function(ffi, name)
        raw = expect.attribute(_bindings, f"_{name}", f"the C function {name}")
        expect.ctypes_function(raw, argtypes, restype, f"the C function {name}")
    expect.that(POOLING_AVAILABLE, "the pooling allocator's C API (gone)")
    expect.that(EXPORT_FAST, "Instance._from_raw or wasmtime_instance_export_get (gone)")
    expect.function(wasmtime.Store, "_context", ["self"])
    expect.function(wasmtime.Instance, "_from_raw", ["instance"])
    expect.that("_instance" in wasmtime.Instance.__annotations__, "Instance._instance")
    expect.function(_extern, "wrap_extern", ["ptr"])
    expect.function(wasmtime.Config, "ptr", ["self"])
    expect.function(wasmtime.WasiConfig, "ptr", ["self"])
    expect.function(wasmtime.Memory, "data_ptr", ["self", "store"])
    expect.function(wasmtime.Memory, "data_len", ["self", "store"])
