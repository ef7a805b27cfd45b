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
* **The native shim** (:func:`shim`, :class:`NativeSandbox`, :class:`NativeTicker`):
  native/wasmshim/wasmshim.c, built by ``native/wasmshim/build.sh`` with gcc against
  ``_ffi.dll``'s library (the wheel's ``_libwasmtime.so``) on first use into
  ``$VERGE_NATIVE_CACHE`` / ``$XDG_CACHE_HOME`` / ``~/.cache`` (``verge-native/<hash of the
  source and the library>/``); ``VERGE_WASMSHIM=off`` never uses it, ``VERGE_WASMSHIM=PATH``
  loads a prebuilt one (of this module's ``_SHIM_ABI``). One C call per invocation with the
  GIL released (:meth:`NativeSandbox.invoke`: the environment as one NUL-joined string, the
  function's constants in a :class:`NativeFunction` made once; back come the results, where
  stdout's CGI head ends and the run's CPU time), and the epoch ticker as a pthread. It
  declares the C API prototypes it uses itself (no headers ship with the
  wheel) and takes the sizes of ``wasmtime_extern_t``/``wasmtime_instance_t`` and the offset
  of ``of`` from ``_ffi`` at run time. Without gcc, or when the build fails, :func:`shim` is
  None (logged once) and the runtime uses the ctypes path below: slower, same results.
* **Host functions** see the sandbox's store and memory as wasmtime-py objects
  (:meth:`Sandbox.store_view`, :meth:`Sandbox.memory`, ``Memory._from_raw``), and
  :func:`memory_address` gives a memory's host address:
  ``ctypes.addressof(memory.data_ptr(store).contents)`` (``data_ptr`` must keep returning a
  ``POINTER(c_ubyte)`` to the first byte).

When upgrading wasmtime: the C API (``_bindings.py``) is regenerated each release; compare
:func:`_c_signatures` with it, and look at ``_func.py`` (``LAST_EXCEPTION``), ``_error.py``
and ``_trap.py`` (``_from_ptr``), ``_memory.py`` (``_from_raw``, ``data_ptr``), and the
prototypes at the top of native/wasmshim/wasmshim.c against crates/c-api/include. Run
``tests/compat/test_wasmtime.py`` and ``tests/compute/test_runtime.py``; then move
``SUPPORTED``. (Compiled artefacts are keyed by the wasmtime version already: an upgrade
never loads a stale one.)
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
import weakref
from array import array
from collections.abc import Mapping, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _bindings, _func
from wasmtime import _ffi as ffi

from verge.compat import Expect, VersionRange

__all__ = [
    "C_FUNCTIONS",
    "POOLING_AVAILABLE",
    "SHIM_SOURCE",
    "POOLING_SETTERS",
    "SUPPORTED",
    "EnvArrays",
    "Sandbox",
    "NativeFunction",
    "NativeSandbox",
    "NativeTicker",
    "StoreView",
    "address",
    "c_argv",
    "c_strings",
    "check",
    "enable_pooling_allocator",
    "head_end",
    "memory_address",
    "native_function",
    "shim",
    "wasi_config",
]

log = logging.getLogger(__name__)

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


def address(managed: wasmtime.InstancePre | wasmtime.Engine | wasmtime.Linker) -> int:
    """The C pointer of a wasmtime-py object (valid while the object lives)."""
    return ctypes.cast(managed.ptr(), ctypes.c_void_p).value or 0


def memory_address(memory: wasmtime.Memory, store: Any) -> int:
    """The host address of byte 0 of a linear memory (bounds-check offsets against
    ``memory.data_len(store)``; the address may change when the memory grows)."""
    return ctypes.addressof(memory.data_ptr(store).contents)


# --------------------------------------------------------------------------- the native shim

SHIM_SOURCE = Path(__file__).resolve().parents[2] / "native" / "wasmshim"
SHIM_ENV = "VERGE_WASMSHIM"  # "off": never; a path: that prebuilt library; unset: build
_SHIM_ABI = 3
_SHIM_USES = (  # wasmshim.c's C API beyond _c_signatures (check() looks for them)
    "wasmtime_engine_increment_epoch",
    "wasmtime_store_epoch_deadline_callback",
    "wasmtime_error_new",
    "wasmtime_linker_allow_shadowing",
    "wasmtime_linker_define_func_unchecked",
    "wasm_valtype_new",
    "wasm_valtype_vec_new",
    "wasm_functype_new",
    "wasm_functype_delete",
    "wasmtime_caller_context",
    "wasmtime_caller_export_get",
    "wasmtime_memory_data",
    "wasmtime_trap_new",
)
_SHIM_LIBRARY = "libwasmshim.so"
_ITEM_BYTES = 64  # wasmshim.c's VS_ITEM_BYTES
_shim_lock = threading.Lock()
_shim_loaded: list[Any] = []  # [] not tried yet; [None] unavailable; [lib]


def shim() -> Any:
    """The wasmshim library (native/wasmshim: one C call per invocation, a native epoch
    ticker), built with gcc on first use into a cache directory; None when it cannot be had
    (no gcc, no source, ``VERGE_WASMSHIM=off``, not Linux): the pure-ctypes path is used."""
    with _shim_lock:
        if not _shim_loaded:
            _shim_loaded.append(_load_shim())
        return _shim_loaded[0]


def _load_shim() -> Any:
    setting = os.environ.get(SHIM_ENV, "")
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    try:
        path = Path(setting) if setting else _build_shim()
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))  # (CDLL: every call releases the GIL)
        if lib.vs_abi() != _SHIM_ABI:
            raise OSError(f"{path}: ABI {lib.vs_abi()}, expected {_SHIM_ABI}")
        _declare_shim(lib)
        return lib
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("wasmshim unavailable (edge functions take the slower ctypes path): %s", exc)
        return None


