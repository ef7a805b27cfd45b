"""verge.compat.aioice: the gathering addresses a context chooses, aioice's default elsewhere."""

from __future__ import annotations

import aioice.ice

from tests.compat import loudly
from verge.compat import aioice as compat


def test_the_installed_aioice_has_what_the_patch_needs() -> None:
    loudly(compat.check)


def test_a_context_chooses_the_host_addresses_and_leaves_the_default_elsewhere() -> None:
    with compat.gather_on(["127.0.0.2", "::1"]):
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.2"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.2",
                                                                               "::1"]
    default = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
    assert "127.0.0.1" not in default  # aioice's own choice again


def test_none_means_aioices_choice_and_empty_means_none() -> None:
    default = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
    with compat.gather_on(None):
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == default
    with compat.gather_on([]):
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == []
