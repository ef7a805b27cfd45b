"""The edge compute runtime: compiled-module cache, per-request sandboxes, limits.

Why it looks like this:

* **Compile once per node.** Compiling a C program's wasm takes ~100 ms; deserialising the
  artefact takes ~0.2 ms. Artefacts live in ``cache_dir`` keyed by the module's sha256,
  the wasmtime version and the engine settings (an upgrade or a setting change can never
  load a stale artefact) and are written atomically. Loaded modules stay in memory as a
  pre-linked ``InstancePre``.
* **A fresh Store and instance per request.** Nothing survives a request: no globals, no
  heap, no file descriptors. wasmtime's pooling allocator keeps pre-reserved instance
  slots (reset between uses: copy-on-write data images, ``memory_init_cow``), which makes
  instantiate + teardown ~35 µs cheaper.
* **One C call per request** (the native path, for modules without host imports: most).
  The wasmshim library (native/wasmshim, built with gcc against the wheel's libwasmtime on
  first use, cached; :func:`verge.compat.wasmtime.shim`) does store, limits, time budget,
  WASI context, instantiate, ``_start``, exit status, drop and the read of stdout in one call
  with the GIL released (:class:`~verge.compat.wasmtime.NativeSandbox`, one per thread), and
  runs the epoch ticker as a pthread (:class:`~verge.compat.wasmtime.NativeTicker`: no GIL
  500 times a second). What Python did around that call is in it too, or done once: the
  request's environment goes in as one NUL-joined string (:func:`_env_blob`; the shim makes
  the C arrays, the CGI names and the function's own variables are C arrays made at deploy
  time, :class:`~verge.compat.wasmtime.NativeFunction`), the shim finds where the CGI head
  of stdout ends and measures the run's CPU time, a head is parsed once and its meaning
  remembered (:func:`wagi.parse_head`: a function prints the same head again and again),
  and the usual run (exit 0, nothing on stderr, the output in the buffer) becomes an
  Invocation in a few steps (:func:`_invoke_native`). Why it matters: Python that runs
  right after a wasm run costs 3-4 times what it costs in a loop (wasmtime and the kernel's
  file work have taken the CPU caches), so each µs saved there counts thrice. Measured on a
  busy 2-core VM: thread CPU per hello-world invocation ~300 µs with wasmtime-py's
  wrappers, ~150 µs driving the C API from ctypes (18 calls), ~130 µs in one call; process
  CPU per hello-world request through the edge's fast path (bench/compute_cpu.py, in
  process, alternating runs) ~190 µs before the above, ~140 µs after, of which the C call
  is ~70-85 µs (a third of it the stdout/stderr files: open with truncation, write, close,
  read; then the store, the instance and its reset). So the native path has no output
  files: host-free modules are pre-linked by a second linker (``Runtime.native_linker``)
  whose WASI ``fd_write`` is the shim's (:func:`~verge.compat.wasmtime.define_capture`,
  wasmtime-wasi's semantics, tested against it), which appends stdout and stderr to the
  thread's buffers up to the caps (``max_response_bytes`` + 1, ``max_stderr_bytes`` + 1;
  more is counted, not kept: a function printing without end no longer grows a file).
  Measured on the quiet 2-core VM (bench/compute_cpu.py, alternating A/B): ~95 -> ~50 µs
  CPU per function request in process. Without gcc (or
  ``VERGE_WASMSHIM=off``), and for modules that import host functions, the ctypes path
  (:class:`~verge.compat.wasmtime.Sandbox`) runs, with a Python ticker when there is no shim:
  slower, same results (tests/compute/test_native.py). There the environment is C arrays
  built from one joined string (:func:`_environment`), stdout is read with one ``pread``,
  the CGI output parsed in one pass; its output files live in /dev/shm (~10 µs cheaper to
  open than a memfd's /proc/self/fd path), else they are memfds; a custom output stream
  would be no cheaper (wasmtime runs it on a tokio task, even a native callback: measured
  +80 µs per request for stderr alone).
* **Few, coarse Python<->wasm crossings.** Per request: one ``_start`` call. The request
  goes in as WASI environment plus in-memory stdin bytes; stdout and stderr go to the
  shim's ``fd_write`` (native path) or to per-thread files wasmtime opens by path (a custom
  output stream, even a native ``write``, is slower: wasmtime runs it on a tokio task; a
  Python callback costs ~40 µs per write). Host functions (KV, fetch) are one call per operation;
  a module that imports none gets no host state at all.
* **Limits.** CPU: epoch interruption (an engine-wide ticker thread bumps the epoch
  every ``tick_ms``; each Store gets a deadline of ``cpu_ms``; time spent waiting in host
  services is given back; wasm runs with the GIL released, so the ticker and host
  functions run meanwhile). On the native path the deadline is one tick, and a callback
  checks the clock at each tick: a run is stopped at the first tick after ``cpu_ms`` of
  (wall-clock) time, never before it, however late the ticker is scheduled. Memory: the
  store's limiter. Response: stdout beyond ``max_response_bytes`` is an error (natively only
  cap + 1 bytes are kept; on the ctypes path the file is only read up to the cap, its
  transient size bounded by the CPU deadline). Sub-requests: counted in :mod:`.host`.
  Instances alive at once: the pool's ``max_instances`` (one more fails with outcome ``error``; a
  stopped function's slot is reset and reused). A violation is an :class:`Invocation` with
  a non-ok outcome, never an exception.
* **What wasmtime-py does not expose** (the pooling allocator, the C API without its
  wrappers, WASI configuration from C arrays and in-memory stdin) comes from
  :mod:`verge.compat.wasmtime`, the one place that touches wasmtime's private names.
* **No ambient authority.** No preopened directories, no inherited env/stdio, no sockets;
  only the ``verge`` host functions, which check :class:`~.host.Capabilities`.

Thread model: create the Runtime in the process that uses it (after any fork: the ticker
is a thread; ``native=False`` keeps it off the shim). :meth:`Runtime.invoke` is synchronous and thread-safe. wasmtime releases
the GIL while wasm runs, so the edge calls it from a small thread pool
(``loop.run_in_executor``); a ``fetch`` callable may then block on the event loop with
``asyncio.run_coroutine_threadsafe(...).result()``. Functions without fetch or KV writes are
first tried on the event loop itself with a smaller ``cpu_ms`` (see verge.edge.compute).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import hashlib
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import wasmtime

from verge.compat import wasmtime as wasmtime_compat
from verge.compute import wagi
from verge.compute.host import Capabilities, HostServices, HostState, define_host_functions
from verge.config import MAX_FUNCTION_MEMORY_MB
from verge.files import write_atomic
from verge.http.message import Headers

log = logging.getLogger(__name__)

WASMTIME_VERSION = importlib.metadata.version("wasmtime")
ENGINE_SETTINGS: dict[str, object] = {
    "epoch_interruption": True,
    "cranelift_opt_level": "speed",
    "memory_init_cow": True,  # (wasmtime's default) a module's data is mapped, not copied
}
MiB = 1024 * 1024
BIG_MEMORY = 8 * MiB  # a store with more memory is dropped with the GIL released
_CGI_NAMES_AT, _CGI_NAMES_KEEP = wasmtime_compat.c_strings(wagi.CGI_NAMES)
_CGI_NAMES = (_CGI_NAMES_AT, len(wagi.CGI_NAMES))


class Outcome(enum.StrEnum):
    ANSWER = "answer"
    PASS = "pass"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    RESPONSE_TOO_LARGE = "response_too_large"
    SUBREQUEST_LIMIT = "subrequest_limit"
    TRAP = "trap"
    EXIT = "exit"  # non-zero exit status
    BAD_OUTPUT = "bad_output"
    ERROR = "error"  # the module could not be instantiated


_LIMIT_OUTCOMES = frozenset(
    {Outcome.TIMEOUT, Outcome.MEMORY_LIMIT, Outcome.RESPONSE_TOO_LARGE, Outcome.SUBREQUEST_LIMIT}
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request limits of a function (set at deploy time; defaults from the issue)."""

    cpu_ms: float = 50.0
    memory_bytes: int = 64 * MiB
    max_response_bytes: int = 2 * MiB
    max_stderr_bytes: int = 16 * 1024
    max_subrequests: int = 8
    subrequest_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """wasmtime's pooling allocator: pre-reserved instance slots, reused between requests.

    It makes instantiate + teardown ~35 µs cheaper per request. ``max_instances`` bounds
    the instances alive at once in this process (an invocation beyond it fails with
    outcome ``error``); ``max_memory_bytes`` is the largest memory limit a function may
    have on this runtime: by default the config's (and so the control plane's) upper bound
    of ``memory_mb``, so whatever a deployment may ask for fits in a slot.
    """

    max_instances: int = 256
    max_memory_bytes: int = MAX_FUNCTION_MEMORY_MB * MiB
    max_table_elements: int = 100_000
    keep_resident_bytes: int = 1 * MiB


