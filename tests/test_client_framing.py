"""Pure parts of the client: varint framing, backoff and reconnect decisions."""

from __future__ import annotations

import random

import pytest

from realtime.client.policy import (
    DisconnectInfo,
    backoff_delay,
    decide_after_close,
    decide_after_error,
    decide_after_http_status,
    reconnect_delay,
    refresh_delay,
)
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import Action, CloseCode, ErrorCode
from realtime.protocol.framing import (
    FrameError,
    decode_varint,
    encode_delimited,
    encode_varint,
    split_delimited,
)

# ---------------------------------------------------------------- varints


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2**64 - 1, b"\xff" * 9 + b"\x01"),
    ],
)
def test_varint_known_encodings(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded
    assert decode_varint(encoded) == (value, len(encoded))


def test_varint_round_trip_many_values() -> None:
    rng = random.Random(1)
    values = [rng.getrandbits(rng.randint(1, 64)) for _ in range(2000)]
    values += [2**k for k in range(64)] + [2**k - 1 for k in range(1, 65)]
    for value in values:
        encoded = encode_varint(value)
        assert decode_varint(encoded) == (value, len(encoded))
        # Decoding from the middle of a buffer.
        assert decode_varint(b"junk" + encoded + b"tail", 4) == (value, 4 + len(encoded))


def test_varint_matches_protobuf() -> None:
    # A uint32 field 1 is a tag byte (0x08) followed by the value's varint.
    for value in (0, 1, 150, 2**21, 2**32 - 1):
        assert pb.Command(id=value).SerializeToString() == (
            (b"\x08" + encode_varint(value)) if value else b""
        )


def test_varint_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_varint(-1)
    with pytest.raises(ValueError):
        encode_varint(2**64)


@pytest.mark.parametrize("data", [b"", b"\x80", b"\xff\xff", b"\x80\x80\x80"])
def test_varint_truncated(data: bytes) -> None:
    with pytest.raises(FrameError, match="truncated varint"):
        decode_varint(data)


def test_varint_too_long() -> None:
    with pytest.raises(FrameError, match="longer than 10 bytes"):
        decode_varint(b"\x80" * 10 + b"\x01")
    with pytest.raises(FrameError, match="exceeds 64 bits"):
        decode_varint(b"\xff" * 9 + b"\x7f")


# ---------------------------------------------------------------- frames


def test_frame_round_trip_one_message() -> None:
    message = pb.Command(id=7, ping=pb.PingRequest()).SerializeToString()
    frame = encode_delimited([message])
    assert frame == encode_varint(len(message)) + message
    assert split_delimited(frame) == [message]


def test_frame_round_trip_several_messages() -> None:
    replies = [
        pb.Reply(id=1, connect=pb.ConnectResult(client="c1", ping_interval=25, pong_timeout=10)),
        pb.Reply(push=pb.Push(ping=pb.ServerPing())),
        pb.Reply(
            push=pb.Push(
                channel="news",
                pub=pb.Publication(offset=3, data=b"x" * 300, tags={"k": "v"}),
            )
        ),
        pb.Reply(),  # every field at its default: a zero-length message
        pb.Reply(id=2, error=pb.Error(code=103, message="denied", action=pb.ACTION_RETRY)),
    ]
    messages = [r.SerializeToString() for r in replies]
    assert messages[3] == b""
    decoded = split_delimited(encode_delimited(messages))
    assert decoded == messages
    assert [pb.Reply.FromString(m) for m in decoded] == replies


def test_frame_round_trip_random_batches() -> None:
    rng = random.Random(2)
    for _ in range(200):
        messages = [rng.randbytes(rng.choice([0, 1, 2, 127, 128, 129, 5000])) for _ in range(10)]
        messages = messages[: rng.randint(1, 10)]
        assert split_delimited(encode_delimited(messages)) == messages


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = encode_delimited([b"abc", b"", b"de"])
    assert split_delimited(bytearray(frame)) == [b"abc", b"", b"de"]
    assert split_delimited(memoryview(frame)) == [b"abc", b"", b"de"]


def test_empty_frame_has_no_messages() -> None:
    assert split_delimited(b"") == []


def test_truncated_body_raises() -> None:
    frame = encode_delimited([b"hello", b"world"])
    for cut in range(1, len(frame)):
        if cut in (6,):  # exactly after the first message: a valid frame
            assert split_delimited(frame[:cut]) == [b"hello"]
            continue
        with pytest.raises(FrameError, match="truncated"):
            split_delimited(frame[:cut])


def test_truncated_message_error_says_what_is_missing() -> None:
    frame = encode_varint(200) + b"x" * 10
    with pytest.raises(FrameError, match=r"says 200 bytes, 10 left"):
        split_delimited(frame)


def test_truncated_length_prefix_raises() -> None:
    big = b"y" * 300  # two-byte length prefix
    frame = encode_delimited([b"ok", big])
    with pytest.raises(FrameError, match="truncated varint"):
        split_delimited(frame[:4])  # the first message and half of the second prefix


def test_framing_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)


# ---------------------------------------------------------------- backoff


