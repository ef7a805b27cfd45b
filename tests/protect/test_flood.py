"""The flood guard (verge.protect.flood): networks counted and boxed, and the kernel filter
that drops a boxed network's new connections, tried on real loopback sockets."""

from __future__ import annotations

import socket

import pytest

from tests.sockets import connects
from verge.config import Config, ConfigError, parse_config
from verge.protect.flood import (
    FILTER_EVERY,
    LOG_BOXES_PER_SECOND,
    MAX_BOXED,
    MAX_ESCALATION,
    MAX_FILTERED,
    MIN_BURST,
    FloodGuard,
    FloodSpec,
    apply_filter,
    drop_program,
)

NOW = 1000.0


def guard(count=10, burst=0, penalty=30.0, workers=1, **fields) -> FloodGuard:
    return FloodGuard(FloodSpec(count, 1, burst, penalty, **fields), workers=workers)


def test_a_network_over_its_rate_is_boxed_whole_and_others_go_on():
    flood = guard(count=10, burst=9)
    # ten addresses of one /24, one request each at the same instant: the network's burst
    assert all(flood.admit(f"192.0.2.{n}", NOW) for n in range(1, 11))
    assert not flood.admit("192.0.2.99", NOW)  # the 11th: over, and the /24 goes in the box
    assert flood.boxed == {(4, 0xC0000200): NOW + 30.0}
    assert not flood.admit("192.0.2.1", NOW + 5)  # the whole network, for the penalty
    assert flood.is_boxed("192.0.2.200", NOW + 5)
    assert not flood.accept("192.0.2.200", NOW + 5)  # a new connection of it: refused
    assert flood.admit("198.51.100.7", NOW + 5) and not flood.is_boxed("198.51.100.7", NOW + 5)
    assert flood.admit("192.0.3.1", NOW + 5)  # the next /24 is another network
    assert flood.stats() == {"dropped": 2, "refused": 1, "boxes": 1, "boxed": 1, "filtered": 1}


def test_the_box_opens_after_the_penalty_by_sweep_or_by_the_next_request():
    flood = guard(count=1, penalty=10.0)
    assert flood.admit("192.0.2.1", NOW) and not flood.admit("192.0.2.1", NOW)
    assert not flood.is_boxed("192.0.2.1", NOW + 10.0)  # over at its end
    assert flood.admit("192.0.2.1", NOW + 10.0)  # and released by the request
    assert not flood.admit("192.0.2.1", NOW + 10.0)  # boxed again at once: twice as long
    assert flood.sweep(NOW + 29.9) == 0 and flood.sweep(NOW + 30.0) == 1
    assert flood.boxed == {} and flood.filtered == ()


def test_ipv6_networks_are_their_slash_48_and_mapped_ipv4_is_ipv4():
    flood = guard(count=1)
    assert flood.network("2001:db8:1:2::5") == flood.network("2001:db8:1:ffff::9")
    assert flood.network("2001:db8:1:2::5") != flood.network("2001:db8:2::1")
    assert flood.network("::ffff:192.0.2.9") == flood.network("192.0.2.1") == (4, 0xC0000200)
    assert flood.admit("2001:db8:1::1", NOW) and not flood.admit("2001:db8:1:9::1", NOW)
    assert flood.is_boxed("2001:db8:1:7::7", NOW) and flood.filtered is None  # v6: Python only


def test_exempt_networks_and_non_addresses_are_never_counted():
    flood = guard(count=1, exempt=("10.0.0.0/8",))
    assert all(flood.admit("10.1.2.3", NOW) for _ in range(100))
    assert all(flood.admit("unix-socket", NOW) for _ in range(100))
    assert flood.boxed == {}


def test_the_rate_is_shared_among_the_workers():
    flood = guard(count=100, burst=40, workers=4)  # each worker: 25/s, burst 10
    admitted = sum(flood.admit("192.0.2.1", NOW) for _ in range(100))
    assert admitted == 11  # the first request plus the worker's burst


