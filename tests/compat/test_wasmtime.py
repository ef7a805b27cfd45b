"""verge.compat.wasmtime: the C API calls run (pooling engine, WASI config from C arrays,
in-memory stdin, native output files), one export by name, and guest memory addresses."""

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
    assert compat.enable_pooling_allocator(config, POOL)
    return wasmtime.Engine(config)


class Run:
    """ECHO instantiated in a fresh store configured through compat.wasi_config."""

    def __init__(self, engine: wasmtime.Engine, tmp: Path, env, stdin: bytes) -> None:
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        self.stdout, self.stderr = tmp / "stdout", tmp / "stderr"
        paths = [ctypes.create_string_buffer(str(p).encode()) for p in (self.stdout, self.stderr)]
        self.store = wasmtime.Store(engine)
        self.store.set_wasi(compat.wasi_config(env, compat.c_argv("fn"), stdin, *paths))
        self.instance = linker.instantiate(self.store, wasmtime.Module(engine, ECHO))

    def start(self) -> None:
        compat.export(self.store, self.instance, b"_start")(self.store)


def test_wasi_config_gives_exactly_env_argv_stdin_and_the_output_files(engine, tmp_path) -> None:
    env = [("A", "1"), ("GREETING", "grüß dich")]
    run = Run(engine, tmp_path, env, b"request body\n")
    run.start()
    assert run.stdout.read_bytes() == b"request body\n"
    err = run.stderr.read_bytes()
    env_count, env_size, argc, argv_size = struct.unpack("<4I", err[:16])
    env_blob = "A=1\0GREETING=grüß dich\0".encode()
    assert (env_count, env_size, argc, argv_size) == (2, len(env_blob), 1, 3)
    assert err[16:] == env_blob + b"fn\0"


def test_no_stdin_and_no_env(engine, tmp_path) -> None:
    run = Run(engine, tmp_path, [], b"")
    run.start()
    assert run.stdout.read_bytes() == b""
    assert struct.unpack("<4I", run.stderr.read_bytes()[:16]) == (0, 0, 1, 3)


def test_export_by_name(engine, tmp_path) -> None:
    run = Run(engine, tmp_path, [], b"")
    assert compat.EXPORT_FAST
    assert isinstance(compat.export(run.store, run.instance, b"_start"), wasmtime.Func)
    assert isinstance(compat.export(run.store, run.instance, b"memory"), wasmtime.Memory)
    with pytest.raises(KeyError):
        compat.export(run.store, run.instance, b"missing")


def test_memory_address_is_byte_zero_of_guest_memory(engine, tmp_path) -> None:
    run = Run(engine, tmp_path, [], b"")
    memory = compat.export(run.store, run.instance, b"memory")
    assert isinstance(memory.data_ptr(run.store), ctypes.POINTER(ctypes.c_ubyte))
    ctypes.memmove(compat.memory_address(memory, run.store) + 60000, b"poke", 4)
    assert memory.read(run.store, 60000, 60004) == b"poke"
    memory.write(run.store, b"peek", 100)
    assert ctypes.string_at(compat.memory_address(memory, run.store) + 100, 4) == b"peek"


def test_pooling_refuses_what_does_not_fit_a_slot() -> None:
    """The pool settings are in force: a memory over max_memory_size cannot be made."""
    config = wasmtime.Config()
    assert compat.enable_pooling_allocator(config, POOL | {"max_memory_size": 64 * 1024})
    engine = wasmtime.Engine(config)
    with pytest.raises(wasmtime.WasmtimeError, match="pooling allocator"):
        wasmtime.Module(engine, "(module (memory 2))")
    wasmtime.Instance(wasmtime.Store(engine), wasmtime.Module(engine, "(module (memory 1))"), [])
