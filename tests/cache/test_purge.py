"""Surrogate-key parsing, the tag index and prefix matching."""

from __future__ import annotations

from verge.cache.purge import MAX_TAG_LENGTH, TagIndex, match_prefix, parse_surrogate_keys


def test_surrogate_key_is_space_separated() -> None:
    headers = {"surrogate-key": "  product-1 \tcategory/shoes  home "}
    assert parse_surrogate_keys(headers) == {"product-1", "category/shoes", "home"}


def test_cache_tag_is_comma_separated() -> None:
    headers = {"cache-tag": "product-1, category shoes ,,home,"}
    assert parse_surrogate_keys(headers) == {"product-1", "category shoes", "home"}


def test_both_headers_are_merged_and_case_is_kept() -> None:
    headers = {"surrogate-key": "A b", "cache-tag": "b,C", "content-type": "text/html"}
    assert parse_surrogate_keys(headers) == {"A", "b", "C"}


def test_repeated_surrogate_key_fields_joined_by_header_map() -> None:
    assert parse_surrogate_keys({"surrogate-key": "a b, c"}) == {"a", "b", "c"}


def test_no_tags() -> None:
    assert parse_surrogate_keys({}) == frozenset()
    assert parse_surrogate_keys({"surrogate-key": "   ", "cache-tag": " , "}) == frozenset()


def test_overlong_tags_are_ignored() -> None:
    long_tag = "x" * (MAX_TAG_LENGTH + 1)
    assert parse_surrogate_keys({"surrogate-key": f"{long_tag} ok"}) == {"ok"}


def test_tag_index_maps_tags_to_keys() -> None:
    index = TagIndex()
    index.add("/a", ["product-1", "home"])
    index.add("/b", {"product-1"})
    assert index.keys_for("product-1") == {"/a", "/b"}
    assert index.keys_for("home") == {"/a"}
    assert index.keys_for("unknown") == set()
    assert index.tags_for("/a") == {"product-1", "home"}
    assert len(index) == 2 and "/a" in index


def test_tag_index_add_replaces_previous_tags() -> None:
    index = TagIndex()
    index.add("/a", ["old", "shared"])
    index.add("/a", ["new", "shared"])
    assert index.keys_for("old") == set()
    assert index.keys_for("new") == {"/a"} == index.keys_for("shared")
    index.add("/a", [])
    assert "/a" not in index and index.keys_for("new") == set()


def test_tag_index_remove_forgets_the_key_everywhere() -> None:
    index = TagIndex()
    index.add("/a", ["t1", "t2"])
    index.add("/b", ["t2"])
    index.remove("/a")
    index.remove("/never-added")
    assert index.keys_for("t1") == set()
    assert index.keys_for("t2") == {"/b"}
    assert len(index) == 1


def test_keys_for_returns_a_copy_so_purging_while_iterating_is_safe() -> None:
    index = TagIndex()
    for key in ("/a", "/b", "/c"):
        index.add(key, ["t"])
    for key in index.keys_for("t"):
        index.remove(key)
    assert index.keys_for("t") == set() and len(index) == 0


def test_match_prefix_keeps_order() -> None:
    keys = ["/img/2.png", "/css/site.css", "/img/1.png", "/imgs/x"]
    assert match_prefix(keys, "/img/") == ["/img/2.png", "/img/1.png"]
    assert match_prefix(iter(keys), "") == keys
    assert match_prefix(keys, "/none") == []