@pytest.mark.parametrize("attempt", [0, 1, 2, 5, 7, 10, 50, 1000, 10**6])
def test_backoff_within_full_jitter_bounds(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(20.0, 0.2 * 2.0 ** min(attempt, 100))
    delays = [backoff_delay(attempt, 0.2, 20.0, rng=rng) for _ in range(500)]
    assert all(0.0 <= d <= ceiling for d in delays)
    # Full jitter: spread over the whole range, not clustered at the ceiling.
    assert min(delays) < ceiling * 0.1
    assert max(delays) > ceiling * 0.9


def test_backoff_grows_then_caps() -> None:
    rng = random.Random(3)
    means = [
        sum(backoff_delay(a, 0.2, 20.0, rng=rng) for _ in range(2000)) / 2000 for a in range(10)
    ]
    assert means[0] < means[3] < means[6]
    assert means[8] == pytest.approx(10.0, rel=0.1)  # uniform(0, 20)
    assert means[9] == pytest.approx(10.0, rel=0.1)


def test_backoff_degenerate_and_invalid() -> None:
    assert backoff_delay(3, 0.0, 20.0) == 0.0
    assert backoff_delay(3, 1.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        backoff_delay(-1, 0.2, 20.0)


def test_reconnect_delay_honours_server_minimum() -> None:
    rng = random.Random(4)
    for attempt in range(12):
        assert reconnect_delay(attempt, 0.2, 20.0, min_delay=5.0, rng=rng) >= 5.0
        assert reconnect_delay(attempt, 0.2, 20.0, min_delay=30.0, rng=rng) == 30.0
        assert 0.0 <= reconnect_delay(attempt, 0.2, 20.0, rng=rng) <= 20.0


def test_refresh_delay_around_85_percent() -> None:
    rng = random.Random(5)
    delays = [refresh_delay(100, rng=rng) for _ in range(500)]
    assert all(80.0 <= d <= 90.0 for d in delays)
    assert sum(delays) / len(delays) == pytest.approx(85.0, abs=1.0)
    with pytest.raises(ValueError):
        refresh_delay(0)


# ---------------------------------------------------------------- reconnect decisions


@pytest.mark.parametrize("code", [None, 1000, 1001, 1006, 1011, 2999, 3000, 3001, 3002, 3499])
def test_close_codes_that_reconnect(code: int | None) -> None:
    decision = decide_after_close(code)
    assert decision.reconnect and not decision.new_token


@pytest.mark.parametrize("code", [3500, 3501, 3502, 3503, 3504, 3999, 4000, 4999])
def test_close_codes_that_do_not_reconnect(code: int) -> None:
    assert not decide_after_close(code).reconnect


@pytest.mark.parametrize("code", [CloseCode.INVALID_TOKEN, CloseCode.TOKEN_EXPIRED])
def test_token_close_codes_with_get_token(code: int) -> None:
    decision = decide_after_close(code, can_refresh_token=True)
    assert decision.reconnect and decision.new_token


def test_token_expired_without_get_token_follows_the_range_rule() -> None:
    assert decide_after_close(CloseCode.TOKEN_EXPIRED).reconnect
    assert not decide_after_close(CloseCode.INVALID_TOKEN).reconnect
    assert not decide_after_close(CloseCode.APP_VERSION_TOO_OLD, can_refresh_token=True).reconnect


def test_disconnect_push_hint_and_veto() -> None:
    hint = DisconnectInfo(3000, "shutdown", True, 1500)
    decision = decide_after_close(3000, hint)
    assert decision.reconnect and decision.min_delay == 1.5
    # The close frame got lost after the push: the push's code decides.
    assert not decide_after_close(None, DisconnectInfo(3503, "old app", False, 0)).reconnect
    assert decide_after_close(None, hint).min_delay == 1.5
    assert not decide_after_close(3005, DisconnectInfo(3005, "x", False, 0)).reconnect


def test_connect_error_decisions() -> None:
    assert not decide_after_error(ErrorCode.TOKEN_EXPIRED).reconnect
    refetch = decide_after_error(ErrorCode.TOKEN_EXPIRED, can_refresh_token=True)
    assert refetch.reconnect and refetch.new_token
    assert decide_after_error(
        ErrorCode.PERMISSION_DENIED, action=Action.REFRESH_TOKEN, can_refresh_token=True
    ).new_token
    assert not decide_after_error(
        ErrorCode.APP_VERSION_TOO_OLD, action=Action.UPDATE_APP, can_refresh_token=True
    ).reconnect
    retry = decide_after_error(ErrorCode.NOT_AVAILABLE, temporary=True, retry_after_ms=2500)
    assert retry.reconnect and retry.min_delay == 2.5
    assert decide_after_error(ErrorCode.INTERNAL, action=Action.RECONNECT).reconnect
    assert not decide_after_error(ErrorCode.BAD_REQUEST).reconnect


def test_http_status_decisions() -> None:
    assert decide_after_http_status(503).reconnect
    assert decide_after_http_status(429).reconnect
    assert not decide_after_http_status(404).reconnect
    assert not decide_after_http_status(401).reconnect
    assert decide_after_http_status(401, can_refresh_token=True).new_token
