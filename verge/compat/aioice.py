"""aioice: the host addresses ICE gathers candidates on.

What it touches: ``aioice.ice.get_host_addresses(use_ipv4, use_ipv6)``, the module-level
function aioice's ``Connection.gather_candidates`` calls for host candidates. Why: it returns
every interface address except 127.0.0.1 and aiortc offers no way to choose, so a stream
server behind a 1:1 NAT, or bound to one address, or tested on loopback (127.0.0.2), could
not say where its media is received (MediaMTX's ``webrtcAdditionalHosts``). The wrapper,
installed once, returns the addresses a context chose with :func:`gather_on` and defers to
aioice elsewhere. When upgrading: check that ``gather_candidates`` still calls the
module-level ``get_host_addresses`` with the same arguments (tests/stream/test_whep.py
gathers on 127.0.0.2 and fails loudly if it does not).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from contextvars import ContextVar

import aioice.ice

from verge.compat import Expect, VersionRange

__all__ = ["SUPPORTED", "check", "gather_on"]

_MODULE = "verge/compat/aioice.py"
AIOICE = VersionRange("aioice", minimum="0.9", below="0.14", tested="0.13.0", module=_MODULE)
SUPPORTED = (AIOICE,)

_GATHER_ON: ContextVar[tuple[str, ...] | None] = ContextVar("verge_ice_gather_on", default=None)


def _install() -> None:
    """Wrap aioice's host-address lookup so a context can choose the addresses (once)."""
    original = aioice.ice.get_host_addresses
    if getattr(original, "verge_wrapped", False):
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        chosen = _GATHER_ON.get()
        if chosen is None:
            return original(use_ipv4, use_ipv6)
        return [a for a in chosen if (use_ipv6 if ":" in a else use_ipv4)]

    get_host_addresses.verge_wrapped = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = get_host_addresses


@contextlib.contextmanager
def gather_on(addresses: tuple[str, ...] | list[str] | None) -> Iterator[None]:
    """ICE agents created and gathering inside this block use exactly ``addresses`` for host
    candidates (``None``: aioice's default, every interface address but 127.0.0.1)."""
    _install()
    token = _GATHER_ON.set(tuple(addresses) if addresses is not None else None)
    try:
        yield
    finally:
        _GATHER_ON.reset(token)


def check() -> None:
    """CompatError unless aioice still gathers host candidates through the module-level
    ``get_host_addresses(use_ipv4, use_ipv6)``."""
    expect = Expect("aioice", AIOICE.require(), _MODULE)
    lookup = getattr(aioice.ice, "get_host_addresses", None)
    expect.that(callable(lookup), "aioice.ice.get_host_addresses")
    original = inspect.unwrap(lookup)
    parameters = list(inspect.signature(lookup).parameters)
    expect.that(parameters[:2] == ["use_ipv4", "use_ipv6"] or original is not lookup,
                "the signature of aioice.ice.get_host_addresses")
    source = inspect.getsource(aioice.ice.Connection.gather_candidates)
    expect.that("get_host_addresses(" in source,
                "Connection.gather_candidates (no longer calls get_host_addresses)")
