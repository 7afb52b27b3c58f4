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


# One operation on a trie: add (filter, member) with a value (None included: the memory
# broker's values are None), remove it, or match a channel.
trie_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "match"]),
        filters,
        st.integers(0, 3),
        st.sampled_from([None, "v1", "v2"]),
        topics,
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(trie_ops)
def test_filter_trie_stays_right_through_adds_removes_and_matches(
    ops: list[tuple[str, str, int, str | None, str]],
) -> None:
    """Matches interleaved with changes: the memo never answers with a stale result, whether
    a filter is exact (kept outside the trie, one member or a dict of them) or a wildcard."""
    from realtime.core.topics import FilterTrie

    trie: FilterTrie[int, str | None] = FilterTrie()
    model: dict[tuple[str, int], str | None] = {}
    for op, topic_filter, member, value, channel in ops:
        if op == "add":
            trie.add(topic_filter, member, value)
            model[(topic_filter, member)] = value
        elif op == "remove":
            assert trie.remove(topic_filter, member) is ((topic_filter, member) in model)
            model.pop((topic_filter, member), None)
        else:
            got = sorted(
                ((m, v) for found in trie.match(channel) for m, v in found.items()), key=repr
            )
            matching = [(m, v) for (f, m), v in model.items() if filter_matches(f, channel)]
            expected = sorted(matching, key=repr)
            assert got == expected
        assert trie.size == len(model)
    for topic_filter, member in list(model):
        assert trie.remove(topic_filter, member)
    assert trie.size == 0 and trie._root.empty() and not trie._exact


def test_verify_keeps_only_the_principal() -> None:
    """Nothing of a decoded token but its Principal outlives `verify`: no claims, header or
    PyJWT options dict stays alive with it (idle memory per connection counts)."""
    import gc

    def token_dicts() -> int:
        gc.collect()
        keys = ("sub", "alg", "verify_signature")
        return sum(1 for o in gc.get_objects() if isinstance(o, dict) and any(k in o for k in keys))

    config = AuthConfig(hmac_secret=SECRET)
    verifier = TokenVerifier(config)
    tokens = [mint_token(config, f"device-{i}", ttl=60, subscribe=["#"]) for i in range(50)]
    verifier.verify(tokens[0])  # PyJWT's one-time setup
    before = token_dicts()
    principals = [verifier.verify(token) for token in tokens]
    assert token_dicts() == before
    assert {type(o).__name__ for p in principals for o in gc.get_referents(p)} <= {
        "str",
        "float",
        "FilterSet",
        "dict",  # the shared empty `info`
        "type",
    }
    assert len({id(p.info) for p in principals}) == 1


def test_verified_tokens_are_remembered_until_they_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    import realtime.auth as auth

    config = AuthConfig(hmac_secret=SECRET, leeway=2.0)
    verifier = TokenVerifier(config)
    token = mint_token(config, "alice", ttl=10, device="phone")
    first = verifier.verify(token)
    assert verifier.verify(token) is first  # no second signature check
    # A token that changed by one character is checked (and refused), not looked up.
    with pytest.raises(AuthError, match="invalid token"):
        verifier.verify(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])
    # Expiry still holds for a remembered token, with the same leeway.
    now = time.time()
    monkeypatch.setattr(auth.time, "time", lambda: now + 11)
    assert verifier.verify(token) is first
    monkeypatch.setattr(auth.time, "time", lambda: now + 13)
    with pytest.raises(AuthError) as refused:
        verifier.verify(token)
    assert refused.value.expired
    # Bounded: the oldest go first.
    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    monkeypatch.setattr(auth.time, "time", lambda: now)
    tokens = [mint_token(config, f"u{i}", ttl=60) for i in range(5)]
    for t in tokens:
        verifier.verify(t)
    assert list(verifier._verified) == tokens[2:]
