"""The token file: parsing, globs, actions, and lookups that compare every entry."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from gradstream.server.tokens import Action, TokenFileError, TokenStore

FILE = """\
# token                           models            actions
aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa  *                 admin
bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb  fraud-*,churn     train,read   # producer
cccccccccccccccccccccccccccccccc  fraud-v2          predict
"""


def test_parse_and_allow() -> None:
    store = TokenStore.parse(FILE)
    admin = store.find("a" * 32)
    producer = store.find("b" * 32)
    predictor = store.find("c" * 32)
    assert admin and producer and predictor
    assert all(admin.allows(a, "anything") for a in Action)  # admin includes the rest
    assert producer.allows(Action.TRAIN, "fraud-v1") and producer.allows(Action.READ, "churn")
    assert not producer.allows(Action.TRAIN, "churn-2")  # globs match whole names
    assert not producer.allows(Action.PREDICT, "fraud-v1")
    assert not producer.allows(Action.ADMIN, "fraud-v1")
    assert predictor.allows(Action.PREDICT, "fraud-v2")
    assert not predictor.allows(Action.PREDICT, "fraud-v3")
    assert store.find("d" * 32) is None
    assert store.find("a" * 31) is None and store.find("") is None


def test_evaluate_and_export_are_their_own_actions() -> None:
    store = TokenStore.parse(
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee  m  evaluate\n"
        "ffffffffffffffffffffffffffffffff  m  train,predict,read,export\n"
    )
    evaluator, exporter = store.find("e" * 32), store.find("f" * 32)
    assert evaluator and exporter
    assert evaluator.allows(Action.EVALUATE, "m")
    assert not evaluator.allows(Action.EXPORT, "m") and not evaluator.allows(Action.READ, "m")
    assert exporter.allows(Action.EXPORT, "m") and not exporter.allows(Action.EVALUATE, "m")


def test_tokens_are_kept_only_as_digests() -> None:
    store = TokenStore.parse(FILE)
    for grant in store.grants:
        assert len(grant.digest) == 32
        assert b"aaaa" not in grant.digest and b"bbbb" not in grant.digest
    assert "a" * 32 not in repr(store.grants)


def test_every_entry_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    store = TokenStore.parse(FILE)
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    store.find("a" * 32)  # found at the first entry: the others are still compared
    assert len(compared) == len(store.grants)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no tokens"),
        ("# only a comment\n", "has no tokens"),
        ("short * admin\n", "at least 16 characters"),
        ("aaaaaaaaaaaaaaaaaaaa * admin,root\n", "must be among"),
        ("aaaaaaaaaaaaaaaaaaaa *\n", "expected TOKEN MODELS ACTIONS"),
        ("aaaaaaaaaaaaaaaaaaaa , admin\n", "no models or no actions"),
        ("aaaaaaaaaaaaaaaaaaaa * admin\naaaaaaaaaaaaaaaaaaaa m read\n", "listed twice"),
    ],
)
def test_malformed_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=message):
        TokenStore.parse(text, "tokens")


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(FILE)
    assert len(TokenStore.load(path).grants) == 3
