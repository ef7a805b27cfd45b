"""libmodsecurity's C API through ctypes: the engine that evaluates the OWASP Core Rule Set.

Why ctypes and not the bindings that ship with it: the ``libmodsecurity`` wheel on PyPI
(pinned: 3.0.15.post2, manylinux x86_64 and macOS arm64) bundles libmodsecurity 3.0.15 and
pybind11 bindings, but the bindings hold the GIL while the rules run (src/bindings.cpp has
no ``gil_scoped_release``). Measured: one thread evaluating a 2 MB query string through them
froze the main thread for 8.4 s, and two threads evaluated benign GETs no faster than one
(1519 vs 1429 requests/s). A WAF in a thread pool must leave the event loop serving, so this
module loads the same bundled library with ctypes, which releases the GIL around every
foreign call, and drives the plain C API (``msc_*``, stable since 3.0). The pybind module is
never imported. Measured through ctypes: the main thread never waited more than 5 ms (the
GIL's switch interval) during that 2 MB evaluation, and two threads did 2462 benign GETs/s
against one thread's 1371.

The library comes from, in order: ``$VERGE_LIBMODSECURITY`` (a path), the ``libmodsecurity``
wheel's ``libmodsecurity.libs/`` directory, the system's ``libmodsecurity.so.3``. Matched
rule ids are read with ``msc_get_rules_messages_rule_ids`` (libmodsecurity 3.0.15, upstream
pull request #3551), not parsed from log text: a log line quotes the attacker's input, so
ids and messages parsed from it could be forged. A library without that function still
blocks; it just reports no rule ids (Debian bookworm's libmodsecurity3 is 3.0.9).

The engine reports every matched rule to a server-log callback, and prints to stderr when
there is none. A Python callback would take the GIL once per match from the worker thread;
libc's ``free`` is installed instead: it is called as ``free(logCbData, text)``, the
transaction's log data is always NULL, and ``free(NULL)`` does nothing (the extra argument
is ignored by the C calling convention). So evaluation never re-enters Python.

Threading: one :class:`Engine` (a ModSecurity instance and one compiled rule set) is shared
read-only; each :meth:`Engine.evaluate` call makes, runs and frees its own transaction, so
calls may run concurrently from several threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

__all__ = [
    "Engine",
    "EngineError",
    "LibraryNotFound",
    "RulesError",
    "Verdict",
    "find_library",
]

LIBRARY_ENV = "VERGE_LIBMODSECURITY"
WHEEL = "libmodsecurity"
PINNED_WHEEL = "3.0.15.post2"
"""The wheel version this module was checked against (its libs/ layout, its C symbols)."""
MAX_RULE_IDS = 256
"""Matched rule ids read back per transaction (a CRS PL4 request rarely matches 40)."""

_LogCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_vp = ctypes.c_void_p


class EngineError(RuntimeError):
    """libmodsecurity could not be loaded or refused an input."""


class LibraryNotFound(EngineError):
    """No libmodsecurity shared library on this machine."""


class RulesError(EngineError):
    """The rule text or file does not parse (the message is the engine's)."""


class _Intervention(ctypes.Structure):
    _fields_ = [
        ("status", ctypes.c_int),
        ("pause", ctypes.c_int),
        ("url", ctypes.c_void_p),
        ("log", ctypes.c_void_p),
        ("disruptive", ctypes.c_int),
    ]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the engine decided about one request."""

    disruptive: bool
    """A rule asked to refuse the request (CRS: the anomaly score reached the threshold)."""
    status: int
    """The status that rule asked for (403 for CRS); 200 when nothing was disruptive."""
    rule_ids: tuple[int, ...]
    """Ids of the rules that matched, in match order, without repeats."""


def find_library() -> str:
    """The path of the libmodsecurity shared library to load (see the module docstring)."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return override
    bundled = _wheel_library()
    if bundled:
        return bundled
    system = ctypes.util.find_library("modsecurity")
    if system:
        return system
    raise LibraryNotFound(
        "libmodsecurity not found: pip install 'libmodsecurity==3.0.15.post2' (bundles it), "
        f"or apt-get install libmodsecurity3, or set ${LIBRARY_ENV} to the .so"
    )


def _wheel_library() -> str | None:
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        return None
    libs = Path(str(dist.locate_file(f"{WHEEL}.libs")))
    found = sorted(glob.glob(str(libs / "libmodsecurity-*.so*")))
    found += sorted(glob.glob(str(Path(str(dist.locate_file(WHEEL))) / "*.dylib")))
    return found[0] if found else None


@lru_cache(maxsize=4)
def _load(path: str) -> ctypes.CDLL:
    """Open the library and declare the C signatures used here (once per path)."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as error:
        raise LibraryNotFound(f"cannot load {path}: {error}") from error
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_char_p, c_size_t = ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
    error_out = ctypes.POINTER(ctypes.c_void_p)
    signatures: dict[str, tuple[object, list[object]]] = {
        "msc_init": (_vp, []),
        "msc_who_am_i": (c_char_p, [_vp]),
        "msc_set_connector_info": (None, [_vp, c_char_p]),
        "msc_set_log_cb": (None, [_vp, _LogCallback]),
        "msc_cleanup": (None, [_vp]),
        "msc_create_rules_set": (_vp, []),
        "msc_rules_add": (c_int, [_vp, c_char_p, error_out]),
        "msc_rules_add_file": (c_int, [_vp, c_char_p, error_out]),
        "msc_rules_cleanup": (c_int, [_vp]),
        "msc_new_transaction": (_vp, [_vp, _vp, _vp]),
        "msc_process_connection": (c_int, [_vp, c_char_p, c_int, c_char_p, c_int]),
        "msc_process_uri": (c_int, [_vp, c_char_p, c_char_p, c_char_p]),
        "msc_add_n_request_header": (c_int, [_vp, c_char_p, c_size_t, c_char_p, c_size_t]),
        "msc_process_request_headers": (c_int, [_vp]),
        "msc_append_request_body": (c_int, [_vp, c_char_p, c_size_t]),
        "msc_process_request_body": (c_int, [_vp]),
        "msc_intervention": (c_int, [_vp, ctypes.POINTER(_Intervention)]),
        "msc_transaction_cleanup": (None, [_vp]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    optional: dict[str, tuple[object, list[object]]] = {  # newer than Debian's 3.0.9
        "msc_intervention_cleanup": (None, [ctypes.POINTER(_Intervention)]),
        "msc_rules_error_cleanup": (None, [_vp]),
        "msc_get_rules_messages_rule_ids": (
            c_size_t,
            [_vp, ctypes.POINTER(ctypes.c_int64), c_size_t],
        ),
    }
    for name, (restype, argtypes) in optional.items():
        if hasattr(lib, name):
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes


_libc_free = ctypes.CDLL(None).free
_libc_free.restype = None
_libc_free.argtypes = [ctypes.c_void_p]


def _silent_log_callback() -> object:
    """libc's free as the server-log callback: a C no-op for free(NULL, text)."""
    return ctypes.cast(_libc_free, _LogCallback)


_INSTANCES: dict[str, tuple[ctypes.CDLL, int, object]] = {}
_INSTANCES_LOCK = threading.Lock()


def _instance(library_path: str, connector: str) -> tuple[ctypes.CDLL, int]:
    """The process's one ModSecurity instance of a library, created on first use and never
    freed. Why: ``msc_cleanup`` runs the library's global teardown (libxml2's and curl's
    cleanup), so freeing one instance while another thread evaluates with another crashed
    the process (SIGBUS in msc_process_request_body); rule sets stay per Engine."""
    with _INSTANCES_LOCK:
        known = _INSTANCES.get(library_path)
        if known is None:
            lib = _load(library_path)
            modsec = lib.msc_init()
            if not modsec:
                raise EngineError("libmodsecurity could not allocate its engine")
            log_callback = _silent_log_callback()  # kept alive with the instance
            lib.msc_set_log_cb(modsec, log_callback)
            lib.msc_set_connector_info(modsec, connector.encode())
            known = _INSTANCES[library_path] = (lib, modsec, log_callback)
        return known[0], known[1]


class Engine:
    """One compiled rule set on the process's ModSecurity instance; evaluates requests.

    Load rules with :meth:`add_rules` / :meth:`add_file` before the first
    :meth:`evaluate`; rules are not changed afterwards (build a new Engine instead).
    """

    def __init__(self, library: str | None = None, connector: str = "verge") -> None:
        self.library_path = library or find_library()
        self._lib, self._modsec = _instance(self.library_path, connector)
        self._rules = self._lib.msc_create_rules_set()
        if not self._rules:
            raise EngineError("libmodsecurity could not allocate a rule set")
        self.reports_rule_ids = hasattr(self._lib, "msc_get_rules_messages_rule_ids")
        self.rule_count = 0

    @property
    def version(self) -> str:
        """'ModSecurity v3.0.15 (Linux)'."""
        return (self._lib.msc_who_am_i(self._modsec) or b"").decode(errors="replace")

    def add_rules(self, text: str) -> int:
        """Compile SecLanguage text; returns the number of rules it added."""
        return self._add(self._lib.msc_rules_add, text.encode())

    def add_file(self, path: str | os.PathLike[str]) -> int:
        """Compile a rules file (its data files resolve relative to it)."""
        return self._add(self._lib.msc_rules_add_file, os.fsencode(path))

    def _add(self, function: object, argument: bytes) -> int:
        error = ctypes.c_void_p()
        added = function(self._rules, argument, ctypes.byref(error))  # type: ignore[operator]
        if added < 0:
            message = ctypes.string_at(error.value).decode(errors="replace") if error else ""
            if error and hasattr(self._lib, "msc_rules_error_cleanup"):
                self._lib.msc_rules_error_cleanup(error)
            raise RulesError(message.strip() or "rules do not parse")
        self.rule_count += added
        return added

    def evaluate(
        self,
        *,
        method: bytes,
        uri: bytes,
        version: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None,
        client: bytes = b"0.0.0.0",
        client_port: int = 0,
        server: bytes = b"0.0.0.0",
        server_port: int = 0,
    ) -> Verdict:
        """Run the request phases (connection, URI, headers, body) of one request.

        Stops at the first disruptive intervention, as a server would. Blocks the calling
        thread (never the GIL) for as long as the rules take. ``uri`` must not contain NUL.
        """
        lib = self._lib
        transaction = lib.msc_new_transaction(self._modsec, self._rules, None)
        if not transaction:
            raise EngineError("libmodsecurity could not allocate a transaction")
        try:
            lib.msc_process_connection(transaction, client, client_port, server, server_port)
            disruption = self._intervention(transaction)
            if disruption is None:
                lib.msc_process_uri(transaction, uri, method, version)
                disruption = self._intervention(transaction)
            if disruption is None:
                disruption = self._headers(transaction, headers)
            if disruption is None:
                disruption = self._body(transaction, body)
            status = disruption if disruption is not None else 200
            return Verdict(disruption is not None, status, self._rule_ids(transaction))
        finally:
            lib.msc_transaction_cleanup(transaction)

    def _headers(self, transaction: int, headers: Sequence[tuple[bytes, bytes]]) -> int | None:
        add = self._lib.msc_add_n_request_header
        for name, value in headers:
            add(transaction, name, len(name), value, len(value))
        self._lib.msc_process_request_headers(transaction)
        return self._intervention(transaction)

    def _body(self, transaction: int, body: bytes | None) -> int | None:
        if body:
            self._lib.msc_append_request_body(transaction, body, len(body))
            # a disruption here (a body over a Reject limit) is read after phase 2 runs
        self._lib.msc_process_request_body(transaction)  # phase 2 runs even without a body
        return self._intervention(transaction)

    def _intervention(self, transaction: int) -> int | None:
        """The status a disruptive rule asked for (403 unless it named a 4xx/5xx), or None."""
        intervention = _Intervention(status=200)
        disruptive = self._lib.msc_intervention(transaction, ctypes.byref(intervention))
        status = intervention.status
        self._free_intervention(intervention)
        if not disruptive:
            return None
        return status if 400 <= status <= 599 else 403

    def _free_intervention(self, intervention: _Intervention) -> None:
        if hasattr(self._lib, "msc_intervention_cleanup"):
            self._lib.msc_intervention_cleanup(ctypes.byref(intervention))
        else:  # 3.0.9: the strings were strdup'ed for us
            _libc_free(intervention.url)
            _libc_free(intervention.log)

    def _rule_ids(self, transaction: int) -> tuple[int, ...]:
        if not self.reports_rule_ids:
            return ()
        ids = (ctypes.c_int64 * MAX_RULE_IDS)()
        count = self._lib.msc_get_rules_messages_rule_ids(transaction, ids, MAX_RULE_IDS)
        return tuple(dict.fromkeys(ids[: min(count, MAX_RULE_IDS)]))

    def close(self) -> None:
        """Free the rule set (no evaluate() of this Engine may be running); the process's
        ModSecurity instance stays (see :func:`_instance`)."""
        if self._rules:
            self._lib.msc_rules_cleanup(self._rules)
            self._rules = None
