"""Frame codecs: bytes of one WebSocket frame <-> protobuf messages.

Two encodings, chosen by subprotocol:

- ``realtime.v1.proto``: binary frames; each message is prefixed by its varint length.
- ``realtime.v1.json``: text frames; one JSON object per line.

Every ``encode_*`` function returns one message (a protobuf one carries its varint length
prefix). Clients may put several messages in one frame; the server sends one message per
frame and puts all the frames it has for a connection in one write. Publications are
encoded once per publication (`encode_publication`) and the same bytes go to every
subscriber using that codec.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.framing import FrameError, encode_varint, split_delimited

PROTO_SUBPROTOCOL: Final = "realtime.v1.proto"
JSON_SUBPROTOCOL: Final = "realtime.v1.json"

MAX_MESSAGES_PER_FRAME: Final = 1000


# ----------------------------------------------------------------------------- protobuf


class ProtobufCodec:
    name: Final = PROTO_SUBPROTOCOL
    binary: Final = True

    def decode_commands(self, frame: bytes) -> list[pb.Command]:
        if not frame:
            raise FrameError("empty frame")
        commands = []
        for raw in split_delimited(frame, MAX_MESSAGES_PER_FRAME):
            try:
                commands.append(pb.Command.FromString(raw))
            except DecodeError as exc:
                raise FrameError(f"invalid protobuf Command: {exc}") from None
        return commands

    def encode_reply(self, reply: pb.Reply) -> bytes:
        raw = reply.SerializeToString()
        return encode_varint(len(raw)) + raw

    def encode_publication(
        self,
        channel: str,
        offset: int,
        data: bytes,
        user: str,
        client: str,
        tags: dict[str, str] | None,
        delta: bool = False,
    ) -> bytes:
        pub = pb.Publication(offset=offset, data=data, tags=tags, delta=delta)
        if user or client:
            pub.info.user = user
            pub.info.client = client
        raw = pb.Reply(push=pb.Push(channel=channel, pub=pub)).SerializeToString()
        return encode_varint(len(raw)) + raw

    def decode_replies(self, frame: bytes) -> list[pb.Reply]:
        """Client side (tests, tools)."""
        try:
            return [pb.Reply.FromString(raw) for raw in split_delimited(frame)]
        except DecodeError as exc:
            raise FrameError(f"invalid protobuf Reply: {exc}") from None

    def encode_command(self, command: pb.Command) -> bytes:
        raw = command.SerializeToString()
        return encode_varint(len(raw)) + raw


# ----------------------------------------------------------------------------- JSON
#
# Field names are the .proto names; integers are JSON numbers (offsets stay below 2**53);
# enums are lower-case names without their prefix ("update_app"); the opaque `data` and
# `info` fields travel as a JSON value when their bytes are JSON, else base64 in `b64data`
# (`b64info`); other bytes fields are base64.

_JSON_BYTES_FIELDS = frozenset({"data", "info"})

_INT_TYPES = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}


def _enum_type(field: FieldDescriptor) -> Any:
    return field.enum_type


def _is_map(field: FieldDescriptor) -> bool:
    message_type: Any = field.message_type
    return bool(message_type.GetOptions().map_entry)


def _map_value_is_message(field: FieldDescriptor) -> bool:
    message_type: Any = field.message_type
    value_field: FieldDescriptor = message_type.fields_by_name["value"]
    return value_field.type == FieldDescriptor.TYPE_MESSAGE


def _enum_prefix(field: FieldDescriptor) -> str:
    return str(_enum_type(field).name).upper() + "_"


def message_to_obj(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        name = field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _is_map(field):
                if _map_value_is_message(field):
                    out[name] = {k: message_to_obj(v) for k, v in value.items()}
                else:
                    out[name] = dict(value)
            elif field.is_repeated:
                out[name] = [message_to_obj(v) for v in value]
            else:
                out[name] = message_to_obj(value)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            if name in _JSON_BYTES_FIELDS:
                try:
                    out[name] = loads_data(value)
                except (ValueError, UnicodeDecodeError):
                    out["b64" + name] = base64.b64encode(value).decode()
            else:
                out[name] = base64.b64encode(value).decode()
        elif field.type == FieldDescriptor.TYPE_ENUM:
            label = _enum_type(field).values_by_number[value].name
            out[name] = label.removeprefix(_enum_prefix(field)).lower()
        else:
            out[name] = list(value) if field.is_repeated else value
    return out


def obj_to_message(obj: Any, msg: Message, path: str) -> None:
    """Fill `msg` from a JSON object; raise ValueError naming the offending path."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    descriptor: Any = msg.DESCRIPTOR
    fields = descriptor.fields_by_name
    oneofs_seen: dict[str, str] = {}
    for key, value in obj.items():
        plain = key[3:]
        if key.startswith("b64") and plain in _JSON_BYTES_FIELDS and plain in fields:
            if plain in obj:
                raise ValueError(f"{path}: give either {plain} or {key}, not both")
            if not isinstance(value, str):
                raise ValueError(f"{path}.{key}: expected a base64 string")
            try:
                setattr(msg, plain, base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise ValueError(f"{path}.{key}: invalid base64") from None
            continue
        field = fields.get(key)
        if field is None:
            raise ValueError(f"{path}: unknown field {key!r}")
        where = f"{path}.{key}"
        if field.containing_oneof is not None:
            other = oneofs_seen.setdefault(field.containing_oneof.name, key)
            if other != key:
                raise ValueError(f"{path}: {other!r} and {key!r} cannot be used together")
        if value is None and key not in _JSON_BYTES_FIELDS:  # JSON null is a valid payload
            continue
        _set_field(msg, field, value, where)


def _set_field(msg: Message, field: FieldDescriptor, value: Any, where: str) -> None:
    name = field.name
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if _is_map(field):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected an object")
            container = getattr(msg, name)
            if _map_value_is_message(field):
                for k, v in value.items():
                    obj_to_message(v, container[k], f"{where}.{k}")
                return
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise ValueError(f"{where}: expected an object of strings")
            container.update(value)
        elif field.is_repeated:
            if not isinstance(value, list):
                raise ValueError(f"{where}: expected a list")
            container = getattr(msg, name)
            for i, item in enumerate(value):
                obj_to_message(item, container.add(), f"{where}[{i}]")
        else:
            obj_to_message(value, getattr(msg, name), where)
            # An empty object still marks the field as set (e.g. {"ping": {}}).
            getattr(msg, name).SetInParent()
        return
    if field.is_repeated:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list")
        getattr(msg, name).extend(_scalar(field, v, f"{where}[{i}]") for i, v in enumerate(value))
        return
    setattr(msg, name, _scalar(field, value, where))


def _scalar(field: FieldDescriptor, value: Any, where: str) -> Any:
    ftype = field.type
    if ftype in _INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer")
        low, high = _INT_TYPES[ftype]
        if not low <= value <= high:
            raise ValueError(f"{where}: {value} is out of range")
        return value
    if ftype == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false")
        return value
    if ftype == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string")
        return value
    if ftype == FieldDescriptor.TYPE_BYTES:
        if field.name in _JSON_BYTES_FIELDS:
            # Any JSON value; stored as its compact UTF-8 JSON text.
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: invalid base64") from None
    if ftype == FieldDescriptor.TYPE_ENUM:
        if isinstance(value, str):
            label = _enum_prefix(field) + value.upper()
            enum_value = _enum_type(field).values_by_name.get(label)
            if enum_value is None:
                raise ValueError(f"{where}: unknown value {value!r}")
            return enum_value.number
        raise ValueError(f"{where}: expected a string")
    raise ValueError(f"{where}: unsupported field type")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_data(data: bytes) -> Any:
    """Parse opaque publication bytes as strict JSON (ValueError when they are not)."""
    return json.loads(data, parse_constant=_reject_constant)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class JsonCodec:
    name: Final = JSON_SUBPROTOCOL
    binary: Final = False

    def decode_commands(self, frame: bytes) -> list[pb.Command]:
        try:
            text = frame.decode()
        except UnicodeDecodeError:
            raise FrameError("frame is not valid UTF-8") from None
        commands: list[pb.Command] = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            if len(commands) >= MAX_MESSAGES_PER_FRAME:
                raise FrameError(f"more than {MAX_MESSAGES_PER_FRAME} messages in one frame")
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise FrameError(f"line {number}: invalid JSON: {exc}") from None
            command = pb.Command()
            try:
                obj_to_message(obj, command, "command")
            except ValueError as exc:
                raise FrameError(f"line {number}: {exc}") from None
            commands.append(command)
        if not commands:
            raise FrameError("empty frame")
        return commands

    def encode_reply(self, reply: pb.Reply) -> bytes:
        return _dumps(message_to_obj(reply))

    def encode_publication(
        self,
        channel: str,
        offset: int,
        data: bytes,
        user: str,
        client: str,
        tags: dict[str, str] | None,
        delta: bool = False,
    ) -> bytes:
        pub: dict[str, Any] = {}
        if offset:
            pub["offset"] = offset
        try:
            pub["data"] = loads_data(data)
        except (ValueError, UnicodeDecodeError):
            pub["b64data"] = base64.b64encode(data).decode()
        if user or client:
            pub["info"] = {"user": user, "client": client}
        if tags:
            pub["tags"] = tags
        if delta:
            pub["delta"] = True
        return _dumps({"push": {"channel": channel, "pub": pub}})

    def decode_replies(self, frame: bytes) -> list[pb.Reply]:
        """Client side (tests, tools)."""
        replies = []
        for line in frame.decode().split("\n"):
            if line.strip():
                reply = pb.Reply()
                try:
                    obj_to_message(json.loads(line), reply, "reply")
                except ValueError as exc:
                    raise FrameError(str(exc)) from None
                replies.append(reply)
        return replies

    def encode_command(self, command: pb.Command) -> bytes:
        return _dumps(message_to_obj(command))


Codec = ProtobufCodec | JsonCodec

PROTOBUF: Final = ProtobufCodec()
JSON: Final = JsonCodec()
CODECS: Final[dict[str, Codec]] = {PROTOBUF.name: PROTOBUF, JSON.name: JSON}
