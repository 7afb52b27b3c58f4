from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.auth import AuthError, TokenVerifier, mint_token
from realtime.config import AuthConfig
from realtime.core.topics import FilterSet, channel_error, filter_error, filter_matches

SECRET = "s" * 40


@pytest.mark.parametrize(
    ("topic_filter", "channel", "expected"),
    [
        ("rooms/+", "rooms/1", True),
        ("rooms/+", "rooms/1/2", False),
        ("rooms/#", "rooms", True),
        ("rooms/#", "rooms/1/2", True),
        ("#", "anything/at/all", True),
        ("+/b", "a/b", True),
        ("a/+/c", "a//c", True),
        ("rooms", "rooms", True),
        ("rooms", "rooms2", False),
    ],
)
def test_filter_matches(topic_filter: str, channel: str, expected: bool) -> None:
    assert filter_matches(topic_filter, channel) is expected
    assert FilterSet([topic_filter]).matches(channel) is expected


def test_filter_and_channel_validation() -> None:
    assert filter_error("a/#/b") and filter_error("a+") and filter_error("")
    assert filter_error("a/+/#") is None
    assert channel_error("a b") and channel_error("$x") and channel_error("a/#")
    assert channel_error("x" * 256) and channel_error("") and channel_error("a\x00")
    assert channel_error("rooms/ünïcode") is None


def test_hs256_round_trip_and_claims() -> None:
    config = AuthConfig(hmac_secret=SECRET)
    token = mint_token(config, "alice", ttl=60, subscribe=["rooms/+"], device="d1")
    principal = TokenVerifier(config).verify(token)
    assert principal.user == "alice" and principal.device == "d1"
    assert principal.subscribe.matches("rooms/7") and not principal.publish


def test_algorithm_is_pinned() -> None:
    config = AuthConfig(hmac_secret=SECRET)
    token = jwt.encode({"sub": "a", "exp": time.time() + 60}, SECRET, algorithm="HS512")
    with pytest.raises(AuthError, match="algorithm"):
        TokenVerifier(config).verify(token)


def test_claim_validation() -> None:
    config = AuthConfig(hmac_secret=SECRET, audience="app", issuer="me")
    verifier = TokenVerifier(config)
    good = mint_token(config, "a", ttl=60)
    assert verifier.verify(good).user == "a"
    for claims, message in [
        ({"sub": "a"}, "exp"),
        ({"exp": time.time() + 60, "aud": "app", "iss": "me"}, "sub"),
        ({"sub": "a", "exp": time.time() + 60, "aud": "other", "iss": "me"}, "(?i)audience"),
        (
            {"sub": "a", "exp": time.time() + 60, "aud": "app", "iss": "me", "subscribe": "x"},
            "list",
        ),
        (
            {"sub": "a", "exp": time.time() + 60, "aud": "app", "iss": "me", "publish": ["a/#/b"]},
            "'#'",
        ),
        ({"sub": "", "exp": time.time() + 60, "aud": "app", "iss": "me"}, "sub"),
    ]:
        with pytest.raises(AuthError, match=message):
            verifier.verify(jwt.encode(claims, SECRET, algorithm="HS256"))


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_asymmetric_algorithms(algorithm: str) -> None:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    config = AuthConfig(algorithm=algorithm, public_key=public)
    token = mint_token(config, "bob", ttl=60, private_key=private)
    assert TokenVerifier(config).verify(token).user == "bob"
    # An HS256 token made with the public key as secret (key confusion) is refused.
    forged = jwt.encode({"sub": "x", "exp": time.time() + 60}, "k" * 40, algorithm="HS256")
    with pytest.raises(AuthError):
        TokenVerifier(config).verify(forged)


@pytest.mark.parametrize(
    ("permission", "topic_filter", "expected"),
    [
        ("rooms/+", "rooms/1", True),
        ("rooms/+", "rooms/+", True),
        ("rooms/+", "rooms/#", False),
        ("rooms/#", "rooms/+/x", True),
        ("rooms/#", "rooms", True),
        ("#", "#", True),
        ("rooms/1", "rooms/+", False),
        ("+/x", "a/x", True),
        ("+/x", "a/y", False),
        ("a/b", "a/b/c", False),
    ],
)
def test_filter_covers(permission: str, topic_filter: str, expected: bool) -> None:
    from realtime.core.topics import filter_covers

    assert filter_covers(permission, topic_filter) is expected
    assert FilterSet([permission]).covers(topic_filter) is expected


levels = st.sampled_from(["a", "b", "c"])
topics = st.lists(levels, min_size=1, max_size=4).map("/".join)
filters = st.lists(st.sampled_from(["a", "b", "+"]), min_size=1, max_size=4).flatmap(
    lambda parts: st.sampled_from(["/".join(parts), "/".join([*parts, "#"]), "#"])
)


@settings(max_examples=300)
@given(st.lists(st.tuples(filters, st.integers(0, 5)), max_size=12), topics)
def test_filter_trie_matches_like_brute_force(entries: list[tuple[str, int]], channel: str) -> None:
    from realtime.core.topics import FilterTrie

    trie: FilterTrie[int, str] = FilterTrie()
    for topic_filter, member in entries:
        trie.add(topic_filter, member, topic_filter)
    expected = {(f, m) for f, m in entries if filter_matches(f, channel)}
    got = {(f, m) for found in trie.match(channel) for m, f in found.items()}
    assert got == expected
    for topic_filter, member in entries:
        trie.remove(topic_filter, member)
    assert trie.size == 0 and trie.match(channel) == [] and trie._root.empty()