def test_a_hostile_spread_over_many_networks_keeps_the_tables_bounded():
    flood = guard(count=1)
    for n in range(70_000):  # 70,000 distinct /24s, each over its rate
        peer = f"10.{n >> 8 & 255}.{n & 255}.1"
        flood.admit(peer, NOW)
        flood.admit(peer, NOW)
    assert len(flood._memo) <= 65_536 and len(flood.boxed) == MAX_BOXED
    assert len(flood.filtered) == 1  # rebuilt at most every FILTER_EVERY seconds ...
    flood.sweep(NOW + 1)  # ... and by the housekeeping
    assert len(flood.filtered) == MAX_FILTERED
    assert len(drop_program(flood.filtered, 0xFFFFFF00)) <= 4096  # what the kernel takes


@pytest.mark.parametrize("fields", [{"ipv4_prefix": 7}, {"ipv6_prefix": 129}, {"penalty": 0}])
def test_settings_out_of_bounds_are_refused(fields):
    with pytest.raises(ValueError):
        FloodSpec(1, 1, **fields)


def test_the_config_section_is_bounded_and_parsed():
    config = Config.model_validate({"flood": {"rate": "2000/s", "burst": 4000, "penalty": "2m",
                                              "exempt": ["10.0.0.0/8"]}})
    spec = config.flood.spec()
    assert (spec.count, spec.period, spec.burst, spec.penalty) == (2000, 1, 4000, 120.0)
    assert Config.model_validate({}).flood is None
    for bad in ("flood: {rate: lots}", "flood: {rate: 1/s, ipv4_prefix: 40}",
                "flood: {rate: 1/s, exempt: [300.0.0.0/8]}", "flood: {rate: 1/s, nope: 1}"):
        with pytest.raises(ConfigError):
            parse_config(bad)


def test_the_kernel_filter_drops_only_the_boxed_networks_syns():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        flood = guard(count=1)
        flood.listeners = [listener]
        assert flood.admit("127.0.1.1", NOW) and not flood.admit("127.0.1.1", NOW)
        assert flood.filtered == (0x7F000100,)
        assert not connects("127.0.1.77", port)  # the SYN is dropped: no handshake
        assert connects("127.0.0.1", port) and connects("127.0.2.1", port)
        flood.close()  # (a reload without the guard) takes the filter off
        assert connects("127.0.1.77", port)
        apply_filter(listener, [], 0)  # detaching twice is harmless


def test_new_connections_count_like_requests_and_box_a_network_that_opens_too_many():
    flood = guard(count=10, burst=9)
    assert all(flood.accept(f"192.0.2.{n}", NOW) for n in range(1, 11))  # the burst
    assert not flood.accept("192.0.2.50", NOW)  # the 11th connection boxes the /24 ...
    assert flood.boxed == {(4, 0xC0000200): NOW + 30.0}
    assert not flood.admit("192.0.2.1", NOW + 1)  # ... before it sent a single request
    assert not flood.accept("192.0.2.1", NOW + 1)
    assert flood.accept("198.51.100.1", NOW + 1) and flood.admit("198.51.100.1", NOW + 1)
    assert flood.accept("unix-socket", NOW) and flood.accept("10.0.0.1", NOW)
    assert flood.stats() == {"dropped": 1, "refused": 2, "boxes": 1, "boxed": 1, "filtered": 1}


def test_connections_and_requests_share_the_network_s_rate():
    flood = guard(count=10, burst=9)
    assert all(flood.accept("192.0.2.1", NOW) for _ in range(5))
    assert all(flood.admit("192.0.2.2", NOW) for _ in range(5))
    assert not flood.admit("192.0.2.3", NOW)


def test_the_default_burst_is_a_tenth_of_a_second_of_the_rate():
    assert FloodSpec(2000, 1).effective_burst == 200
    assert FloodSpec(120_000, 60).effective_burst == 200
    assert FloodSpec(50, 1).effective_burst == MIN_BURST  # at least a few at once
    assert FloodSpec(2000, 1, burst=0).effective_burst == 0  # an explicit one is kept
    flood = FloodGuard(FloodSpec(2000, 1))
    assert sum(flood.admit("192.0.2.1", NOW) for _ in range(1000)) == 201
    workers = FloodGuard(FloodSpec(2000, 1), workers=2)  # each worker: half
    assert sum(workers.admit("192.0.2.1", NOW) for _ in range(1000)) == 101
    assert Config.model_validate({"flood": {"rate": "2000/s"}}).flood.spec().burst is None


