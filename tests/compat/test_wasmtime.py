"""verge.compat.wasmtime: the C API calls run (pooling engine, WASI config from C arrays,
in-memory stdin, native output files), a Sandbox runs command modules in fresh stores and
reports their failures as wasmtime-py exceptions, and guest memory addresses."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest
import wasmtime
from wasmtime import _bindings

from tests.compat import loudly
from verge.compat import CompatError, VersionRange
from verge.compat import wasmtime as compat

# _start: stderr <- the environ and args sizes (4 x u32), the environ strings, the argv strings;
# stdout <- stdin (up to 4 KiB)
ECHO = """
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $arg_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $arg_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $out (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 64) (local.get $ptr))
    (i32.store (i32.const 68) (local.get $len))
    (drop (call $write (local.get $fd) (i32.const 64) (i32.const 1) (i32.const 72))))
  (func (export "_start")
    (drop (call $env_sizes (i32.const 0) (i32.const 4)))
    (drop (call $arg_sizes (i32.const 8) (i32.const 12)))
    (drop (call $env_get (i32.const 1024) (i32.const 2048)))
    (drop (call $arg_get (i32.const 1536) (i32.const 3072)))
    (call $out (i32.const 2) (i32.const 0) (i32.const 16))
    (call $out (i32.const 2) (i32.const 2048) (i32.load (i32.const 4)))
    (call $out (i32.const 2) (i32.const 3072) (i32.load (i32.const 12)))
    (i32.store (i32.const 32) (i32.const 8192))
    (i32.store (i32.const 36) (i32.const 4096))
    (drop (call $read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 40)))
    (call $out (i32.const 1) (i32.const 8192) (i32.load (i32.const 40)))))