def _shim_cache_dir() -> Path:
    base = os.environ.get("VERGE_NATIVE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "verge-native"
    home = Path.home()
    if os.access(home, os.W_OK):
        return home / ".cache" / "verge-native"
    return Path(tempfile.gettempdir()) / f"verge-native-{os.getuid()}"


def _private_dir(path: Path) -> Path:
    """``path``, made if missing (0700); OSError unless it and its parent are ours and no one
    else may write to them. The library found there is loaded into the process: in a shared
    place (the /tmp fallback) another user must not be able to put one there first."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for directory in (path.parent, path):
        info = directory.lstat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022 or not os.path.isdir(directory):
            raise OSError(f"{directory} is not a private directory of this user: not used")
    return path


def _build_shim() -> Path | None:
    """The library built from SHIM_SOURCE for this libwasmtime (cached by a hash of both)."""
    source, script = SHIM_SOURCE / "wasmshim.c", SHIM_SOURCE / "build.sh"
    libwasmtime = Path(ffi.dll._name).resolve()
    if not (source.is_file() and script.is_file() and libwasmtime.is_file()):
        return None
    stat = libwasmtime.stat()
    key = hashlib.sha256()
    for part in (
        source.read_bytes(),
        script.read_bytes(),
        str(libwasmtime).encode(),
        f"{stat.st_size}.{stat.st_mtime_ns}".encode(),
    ):
        key.update(part)
    target = _private_dir(_shim_cache_dir() / key.hexdigest()[:16]) / _SHIM_LIBRARY
    if target.is_file():
        return target
    partial = target.with_name(f".{_SHIM_LIBRARY}.{os.getpid()}.{threading.get_ident()}")
    try:
        subprocess.run(
            ["sh", str(script), str(partial), str(libwasmtime.parent)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(partial, target)  # (atomic: workers may build at once)
    except FileNotFoundError as exc:
        raise OSError(f"cannot build: {exc}") from exc
    except subprocess.CalledProcessError as exc:
        raise OSError(f"build failed: {exc.stderr.strip()[-500:]}") from exc
    finally:
        if partial.exists():
            partial.unlink()
    return target


def _declare_shim(lib: Any) -> None:
    vp, i64, u64, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_size_t
    chars = ctypes.c_char_p
    signatures = {
        "vs_ticker_start": ([vp, u64, u64], vp),
        "vs_ticker_stop": ([vp], None),
        "vs_ticker_free": ([vp], None),
        "vs_ticker_parked": ([vp], ctypes.c_int),
        "vs_ticker_bumps": ([vp], ctypes.c_ulong),
        "vs_thread_new": ([vp, vp, size, size, vp, size, size], vp),
        "vs_define_capture": ([vp], vp),
        "vs_thread_free": ([vp], None),
        "vs_thread_out": ([vp], vp),
        "vs_invoke": ([vp, vp, u64, chars, size, chars, size], ctypes.c_int),
        "vs_head_end": ([chars, size, size, ctypes.POINTER(i64)], i64),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    # enter/leave: short, called with the GIL held (no release and re-take)
    for name in ("vs_ticker_enter", "vs_ticker_leave"):
        setattr(lib, f"{name}_gil", ctypes.PYFUNCTYPE(None, vp)((name, lib)))


_LIVE_TICKERS: weakref.WeakSet[NativeTicker] = weakref.WeakSet()


@atexit.register
def _stop_tickers() -> None:
    """Stop every ticker thread before the interpreter tears down the engines they bump."""
    for ticker in list(_LIVE_TICKERS):
        ticker.close()


class NativeTicker:
    """The engine's epoch ticker as a pthread (wasmshim): no GIL, never early.

    Same interface as the runtime's Python ``EpochTicker``: ``enter``/``leave`` around each
    run, it parks after ``idle_ticks`` ticks without one; each bump is a whole tick after the
    previous one, so a deadline of n ticks is never reached in under n - 1 ticks.
    """

    def __init__(
        self, lib: Any, engine: wasmtime.Engine, tick: float, idle_ticks: int = 500
    ) -> None:
        self._lib = lib
        self._engine = engine  # (kept alive: the thread bumps it)
        self.tick = tick
        self.handle = lib.vs_ticker_start(address(engine), max(1, int(tick * 1e9)), idle_ticks)
        if not self.handle:
            raise OSError("cannot start the epoch ticker thread")
        self._enter, self._leave = lib.vs_ticker_enter_gil, lib.vs_ticker_leave_gil
        _LIVE_TICKERS.add(self)

    def enter(self) -> None:
        self._enter(self.handle)

    def leave(self) -> None:
        self._leave(self.handle)

    @property
    def _parked(self) -> bool:
        return bool(self.handle and self._lib.vs_ticker_parked(self.handle))

    @property
    def bumps(self) -> int:
        return self._lib.vs_ticker_bumps(self.handle) if self.handle else 0

    def close(self) -> None:
        """Stop ticking (runs that follow are not interrupted, as with the Python ticker)."""
        if self.handle:
            self._lib.vs_ticker_stop(self.handle)

    def __del__(self) -> None:  # (sandboxes hold the ticker: none is left to use it)
        handle, self.handle = self.handle, None
        if handle:
            self._lib.vs_ticker_free(handle)


# the outcome of NativeSandbox.invoke (wasmshim.c's VS_* enums), and its results in ``out``
RAN, SETUP_FAILED, INSTANTIATE_FAILED, START_FAILED, NO_EXPORTS, TIMED_OUT = range(6)
(
    _STATUS,
    EXIT_CODE,
    _ERROR,
    _TRAP,
    MEMORY,
    STDOUT_LEN,
    STDERR_SIZE,
    HEAD_END,
    BODY_AT,
    CPU_NS,
    WALL_NS,
    STDOUT_AT,
    STDERR_AT,
    STDOUT_KEPT,
    STDERR_KEPT,
) = range(15)
_OUT_FIELDS = 15
OUTPUT_BUFFER = 64 * 1024


class NativeFunction(ctypes.Structure):
    """wasmshim.c's ``vs_function``: what every run of a deployed function needs, made once.

    A run's environment is the request's (``named``: the names of its first ``named_count``
    values, see :meth:`NativeSandbox.invoke`), then the function's own (``env_*``)."""

    _fields_ = [
        ("pre", ctypes.c_void_p),
        ("memory_bytes", ctypes.c_int64),
        ("argv", ctypes.c_void_p),
        ("argc", ctypes.c_size_t),
        ("named", ctypes.c_void_p),
        ("named_count", ctypes.c_size_t),
        ("env_names", ctypes.c_void_p),
        ("env_values", ctypes.c_void_p),
        ("env_count", ctypes.c_size_t),
        ("stdout_keep", ctypes.c_size_t),
        ("stderr_keep", ctypes.c_size_t),
    ]


def native_function(
    pre: int,
    memory_bytes: int,
    argv: int,
    named: tuple[int, int],
    env: EnvArrays,
    keep: tuple[int, int] = (2 * 1024 * 1024 + 1, 16 * 1024 + 1),
) -> NativeFunction:
    """A :class:`NativeFunction`: ``pre`` (:func:`address` of an ``InstancePre`` from a
    linker :func:`define_capture` made), ``argv`` (:func:`c_argv`), ``named`` = (address of
    a ``char *[]`` of names, their count), ``env`` the function's own variables, ``keep``
    the stdout and stderr bytes a run keeps (more are counted). The caller keeps the arrays
    alive."""
    count, names, values = env
    return NativeFunction(
        pre, memory_bytes, argv, 1, named[0], named[1], names, values, count, *keep
    )


def define_capture(lib: Any, linker: wasmtime.Linker) -> None:
    """Shadow WASI's ``fd_write`` in ``linker`` (WASI defined already) with wasmshim's: a
    module pre-linked by it writes stdout and stderr into the invoking NativeSandbox's
    buffers, not files; run it only through :meth:`NativeSandbox.invoke`."""
    error = lib.vs_define_capture(address(linker))
    if error:
        raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, _ERROR_P))


