"""verge.compat's shared parts: version ranges, shape checks, and every module at once."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from tests.compat import loudly
from verge.compat import CompatError, Expect, VersionRange, check_all


def version_range(installed: str) -> VersionRange:
    return VersionRange("lib", "4.4.1", "4.5", "4.4.1", "verge/compat/lib.py", lambda: installed)


@pytest.mark.parametrize("version", ["4.4.1", "4.4.9", "4.4.10rc1", "4.4.1.post1"])
def test_versions_inside_the_range(version: str) -> None:
    assert version_range(version).require() == version


@pytest.mark.parametrize("version", ["4.4.0", "4.5", "4.5.0", "5.0.0", "3.9.9"])
def test_a_version_outside_the_range_names_the_module_to_read(version: str) -> None:
    with pytest.raises(CompatError) as caught:
        version_range(version).require()
    message = str(caught.value)
    assert f"lib {version} is outside >=4.4.1,<4.5 (tested: 4.4.1)" in message
    assert "verge/compat/lib.py" in message


def test_the_default_installed_version_is_the_distributions() -> None:
    pytest_range = VersionRange("pytest", "1", "1000", pytest.__version__, "x")
    assert pytest_range.installed() == pytest.__version__


def test_expect_names_library_version_and_module() -> None:
    expect = Expect("h2", "9.0", "verge/compat/h2.py")
    with pytest.raises(CompatError, match=r"^h2 9.0 changed Thing.gone \(gone\): see verge/"):
        expect.attribute(type("Thing", (), {}), "gone")
    with pytest.raises(CompatError, match=r"changed Expect.that parameters"):
        expect.function(Expect, "that", ["self", "condition"])
    libc = ctypes.CDLL(None)
    libc.strlen.argtypes, libc.strlen.restype = [ctypes.c_char_p], ctypes.c_size_t
    expect.ctypes_function(libc.strlen, [ctypes.c_char_p], ctypes.c_size_t, "strlen")
    with pytest.raises(CompatError, match=r"strlen result type"):
        expect.ctypes_function(libc.strlen, [ctypes.c_char_p], ctypes.c_int, "strlen")


def test_importing_the_package_loads_no_library() -> None:
    code = "import sys, verge.compat; print(*(m for m in LIBS if m in sys.modules))"
    libs = ("h2", "hpack", "aioquic", "wasmtime", "_ssl")
    shown = subprocess.run(
        [sys.executable, "-c", f"LIBS = {libs!r}; {code}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == ""


def test_every_compat_module_checks_out() -> None:
    versions = loudly(check_all)
    assert {"h2", "hpack", "aioquic", "pylsqpack", "CPython", "OpenSSL", "wasmtime",
            "aioice"} <= set(versions)
