"""The native path (native/wasmshim: one C call per invocation, a native epoch ticker) against
the pure-ctypes fallback: the same Invocation, the same limits, and a clean fallback."""

from __future__ import annotations

import os
import shutil
import time
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verge.compat import wasmtime as compat
from verge.compute import runtime as runtime_module
from verge.compute import wagi
from verge.compute.host import Capabilities
from verge.compute.runtime import Limits, Outcome, PoolSettings, Runtime
from verge.compute.wagi import CgiRequest

MiB = 1024 * 1024
GET = CgiRequest("GET", "/hello?x=1", headers=[("Host", "shop.example")], host="shop.example")
POST = CgiRequest(
    "POST",
    "/api/echo?a=1",
    headers=[("Host", "shop.example"), ("X-Tag", "a"), ("X-Tag", "b"), ("X-Naïve", "grüße")],
    body=b"BODY!",
    host="shop.example",
    remote_addr="192.0.2.7",
)
ODD = CgiRequest(  # PATH_INFO "/a\0b", a header value with a NUL, a lone surrogate
    "GET",
    "/a%00b?q=%00",
    headers=[("Host", "h"), ("X-Nul", "x\0y"), ("X-Surrogate", "\udcff"), ("X-Empty", "")],
    host="h",
)
SAME = ("outcome", "result", "error", "exit_code", "stdout_bytes", "stderr", "stderr_truncated")

needs_shim = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "gcc")) is None or compat.shim() is None,
    reason="wasmshim not available (no gcc): the fallback path is what runs",
)


@pytest.fixture(scope="module")
def pair(artefact_dir):
    """The same modules on a native runtime and on the pure-ctypes one."""
    native, fallback = Runtime(artefact_dir), Runtime(artefact_dir, native=False)
    yield native, fallback
    native.close()
    fallback.close()


def both(pair, module, request, **load):
    native, fallback = pair
    runs = []
    for rt in (native, fallback):
        fn = rt.load(module, **load)
        runs.append(rt.invoke(fn, request, request_id="rid-1"))
    return runs


@needs_shim
def test_the_runtime_uses_the_shim(pair, wasm):
    native, fallback = pair
    assert isinstance(native.ticker, compat.NativeTicker) and native.shim is not None
    assert fallback.shim is None and isinstance(fallback.ticker, runtime_module.EpochTicker)
    fn = native.load(wasm["hello"], name="hello")
    assert not fn.loaded.uses_host
    native.invoke(fn, GET)
    assert native._scratch().native is not None