def make_engine(pool: PoolSettings | None) -> wasmtime.Engine:
    config = wasmtime.Config()
    for name, value in ENGINE_SETTINGS.items():
        setattr(config, name, value)
    if pool is not None:  # (a wasmtime without it: the default allocator, slower)
        wasmtime_compat.enable_pooling_allocator(
            config,
            {
                "total_memories": pool.max_instances,
                "total_core_instances": pool.max_instances,
                "total_tables": pool.max_instances,
                "total_stacks": pool.max_instances,
                "max_memory_size": pool.max_memory_bytes,
                "table_elements": pool.max_table_elements,
                "linear_memory_keep_resident": pool.keep_resident_bytes,
                "table_keep_resident": 64 * 1024,
            },
        )
    return wasmtime.Engine(config)


@dataclass(slots=True)
class Invocation:
    """One run of a function: its result or why it failed, and what it cost."""

    function: str
    request_id: str
    outcome: Outcome
    result: wagi.Result | None = None
    error: str = ""
    exit_code: int = 0
    duration_ms: float = 0.0
    cpu_ms: float = 0.0
    peak_memory: int = 0
    stdout_bytes: int = 0
    stderr: bytes = b""
    stderr_truncated: bool = False
    subrequests: int = 0
    kv_reads: int = 0
    kv_writes: int = 0
    denied: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.ANSWER, Outcome.PASS)

    @property
    def error_status(self) -> int:
        """The 5xx the edge should answer with when not ok (503 for a broken limit)."""
        return 503 if self.outcome in _LIMIT_OUTCOMES else 500

    def log_record(self) -> dict[str, object]:
        """A JSON-ready line for the access/function log."""
        return {
            "function": self.function,
            "request_id": self.request_id,
            "outcome": str(self.outcome),
            "error": self.error,
            "exit_code": self.exit_code,
            "duration_ms": round(self.duration_ms, 3),
            "cpu_ms": round(self.cpu_ms, 3),
            "peak_memory": self.peak_memory,
            "stdout_bytes": self.stdout_bytes,
            "subrequests": self.subrequests,
            "kv_reads": self.kv_reads,
            "kv_writes": self.kv_writes,
            "denied": self.denied,
            "stderr": self.stderr.decode("utf-8", "replace"),
        }


