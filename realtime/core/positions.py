"""What this node received of each channel's stream, checked against the broker's top.

Where publications can be lost on the way to a node (Redis pub/sub: `Broker.
delivery_may_gap`), the node notes, for each channel with local WebSocket subscribers and
history, the stream position of the last publication it received: one int and one str per
channel, nothing per subscriber or per delivery. Two checks find what was lost; the node
ends the channel's subscriptions for both (`Node.handle_stream_gap`: code 2500, resubscribe
with recovery):

- **on arrival**: a publication whose offset is past the last one + 1 (those between were
  lost) or whose epoch differs (the stream started over: a client would drop its small
  offsets as duplicates). An offset at or below the last one in the same epoch is not a
  gap: a publication in flight while a subscribe read the top it was seeded with.
- **periodically** (`broker.position_check_interval`), for losses no later publication
  reveals (the last of a burst; a stream that started over and stayed quiet): `pick` a
  bounded batch of channels (rotating through all of them), ask the broker for their tops
  (`Broker.positions`), and `compare`. A channel whose top is past what the node received
  (or in another epoch) may just have publications in flight, so it is only a *suspect*,
  with the top seen. At the next check, `confirm` declares it gapped if the node still has
  not received up to that top: in flight publications arrive within an interval, lost ones
  never do. No second read is needed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Mapping

from realtime.core.broker import StreamPosition
from realtime.metrics import Metrics

CHANNELS_PER_ROUND = 2000  # channels whose top is read per check


class PositionTracker:
    """Positions received per channel, and the checks against the broker's tops."""

    __slots__ = (
        "arrival_gaps",
        "check_gaps",
        "checked",
        "epochs",
        "interval",
        "next_check",
        "offsets",
        "per_round",
        "rotation",
        "suspects",
    )

    def __init__(self, interval: float, per_round: int = CHANNELS_PER_ROUND) -> None:
        self.interval = interval  # seconds between checks; 0: none
        self.next_check = 0.0
        self.per_round = per_round
        self.offsets: dict[str, int] = {}  # channel -> offset of the last one received
        self.epochs: dict[str, str] = {}  # channel -> its epoch
        # Channels found behind the broker's top at the last check -> that top.
        self.suspects: dict[str, StreamPosition] = {}
        self.rotation: deque[str] = deque()  # still to check in this pass over all channels
        # Counters (metrics).
        self.checked = 0  # channels compared with the broker's top
        self.arrival_gaps = 0  # gaps revealed by an arriving publication
        self.check_gaps = 0  # gaps confirmed by periodic checks

    def __len__(self) -> int:
        return len(self.offsets)

    def register_metrics(self, metrics: Metrics) -> None:
        metrics.gauge(
            "position_checks",
            "Channels whose received position was checked against the broker's top.",
            lambda: self.checked,
        )
        metrics.gauge(
            "position_gaps_on_arrival",
            "Publications that arrived past lost ones, or in a new epoch (since start).",
            lambda: self.arrival_gaps,
        )
        metrics.gauge(
            "position_gaps_on_check",
            "Channels still behind the broker's top seen at the previous check (since start).",
            lambda: self.check_gaps,
        )

    # ------------------------------------------------------------------ recording

    def arrived(self, channel: str, offset: int, epoch: str) -> bool:
        """A publication with a position arrived for `channel`; True when it shows that
        publications were lost before it (see the module's docstring)."""
        last = self.offsets.get(channel)
        if last is None:
            self.offsets[channel] = offset
            self.epochs[channel] = epoch
            return False
        if epoch == self.epochs[channel]:
            if offset == last + 1:
                self.offsets[channel] = offset
                return False
            if offset <= last:
                return False
        else:
            self.epochs[channel] = epoch
        self.offsets[channel] = offset
        self.arrival_gaps += 1
        return True

    def seed(self, channel: str, top: StreamPosition) -> None:
        """A subscriber got everything up to `top` (its subscribe read it): where nothing
        arrived yet, that is where the channel stands."""
        if channel not in self.offsets:
            self.offsets[channel] = top.offset
            self.epochs[channel] = top.epoch

    def forget(self, channel: str) -> None:
        """`channel` has no local subscriber left, or starts over with a first one."""
        if self.offsets.pop(channel, None) is not None:
            del self.epochs[channel]
        self.suspects.pop(channel, None)

    def position(self, channel: str) -> StreamPosition | None:
        offset = self.offsets.get(channel)
        return None if offset is None else StreamPosition(offset, self.epochs[channel])

    # ------------------------------------------------------------------ checking

    def due(self, now: float) -> bool:
        """Whether a check is due at `now` (then the next one is an interval away)."""
        if not self.interval or now < self.next_check:
            return False
        self.next_check = now + self.interval
        return True

    def _behind(self, channel: str, top: StreamPosition) -> bool:
        return self.epochs[channel] != top.epoch or self.offsets[channel] < top.offset

    def confirm(self, live: Container[str]) -> list[str]:
        """The suspects of the last check that still have not received up to the top seen
        then: they lost publications. Clears the suspects (the others caught up)."""
        gapped = [
            channel
            for channel, top in self.suspects.items()
            if channel in live and channel in self.offsets and self._behind(channel, top)
        ]
        self.suspects.clear()
        self.check_gaps += len(gapped)
        return gapped

    def pick(self, live: Container[str]) -> list[str]:
        """The next channels to check, at most `per_round`; one pass goes through every
        channel, then the next pass starts. Channels no longer `live` are forgotten."""
        rotation = self.rotation
        if not rotation:
            rotation.extend(self.offsets)
        picked: list[str] = []
        while rotation and len(picked) < self.per_round:
            channel = rotation.popleft()
            if channel not in self.offsets:
                continue
            if channel in live:
                picked.append(channel)
            else:
                self.forget(channel)
        return picked

    def compare(self, tops: Mapping[str, StreamPosition]) -> list[str]:
        """The broker's tops of picked channels: those behind become suspects (returned),
        confirmed or cleared by the next `confirm`."""
        behind: list[str] = []
        for channel, top in tops.items():
            if channel not in self.offsets:
                continue  # forgotten while the broker answered
            self.checked += 1
            if self._behind(channel, top):
                self.suspects[channel] = top
                behind.append(channel)
        return behind