"""
POOL = {
    name: 4 for name in ("total_memories", "total_core_instances", "total_tables", "total_stacks")
} | {
    "max_memory_size": 1 << 20,
    "table_elements": 100,
    "linear_memory_keep_resident": 0,
    "table_keep_resident": 0,
}


@pytest.mark.parametrize("supported", compat.SUPPORTED, ids=lambda r: r.name)
def test_installed_version_is_supported(supported: VersionRange) -> None:
    loudly(supported.require)


def test_check_passes() -> None:
    loudly(compat.check)


def test_check_fails_loudly_on_a_changed_c_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _bindings._wasi_config_set_env
    monkeypatch.setattr(raw, "argtypes", raw.argtypes[:3])
    with pytest.raises(
        CompatError,
        match=r"^wasmtime \S+ changed the C function "
        r"wasi_config_set_env argument types",
    ):
        compat.check()


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    assert compat.enable_pooling_allocator(config, POOL)
    return wasmtime.Engine(config)


@pytest.fixture(scope="module")
def linker(engine) -> wasmtime.Linker:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    return linker


def pre_of(engine, linker, wat: str) -> wasmtime.InstancePre:
    return linker.instantiate_pre(wasmtime.Module(engine, wat))


def env_arrays(env: list[tuple[str, str]]) -> tuple[compat.EnvArrays, object]:
    names = [name for name, _ in env]
    at, keep = compat.c_strings(names + [value for _, value in env])
    return (len(names), at, at + 8 * len(names)), keep


class Run:
    """A module run once in a Sandbox, its WASI configured through compat.wasi_config."""

    def __init__(self, engine, linker, tmp: Path, envs, stdin: bytes, wat: str = ECHO) -> None:
        self.stdout, self.stderr = tmp / "stdout", tmp / "stderr"
        self.pre = pre_of(engine, linker, wat)
        self.box = compat.Sandbox(engine)
        self.argv, self._keep = compat.c_argv("fn")
        self.box.open(1 << 20, 1000)
        paths = [str(p).encode() for p in (self.stdout, self.stderr)]
        self.box.set_wasi(compat.wasi_config(envs, self.argv, stdin, *paths))

    def start(self) -> BaseException | None:
        failure = self.box.instantiate(compat.address(self.pre))
        return failure if failure is not None else self.box.call_start()


def test_wasi_config_gives_exactly_env_argv_stdin_and_the_output_files(
    engine, linker, tmp_path
) -> None:
    first, keep1 = env_arrays([("A", "1"), ("GREETING", "grüß dich")])
    second, keep2 = env_arrays([("B", "2")])
    run = Run(engine, linker, tmp_path, [first, (0, 0, 0), second], b"request body\n")
    assert run.start() is None and run.box.exit_code == 0
    run.box.close()
    assert run.stdout.read_bytes() == b"request body\n"
    err = run.stderr.read_bytes()
    env_count, env_size, argc, argv_size = struct.unpack("<4I", err[:16])
    env_blob = "A=1\0GREETING=grüß dich\0B=2\0".encode()
    assert (env_count, env_size, argc, argv_size) == (3, len(env_blob), 1, 3)
    assert err[16:] == env_blob + b"fn\0"


def test_no_stdin_and_no_env(engine, linker, tmp_path) -> None:
    run = Run(engine, linker, tmp_path, [], b"")
    assert run.start() is None
    run.box.close()
    assert run.stdout.read_bytes() == b""
    assert struct.unpack("<4I", run.stderr.read_bytes()[:16]) == (0, 0, 1, 3)


def test_c_strings_of_any_text() -> None:
    parts = ["", "ascii", "grüß", "tab\there", "surrogate \udc80"]
    at, keep = compat.c_strings(parts)
    array_ = ctypes.cast(at, ctypes.POINTER(ctypes.c_char_p))
    assert [array_[i] for i in range(len(parts))] == [p.encode("utf-8", "replace") for p in parts]
    assert keep


def test_an_unopenable_output_file_is_an_error(engine, linker, tmp_path) -> None:
    argv, _keep = compat.c_argv("fn")
    missing = str(tmp_path / "no" / "such" / "dir" / "out").encode()
    with pytest.raises(OSError, match="output files"):
        compat.wasi_config([], argv, b"", missing, missing)


def test_exit_status_and_traps_come_back_as_exceptions(engine, linker, tmp_path) -> None:
    exits = """(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start") (call $exit (i32.const 3))))"""
    run = Run(engine, linker, tmp_path, [], b"", exits)
    assert run.start() is None and run.box.exit_code == 3
    run.box.close()
    traps = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'
    run = Run(engine, linker, tmp_path, [], b"", traps)
    failure = run.start()
    assert isinstance(failure, wasmtime.Trap)
    assert failure.trap_code == wasmtime.TrapCode.UNREACHABLE
    run.box.close()


def test_a_deadline_interrupts_and_the_sandbox_is_reusable(engine, linker, tmp_path) -> None:
    spin = '(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))'
    run = Run(engine, linker, tmp_path, [], b"", spin)
    run.box.set_deadline(1)
    assert run.box.instantiate(compat.address(run.pre)) is None
    engine.increment_epoch()
    engine.increment_epoch()
    failure = run.box.call_start()
    assert isinstance(failure, wasmtime.Trap)
    assert failure.trap_code == wasmtime.TrapCode.INTERRUPT
    run.box.close()
    run.box.open(1 << 20, 1000)  # the same sandbox, a fresh store
    run.box.set_wasi(compat.wasi_config([], run.argv, b"", b"/dev/null", b"/dev/null"))
    assert run.box.instantiate(compat.address(pre_of(engine, linker, ECHO))) is None
    assert run.box.call_start() is None
    assert run.box.memory_size() == 65536
    run.box.close()


def test_a_host_function_exception_is_the_failure(engine, tmp_path) -> None:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()

    def boom() -> None:
        raise LookupError("from the host")

    linker.define_func("verge", "boom", wasmtime.FuncType([], []), boom)
    wat = """(module (import "verge" "boom" (func $boom))
      (memory (export "memory") 1) (func (export "_start") (call $boom)))"""
    run = Run(engine, linker, tmp_path, [], b"", wat)
    failure = run.start()
    assert isinstance(failure, LookupError) and str(failure) == "from the host"
    run.box.close()


def test_memory_limit_refuses_an_instance_that_needs_more(engine, linker, tmp_path) -> None:
    run = Run(
        engine,
        linker,
        tmp_path,
        [],
        b"",
        '(module (memory (export "memory") 2) (func (export "_start")))',
    )
    run.box.close()
    run.box.open(65536, 1000)
    failure = run.box.instantiate(compat.address(run.pre))
    assert isinstance(failure, wasmtime.WasmtimeError) and "memory" in str(failure)
    run.box.close()


def test_memory_address_is_byte_zero_of_guest_memory(engine, linker, tmp_path) -> None:
    run = Run(engine, linker, tmp_path, [], b"")
    assert run.box.instantiate(compat.address(run.pre)) is None
    store, memory = run.box.store_view(), run.box.memory()
    assert isinstance(memory.data_ptr(store), ctypes.POINTER(ctypes.c_ubyte))
    assert memory.data_len(store) == run.box.memory_size() == 65536
    ctypes.memmove(compat.memory_address(memory, store) + 60000, b"poke", 4)
    assert memory.read(store, 60000, 60004) == b"poke"
    memory.write(store, b"peek", 100)
    assert ctypes.string_at(compat.memory_address(memory, store) + 100, 4) == b"peek"
    run.box.close()


def test_pooling_refuses_what_does_not_fit_a_slot() -> None:
    """The pool settings are in force: a memory over max_memory_size cannot be made."""
    config = wasmtime.Config()
    assert compat.enable_pooling_allocator(config, POOL | {"max_memory_size": 64 * 1024})
    engine = wasmtime.Engine(config)
    with pytest.raises(wasmtime.WasmtimeError, match="pooling allocator"):
        wasmtime.Module(engine, "(module (memory 2))")
    wasmtime.Instance(wasmtime.Store(engine), wasmtime.Module(engine, "(module (memory 1))"), [])