@dataclass(slots=True)
class LoadedModule:
    digest: str
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    source: str  # "memory" | "disk" | "compiled"
    load_ms: float
    pre_at: int = 0  # the InstancePre's C pointer
    uses_host: bool = False  # imports ``verge`` host functions

    def __post_init__(self) -> None:
        self.pre_at = wasmtime_compat.address(self.pre)
        self.uses_host = _uses_host(self.module)

    def again(self) -> LoadedModule:
        """The same module, as found in memory by a later load."""
        return LoadedModule(self.digest, self.module, self.pre, "memory", 0.0)


@dataclass(slots=True)
class Function:
    """A deployed function on this node: module + capabilities + limits.

    Its argv and own variables are C arrays built here, once: they do not change per request;
    so is what the shim needs for each run (``native``, at ``native_at``).
    """

    name: str
    loaded: LoadedModule
    caps: Capabilities
    limits: Limits
    argv: int = field(default=0, repr=False)
    env: wasmtime_compat.EnvArrays = field(default=(0, 0, 0), repr=False)
    overrides: frozenset[str] = field(default=frozenset(), repr=False)
    shadows_cgi: bool = field(default=False, repr=False)  # overrides a CGI_NAMES variable
    native: wasmtime_compat.NativeFunction | None = field(default=None, repr=False)
    native_at: int = field(default=0, repr=False)
    _keep: tuple[object, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        self.argv, argv_keep = wasmtime_compat.c_argv(self.name)
        names = [name for name, _ in self.caps.env]
        at, env_keep = wasmtime_compat.c_strings(names + [value for _, value in self.caps.env])
        self.env = (len(names), at, at + 8 * len(names))
        self.overrides = frozenset(names)
        self.shadows_cgi = not self.overrides.isdisjoint(wagi.CGI_NAMES)
        self._keep = (argv_keep, env_keep)
        # the request's environment is the CGI variables' values, then the headers' pairs,
        # then these variables; or (shadows_cgi) all of it in pairs (see _env_blob)
        named, env = ((0, 0), (0, 0, 0)) if self.shadows_cgi else (_CGI_NAMES, self.env)
        limits = self.limits
        self.native = wasmtime_compat.native_function(
            self.loaded.pre_at,
            limits.memory_bytes,
            self.argv,
            named,
            env,
            (limits.max_response_bytes + 1, limits.max_stderr_bytes + 1),
        )
        self.native_at = ctypes.addressof(self.native)

    @property
    def digest(self) -> str:
        return self.loaded.digest


class ModuleCache:
    """Compiled modules: in memory, then on disk as serialized artefacts, then compile."""

    def __init__(
        self,
        engine: wasmtime.Engine,
        linker: wasmtime.Linker,
        cache_dir: Path | None,
        fingerprint: object = ENGINE_SETTINGS,
        native_linker: wasmtime.Linker | None = None,
    ) -> None:
        self.engine = engine
        self.linker = linker
        self.native_linker = native_linker  # (pre-links the modules without host imports)
        self.dir = cache_dir
        self.loaded: dict[str, LoadedModule] = {}
        self._lock = threading.Lock()
        settings = json.dumps([fingerprint, platform.machine()], sort_keys=True).encode()
        self.suffix = f"{WASMTIME_VERSION}.{hashlib.sha256(settings).hexdigest()[:12]}"
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def artefact_path(self, digest: str) -> Path | None:
        return None if self.dir is None else self.dir / f"{digest}.{self.suffix}.cwasm"

    def load(self, wasm: bytes | str) -> LoadedModule:
        """The module for ``wasm`` (binary, or WAT text), compiling only on a cold node."""
        binary = to_binary(wasm)
        digest = hashlib.sha256(binary).hexdigest()
        with self._lock:
            cached = self.loaded.get(digest)
            if cached is not None:
                return cached.again()
            start = time.perf_counter()
            module, source = self._from_disk(digest) or (self._compile(digest, binary), "compiled")
            _check_exports(module)
            native = self.native_linker is not None and not _uses_host(module)
            pre = (self.native_linker if native else self.linker).instantiate_pre(module)
            loaded = LoadedModule(digest, module, pre, source, (time.perf_counter() - start) * 1e3)
            self.loaded[digest] = loaded
            return loaded

    def _from_disk(self, digest: str) -> tuple[wasmtime.Module, str] | None:
        path = self.artefact_path(digest)
        if path is None or not path.exists():
            return None
        try:
            return wasmtime.Module.deserialize_file(self.engine, str(path)), "disk"
        except wasmtime.WasmtimeError as exc:
            log.warning("discarding unusable artefact %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None

    def _compile(self, digest: str, binary: bytes) -> wasmtime.Module:
        module = wasmtime.Module(self.engine, binary)
        path = self.artefact_path(digest)
        if path is not None:
            write_atomic(path, module.serialize(), mode=0o644)
        return module


def _uses_host(module: wasmtime.Module) -> bool:
    """Whether the module imports ``verge`` host functions (then it runs on the ctypes path)."""
    return any(item.module == "verge" for item in module.imports)


def to_binary(wasm: bytes | str) -> bytes:
    if isinstance(wasm, str):
        return wasmtime.wat2wasm(wasm)
    if not wasm.startswith(b"\0asm"):
        return wasmtime.wat2wasm(wasm.decode("utf-8"))
    return wasm


def _check_exports(module: wasmtime.Module) -> None:
    kinds = {e.name: type(e.type) for e in module.exports}
    missing = {"_start", "memory"} - set(kinds)
    if missing:
        raise ValueError(f"not a WASI command module: missing export(s) {sorted(missing)}")
    if (kinds["_start"], kinds["memory"]) != (wasmtime.FuncType, wasmtime.MemoryType):
        raise ValueError("not a WASI command module: _start must be a function, memory a memory")


class EpochTicker:
    """Bumps the engine epoch every ``tick`` seconds while invocations are running.

    It parks after ``idle_ticks`` ticks without any invocation, so an idle node does not
    wake up hundreds of times a second; :meth:`enter` wakes it.
    """

    def __init__(self, engine: wasmtime.Engine, tick: float, idle_ticks: int = 500) -> None:
        self.engine = engine
        self.tick = tick
        self.idle_ticks = idle_ticks
        # (no lock on the request path: deque.append/pop and next(count) are atomic)
        self._running: deque[None] = deque()
        self._counter = itertools.count(1)
        self._entries = 0
        self._parked = False
        self._stop = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verge-epoch", daemon=True)
        self._thread.start()

    def enter(self) -> None:
        self._running.append(None)
        self._entries = next(self._counter)
        if self._parked:
            self._wake.set()

    def leave(self) -> None:
        self._running.pop()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        seen, idle = -1, 0
        base, done = time.monotonic(), 0
        while not self._stop:
            time.sleep(max(0.0, base + (done + 1) * self.tick - time.monotonic()))
            # One bump per wake, even a late one: catching up would let a function that started
            # while the ticker lagged trap before its budget ("at least cpu_ms" is the promise;
            # a late wake only lets it run a little longer)
            self.engine.increment_epoch()
            done = max(done + 1, int((time.monotonic() - base) / self.tick))
            if self._entries != seen or self._running:
                seen, idle = self._entries, 0
                continue
            idle += 1
            if idle >= self.idle_ticks:
                self._park(seen)
                idle = 0
                base, done = time.monotonic(), 0

    def _park(self, seen: int) -> None:
        self._parked = True
        if self._entries == seen and not self._stop:  # re-check after publishing _parked
            self._wake.wait()
        self._wake.clear()
        self._parked = False


class _Scratch:
    """Per-thread: the sandboxes that run invocations, and the output files wasmtime writes
    stdout and stderr into on the ctypes path (it opens them by path, truncating, for each
    request; the native path captures them in memory)."""

    def __init__(self, engine: wasmtime.Engine, shim: object = None, ticker: object = None) -> None:
        self.sandbox = wasmtime_compat.Sandbox(engine)
        self.stdout_fd, self.stdout_path = _output_file("out")
        self.stderr_fd, self.stderr_path = _output_file("err")
        self.native: wasmtime_compat.NativeSandbox | None = None
        if shim is not None:  # modules without host imports run in one C call
            self.native = wasmtime_compat.NativeSandbox(
                shim,
                engine,
                ticker if isinstance(ticker, wasmtime_compat.NativeTicker) else None,
                head_limit=wagi.MAX_HEAD_BYTES,
            )
        weakref.finalize(
            self,
            _remove_outputs,
            (self.stdout_fd, self.stderr_fd),
            (self.stdout_path, self.stderr_path),
        )


SHM_DIR = "/dev/shm"
_OUTPUT_PREFIX = "verge-out-"
_swept: list[bool] = []


def _output_file(kind: str) -> tuple[int, bytes]:
    """(fd, path) of a private file for a thread's stdout or stderr.

    In /dev/shm (tmpfs) where there is one: wasmtime opens it ~10 µs faster per request than
    a memfd's /proc/self/fd/N (a shorter path walk, no /proc permission checks); removed when
    the thread's scratch goes, and a crashed process's are swept by the next one."""
    if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK):
        if not _swept:
            _swept.append(True)
            _sweep_outputs(SHM_DIR)
        with contextlib.suppress(OSError):
            prefix = f"{_OUTPUT_PREFIX}{os.getpid()}-{kind}-"
            fd, path = tempfile.mkstemp(prefix=prefix, dir=SHM_DIR)  # 0600, O_EXCL, CLOEXEC
            return fd, path.encode()
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create(f"verge-{kind}", os.MFD_CLOEXEC)
        return fd, f"/proc/self/fd/{fd}".encode()
    fd, path = tempfile.mkstemp(prefix=f"verge-{kind}-")  # portable fallback
    return fd, path.encode()


def _sweep_outputs(directory: str) -> None:
    """Remove output files left by processes that are gone (killed before their cleanup)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(_OUTPUT_PREFIX):
                continue
            pid = name[len(_OUTPUT_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (another user's: alive)
        return True
    return True


def _remove_outputs(fds: tuple[int, ...], paths: tuple[bytes, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    for path in paths:
        if not path.startswith(b"/proc/"):
            with contextlib.suppress(OSError):
                os.unlink(path)


_FIRST_READ = 64 * 1024


def _read_capped(fd: int, cap: int) -> bytes:
    """The file's bytes up to cap + 1 (so the caller sees an overflow); big files are emptied.

    The usual small output takes one read (no stat first)."""
    want = min(cap + 1, _FIRST_READ)
    data = os.pread(fd, want, 0)
    if len(data) < want:
        return data
    size = os.fstat(fd).st_size
    if size > want and want <= cap:
        data += os.pread(fd, min(size, cap + 1) - want, want)
    if size > _FIRST_READ:
        os.ftruncate(fd, 0)
    return data


class Runtime:
    """One per edge worker process: an engine, a module cache and the epoch ticker."""

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        tick_ms: float = 2.0,
        pooling: PoolSettings | bool = True,
        hook: Callable[[Invocation], None] | None = None,
        native: bool = True,
    ) -> None:
        self.pool = PoolSettings() if pooling is True else (pooling or None)
        self.engine = make_engine(self.pool)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        define_host_functions(self.linker, self._state)
        self.shim = wasmtime_compat.shim() if native else None
        self.native_linker: wasmtime.Linker | None = None
        if self.shim is not None:  # stdout and stderr captured by the shim, not files
            self.native_linker = wasmtime.Linker(self.engine)
            self.native_linker.define_wasi()
            wasmtime_compat.define_capture(self.shim, self.native_linker)
        self.modules = ModuleCache(
            self.engine,
            self.linker,
            Path(cache_dir) if cache_dir is not None else None,
            fingerprint=[ENGINE_SETTINGS, self.pool and asdict(self.pool)],
            native_linker=self.native_linker,
        )
        self.tick = tick_ms / 1000.0
        self.ticker: EpochTicker | wasmtime_compat.NativeTicker
        if self.shim is not None:
            self.ticker = wasmtime_compat.NativeTicker(self.shim, self.engine, self.tick)
        else:
            self.ticker = EpochTicker(self.engine, self.tick)
        self.hook = hook
        self._local = threading.local()

    def close(self) -> None:
        self.ticker.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(
        self,
        wasm: bytes | str,
        *,
        name: str = "function",
        caps: Capabilities | None = None,
        limits: Limits | None = None,
    ) -> Function:
        """Compile (or fetch from the cache) and bind capabilities and limits.

        Raises ValueError for a module that is not a WASI command, cannot be linked (an
        import the sandbox does not provide) or does not fit the limits.
        """
        limits = limits or Limits()
        if self.pool is not None and limits.memory_bytes > self.pool.max_memory_bytes:
            raise ValueError(
                f"memory limit {limits.memory_bytes} over this runtime's "
                f"maximum of {self.pool.max_memory_bytes}"
            )
        try:
            fn = Function(name, self.modules.load(wasm), caps or Capabilities(), limits)
        except wasmtime.WasmtimeError as exc:
            raise ValueError(f"invalid module: {_describe(exc, None)}") from exc
        self._trial_instantiate(fn)
        return fn

    def _trial_instantiate(self, fn: Function) -> None:
        """Instantiate once without running it, so a bad module fails at deploy time."""
        store = wasmtime.Store(self.engine)
        try:
            store.set_wasi(wasmtime.WasiConfig())
            store.set_limits(memory_size=fn.limits.memory_bytes)
            store.set_epoch_deadline(self._deadline_ticks(fn.limits.cpu_ms / 1000.0))
            self.ticker.enter()
            try:
                fn.loaded.pre.instantiate(store)
            finally:
                self.ticker.leave()
        except Exception as exc:
            raise ValueError(f"module cannot be instantiated: {_describe(exc, None)}") from exc
        finally:
            store.close()

    def invoke(
        self,
        fn: Function,
        request: wagi.CgiRequest,
        *,
        services: HostServices | None = None,
        request_id: str = "",
        response: tuple[int, Headers, bytes] | None = None,
        cpu_ms: float | None = None,
    ) -> Invocation:
        """Run ``fn`` once for ``request``; with ``response`` it edits that origin response.

        ``cpu_ms`` runs it on a smaller CPU budget than its limit (a speculative attempt:
        see verge.edge.compute); running out of it is an ``Outcome.TIMEOUT`` as usual.
        """
        phase = "request" if response is None else "response"
        stdin = request.body if response is None else wagi.encode_response(*response)
        scratch = self._scratch()
        if scratch.native is not None and not fn.loaded.uses_host:  # one C call
            env = _env_blob(fn, request, request_id, phase)
            inv = _invoke_native(self, scratch, fn, env, stdin, request_id, cpu_ms)
        else:
            envs, keep = _environment(fn, request, request_id, phase)
            inv = _Run(self, fn, request_id, services, cpu_ms).execute(scratch, envs, stdin)
            del keep  # (the C arrays were copied into the WASI context)
        if self.hook is not None:
            try:
                self.hook(inv)
            except Exception:
                log.exception("compute hook failed")
        return inv

    def _state(self) -> HostState:
        return self._local.state

    def _scratch(self) -> _Scratch:
        try:
            return self._local.scratch
        except AttributeError:
            scratch = self._local.scratch = _Scratch(self.engine, self.shim, self.ticker)
            return scratch

    def _deadline_ticks(self, seconds: float) -> int:
        """Epoch ticks for a budget: trap after at least ``seconds``, at most one tick more."""
        return max(0, math.ceil(seconds / self.tick)) + 1 if seconds > 0 else 0


def _environment(
    fn: Function, request: wagi.CgiRequest, request_id: str, phase: str
) -> tuple[list[wasmtime_compat.EnvArrays], object]:
    """The invocation's environment as C arrays (and what keeps them alive): the CGI
    variables (names: one array for the process), the request headers', the function's own
    (its array), in the order and with the overrides of :func:`wagi.build_environ`."""
    if fn.shadows_cgi:  # (rare) the general form
        pairs = wagi.build_environ(
            request, request_id=request_id, phase=phase, function_env=fn.caps.env
        )
        names = [name for name, _ in pairs]
        at, keep = wasmtime_compat.c_strings(names + [value for _, value in pairs])
        return [(len(names), at, at + 8 * len(names))], keep
    strings = wagi.cgi_values(request, request_id, phase)
    headers = wagi.header_environ(request.headers)
    if fn.overrides:
        headers = {k: v for k, v in headers.items() if k not in fn.overrides}
    cgi, count = len(strings), len(headers)
    strings.extend(headers)
    strings.extend(headers.values())
    at, keep = wasmtime_compat.c_strings(strings)
    names_at = at + 8 * cgi
    envs = [(cgi, _CGI_NAMES_AT, at), (count, names_at, names_at + 8 * count), fn.env]
    return envs, keep


def _env_blob(fn: Function, request: wagi.CgiRequest, request_id: str, phase: str) -> bytes:
    """The invocation's environment for the shim (``NativeSandbox.invoke``), in the order and
    with the overrides of :func:`wagi.build_environ`: one NUL-joined UTF-8 string of the CGI
    variables' values and the request headers' names and values (the function's own
    variables come from ``fn.native``); or, for a function that overrides a CGI variable,
    every name and value. A string holding a NUL (``PATH_INFO`` of ``%00``) ends there, as C
    strings do: the NULs must only separate."""
    if fn.shadows_cgi:  # (rare) the general form
        pairs = wagi.build_environ(
            request, request_id=request_id, phase=phase, function_env=fn.caps.env
        )
        parts = [text for pair in pairs for text in pair]
    else:
        parts = wagi.cgi_values(request, request_id, phase)
        overrides = fn.overrides
        for name, value in wagi.header_environ(request.headers).items():
            if name not in overrides:
                parts += (name, value)
    text = "\0".join(parts)
    if text.count("\0") != len(parts) - 1:
        text = "\0".join([part.partition("\0")[0] for part in parts])
    return text.encode("utf-8", "replace")


def _invoke_native(
    rt: Runtime,
    scratch: _Scratch,
    fn: Function,
    env: bytes,
    stdin: bytes,
    request_id: str,
    cpu_ms: float | None,
) -> Invocation:
    """One run through the shim (``env`` from :func:`_env_blob`). The usual run (exit status
    0, nothing on stderr, the whole output in the buffer, its head found, within the cap) is
    taken here, in few steps: this is every small function's request path. Anything else
    goes through a :class:`_Run`, which gives the same Invocation for the usual run too."""
    limits, native = fn.limits, scratch.native
    budget = limits.cpu_ms if cpu_ms is None else min(cpu_ms, limits.cpu_ms)
    status = native.invoke(fn.native_at, max(0, int(budget * 1e6)), env, stdin)
    out = native.out
    length, head_end = out[_STDOUT_LEN], out[_HEAD_END]
    if (
        status == wasmtime_compat.RAN
        and head_end >= 0
        and length <= limits.max_response_bytes
        and length < wasmtime_compat.OUTPUT_BUFFER
        and not out[_EXIT_CODE]
        and not out[_STDERR_SIZE]
    ):
        view = native.view
        try:
            head, body = view[:head_end].tobytes(), view[out[_BODY_AT] : length].tobytes()
            result = wagi.parse_head(head, body)
        except wagi.BadOutput:
            result = None
        if result is not None:
            return Invocation(
                fn.name,
                request_id,
                Outcome.PASS if type(result) is wagi.Pass else Outcome.ANSWER,
                result,
                duration_ms=out[_WALL_NS] / 1e6,
                cpu_ms=out[_CPU_NS] / 1e6,
                peak_memory=out[_MEMORY],
                stdout_bytes=length,
            )
    return _Run(rt, fn, request_id, None, cpu_ms).took_native(status, scratch, native)


_EXIT_CODE, _MEMORY = wasmtime_compat.EXIT_CODE, wasmtime_compat.MEMORY
_STDOUT_LEN, _STDERR_SIZE = wasmtime_compat.STDOUT_LEN, wasmtime_compat.STDERR_SIZE
_HEAD_END, _BODY_AT = wasmtime_compat.HEAD_END, wasmtime_compat.BODY_AT
_CPU_NS, _WALL_NS = wasmtime_compat.CPU_NS, wasmtime_compat.WALL_NS


def _describe(exc: BaseException, code: wasmtime.TrapCode | None) -> str:
    """A one-line reason for a failure (wasmtime messages start with a backtrace)."""
    if code is not None:
        return code.name.lower().replace("_", " ")
    text = str(exc).strip()
    if "Caused by:" in text:
        text = text.rsplit("Caused by:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class _Run:
    """The life of one invocation (kept out of Runtime.invoke to keep each step short)."""

    __slots__ = ("box", "cpu_ms", "fn", "inv", "limits", "rt", "started", "state")

    def __init__(
        self,
        rt: Runtime,
        fn: Function,
        request_id: str,
        services: HostServices | None,
        cpu_ms: float | None = None,
    ) -> None:
        self.rt = rt
        self.fn = fn
        self.limits = fn.limits
        self.cpu_ms = fn.limits.cpu_ms if cpu_ms is None else min(cpu_ms, fn.limits.cpu_ms)
        self.inv = Invocation(fn.name, request_id, Outcome.ERROR)
        self.state: HostState | None = None  # only for a module that imports host functions
        if fn.loaded.uses_host:
            self.state = HostState(
                fn.caps,
                services or HostServices(),
                fn.limits.max_subrequests,
                fn.limits.subrequest_timeout_s,
            )
        self.box: wasmtime_compat.Sandbox | None = None
        self.started = 0.0

    def execute(
        self, scratch: _Scratch, envs: list[wasmtime_compat.EnvArrays], stdin: bytes
    ) -> Invocation:
        """The run on the ctypes path (:class:`~verge.compat.wasmtime.Sandbox`): a module
        with host imports, or no shim."""
        rt, inv, state = self.rt, self.inv, self.state
        box = self.box = scratch.sandbox
        if state is not None:
            rt._local.state = state
        rt.ticker.enter()
        cpu0 = time.thread_time()
        self.started = time.perf_counter()
        configured = False
        try:
            box.open(self.limits.memory_bytes, rt._deadline_ticks(self.cpu_ms / 1000.0))
            box.set_wasi(
                wasmtime_compat.wasi_config(
                    envs, self.fn.argv, stdin, scratch.stdout_path, scratch.stderr_path
                )
            )
            configured = True
            self._run_wasm(box)
        except Exception as exc:  # setup failed (bad env, engine error): still a result
            inv.outcome, inv.error = Outcome.ERROR, f"could not start: {exc}"
        finally:
            rt.ticker.leave()
            box.close(release_gil=inv.peak_memory > BIG_MEMORY)
            if state is not None:
                rt._local.state = None
        if configured:
            self._collect(scratch)
        inv.duration_ms = (time.perf_counter() - self.started) * 1e3
        inv.cpu_ms = (time.thread_time() - cpu0) * 1e3
        return inv

    def took_native(
        self, status: int, scratch: _Scratch, native: wasmtime_compat.NativeSandbox
    ) -> Invocation:
        """The Invocation of a run the shim made (:func:`_invoke_native`), from its status
        and results. Its ``cpu_ms`` and ``duration_ms`` are the C call's (the shim measures
        them): the run, not the Python around it."""
        inv, out = self.inv, native.out
        inv.peak_memory = out[wasmtime_compat.MEMORY]
        if status == wasmtime_compat.RAN:
            inv.exit_code = code = native.exit_code
            if code == 0:
                inv.outcome = Outcome.ANSWER
            else:
                self._exited(code)
        elif status == wasmtime_compat.TIMED_OUT:
            self._timed_out()
        elif status == wasmtime_compat.SETUP_FAILED:
            inv.outcome, inv.error = Outcome.ERROR, f"could not start: {native.failure(status)}"
        else:
            failure = native.failure(status)
            instantiating = status != wasmtime_compat.START_FAILED
            self._failed(failure, instantiating=instantiating)
        if status != wasmtime_compat.SETUP_FAILED:
            self._collect_native(scratch, native)
        inv.duration_ms = out[wasmtime_compat.WALL_NS] / 1e6
        inv.cpu_ms = out[wasmtime_compat.CPU_NS] / 1e6
        return inv

    def _collect_native(self, scratch: _Scratch, native: wasmtime_compat.NativeSandbox) -> None:
        out, limits = native.out, self.limits
        cap = limits.max_response_bytes
        if out[wasmtime_compat.STDERR_SIZE]:
            err = native.stderr(limits.max_stderr_bytes + 1)
            self.inv.stderr_truncated = len(err) > limits.max_stderr_bytes
            self.inv.stderr = err[: limits.max_stderr_bytes]
        length, head_end = out[wasmtime_compat.STDOUT_LEN], out[wasmtime_compat.HEAD_END]
        if length >= wasmtime_compat.OUTPUT_BUFFER or head_end < 0 or length > cap:
            self._take_output(native.stdout(cap + 1))  # (over the cap: too large)
        elif self._answers(length):  # the shim found the head: no copy of the whole output
            view = native.view
            head, body = view[:head_end].tobytes(), view[out[wasmtime_compat.BODY_AT] : length]
            self._parse(wagi.parse_head, head, body.tobytes())

    def _run_wasm(self, box: wasmtime_compat.Sandbox) -> None:
        inv = self.inv
        failure = box.instantiate(self.fn.loaded.pre_at)
        if failure is not None:  # a start function that traps, or memory over the limit
            self._failed(failure, instantiating=True)
            return
        if self.state is not None:
            self.state.store = box.store_view()  # type: ignore[assignment]
            self.state.memory = box.memory()
            self.state.on_host_return = self._rearm
        failure = box.call_start()
        inv.peak_memory = box.memory_size()
        if failure is not None:
            self._failed(failure)
            return
        inv.exit_code = code = box.exit_code
        if code == 0:
            inv.outcome = Outcome.ANSWER
            return
        self._exited(code)

    def _exited(self, code: int) -> None:
        inv = self.inv
        inv.outcome, inv.error = Outcome.EXIT, f"exited with status {code}"
        if self._near_memory_limit():
            inv.outcome = Outcome.MEMORY_LIMIT
            inv.error += f" at the memory limit of {self.limits.memory_bytes} bytes"

    def _rearm(self) -> None:
        """After a host call: give back the time spent waiting, keep the CPU budget."""
        assert self.state is not None and self.box is not None
        used = time.perf_counter() - self.started - self.state.host_seconds
        remaining = self.cpu_ms / 1000.0 - used
        if self.box.store:
            self.box.set_deadline(self.rt._deadline_ticks(remaining))

    def _failed(self, exc: BaseException, instantiating: bool = False) -> None:
        inv = self.inv
        violation = self.state.violation if self.state is not None else None
        if violation is not None:
            inv.outcome, inv.error = Outcome(violation.outcome), str(violation)
            return
        code = getattr(exc, "trap_code", None) if isinstance(exc, wasmtime.Trap) else None
        message = _describe(exc, code)
        if code == wasmtime.TrapCode.INTERRUPT:
            self._timed_out()
        elif instantiating:
            text = message.lower()
            pool_full = "concurrent limit" in text  # every instance slot is in use
            memory_error = not pool_full and ("memory" in text or "limit" in text)
            inv.outcome = Outcome.MEMORY_LIMIT if memory_error else Outcome.ERROR
            inv.error = f"instantiation failed: {message}"
        else:
            inv.outcome, inv.error = Outcome.TRAP, f"trap: {message}"
        if (
            not instantiating
            and inv.outcome != Outcome.SUBREQUEST_LIMIT
            and self._near_memory_limit()
        ):
            inv.outcome = Outcome.MEMORY_LIMIT
            inv.error = f"memory limit of {self.limits.memory_bytes} bytes reached ({message})"

    def _timed_out(self) -> None:
        self.inv.outcome = Outcome.TIMEOUT
        self.inv.error = f"CPU time limit of {self.cpu_ms:g} ms exceeded"

    def _near_memory_limit(self) -> bool:
        """A failed run whose memory got within one big allocation of the limit ran out.

        A heuristic: wasmtime does not report failed ``memory.grow``s (malloc just returns
        NULL), so a run that failed near the limit is counted as a memory failure.
        """
        slack = max(self.limits.memory_bytes // 16, 2 * MiB)
        return self.inv.peak_memory >= self.limits.memory_bytes - slack

    def _collect(self, scratch: _Scratch) -> None:
        inv, state, limits = self.inv, self.state, self.limits
        if state is not None:
            inv.subrequests, inv.kv_reads, inv.kv_writes = (
                state.subrequests,
                state.kv_reads,
                state.kv_writes,
            )
            inv.denied = state.denied
        if os.lseek(scratch.stderr_fd, 0, os.SEEK_END):  # (its size: usually nothing)
            self._read_stderr(scratch)
        self._take_output(_read_capped(scratch.stdout_fd, limits.max_response_bytes))

    def _read_stderr(self, scratch: _Scratch) -> None:
        inv, limits = self.inv, self.limits
        err = _read_capped(scratch.stderr_fd, limits.max_stderr_bytes)
        inv.stderr_truncated = len(err) > limits.max_stderr_bytes
        inv.stderr = err[: limits.max_stderr_bytes]

    def _take_output(self, out: bytes) -> None:
        """stdout (up to the cap + 1 bytes) -> the result, or why there is none."""
        if self._answers(len(out)):
            self._parse(wagi.parse_output, out)

    def _answers(self, length: int) -> bool:
        """Note stdout's length (up to the cap + 1); whether it is an answer to parse."""
        inv, limits = self.inv, self.limits
        inv.stdout_bytes = length
        if inv.outcome != Outcome.ANSWER:
            return False
        if length > limits.max_response_bytes:
            inv.outcome = Outcome.RESPONSE_TOO_LARGE
            inv.error = f"response over {limits.max_response_bytes} bytes"
            return False
        return True

    def _parse(self, parse: Callable[..., wagi.Result], *output: bytes) -> None:
        inv = self.inv
        try:
            inv.result = parse(*output)
        except wagi.BadOutput as exc:
            inv.outcome, inv.error = Outcome.BAD_OUTPUT, f"bad CGI output: {exc}"
            return
        if type(inv.result) is wagi.Pass:
            inv.outcome = Outcome.PASS
