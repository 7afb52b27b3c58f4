"""Frame codecs: round trips, the JSON mapping, and fuzzing of the decoders."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codec import JSON, PROTOBUF, message_to_obj
from realtime.protocol.framing import FrameError, decode_varint, encode_varint, split_delimited


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded, 0) == (value, len(encoded))


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_delimited_round_trip(messages: list[bytes]) -> None:
    frame = b"".join(encode_varint(len(m)) + m for m in messages)
    assert split_delimited(frame) == messages


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_protobuf_decoder_never_fails_unexpectedly(frame: bytes) -> None:
    try:
        commands = PROTOBUF.decode_commands(frame)
    except FrameError:
        return
    assert all(isinstance(c, pb.Command) for c in commands)


@settings(max_examples=2000)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_json_decoder_never_fails_unexpectedly(frame: bytes) -> None:
    try:
        commands = JSON.decode_commands(frame)
    except FrameError:
        return
    assert all(isinstance(c, pb.Command) for c in commands)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    st.from_regex(r"[a-z]{1,8}(/[a-z0-9]{1,8}){0,2}", fullmatch=True),
    json_values,
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
def test_json_command_round_trip(channel: str, data: object, tags: dict[str, str]) -> None:
    line = json.dumps(
        {"id": 7, "publish": {"channel": channel, "data": data, "tags": tags}}
    ).encode()
    (command,) = JSON.decode_commands(line)
    assert command.publish.channel == channel
    assert json.loads(command.publish.data) == data
    (again,) = JSON.decode_commands(JSON.encode_command(command))
    assert again == command


@given(st.binary(max_size=64), st.integers(0, 2**40))
def test_protobuf_publication_encoding_matches_the_schema(data: bytes, offset: int) -> None:
    raw = PROTOBUF.encode_publication("rooms/1", offset, data, "u", "c", {"k": "v"})
    (reply,) = PROTOBUF.decode_replies(raw)
    assert reply.id == 0
    assert reply.push.channel == "rooms/1"
    assert reply.push.pub.offset == offset and reply.push.pub.data == data
    assert reply.push.pub.info.user == "u" and dict(reply.push.pub.tags) == {"k": "v"}


@given(st.binary(max_size=64))
def test_json_publication_carries_binary_as_base64(data: bytes) -> None:
    (reply,) = JSON.decode_replies(JSON.encode_publication("c", 3, data, "", "", None))
    assert reply.push.pub.data == data or json.loads(reply.push.pub.data) == json.loads(data)


def test_json_mapping_is_readable() -> None:
    reply = pb.Reply(
        id=3,
        error=pb.Error(code=113, message="old", action=pb.ACTION_UPDATE_APP, retry_after_ms=5),
    )
    assert message_to_obj(reply) == {
        "id": 3,
        "error": {"code": 113, "message": "old", "retry_after_ms": 5, "action": "update_app"},
    }
    pub = pb.Publication(offset=2**40, data=b'{"a":[1,2]}')
    assert message_to_obj(pub) == {"offset": 2**40, "data": {"a": [1, 2]}}
    assert message_to_obj(pb.Publication(data=b"\xff")) == {"b64data": "/w=="}
    assert message_to_obj(pb.Publication(data=b"NaN")) == {"b64data": "TmFO"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 1, "subscribe": {"chanel": "x"}}', "unknown field 'chanel'"),
        ('{"id": -1}', "out of range"),
        ('{"id": true}', "expected an integer"),
        ('{"publish": {"b64data": "***"}}', "invalid base64"),
        ('{"publish": {"data": 1, "b64data": "AA=="}}', "not both"),
        ('{"subscribe": {"recover": "yes"}}', "expected true or false"),
        ('{"subscribe": {}, "ping": {}}', "cannot be used together"),
        ('"just a string"', "expected a JSON object"),
    ],
)
def test_json_errors_name_the_problem(line: str, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        JSON.decode_commands(line.encode())


def test_json_lines_and_empty_frames() -> None:
    frame = b'{"id":1,"ping":{}}\n\n{"id":2,"ping":{}}\n'
    assert [c.id for c in JSON.decode_commands(frame)] == [1, 2]
    assert JSON.decode_commands(b'{"id":1,"ping":{}}')[0].HasField("ping")
    for empty in (b"", b"\n \n"):
        with pytest.raises(FrameError, match="empty"):
            JSON.decode_commands(empty)
    with pytest.raises(FrameError, match="empty"):
        PROTOBUF.decode_commands(b"")
    with pytest.raises(FrameError, match="more than"):
        PROTOBUF.decode_commands(b"\x00" * 1001)
