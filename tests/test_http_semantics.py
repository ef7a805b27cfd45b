"""The shared RFC 9110 facts: one reason-phrase table (from http.HTTPStatus, with RFC 9110's
wording where Python 3.11 still has RFC 7231's) and the hop-by-hop fields."""

from __future__ import annotations

from http import HTTPStatus

from verge.http import message
from verge.http_semantics import HOP_BY_HOP, REASONS, reason_phrase


def test_every_http_status_has_its_phrase() -> None:
    assert set(REASONS) == {status.value for status in HTTPStatus}
    assert REASONS[200] == "OK" and REASONS[503] == "Service Unavailable"


def test_rfc_9110_wording() -> None:
    assert REASONS[413] == "Content Too Large"
    assert REASONS[414] == "URI Too Long"
    assert REASONS[416] == "Range Not Satisfiable"
    assert REASONS[422] == "Unprocessable Content"


def test_unknown_status_gets_the_default() -> None:
    assert reason_phrase(299) == "" and reason_phrase(299, "Unknown") == "Unknown"


def test_hop_by_hop_fields_are_shared() -> None:
    assert message.HOP_BY_HOP is HOP_BY_HOP
    assert {"connection", "transfer-encoding", "upgrade"} <= HOP_BY_HOP