def test_a_repeat_offender_sits_twice_as_long_each_time_up_to_a_bound():
    flood = guard(count=1, penalty=10.0)
    ends = []
    now = NOW
    for _ in range(7):  # boxed again each time it comes back right after its release
        while flood.admit("192.0.2.1", now):
            pass
        ends.append(flood.boxed[(4, 0xC0000200)] - now)
        now = flood.boxed[(4, 0xC0000200)] + 1.0
    assert ends == [10.0, 20.0, 40.0, 80.0, 160.0, 160.0, 160.0]  # MAX_ESCALATION = 16
    assert MAX_ESCALATION == 16
    # one more sentence of good behaviour after a release and it starts afresh
    flood.sweep(now)
    now += 2 * 160.0
    flood.sweep(now)
    assert flood.strikes == {}
    while flood.admit("192.0.2.1", now):
        pass
    assert flood.boxed[(4, 0xC0000200)] == now + 10.0


def test_the_kernel_filter_goes_on_at_the_first_box_and_later_ones_at_the_next_connection():
    flood = guard(count=1)
    assert flood.admit("192.0.2.1", NOW) and not flood.admit("192.0.2.1", NOW)
    assert flood.filtered == (0xC0000200,)  # the first box: at once
    assert flood.admit("198.51.100.1", NOW + 0.05)
    assert not flood.admit("198.51.100.1", NOW + 0.05)
    assert flood.filtered == (0xC0000200,)  # within FILTER_EVERY of the last rebuild: later,
    assert not flood.accept("198.51.100.2", NOW + 0.06)
    assert flood.filtered == (0xC0000200,)
    assert flood.accept("203.0.113.1", NOW + FILTER_EVERY)  # at the next connection after it
    assert flood.filtered == (0xC6336400, 0xC0000200)
    flood.sweep(NOW + 31.0)  # both released: the filter is emptied ...
    assert flood.filtered == ()
    assert flood.admit("192.0.2.1", NOW + 31.01) and not flood.admit("192.0.2.1", NOW + 31.01)
    assert flood.filtered == (0xC0000200,)  # ... and the next first box goes on at once


def test_a_read_carrying_more_requests_than_the_network_may_send_boxes_it_unparsed():
    flood = guard(count=10, burst=9)
    assert flood.admit_read("192.0.2.1", 10, NOW)  # the whole burst: parsed, counted later
    assert flood.limit.state((4, 0xC0000200), NOW) == (None, None)  # (nothing counted)
    assert all(flood.admit("192.0.2.1", NOW) for _ in range(4))
    assert flood.admit_read("192.0.2.2", 6, NOW)  # what is left of it
    assert not flood.admit_read("192.0.2.3", 7, NOW)  # more: boxed at the read
    assert flood.boxed == {(4, 0xC0000200): NOW + 30.0} and flood.dropped == 7
    assert not flood.admit_read("192.0.2.4", 1, NOW + 1)  # a boxed network's reads too
    assert flood.admit_read("198.51.100.1", 10, NOW) and flood.admit_read("unix", 10**6, NOW)


def test_box_warnings_are_bounded_per_second(caplog):
    """A flood over thousands of networks is boxed network by network, but the log gets at
    most LOG_BOXES_PER_SECOND lines a second; the next line says how many it left out."""
    flood = guard(count=1, burst=0)
    with caplog.at_level("WARNING", logger="verge.protect"):
        for n in range(500):  # 500 /24s over their rate within one second
            net = f"10.{n // 256}.{n % 256}.1"
            flood.admit(net, NOW + 0.5)
            assert not flood.admit(net, NOW + 0.5)
        assert flood.boxes == 500 and len(caplog.records) == LOG_BOXES_PER_SECOND
        flood.admit("192.0.2.1", NOW + 1.5)
        assert not flood.admit("192.0.2.1", NOW + 1.5)  # the next second: written, with the count
    assert len(caplog.records) == LOG_BOXES_PER_SECOND + 1
    assert "490 more networks boxed before it" in caplog.records[-1].getMessage()
