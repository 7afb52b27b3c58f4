"""JWT verification and the principal a connection acts as.

The algorithm is pinned by configuration: a token signed with anything else (including
"none") is refused. Claims:

- ``sub``: the user id (required; "" is not a user);
- ``exp``: expiry (required unless ``auth.require_exp = false``);
- ``device``: optional device id;
- ``subscribe`` / ``publish``: lists of channel filters (``rooms/+``, ``users/alice/#``);
- ``info``: optional JSON object the app wants others to see (presence, later).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from realtime.config import AuthConfig
from realtime.core.topics import FilterSet, filter_error

NO_FILTERS = FilterSet(())
_NO_INFO: dict[str, Any] = {}  # shared by principals without an info claim; read-only


class AuthError(Exception):
    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    device: str = ""
    expires_at: float = 0.0  # unix time; 0 = never
    subscribe: FilterSet = field(default_factory=lambda: NO_FILTERS)
    publish: FilterSet = field(default_factory=lambda: NO_FILTERS)
    info: dict[str, Any] = field(default_factory=lambda: _NO_INFO)


# Filter sets by claim: thousands of devices carry the same claims, so they share one set
# (it is immutable), which matters for memory per idle connection.
_INTERNED: dict[tuple[str, ...], FilterSet] = {}


def _filters(claims: dict[str, Any], name: str) -> FilterSet:
    value = claims.get(name, [])
    if not value and isinstance(value, list):
        return NO_FILTERS
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        interned = _INTERNED.get(tuple(value))
        if interned is not None:
            return interned
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AuthError(f"claim {name!r} must be a list of channel filters")
    for item in value:
        problem = filter_error(item)
        if problem:
            raise AuthError(f"claim {name!r}: {item!r}: {problem}")
    filters = FilterSet(value)
    if len(_INTERNED) >= 4096:
        _INTERNED.clear()
    _INTERNED[tuple(value)] = filters
    return filters


VERIFIED_CACHE_SIZE = 10_000


class TokenVerifier:
    def __init__(self, config: AuthConfig) -> None:
        self.algorithm = config.algorithm
        if config.algorithm.startswith("HS"):
            self._key: Any = config.hmac_secret
        else:
            pem = config.public_key or Path(config.public_key_file).read_text()
            self._key = pem
        self._audience = config.audience or None
        self._issuer = config.issuer or None
        self._leeway = config.leeway
        required = ["sub"] + (["exp"] if config.require_exp else [])
        # Options bound once, so that PyJWT does not merge them into a new dict per token.
        # Nothing of a decoding outlives `verify` but the Principal and its strings (tested;
        # tracemalloc may still name PyJWT's lines: CPython reuses freed dict-key tables).
        self._jwt = jwt.PyJWT(options={"require": required})
        # Tokens verified lately (apps poll and reconnect with the same one): checking a
        # signature costs ~35 us, a lookup nothing. The string is the signed token itself,
        # so a hit is as valid as a check; only its expiry is checked again.
        self._verified: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        if not token:
            raise AuthError("no token: send it in connect.token, ?token= or Authorization")
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at and time.time() > known.expires_at + self._leeway:
                del self._verified[token]
                raise AuthError("token expired", expired=True)
            return known
        principal = self._decode(token)
        verified = self._verified
        if len(verified) >= VERIFIED_CACHE_SIZE:
            del verified[next(iter(verified))]  # the oldest
        verified[token] = principal
        return principal

    def _decode(self, token: str) -> Principal:
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", expired=True) from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"token algorithm is not {self.algorithm}") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        user = claims.get("sub")
        if not isinstance(user, str) or not user:
            raise AuthError("claim 'sub' must be a non-empty string")
        device = claims.get("device", "")
        if not isinstance(device, str):
            raise AuthError("claim 'device' must be a string")
        info = claims.get("info", _NO_INFO)
        if not isinstance(info, dict):
            raise AuthError("claim 'info' must be an object")
        exp = claims.get("exp", 0)
        return Principal(
            user=user,
            device=device,
            expires_at=float(exp or 0),
            subscribe=_filters(claims, "subscribe"),
            publish=_filters(claims, "publish"),
            info=info,
        )


def mint_token(
    config: AuthConfig,
    user: str,
    *,
    ttl: float,
    subscribe: list[str] | None = None,
    publish: list[str] | None = None,
    device: str = "",
    private_key: str = "",
    now: float | None = None,
) -> str:
    """Sign a token (HS* with the configured secret; RS*/ES* need `private_key`)."""
    import time

    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": user, "iat": int(issued)}
    if ttl > 0:
        claims["exp"] = int(issued + ttl)
    if subscribe:
        claims["subscribe"] = subscribe
    if publish:
        claims["publish"] = publish
    if device:
        claims["device"] = device
    if config.audience:
        claims["aud"] = config.audience
    if config.issuer:
        claims["iss"] = config.issuer
    key = config.hmac_secret if config.algorithm.startswith("HS") else private_key
    if not key:
        raise AuthError(f"{config.algorithm} needs a private key to sign (--private-key)")
    return jwt.encode(claims, key, algorithm=config.algorithm)
