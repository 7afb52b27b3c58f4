"""FCM (v1 API) through firebase-admin: data-only wakes, visible notifications, iOS via FCM.

Never blocks the event loop: the service-account file is read and the first OAuth token
fetched in a thread at start, then the credential refreshes in google-auth's background
thread (`with_non_blocking_refresh`); a token that is missing or about to expire is
refreshed in a thread before a send (google-auth would otherwise refresh it on the loop),
and `delete_app` (which runs its own event loop) runs in a thread on close. Sends use
`send_each_async` under `asyncio.wait_for(deadline)`; errors map to a `PushOutcome`
(`outcome_for_error`).

Tests point the SDK at a local fake with `endpoint`: the messaging service's `_fcm_url`
(a private attribute of firebase-admin 7.x; pyproject bounds the version and the tests
notice a change); the OAuth token URI comes from the service-account JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import itertools
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import firebase_admin
import google.auth.exceptions
import google.auth.transport.requests
from firebase_admin import credentials, exceptions, messaging

from realtime.push.messages import (
    FCM,
    VISIBLE,
    PushOutcome,
    Wake,
    collapse_id_for,
)

if TYPE_CHECKING:
    from realtime.config import FcmConfig

FCM_URL_PATH = "/v1/projects/{}/messages:send"
# Refresh the OAuth token in a thread when it expires within deadline + this margin.
REFRESH_MARGIN = 60.0
_app_names = itertools.count(1)


def build_message(wake: Wake, now: float | None = None) -> messaging.Message:
    """The FCM message for `wake`: data-only (the hint) for a silent wake, with a
    notification for a visible one; APNs headers and payload when the device is an iPhone
    reached through FCM."""
    visible = wake.kind == VISIBLE
    collapse = collapse_id_for(wake.collapse_id) if wake.collapse_id else None
    android = messaging.AndroidConfig(
        priority="high" if visible else "normal",
        ttl=wake.ttl,
        collapse_key=collapse,
        notification=(
            messaging.AndroidNotification(tag=collapse) if visible and collapse else None
        ),
    )
    apns = None
    if wake.platform == "ios":
        expires = int(time.time() if now is None else now) + wake.ttl
        headers = {
            "apns-push-type": "alert" if visible else "background",
            "apns-priority": "10" if visible else "5",
            "apns-expiration": str(expires),
        }
        if collapse:
            headers["apns-collapse-id"] = collapse
        if visible:
            aps = messaging.Aps(
                alert=messaging.ApsAlert(title=wake.title or None, body=wake.body or None),
                thread_id=(wake.thread_id or wake.collapse_id) or None,
            )
        else:
            aps = messaging.Aps(content_available=True)
        apns = messaging.APNSConfig(headers=headers, payload=messaging.APNSPayload(aps=aps))
    with warnings.catch_warnings():
        # firebase-admin 7.7 marks `token` deprecated in favour of Firebase installation ids
        # (`fid`); apps still hand us FCM registration tokens, which FCM v1 takes as `token`.
        warnings.filterwarnings("ignore", "Message.token is deprecated", DeprecationWarning)
        return messaging.Message(
            token=wake.token,
            data=dict(wake.hint) or None,
            notification=(
                messaging.Notification(title=wake.title or None, body=wake.body or None)
                if visible
                else None
            ),
            android=android,
            apns=apns,
        )


def _error_body(exc: exceptions.FirebaseError) -> dict[str, Any]:
    response = exc.http_response
    if response is None:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _names_token(exc: exceptions.FirebaseError) -> bool:
    """Does this INVALID_ARGUMENT blame the registration token (and not, say, the ttl)?"""
    error = _error_body(exc)
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        for violation in detail.get("fieldViolations") or []:
            if isinstance(violation, dict) and violation.get("field") in ("message.token", "token"):
                return True
    message = str(error.get("message") or exc)
    return "registration token" in message.lower()


def _retry_after(exc: exceptions.FirebaseError) -> float | None:
    response = exc.http_response
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def outcome_for_error(exc: BaseException) -> PushOutcome:
    """Map an FCM failure to what to do (shared/notes/push.md, "Provider answers")."""
    if isinstance(exc, google.auth.exceptions.RefreshError):
        # the OAuth token endpoint refused our service account (or is down)
        if getattr(exc, "retryable", False):
            return PushOutcome.retry("oauth", str(exc))
        return PushOutcome.config_error("oauth", str(exc))
    if isinstance(exc, google.auth.exceptions.TransportError):
        return PushOutcome.retry("oauth", str(exc))
    if not isinstance(exc, exceptions.FirebaseError):
        return PushOutcome.retry("connection", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, exceptions.UnknownError) and exc.cause is not None:
        cause = exc.cause
        if isinstance(cause, google.auth.exceptions.GoogleAuthError):
            return outcome_for_error(cause)
    status = exc.http_response.status_code if exc.http_response is not None else 0
    detail = str(exc)
    if isinstance(exc, messaging.UnregisteredError):
        return PushOutcome.token_invalid("UNREGISTERED", detail, status)
    if isinstance(exc, messaging.SenderIdMismatchError):
        return PushOutcome.token_invalid("SENDER_ID_MISMATCH", detail, status)
    if isinstance(exc, messaging.QuotaExceededError):
        return PushOutcome.retry("QUOTA_EXCEEDED", detail, _retry_after(exc), status)
    if isinstance(exc, messaging.ThirdPartyAuthError):
        return PushOutcome.config_error("THIRD_PARTY_AUTH_ERROR", detail, status)
    if isinstance(exc, exceptions.InvalidArgumentError):
        if _names_token(exc):
            return PushOutcome.token_invalid("INVALID_ARGUMENT", detail, status)
        return PushOutcome.failed("INVALID_ARGUMENT", detail, status)
    if isinstance(
        exc,
        exceptions.UnauthenticatedError
        | exceptions.PermissionDeniedError
        | exceptions.NotFoundError,
    ):
        return PushOutcome.config_error(str(exc.code), detail, status)
    if isinstance(
        exc,
        exceptions.InternalError
        | exceptions.UnavailableError
        | exceptions.DeadlineExceededError
        | exceptions.ResourceExhaustedError
        | exceptions.UnknownError,
    ):
        return PushOutcome.retry(str(exc.code), detail, _retry_after(exc), status)
    return PushOutcome.failed(str(exc.code), detail, status)


class FcmProvider:
    """Sends `Wake`s through FCM with a service account."""

    name = FCM

    def __init__(
        self,
        *,
        service_account_file: str,
        project_id: str = "",
        deadline: float = 10.0,
        endpoint: str | None = None,
    ) -> None:
        if not service_account_file:
            raise ValueError("FcmProvider: service_account_file is required")
        self.service_account_file = service_account_file
        self.project_id = project_id
        self.deadline = deadline
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self._app: firebase_admin.App | None = None
        self._credential: Any = None  # google.oauth2.service_account.Credentials
        self._auth_request: google.auth.transport.requests.Request | None = None
        self._refresh_lock = asyncio.Lock()

    @classmethod
    def from_config(cls, config: FcmConfig, deadline: float) -> FcmProvider:
        """From `PushConfig.fcm`."""
        return cls(
            service_account_file=config.service_account_file,
            project_id=config.project_id,
            deadline=deadline,
            endpoint=config.endpoint or None,
        )

    async def start(self) -> None:
        """Load the service account and fetch the first OAuth token, in a thread. Raises
        ValueError for an unusable service-account file; a token endpoint that does not
        answer yet is tried again before the next send."""
        app = await asyncio.to_thread(self._make_app)
        self._app = app
        self._credential = app.credential.get_credential()
        self._auth_request = google.auth.transport.requests.Request()
        if self.endpoint is not None:
            service = messaging._get_messaging_service(app)
            if not hasattr(service, "_fcm_url"):
                raise RuntimeError(
                    "firebase-admin changed: its messaging service has no _fcm_url "
                    "(the FCM endpoint override is written for firebase-admin 7.x)"
                )
            service._fcm_url = self.endpoint + FCM_URL_PATH.format(app.project_id)
        # A refusal is reported by the first send (outcome "oauth"), which tries again.
        with contextlib.suppress(google.auth.exceptions.GoogleAuthError):
            await asyncio.to_thread(self._credential.refresh, self._auth_request)
        # From now on google-auth refreshes a token nearing expiry in its own thread.
        self._credential.with_non_blocking_refresh()

    def _make_app(self) -> firebase_admin.App:
        path = Path(self.service_account_file)
        try:
            cred = credentials.Certificate(str(path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a usable service-account JSON ({exc})") from None
        options: dict[str, Any] = {"httpTimeout": self.deadline}
        if self.project_id:
            options["projectId"] = self.project_id
        name = f"realtime-push-{next(_app_names)}"
        return firebase_admin.initialize_app(cred, options, name=name)

    async def _fresh_token(self) -> None:
        """Refresh a missing or soon-expiring OAuth token in a thread, once for all sends."""
        if not self._needs_refresh():
            return
        seen = self._credential.token
        async with self._refresh_lock:
            if self._credential.token == seen:  # nobody refreshed it while we waited
                await asyncio.to_thread(self._credential.refresh, self._auth_request)

    def _needs_refresh(self) -> bool:
        cred = self._credential
        if cred.token is None:
            return True
        if cred.expiry is None:
            return False
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # google-auth: naive UTC
        left: float = (cred.expiry - now).total_seconds()
        return left < self.deadline + REFRESH_MARGIN

    async def send(self, wake: Wake) -> PushOutcome:
        if self._app is None:
            raise RuntimeError("FcmProvider.start() was not awaited")
        try:
            message = build_message(wake)
        except (TypeError, ValueError) as exc:
            return PushOutcome.failed("message", str(exc))
        try:
            async with asyncio.timeout(self.deadline):
                await self._fresh_token()
                batch = await messaging.send_each_async([message], dry_run=False, app=self._app)
        except TimeoutError:
            return PushOutcome.retry("timeout", f"no answer within {self.deadline:g} s")
        except Exception as exc:  # an auth failure fails the whole batch
            return outcome_for_error(exc)
        response = batch.responses[0]
        if response.success:
            return PushOutcome.sent()
        assert response.exception is not None
        return outcome_for_error(response.exception)

    async def close(self) -> None:
        app, self._app = self._app, None
        if app is not None:
            # delete_app closes the SDK's async HTTP client with asyncio.run(): not on our loop.
            await asyncio.to_thread(firebase_admin.delete_app, app)

    def describe(self) -> dict[str, Any]:
        project = self._app.project_id if self._app is not None else self.project_id
        return {"project": project, "endpoint": self.endpoint or "google"}
