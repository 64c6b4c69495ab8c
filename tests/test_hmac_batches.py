"""Pseudonyms in batches: the vectorised HMAC gives `hmac`'s bytes, value for value."""

from __future__ import annotations

import hashlib
import hmac
import random

import polars as pl
import pytest

from personanet.privacy import pseudonym
from personanet.privacy.pseudonym import HEX_CHARS, pseudonymize


def _reference(key: bytes, prefix: bytes, values: list[str]) -> list[str]:
    return [hmac.new(key, prefix + v.encode("utf-8"), hashlib.sha256).hexdigest()[:HEX_CHARS]
            for v in values]


def _values(n: int, seed: int = 7) -> list[str]:
    """Short and long, ASCII and not, empty, and messages across SHA-256's block edges."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789.@-_ ÄéžЖ中😀"
    out = ["", "a", "x" * 55, "x" * 56, "x" * 63, "x" * 64, "x" * 119, "x" * 200]
    while len(out) < n:
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))))
    return out


@pytest.mark.parametrize("key", [bytes(range(32)), b"k" * 16, bytes(range(200, 256)) * 2],
                         ids=["32-byte key", "16-byte key", "key longer than a block"])
def test_vectorised_hmac_equals_hmac_on_100k_values(key: bytes) -> None:
    values = _values(100_000)
    prefix = b"email\x00"
    got = pseudonym._hmac_hex(pl.Series("v", values), key=key, prefix=prefix).to_list()
    assert got == _reference(key, prefix, values)


def test_python_loop_equals_hmac() -> None:
    values = _values(2_000, seed=3)
    key = bytes(range(1, 33))
    got = pseudonym._hmac_hex_python(pl.Series("v", values), key=key, prefix=b"name\x00")
    assert got.to_list() == _reference(key, b"name\x00", values)


def test_the_plugin_path_is_the_one_taken() -> None:
    # Without polars-hash the loop would silently give the same bytes 3x slower.
    import polars_hash  # noqa: F401

    expr = pseudonym.hmac_expr(pl.lit(pl.Series(["a"])), key=b"k" * 32, prefix=b"c\x00")
    assert pl.select(expr).item() == _reference(b"k" * 32, b"c\x00", ["a"])[0]


def test_without_the_plugin_pseudonyms_are_the_same(monkeypatch) -> None:
    key = bytes(range(32))
    values = pl.Series("email", ["Ann@X.org", None, " bob@y.org ", "zoë@z.org", ""])
    with_plugin = pseudonymize(values, key=key, column="email", case="lower")

    def missing(*args, **kwargs):
        raise ImportError("polars_hash")

    monkeypatch.setattr(pseudonym, "hmac_expr", missing)
    assert pseudonymize(values, key=key, column="email", case="lower").equals(with_plugin)
    assert with_plugin.to_list()[:2] == [_reference(key, b"email\x00", ["ann@x.org"])[0], None]


def test_repeated_and_distinct_values_take_the_same_pseudonyms() -> None:
    # Names (few distinct values) hash distinct spellings and join; emails hash every row.
    key = bytes(range(32))
    names = pl.Series("name", ["Ann", "Bob"] * 500)
    emails = pl.Series("name", [f"u{i}" for i in range(999)] + ["Ann"])
    by_join = pseudonymize(names, key=key, column="name")
    direct = pseudonymize(emails, key=key, column="name")
    assert by_join[0] == direct[-1] == _reference(key, b"name\x00", ["Ann"])[0]
