"""Value types handed to applications."""

from __future__ import annotations

from dataclasses import dataclass, field

from realtime.protocol import realtime_pb2 as pb

__all__ = ["Publication", "StreamPosition"]


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """A position in a channel's stream: ``offset`` within the stream generation ``epoch``."""

    offset: int
    epoch: str

    @classmethod
    def from_pb(cls, position: pb.StreamPosition) -> StreamPosition:
        return cls(offset=position.offset, epoch=position.epoch)

    def to_pb(self) -> pb.StreamPosition:
        return pb.StreamPosition(offset=self.offset, epoch=self.epoch)


@dataclass(frozen=True, slots=True)
class Publication:
    """One message published on a channel.

    ``offset`` is the position in the channel's stream, 0 when the channel keeps no
    history. ``user``/``client`` identify the publisher when the server tells.
    """

    channel: str
    offset: int
    data: bytes
    user: str = ""
    client: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, channel: str, publication: pb.Publication) -> Publication:
        return cls(
            channel=channel,
            offset=publication.offset,
            data=publication.data,
            user=publication.info.user,
            client=publication.info.client,
            tags=dict(publication.tags),
        )
