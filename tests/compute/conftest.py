"""Builds C functions with clang + wasi-libc: the test functions (tests/compute/examples/*.c)
and the documented examples for function authors (examples/functions/*.c).

Both include the one header, examples/functions/verge.h. They are compiled once per test
session into a temporary directory, with the flags `make functions` uses; without the
toolchain (Debian: clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32) the wasm tests are
skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = Path(__file__).parent / "examples"  # the test functions
FUNCTIONS = ROOT / "examples" / "functions"  # verge.h and the examples for function authors
WASM_CFLAGS = ("--target=wasm32-wasi", "-O2", "-Wl,--strip-all")  # as in the Makefile
CLANG_CANDIDATES = ("clang-14", "clang", "clang-16", "clang-19")
SYSROOT_HINTS = (Path("/usr/lib/wasm32-wasi/libc.a"), Path("/usr/share/wasi-sysroot"))
MISSING_TOOLCHAIN = (
    "libclang_rt",
    "wasm-ld",
    "cannot find",
    "stdio.h' file not found",
    "unable to execute",
    "unknown target",
)


def find_clang() -> str | None:
    return next((c for c in CLANG_CANDIDATES if shutil.which(c)), None)


def compile_c(sources: Iterable[Path], out: Path) -> dict[str, Path]:
    """Compile each source into out/<stem>.wasm in parallel: {stem: path}.

    pytest.skip when the toolchain is missing or incomplete."""
    clang = find_clang()
    if clang is None:
        pytest.skip(
            "clang not installed (apt-get install clang-14 lld-14 wasi-libc "
            "libclang-rt-14-dev-wasm32)"
        )
    if not any(p.exists() for p in SYSROOT_HINTS):
        pytest.skip("wasi-libc not installed (apt-get install wasi-libc)")
    procs = {}
    for source in sources:
        target = out / f"{source.stem}.wasm"
        cmd = [clang, *WASM_CFLAGS, f"-I{FUNCTIONS}", str(source), "-o", str(target)]
        procs[source.stem] = (target, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
    built = {}
    for name, (target, proc) in procs.items():
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            if any(m in err for m in MISSING_TOOLCHAIN):
                pytest.skip(f"wasm32-wasi toolchain incomplete: {err.strip()[:300]}")
            raise RuntimeError(f"building {name}.c failed:\n{err}")
        built[name] = target
    return built


def build_examples(out: Path) -> dict[str, Path]:
    """The test functions (tests/compute/examples/*.c)."""
    return compile_c(sorted(EXAMPLES.glob("*.c")), out)


def build_function_examples(out: Path) -> dict[str, Path]:
    """The examples for function authors (examples/functions/*.c)."""
    return compile_c(sorted(FUNCTIONS.glob("*.c")), out)


@pytest.fixture(scope="session")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """name -> wasm bytes of each C example, plus the WAT example as 'hello_wat'."""
    built = build_examples(tmp_path_factory.mktemp("wasm"))
    modules = {name: path.read_bytes() for name, path in built.items()}
    modules["hello_wat"] = (EXAMPLES / "hello.wat").read_bytes()
    return modules


@pytest.fixture(scope="session")
def artefact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artefacts")


@pytest.fixture(scope="session")
def runtime(artefact_dir: Path):
    from verge.compute.runtime import Runtime  # imported lazily: other tests here need no wasm

    rt = Runtime(artefact_dir)
    yield rt
    rt.close()