@needs_shim
@pytest.mark.parametrize(
    ("name", "request_", "env", "limits"),
    [
        ("hello", GET, {}, Limits()),
        ("hello_wat", GET, {}, Limits()),
        ("echo", POST, {"API_KEY": "k", "SERVER_NAME": "mine"}, Limits()),
        ("echo", CgiRequest("POST", "/fail", body=b"x"), {}, Limits()),  # exit 3 + stderr
        ("echo", CgiRequest("POST", "/garbage", body=b"x"), {}, Limits()),  # bad output
        ("echo", CgiRequest("POST", "/pass", body=b"x"), {}, Limits()),
        ("echo", POST, {"HTTP_X_TAG": "mine"}, Limits()),  # overrides a header's variable
        ("echo", ODD, {}, Limits()),  # NULs and unencodable characters in the environment
        ("echo", POST, {}, Limits(max_response_bytes=100)),  # too large, yet in the buffer
        ("bigout", GET, {"SIZE": "1000"}, Limits(max_response_bytes=2000)),
        ("bigout", GET, {"SIZE": str(200 * 1024)}, Limits(max_response_bytes=MiB)),  # > buffer
        ("bigout", GET, {"SIZE": str(3 * MiB)}, Limits(max_response_bytes=MiB)),  # too large
        ("membomb", GET, {}, Limits(memory_bytes=8 * MiB, cpu_ms=2000)),
        ("loop", GET, {}, Limits(cpu_ms=10)),
        ("sandbox", GET, {}, Limits()),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_native_and_fallback_give_the_same_invocation(pair, wasm, name, request_, env, limits):
    caps = Capabilities.of(env=env)
    native, fallback = both(pair, wasm[name], request_, name=name, caps=caps, limits=limits)
    for attribute in SAME:
        assert getattr(native, attribute) == getattr(fallback, attribute), attribute
    assert native.peak_memory == fallback.peak_memory
    assert native.cpu_ms > 0 and native.duration_ms > 0


@needs_shim
def test_a_trap_is_the_same_trap(pair):
    wat = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'
    native, fallback = both(pair, wat, GET, name="trap")
    assert native.outcome == fallback.outcome == Outcome.TRAP
    assert native.error == fallback.error and "unreachable" in native.error


@needs_shim
@pytest.mark.parametrize("cpu_ms", [3, 12, 30])
def test_a_spinning_loop_is_stopped_at_its_budget_never_before(pair, wasm, cpu_ms):
    native, _ = pair
    fn = native.load(wasm["loop"], name="loop", limits=Limits(cpu_ms=cpu_ms))
    for _ in range(3):
        start = time.perf_counter()
        inv = native.invoke(fn, GET)
        elapsed = (time.perf_counter() - start) * 1e3
        assert inv.outcome == Outcome.TIMEOUT and inv.error_status == 503
        assert inv.error == f"CPU time limit of {cpu_ms:g} ms exceeded"
        assert cpu_ms <= elapsed < cpu_ms + 50, elapsed  # (slack: a busy 2-core machine)


@needs_shim
def test_a_speculative_budget_is_a_budget_too(pair, wasm):
    native, _ = pair
    fn = native.load(wasm["loop"], name="loop", limits=Limits(cpu_ms=1000))
    start = time.perf_counter()
    inv = native.invoke(fn, GET, cpu_ms=4)
    assert inv.outcome == Outcome.TIMEOUT and "4 ms" in inv.error
    assert 4 <= (time.perf_counter() - start) * 1e3 < 200


@needs_shim
def test_the_pool_is_not_exhausted_by_native_runs(wasm):
    with Runtime(None, pooling=PoolSettings(max_instances=2, max_memory_bytes=16 * MiB)) as rt:
        small = Limits(memory_bytes=8 * MiB)
        hello = rt.load(wasm["hello"], name="hello", limits=small)
        bomb = rt.load(wasm["membomb"], name="bomb", limits=Limits(memory_bytes=8 * MiB))
        loop = rt.load(wasm["loop"], name="loop", limits=Limits(memory_bytes=8 * MiB, cpu_ms=5))
        for _ in range(3):
            assert rt.invoke(bomb, GET).outcome == Outcome.MEMORY_LIMIT
            assert rt.invoke(loop, GET).outcome == Outcome.TIMEOUT
        for _ in range(50):
            assert rt.invoke(hello, GET).outcome == Outcome.ANSWER


@needs_shim
def test_native_ticker_parks_when_idle_and_wakes_on_enter(pair):
    native, _ = pair
    ticker = compat.NativeTicker(native.shim, native.engine, tick=0.001, idle_ticks=3)
    try:
        deadline = time.monotonic() + 5
        while not ticker._parked and time.monotonic() < deadline:
            time.sleep(0.002)
        assert ticker._parked
        parked_at = ticker.bumps
        ticker.enter()
        while ticker.bumps < parked_at + 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert not ticker._parked and ticker.bumps >= parked_at + 3
        ticker.leave()
    finally:
        ticker.close()
    ticker.close()  # (twice is fine)


def test_shim_off_means_the_fallback(monkeypatch):
    monkeypatch.setenv(compat.SHIM_ENV, "off")
    assert compat._load_shim() is None


def test_a_failed_build_means_the_fallback(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv(compat.SHIM_ENV, raising=False)
    monkeypatch.setenv("VERGE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert compat._load_shim() is None
    assert "wasmshim unavailable" in caplog.text
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


def test_a_library_planted_in_a_shared_cache_is_never_loaded(monkeypatch, tmp_path, caplog):
    """The shim is loaded from its cache directory only if the directory and its parent are
    this user's and no one else may write to them: a world-writable cache (the /tmp fallback
    made by another user first) is refused, and the ctypes path runs."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.delenv(compat.SHIM_ENV, raising=False)
    monkeypatch.setenv("VERGE_NATIVE_CACHE", str(shared))
    (shared / "verge-native").mkdir(mode=0o777)
    (shared / "verge-native").chmod(0o777)
    assert compat._load_shim() is None
    assert "not a private directory" in caplog.text
    assert not list(shared.rglob("*.so"))


def test_output_files_of_dead_processes_are_swept(tmp_path):
    prefix = runtime_module._OUTPUT_PREFIX
    dead, mine = tmp_path / f"{prefix}999999999-out-x", tmp_path / f"{prefix}{os.getpid()}-out-y"
    other = tmp_path / "unrelated"
    for path in (dead, mine, other):
        path.write_bytes(b"")
    runtime_module._sweep_outputs(str(tmp_path))
    assert not dead.exists() and mine.exists() and other.exists()


@needs_shim
def test_a_response_edit_runs_the_same_natively(pair, wasm):
    origin = (200, [("Content-Type", "text/html"), ("X-Origin", "1")], b"<p>origin</p>")
    native, fallback = (
        rt.invoke(rt.load(wasm["echo"], name="echo"), POST, request_id="r", response=origin)
        for rt in pair
    )
    for attribute in SAME:
        assert getattr(native, attribute) == getattr(fallback, attribute), attribute
    assert b"VERGE_PHASE=response" in native.result.body
    assert native.result.body.endswith(b"--body--\n" + wagi.encode_response(*origin))


@needs_shim
def test_each_native_run_gives_new_result_objects(pair, wasm):
    native, _ = pair
    fn = native.load(wasm["hello"], name="hello")
    first = native.invoke(fn, GET)
    first.result.headers.append(("X-Changed", "by the caller"))
    second = native.invoke(fn, GET)
    assert second.result == wagi.Answer(200, [("Content-Type", "text/plain")], b"hello from wasm\n")
    assert second.result is not first.result and second.stdout_bytes == first.stdout_bytes
    assert second.cpu_ms > 0 and second.duration_ms >= second.cpu_ms * 0.5


def fd_write_module(fd: int, iovs: int, count: int, iov: tuple[int, int]) -> str:
    """A guest making one fd_write(fd, iovs, count, 200) with `iov` at 40 (after an empty
    one at 32), then answering with the errno and the count it got as its body's bytes."""
    return f"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "Content-Type: text/plain\\n\\nxyz")
  (func (export "_start")
    (i32.store (i32.const 40) (i32.const {iov[0]})) (i32.store (i32.const 44) (i32.const {iov[1]}))
    (i32.store8 (i32.const 300)
      (call $write (i32.const {fd}) (i32.const {iovs}) (i32.const {count}) (i32.const 200)))
    (i32.store8 (i32.const 301) (i32.load (i32.const 200)))
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 26))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 200)))
    (i32.store (i32.const 0) (i32.const 300)) (i32.store (i32.const 4) (i32.const 2))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 200)))))"""


XYZ = (126, 3)


@needs_shim
@pytest.mark.parametrize(
    ("fd", "iovs", "count", "iov", "body", "stderr"),
    [
        (2, 32, 2, XYZ, bytes([0, 3]), b"xyz"),  # the first non-empty buffer
        (2, 32, 1, XYZ, bytes([0, 0]), b""),  # only empty ones
        (2, 40, 0, XYZ, bytes([0, 0]), b""),  # none
        (0, 40, 1, XYZ, bytes([8, 0]), b""),  # stdin: EBADF
        (3, 40, 1, XYZ, bytes([8, 0]), b""),  # no such fd
        (-1, 40, 1, XYZ, bytes([8, 0]), b""),
        (2, 40, 1, (0, 0x7FFFFF9), bytes([48, 0]), b""),  # a huge buffer: ENOMEM (no trap)
        (2, 32, 9, (0, 0), bytes([48, 0]), b""),  # (the 8th is "Cont..." as a length)
    ],
)
def test_the_shims_fd_write_answers_as_wasis_does(pair, fd, iovs, count, iov, body, stderr):
    """The shim's fd_write (stdout and stderr captured, no files) against wasmtime-wasi's:
    the same errno, count and output."""
    native, fallback = both(pair, fd_write_module(fd, iovs, count, iov), GET, name="fd")
    for attribute in SAME:
        assert getattr(native, attribute) == getattr(fallback, attribute), attribute
    assert native.ok and native.result.body == body and native.stderr == stderr


@needs_shim
@pytest.mark.parametrize(
    ("iovs", "count", "iov", "region"),
    [
        (40, 1, (0xFFFFFFF0, 64), "start: 4294967280, len: 64"),  # the buffer
        (40, 1, (65530, 10), "start: 65530, len: 10"),
        (40, 1, (0, 0x7FFFFF8), "start: 0, len: 134217720"),
        (65532, 1, XYZ, "start: 65536, len: 4"),  # the iovec's length
        (65528, 2, XYZ, "start: 65536, len: 4"),  # the second iovec
        (0xFFFFFFF8, 1, XYZ, "start: 4294967288, len: 4"),
    ],
)
def test_a_guest_address_out_of_bounds_traps_as_in_wasi(pair, iovs, count, iov, region):
    native, fallback = both(pair, fd_write_module(1, iovs, count, iov), GET, name="fd")
    for attribute in SAME:
        assert getattr(native, attribute) == getattr(fallback, attribute), attribute
    assert native.outcome == Outcome.TRAP
    assert native.error == f"trap: Pointer out of bounds: Region {{ {region} }}"


@needs_shim
def test_a_count_written_out_of_bounds_traps_after_the_write(pair):
    wat = fd_write_module(2, 40, 1, XYZ).replace(
        "(i32.const 200)))\n    (i32.store8 (i32.const 301)",
        "(i32.const 65534)))\n    (i32.store8 (i32.const 301)",
    )
    assert "65534" in wat
    native, fallback = both(pair, wat, GET, name="fd")
    assert native.outcome == fallback.outcome == Outcome.TRAP
    assert native.stderr == fallback.stderr == b"xyz"
    assert native.error.endswith("Pointer out of bounds: Region { start: 65534, len: 4 }")


# a start function that writes (it runs while instantiating), and a guest that writes its
# response in many pieces of two buffers (WASI writes the first: the guest asked for writev)
START_WRITES = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "Content-Type: text/plain\\n\\n")
  (func $head
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 26))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (start $head)
  (func (export "_start") (local $i i32)
    (memory.fill (i32.const 1024) (i32.const 98) (i32.const 1000))
    (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 1000))
    (i32.store (i32.const 16) (i32.const 1024)) (i32.store (i32.const 20) (i32.const 7))
    (loop $more
      (drop (call $write (i32.const 1) (i32.const 0) (i32.const 2) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 300))))))"""


