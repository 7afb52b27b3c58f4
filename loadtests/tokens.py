"""Tokens for thousands of virtual users, from the gateway's configured key.

Used by the locustfile (each virtual user mints its own token when it starts), and as a
command for pre-minted token files:

    .venv/bin/python loadtests/tokens.py --secret-file .realtime/dev-secrets.toml \\
        --count 5000 --prefix user- --out tokens.txt

Where the secret comes from, first match wins:
  --secret-file FILE   a gateway config ([auth] hmac_secret), the dev secrets file
                       (.realtime/dev-secrets.toml: hmac_secret = "..."), or a file holding
                       only the secret;
  $LOADTEST_HMAC_SECRET, then $REALTIME_AUTH__HMAC_SECRET (what the gateway reads).
There is no default secret. `realtime token --count N` mints from the gateway's own config
too (users <user>0..<user>N-1), with the claims given on its command line.

No locust or gevent import here: the test suite imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path

import jwt

SECRET_ENV_VARS = ("LOADTEST_HMAC_SECRET", "REALTIME_AUTH__HMAC_SECRET")

# Channel filters each kind of virtual user may use (namespaces of loadtests/gateway.toml).
CLAIMS: dict[str, tuple[list[str], list[str]]] = {
    # kind: (subscribe filters, publish filters)
    "chat": (["chat/#"], ["chat/#"]),
    "feed": (["feed/#"], []),
    "publisher": (["feed/#"], ["feed/#"]),
    "device": (["iot/#"], ["iot/#"]),
    "all": (["chat/#", "feed/#", "iot/#"], ["chat/#", "feed/#", "iot/#"]),
}


class TokenError(Exception):
    """No usable secret or token file: the message says what to pass."""


def read_secret(secret_file: str = "") -> str:
    """The HS* secret from `secret_file` or the environment; never a default."""
    if secret_file:
        path = Path(secret_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise TokenError(f"--secret-file {secret_file}: {exc.strerror}") from None
        secret = _secret_from_text(text)
        if not secret:
            raise TokenError(f"--secret-file {secret_file}: no hmac_secret in it")
        return secret
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if value:
            return value
    raise TokenError(
        "no token source: pass --token-file (one token per line), --secret-file (the "
        "gateway's config, .realtime/dev-secrets.toml, or a file with the secret), or set "
        "LOADTEST_HMAC_SECRET"
    )


def _secret_from_text(text: str) -> str:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return text.strip()  # a file holding only the secret
    auth = doc.get("auth")
    if isinstance(auth, dict) and isinstance(auth.get("hmac_secret"), str):
        return str(auth["hmac_secret"])
    value = doc.get("hmac_secret", "")
    return value if isinstance(value, str) else ""


def mint(
    secret: str,
    user: str,
    *,
    subscribe: list[str],
    publish: list[str],
    ttl: float = 6 * 3600,
    algorithm: str = "HS256",
    now: float | None = None,
) -> str:
    """A token with the claims the gateway reads (sub, exp, subscribe, publish)."""
    issued = time.time() if now is None else now
    claims: dict[str, object] = {"sub": user, "iat": int(issued)}
    if ttl > 0:
        claims["exp"] = int(issued + ttl)
    if subscribe:
        claims["subscribe"] = subscribe
    if publish:
        claims["publish"] = publish
    return jwt.encode(claims, secret, algorithm=algorithm)


class TokenSource:
    """Tokens for virtual users: line `index` (wrapping) of a token file, or minted."""

    def __init__(self, token_file: str = "", secret_file: str = "", ttl: float = 6 * 3600):
        self.ttl = ttl
        self._tokens: list[str] = []
        self._secret = ""
        if token_file:
            try:
                lines = Path(token_file).read_text().split()
            except OSError as exc:
                raise TokenError(f"--token-file {token_file}: {exc.strerror}") from None
            self._tokens = [line for line in lines if line]
            if not self._tokens:
                raise TokenError(f"--token-file {token_file}: no tokens in it")
        else:
            self._secret = read_secret(secret_file)

    def token(self, user: str, index: int, kind: str) -> str:
        if self._tokens:
            return self._tokens[index % len(self._tokens)]
        subscribe, publish = CLAIMS[kind]
        return mint(self._secret, user, subscribe=subscribe, publish=publish, ttl=self.ttl)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Mint tokens for load-test users <prefix>0..<prefix>N-1, one per line."
    )
    parser.add_argument("--secret-file", default="", help="see the module docstring")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--prefix", default="user-")
    parser.add_argument("--kind", choices=sorted(CLAIMS), default="all", help="claims to grant")
    parser.add_argument("--ttl", type=float, default=6 * 3600, help="seconds (0: no exp)")
    parser.add_argument("--out", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    try:
        secret = read_secret(args.secret_file)
    except TokenError as exc:
        print(f"tokens: {exc}", file=sys.stderr)
        return 2
    subscribe, publish = CLAIMS[args.kind]
    now = time.time()
    lines = [
        mint(
            secret, f"{args.prefix}{i}", subscribe=subscribe, publish=publish, ttl=args.ttl, now=now
        )
        for i in range(args.count)
    ]
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
