"""Prometheus metrics, in the text exposition format, with no dependency.

Counters are plain integers bumped where events happen (never per delivery: the hub counts
deliveries per publication); gauges are read from the node when /metrics is scraped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self.connections_accepted = 0
        self.connections_refused: Counter[str] = Counter()  # by reason
        self.disconnects: Counter[int] = Counter()  # by close code
        self.messages_in = 0  # commands received
        self.bytes_in = 0
        self.messages_out = 0  # replies and pushes written
        self.bytes_out = 0
        self.errors: Counter[int] = Counter()  # error replies by code
        self.publishes: Counter[str] = Counter()  # by source: client, api
        self.api_requests: Counter[tuple[str, int]] = Counter()  # by (endpoint, status)
        # Ephemeral events handled (join, leave, typing) and typing commands throttled.
        self.channel_events: Counter[str] = Counter()
        # Backgrounded apps: wakes by outcome (armed, coalesced, sent, over_budget,
        # cancelled, no_token) and polls by result (ok, empty, error).
        self.wakes: Counter[str] = Counter()
        self.polls: Counter[str] = Counter()
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        # Fan-out deliveries are counted by the hub per publication and added on scrape.
        self.deliveries: Callable[[], int] = lambda: 0
        self.delta_deliveries: Callable[[], int] = lambda: 0
        # Push providers (realtime/push/sender.py): by provider, errors also by reason,
        # drops also by why (queue_full, breaker_open, retries_exhausted, ...); breaker
        # state per provider read on scrape (0 closed, 1 half-open, 2 open).
        self.push_sent: Counter[str] = Counter()
        self.push_errors: Counter[tuple[str, str]] = Counter()
        self.push_tokens_removed: Counter[str] = Counter()
        self.push_dropped: Counter[tuple[str, str]] = Counter()
        self.push_breakers: dict[str, Callable[[], float]] = {}
        # Device registry (push tokens): registrations, tokens taken from another user or
        # device (re-login), tokens pruned for being unused for push.token_max_idle_days.
        self.push_devices_registered = 0
        self.push_tokens_moved = 0
        self.push_tokens_pruned = 0

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP realtime_{name} {help_text}")
            lines.append(f"# TYPE realtime_{name} {kind}")
            for labels, value in samples:
                lines.append(f"realtime_{name}{labels} {value:g}")

        def labelled(label: str, counter: Counter[str] | Counter[int]) -> list[tuple[str, float]]:
            return [(f'{{{label}="{_escape(str(k))}"}}', float(v)) for k, v in counter.items()]

        for name, (help_text, read) in sorted(self.gauges.items()):
            metric(name, "gauge", help_text, [("", float(read()))])
        metric(
            "connections_accepted_total",
            "counter",
            "WebSocket connections that completed connect.",
            [("", self.connections_accepted)],
        )
        metric(
            "connections_refused_total",
            "counter",
            "Connections refused, by reason.",
            labelled("reason", self.connections_refused),
        )
        metric(
            "disconnects_total",
            "counter",
            "Connections closed by the server, by close code (3001 = slow consumer).",
            labelled("code", self.disconnects),
        )
        metric(
            "slow_disconnects_total",
            "counter",
            "Clients disconnected because they did not read fast enough.",
            [("", self.disconnects.get(3001, 0))],
        )
        metric("messages_in_total", "counter", "Commands received.", [("", self.messages_in)])
        metric("bytes_in_total", "counter", "Payload bytes received.", [("", self.bytes_in)])
        metric(
            "messages_out_total",
            "counter",
            "Replies and pushes queued to clients.",
            [("", self.messages_out + self.deliveries())],
        )
        metric(
            "bytes_out_total",
            "counter",
            "Payload bytes written.",
            [("", self.bytes_out)],
        )
        metric(
            "errors_total",
            "counter",
            "Error replies, by code.",
            labelled("code", self.errors),
        )
        metric(
            "publications_total",
            "counter",
            "Publications accepted, by source.",
            labelled("source", self.publishes),
        )
        metric(
            "delta_deliveries_total",
            "counter",
            "Publications delivered as a Fossil delta instead of the full payload.",
            [("", self.delta_deliveries())],
        )
        metric(
            "channel_events_total",
            "counter",
            "Ephemeral channel events handled (join, leave, typing; typing_throttled: "
            "typing commands not forwarded; stream_gap: channels whose local subscribers "
            "were told to resubscribe because publications may have been lost).",
            labelled("kind", self.channel_events),
        )
        metric(
            "push_wakes_total",
            "counter",
            "Wakes of backgrounded apps, by outcome (armed: a publication armed one; "
            "coalesced: one was pending; sent: handed to the push sender; over_budget; "
            "cancelled: the app came back first; no_token: no push token registered).",
            labelled("outcome", self.wakes),
        )
        metric(
            "polls_total",
            "counter",
            "GET /v1/poll requests, by result: ok (publications), empty, error_<status>.",
            labelled("result", self.polls),
        )
        metric(
            "api_requests_total",
            "counter",
            "Server API requests, by endpoint and status.",
            [
                (f'{{endpoint="{_escape(e)}",status="{s}"}}', float(v))
                for (e, s), v in self.api_requests.items()
            ],
        )
        metric(
            "push_sent_total",
            "counter",
            "Pushes a provider (APNs, FCM) accepted, by provider.",
            labelled("provider", self.push_sent),
        )
        metric(
            "push_errors_total",
            "counter",
            "Provider errors, by provider and the provider's reason (or timeout, connection).",
            [
                (f'{{provider="{_escape(p)}",reason="{_escape(r)}"}}', float(v))
                for (p, r), v in self.push_errors.items()
            ],
        )
        metric(
            "push_tokens_removed_total",
            "counter",
            "Device tokens a provider reported invalid (handed to the device registry).",
            labelled("provider", self.push_tokens_removed),
        )
        metric(
            "push_dropped_total",
            "counter",
            "Wakes not delivered, by provider and why (queue_full, breaker_open, "
            "retries_exhausted, no_provider, closed).",
            [
                (f'{{provider="{_escape(p)}",why="{_escape(w)}"}}', float(v))
                for (p, w), v in self.push_dropped.items()
            ],
        )
        metric(
            "push_breaker_state",
            "gauge",
            "Circuit breaker of each push provider: 0 closed, 1 half-open, 2 open.",
            [
                (f'{{provider="{_escape(p)}"}}', float(read()))
                for p, read in sorted(self.push_breakers.items())
            ],
        )
        metric(
            "push_devices_registered_total",
            "counter",
            "Push tokens registered (register_device over the socket or the server API).",
            [("", self.push_devices_registered)],
        )
        metric(
            "push_tokens_moved_total",
            "counter",
            "Registrations that took a push token from another user or device (re-login).",
            [("", self.push_tokens_moved)],
        )
        metric(
            "push_tokens_pruned_total",
            "counter",
            "Push tokens removed for being unused for push.token_max_idle_days.",
            [("", self.push_tokens_pruned)],
        )
        return "\n".join(lines) + "\n"