@needs_shim
def test_output_written_by_a_start_function_and_in_pieces_is_all_there(pair):
    limits = Limits(max_response_bytes=MiB)
    native, fallback = both(pair, START_WRITES, GET, name="pieces", limits=limits)
    for attribute in SAME:
        assert getattr(native, attribute) == getattr(fallback, attribute), attribute
    assert native.ok and native.result.body == b"b" * 300_000  # (one buffer a call, as WASI)


@needs_shim
def test_output_past_the_cap_is_counted_not_kept(pair, wasm):
    """A function that prints far more than its cap: too large, and the shim kept cap + 1
    bytes (no file grows meanwhile); the next run's output is its own."""
    native, _ = pair
    cap = 100_000
    big = native.load(
        wasm["bigout"],
        name="bigout",
        caps=Capabilities.of(env={"SIZE": str(8 * MiB)}),
        limits=Limits(max_response_bytes=cap),
    )
    inv = native.invoke(big, GET)
    assert inv.outcome == Outcome.RESPONSE_TOO_LARGE and inv.stdout_bytes == cap + 1
    sandbox = native._scratch().native
    assert sandbox.stdout_len > 8 * MiB and len(sandbox.stdout(10 * MiB)) == cap + 1
    hello = native.invoke(native.load(wasm["hello"], name="hello"), GET)
    assert hello.result.body == b"hello from wasm\n" and hello.stderr == b""


