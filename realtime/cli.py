"""`realtime serve | token | check-config`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from realtime import __version__
from realtime.config import (
    DEV_SECRETS_FILE,
    Config,
    ConfigError,
    apply_dev_secrets,
    load_config,
    require_secrets,
)
from realtime.gctune import tune_for_long_lived_connections


def _load(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("REALTIME_CONFIG") or None
    return load_config(path)


def _banner(config: Config, gateway: object, created_secrets: bool) -> str:
    from realtime.app import Gateway
    from realtime.transports.websocket import WEBSOCKET_PATH

    assert isinstance(gateway, Gateway)
    host = config.server.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    lines = [
        f"realtime gateway {__version__}  node {gateway.node.name}",
        f"  config     {config.source}",
        f"  broker     {gateway.node.broker.name}"
        + ("  (one node alone; no Redis needed)" if gateway.node.broker.name == "memory" else ""),
        f"  websocket  ws://{shown}:{gateway.websocket.port}{WEBSOCKET_PATH}"
        f"  (subprotocols realtime.v1.proto, realtime.v1.json; listening on {host})",
        _mqtt_line(gateway, shown),
        _push_line(gateway),
        f"  server API http://{config.api.host}:{gateway.http.port}/api/v1/"
        "  (header 'Authorization: apikey <key>'; /metrics /healthz /readyz)",
    ]
    if config.dev:
        state = "generated" if created_secrets else "reused"
        lines += [
            f"  DEV MODE   secrets {state} in {DEV_SECRETS_FILE} (never use them in production)",
            f"  API key    {config.api.key}",
            "  dev token  realtime token --user alice --subscribe 'news/#'",
        ]
    else:
        lines.append("  tokens     realtime token --config <this config> --user <id> ...")
    return "\n".join(lines)


def _push_line(gateway: object) -> str:
    from realtime.app import Gateway

    assert isinstance(gateway, Gateway)
    if gateway.push is None:
        return "  push       off  ([push.apns] or [push.fcm] to wake backgrounded apps)"
    described = []
    for name, provider in gateway.push.providers.items():
        details: dict[str, object] = getattr(provider, "describe", dict)()
        described.append(f"{name} ({', '.join(f'{k} {v}' for k, v in details.items())})")
    background = gateway.config.background
    return (
        f"  push       {'; '.join(described)}; wake after {background.wake_delay:g} s, "
        f"{background.wakes_per_hour}/h per device; apps poll GET /v1/poll"
    )


def _mqtt_line(gateway: object, shown: str) -> str:
    from realtime.app import Gateway

    assert isinstance(gateway, Gateway)
    if gateway.mqtt is None:
        return "  mqtt       off  ([mqtt] enabled = true to let devices in)"
    line = f"  mqtt       mqtt://{shown}:{gateway.mqtt.port}"
    if gateway.mqtt.tls_port:
        line += f", mqtts://{shown}:{gateway.mqtt.tls_port}"
    return line + ", and ws .../mqtt  (3.1.1 and 5.0; the token is the password)"


def cmd_serve(args: argparse.Namespace) -> int:
    from realtime.app import Gateway
    from realtime.log import setup_logging

    config = _load(args)
    created = False
    if args.dev:
        created = apply_dev_secrets(config)
    require_secrets(config)
    setup_logging(config.log.level, config.log.format)

    async def main() -> None:
        gateway = Gateway(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await gateway.start()
        tune_for_long_lived_connections()
        print(_banner(config, gateway, created), flush=True)
        await stop.wait()
        await gateway.stop()

    _run(main())
    return 0


def _run(coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]


def cmd_token(args: argparse.Namespace) -> int:
    from realtime.auth import mint_token

    config = _load(args)
    if not config.auth.hmac_secret and config.auth.algorithm.startswith("HS"):
        if DEV_SECRETS_FILE.exists():
            apply_dev_secrets(config)
            print(f"(using the dev secret in {DEV_SECRETS_FILE})", file=sys.stderr)
        else:
            raise ConfigError(
                "auth.hmac_secret is not set: pass --config, set REALTIME_AUTH__HMAC_SECRET, "
                "or start `realtime serve --dev` once in this directory"
            )
    private_key = Path(args.private_key).read_text() if args.private_key else ""
    for index in range(args.count):
        user = args.user if args.count == 1 else f"{args.user}{index}"
        print(
            mint_token(
                config.auth,
                user,
                ttl=args.ttl,
                subscribe=args.subscribe,
                publish=args.publish,
                device=args.device,
                private_key=private_key,
            )
        )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"ok: {config.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realtime", description="Realtime gateway")
    parser.add_argument("--version", action="version", version=f"realtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            "-c",
            help="TOML config file (default: $REALTIME_CONFIG or the built-in defaults)",
        )

    serve = sub.add_parser("serve", help="run the gateway")
    with_config(serve)
    serve.add_argument(
        "--dev",
        action="store_true",
        help=f"generate missing secrets into {DEV_SECRETS_FILE} (local development only)",
    )
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="mint a JWT with the configured key")
    with_config(token)
    token.add_argument("--user", "-u", required=True, help="user id (the sub claim)")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until expiry (0: none)")
    token.add_argument(
        "--subscribe",
        "-s",
        action="append",
        default=[],
        help="channel filter the user may subscribe to (repeatable; + and #)",
    )
    token.add_argument(
        "--publish",
        "-p",
        action="append",
        default=[],
        help="channel filter the user may publish to (repeatable)",
    )
    token.add_argument("--device", default="", help="device id claim")
    token.add_argument(
        "--count",
        type=int,
        default=1,
        help="mint N tokens for users <user>0..<user>N-1 (load tests)",
    )
    token.add_argument("--private-key", help="PEM private key file for RS*/ES* algorithms")
    token.set_defaults(func=cmd_token)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    with_config(check)
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"realtime: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"realtime: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
