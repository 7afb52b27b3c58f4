"""The server API for backends: JSON over HTTP, bound to loopback by default, key required.

Request bodies use the same field names as the client protocol's JSON encoding (a
publication's `data` is any JSON value, or base64 bytes in `b64data`). Errors are JSON:
``{"error": {"code": "bad_channel", "number": 102, "message": "..."}}``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from realtime.core.broker import BrokerUnavailable, StreamPosition
from realtime.core.devices import DeviceRecord
from realtime.core.node import Node
from realtime.core.replies import pb_client_info, pb_publications
from realtime.core.topics import filter_error, filter_matches
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codec import message_to_obj, obj_to_message
from realtime.protocol.codes import ErrorCode, ProtocolError
from realtime.transports.http import HttpError, HttpRequest, HttpResponse

log = logging.getLogger("realtime.api")

API_PREFIX = "/api/v1/"
MAX_BROADCAST_CHANNELS = 1000

_STATUS = {
    ErrorCode.BAD_CHANNEL: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_AVAILABLE: 409,
    ErrorCode.BROKER_UNAVAILABLE: 503,
    ErrorCode.TOO_MANY_REQUESTS: 429,
}


def _error_body(error: ProtocolError) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": error.code.name.lower(),
        "number": int(error.code),
        "message": error.message,
    }
    if error.temporary:
        body["temporary"] = True
    if error.retry_after_ms:
        body["retry_after_ms"] = error.retry_after_ms
    return body


def _position(position: StreamPosition) -> dict[str, Any]:
    return {"offset": position.offset, "epoch": position.epoch}


def _strings(
    body: dict[str, Any],
    endpoint: str,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> dict[str, str]:
    """The body's string fields: the required ones present, nothing unknown."""
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        known = ", ".join(required + optional)
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{endpoint}: unknown field {unknown[0]!r} (known: {known})"
        )
    for name in required:
        if name not in body:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{endpoint}: {name} is required")
    for name, value in body.items():
        if not isinstance(value, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{endpoint}: {name} must be a string")
    return dict(body)


def _device(record: DeviceRecord) -> dict[str, Any]:
    return {
        "user": record.user,
        "device": record.device,
        "provider": record.provider,
        "token": record.token,
        "environment": record.environment,
        "app_id": record.app_id,
        "platform": record.platform,
        "registered_at": record.registered_at,
        "last_used": record.last_used,
    }


Route = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ServerApi:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._key = node.config.api.key.encode()
        self.routes: dict[str, Route] = {
            "publish": self.publish,
            "broadcast": self.broadcast,
            "history": self.history,
            "presence": self.presence,
            "presence_stats": self.presence_stats,
            "user_status": self.user_status,
            "channels": self.channels,
            "disconnect": self.disconnect,
            "info": self.info,
            "nodes": self.nodes,
            "register_device": self.register_device,
            "unregister_device": self.unregister_device,
            "devices": self.devices,
        }

    async def handle(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        if path in ("/healthz", "/readyz", "/metrics"):
            if request.method not in ("GET", "HEAD"):
                raise HttpError(405, "method_not_allowed", "use GET", {"Allow": "GET, HEAD"})
            return self._plain(path)
        if not path.startswith(API_PREFIX):
            raise HttpError(404, "not_found", f"unknown path; API endpoints are {API_PREFIX}*")
        name = path[len(API_PREFIX) :]
        route = self.routes.get(name)
        if route is None:
            raise HttpError(
                404, "not_found", f"unknown endpoint {name!r}; known: {', '.join(self.routes)}"
            )
        status = 200
        try:
            if request.method != "POST":
                raise HttpError(405, "method_not_allowed", "use POST", {"Allow": "POST"})
            self._authorize(request)
            body = request.json() if request.body else {}
            if not isinstance(body, dict):
                raise HttpError(400, "bad_request", "the body must be a JSON object")
            try:
                return HttpResponse.json(await route(body))
            except ProtocolError as exc:
                status = _STATUS.get(exc.code, 400)
                return HttpResponse.json({"error": _error_body(exc)}, status)
            except BrokerUnavailable as exc:
                status = 503
                error = ProtocolError(
                    ErrorCode.BROKER_UNAVAILABLE, str(exc), True, int(exc.retry_after * 1000)
                )
                response = HttpResponse.json({"error": _error_body(error)}, status)
                response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
                return response
        except HttpError as exc:
            status = exc.status
            raise
        finally:
            self.node.metrics.api_requests[(name, status)] += 1

    def _plain(self, path: str) -> HttpResponse:
        node = self.node
        if path == "/metrics":
            return HttpResponse.text(
                node.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8"
            )
        if path == "/readyz" and not node.ready:
            return HttpResponse.json({"status": "not ready", "draining": node.draining}, 503)
        return HttpResponse.json({"status": "ok"})

    def _authorize(self, request: HttpRequest) -> None:
        given = request.headers.get("x-api-key", "")
        auth = request.headers.get("authorization", "")
        if not given and auth[:7].lower() == "apikey ":
            given = auth[7:].strip()
        if not given:
            raise HttpError(
                401,
                "unauthorized",
                "missing API key: send 'Authorization: apikey <key>' or 'X-API-Key: <key>'",
            )
        if not hmac.compare_digest(given.encode(), self._key):
            raise HttpError(401, "unauthorized", "wrong API key")

    # ------------------------------------------------------------------ endpoints

    @staticmethod
    def _parse(body: dict[str, Any], message: Any, what: str) -> Any:
        try:
            obj_to_message(body, message, what)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return message

    async def publish(self, body: dict[str, Any]) -> dict[str, Any]:
        req: pb.PublishRequest = self._parse(body, pb.PublishRequest(), "publish")
        if "data" not in body and "b64data" not in body:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "publish: data or b64data is required")
        result = await self.node.publish(
            req.channel, req.data, tags=dict(req.tags), idempotency_key=req.idempotency_key
        )
        return {"position": _position(result.position), "duplicate": result.duplicate}

    async def broadcast(self, body: dict[str, Any]) -> dict[str, Any]:
        body = dict(body)
        channels = body.pop("channels", None)
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "broadcast: channels must be a list")
        if not channels or len(channels) > MAX_BROADCAST_CHANNELS:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"broadcast: between 1 and {MAX_BROADCAST_CHANNELS} channels",
            )
        if "channel" in body:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "broadcast: use channels, not channel")
        req: pb.PublishRequest = self._parse(body, pb.PublishRequest(), "broadcast")
        results: list[dict[str, Any]] = []
        for channel in channels:
            try:
                result = await self.node.publish(channel, req.data, tags=dict(req.tags))
                results.append({"channel": channel, "position": _position(result.position)})
            except ProtocolError as exc:
                results.append({"channel": channel, "error": _error_body(exc)})
        return {"results": results}

    async def history(self, body: dict[str, Any]) -> dict[str, Any]:
        req: pb.HistoryRequest = self._parse(body, pb.HistoryRequest(), "history")
        since = StreamPosition(req.since.offset, req.since.epoch) if req.HasField("since") else None
        result = await self.node.history(
            req.channel, since=since, limit=req.limit, reverse=req.reverse
        )
        reply = pb.HistoryResult(publications=pb_publications(result.publications))
        return {
            "publications": message_to_obj(reply).get("publications", []),
            "position": _position(result.position),
        }

    async def presence(self, body: dict[str, Any]) -> dict[str, Any]:
        req: pb.PresenceRequest = self._parse(body, pb.PresenceRequest(), "presence")
        entries = await self.node.presence_list(req.channel)
        return {
            "clients": {
                client: message_to_obj(pb_client_info(entry)) for client, entry in entries.items()
            }
        }

    async def presence_stats(self, body: dict[str, Any]) -> dict[str, Any]:
        req: pb.PresenceStatsRequest = self._parse(
            body, pb.PresenceStatsRequest(), "presence_stats"
        )
        stats = await self.node.presence_stats(req.channel)
        return {"clients": stats.clients, "users": stats.users}

    async def user_status(self, body: dict[str, Any]) -> dict[str, Any]:
        users = body.get("users")
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "user_status: users must be a list of ids")
        if set(body) - {"users"}:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "user_status: only users is accepted")
        statuses = await self.node.user_status(users)
        return {
            "statuses": [
                {"user": s.user, "online": s.online, "last_seen": int(s.last_seen)}
                for s in statuses
            ]
        }

    async def channels(self, body: dict[str, Any]) -> dict[str, Any]:
        pattern = body.get("filter", "#")
        if not isinstance(pattern, str) or filter_error(pattern):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "channels: filter must be a channel filter like rooms/+"
            )
        found = [
            {"channel": name, "subscribers": ch.size}
            for name, ch in self.node.hub.channels.items()
            if filter_matches(pattern, name)
        ]
        found.sort(key=lambda item: str(item["channel"]))
        return {"channels": found, "node": self.node.name}

    async def disconnect(self, body: dict[str, Any]) -> dict[str, Any]:
        user = body.get("user")
        if not isinstance(user, str) or not user:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "disconnect: user is required")
        reconnect = body.get("reconnect", True)
        reason = body.get("reason", "disconnected by the server")
        if not isinstance(reconnect, bool) or not isinstance(reason, str):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "disconnect: reconnect is a boolean, reason a string"
            )
        # On every node: a user's connections may be anywhere in the cluster.
        return await self.node.disconnect_user_everywhere(user, reconnect=reconnect, reason=reason)

    async def nodes(self, body: dict[str, Any]) -> dict[str, Any]:
        """Every node of the cluster with its load (as it listed itself lately)."""
        return {"nodes": await self.node.cluster.nodes()}

    async def register_device(self, body: dict[str, Any]) -> dict[str, Any]:
        """A device's push token, registered by the backend (as the app would)."""
        fields = _strings(
            body,
            "register_device",
            required=("user", "device", "provider", "token"),
            optional=("environment", "app_id", "platform"),
        )
        record, moved = await self.node.add_device(
            fields["user"],
            fields["device"],
            fields["provider"],
            fields["token"],
            environment=fields.get("environment", ""),
            app_id=fields.get("app_id", ""),
            platform=fields.get("platform", ""),
        )
        return {"device": _device(record), "moved": moved}

    async def unregister_device(self, body: dict[str, Any]) -> dict[str, Any]:
        fields = _strings(body, "unregister_device", required=("user", "device"))
        return {"removed": await self.node.remove_device(fields["user"], fields["device"])}

    async def devices(self, body: dict[str, Any]) -> dict[str, Any]:
        """A user's devices with their push tokens (in full: this API is the backend's)."""
        fields = _strings(body, "devices", required=("user",))
        records = await self.node.list_devices(fields["user"])
        records.sort(key=lambda r: (r.device, r.registered_at))
        return {"devices": [_device(record) for record in records]}

    async def info(self, body: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        return {
            "node": node.name,
            "node_id": node.cluster.node_id,
            "version": node.version,
            "broker": node.broker.name,
            "connections": len(node.sessions),
            "users": len(node.users),
            "channels": len(node.hub.channels),
            "draining": node.draining,
        }