@needs_shim
def test_a_malformed_environment_is_refused_before_anything_runs(pair, wasm):
    native, _ = pair
    fn = native.load(wasm["hello"], name="hello")
    sandbox = native._scratch().native
    for env in (b"only\0three\0values", b"x\0" * len(wagi.CGI_NAMES) + b"name"):
        assert sandbox.invoke(fn.native_at, 10**9, env, b"") == compat.SETUP_FAILED
        assert "environment" in str(sandbox.failure(compat.SETUP_FAILED))
    assert native.invoke(fn, GET).outcome == Outcome.ANSWER  # (the sandbox is still fine)


@needs_shim
@settings(max_examples=400, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b"a", b":", b" "]), max_size=14).map(
        b"".join
    ),
    limit=st.integers(0, 16),
)
def test_the_shim_finds_the_end_of_a_head_where_wagi_does(data, limit):
    with mock.patch.object(wagi, "MAX_HEAD_BYTES", limit):
        try:
            expected = wagi._head_end(data)
        except wagi.BadOutput:  # (no end within the limit, and more data than the limit)
            expected = (-1, 0)
    assert compat.head_end(compat.shim(), data, limit) == expected


def c_string(text: str) -> str:
    """What C sees of a Python string in the environment: UTF-8 (unencodable characters
    replaced), up to its first NUL."""
    return text.encode("utf-8", "replace").split(b"\0", 1)[0].decode()