class NativeSandbox:
    """Runs a command module without host imports in a fresh Store with one C call (the GIL
    released throughout): store, limits, deadline, WASI (environment, ``argv``, ``stdin``;
    stdout and stderr captured in memory: :func:`define_capture`), instantiate, ``_start``,
    drop, and where stdout's CGI head ends. One per thread.

    After :meth:`invoke`, ``out`` (int64s, indexed by this module's ``EXIT_CODE``, ``MEMORY``,
    ``STDOUT_LEN``, ``STDERR_SIZE``, ``HEAD_END``, ``BODY_AT``, ``CPU_NS``, ``WALL_NS``),
    ``exit_code``, ``memory_size``, ``stdout_len`` and ``stderr_size`` (bytes written: the
    function's ``keep`` of them are kept); ``view`` (the buffer: stdout while shorter than
    ``OUTPUT_BUFFER``), :meth:`stdout` and :meth:`stderr` (what was kept), and
    :meth:`failure` for a status other than ``RAN``.
    """

    def __init__(
        self,
        lib: Any,
        engine: wasmtime.Engine,
        ticker: NativeTicker | None,
        head_limit: int = OUTPUT_BUFFER,
    ) -> None:
        self._lib = lib
        self._keep = (engine, ticker)
        self._buffer = ctypes.create_string_buffer(OUTPUT_BUFFER)
        self._buffer_at = ctypes.addressof(self._buffer)
        self.view = memoryview(self._buffer).cast("B")  # (a slice copies faster than string_at)
        item = max(ctypes.sizeof(ffi.wasmtime_extern_t), ctypes.sizeof(ffi.wasmtime_instance_t))
        if item > _ITEM_BYTES:
            raise OSError(f"wasmtime values of {item} bytes: wasmshim has room for {_ITEM_BYTES}")
        self._thread = lib.vs_thread_new(
            address(engine),
            ticker.handle if ticker else None,
            _EXTERN_OF,
            item,
            self._buffer_at,
            OUTPUT_BUFFER,
            head_limit,
        )
        if not self._thread:
            raise OSError("wasmshim: cannot make a thread context")
        out = (ctypes.c_int64 * _OUT_FIELDS).from_address(lib.vs_thread_out(self._thread))
        self.out = memoryview(out).cast("B").cast("q")
        self._invoke = lib.vs_invoke

    def invoke(self, function: int, budget_ns: int, env: bytes, stdin: bytes) -> int:
        """One run of the :class:`NativeFunction` at ``function`` (its ``addressof``):
        ``RAN`` or why it did not.

        ``env`` is the request's environment: NUL-separated UTF-8 strings, the values of the
        function's ``named`` variables, then name/value pairs (a C string ends at its NUL:
        none may hold one). It gets ``budget_ns`` of time from now, checked at each epoch
        tick: ``TIMED_OUT`` at the first tick after the budget, never before it."""
        return self._invoke(self._thread, function, budget_ns, env, len(env), stdin, len(stdin))

    @property
    def exit_code(self) -> int:
        return self.out[EXIT_CODE]

    @property
    def memory_size(self) -> int:
        return self.out[MEMORY]

    @property
    def stdout_len(self) -> int:
        return self.out[STDOUT_LEN]

    @property
    def stderr_size(self) -> int:
        return self.out[STDERR_SIZE]

    def stdout(self, limit: int) -> bytes:
        """stdout's first bytes, up to ``limit`` (at most what the run kept)."""
        size = min(self.out[STDOUT_KEPT], limit)
        return ctypes.string_at(self.out[STDOUT_AT], size) if size else b""

    def stderr(self, limit: int) -> bytes:
        """stderr's first bytes, up to ``limit`` (at most what the run kept)."""
        size = min(self.out[STDERR_KEPT], limit)
        return ctypes.string_at(self.out[STDERR_AT], size) if size else b""

    def failure(self, status: int) -> BaseException:
        """The exception for a failed :meth:`invoke` (an error or trap of wasmtime's, taken)."""
        out = self.out
        error, trap = out[_ERROR], out[_TRAP]
        out[_ERROR] = out[_TRAP] = 0
        if error:
            return wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, _ERROR_P))
        if trap:
            return wasmtime.Trap._from_ptr(ctypes.cast(trap, _TRAP_P))
        if status == NO_EXPORTS:
            return wasmtime.WasmtimeError("not a command module: no memory or _start export")
        return OSError("environment not valid UTF-8, or the output files cannot be opened")

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread:
            self._lib.vs_thread_free(thread)

    def __del__(self) -> None:
        self.close()


def head_end(lib: Any, data: bytes, limit: int) -> tuple[int, int]:
    """wasmshim's ``vs_head_end``: (offset of the blank line ending the CGI head of ``data``,
    its length), or (-1, 0); as ``verge.compute.wagi`` finds it (tested against it)."""
    sep = ctypes.c_int64()
    end = lib.vs_head_end(data, len(data), limit, ctypes.byref(sep))
    return end, sep.value


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
    for name in _SHIM_USES:  # (declared again in native/wasmshim/wasmshim.c)
        expect.function(ffi, name)
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