def environment_in_c(fn, env: bytes) -> list[tuple[str, str]]:
    """The environment wasmshim builds from _env_blob's string and the function's own."""
    strings = [part.decode() for part in env.split(b"\0")]
    named = [] if fn.shadows_cgi else list(wagi.CGI_NAMES)
    pairs = list(zip(named, strings[: len(named)], strict=True))
    rest = strings[len(named) :]
    pairs += list(zip(rest[::2], rest[1::2], strict=True))
    own = [] if fn.shadows_cgi else [(n, c_string(v)) for n, v in fn.caps.env]
    return pairs + own


TEXT = st.text(st.sampled_from("aZ09 -_%/.:é\0\udcff"), max_size=8)


@pytest.fixture(scope="module")
def empty_module(artefact_dir):
    """A loaded module to make Functions of (what _env_blob reads is their environment)."""
    with Runtime(artefact_dir, native=False) as rt:
        yield rt.modules.load('(module (memory (export "memory") 1) (func (export "_start")))')


@settings(max_examples=200, deadline=None)
@given(
    target=TEXT.map(lambda t: "/" + t),
    headers=st.lists(
        st.tuples(st.sampled_from(["Host", "X-Tag", "x-tag", "Content-Type", "Bad.Name"]), TEXT),
        max_size=5,
    ),
    own=st.dictionaries(st.sampled_from(["API_KEY", "HTTP_X_TAG", "SERVER_NAME"]), TEXT),
)
def test_the_shim_gets_the_environment_build_environ_gives(empty_module, target, headers, own):
    """_env_blob (one string; the C arrays are the shim's) against wagi.build_environ, for
    functions with their own variables, overriding a header's or a CGI variable."""
    fn = runtime_module.Function("f", empty_module, Capabilities.of(env=own), Limits())
    request = CgiRequest("GET", target, headers=headers, host="h", route="/r")
    env = runtime_module._env_blob(fn, request, "rid", "request")
    expected = wagi.build_environ(request, request_id="rid", function_env=fn.caps.env)
    assert environment_in_c(fn, env) == [(n, c_string(v)) for n, v in expected]
