"""Drive amqtt's MQTTClient (MQTT 3.1.1) through one scenario; report JSON lines on stdout.

Run with the isolated amqtt virtualenv's python, never imported by the test suite
(amqtt 0.12.1 pins websockets==15.0.1, the gateway uses a newer one):

    .venv-amqtt/bin/python -I tests/amqtt_driver.py subscribe \
        --url mqtt://device:TOKEN@127.0.0.1:1883 --topic rooms/+ --qos 1 --count 2
    .venv-amqtt/bin/python -I tests/amqtt_driver.py publish \
        --url mqtt://device:TOKEN@127.0.0.1:1883 --topic rooms/1 --payload hi --qos 1 --retain

Each line is one JSON object with an "event":
  connected {code}            CONNACK accepted
  connect_failed {code, error} CONNACK refused (code) or no connection (code null); exit 2
  suback {codes}              SUBACK return codes as amqtt reports them (0x80 -> 128)
  message {topic, payload, qos, retain}   payload decoded as UTF-8 (with replacement)
  published {topic, qos, retain, acked}   amqtt's publish() returned (QoS 1/2: flow complete)
  timeout {received}          the deadline passed before --count messages arrived
  done {received}             the scenario completed (subscribe: --count messages, then
                              --linger seconds in which more are still reported); exit 0
  error {error}               anything else amqtt raised; exit 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from amqtt.client import MQTTClient
from amqtt.errors import ConnectError


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def make_client(args: argparse.Namespace) -> MQTTClient:
    config = {
        "auto_reconnect": False,  # a refused CONNECT must be reported, not retried
        "keep_alive": 30,
        "connection_timeout": max(1, int(args.timeout)),
        "plugins": {},  # no packet logger
    }
    return MQTTClient(client_id=args.client_id, config=config)


async def connect(client: MQTTClient, args: argparse.Namespace) -> bool:
    try:
        code = await client.connect(args.url, cleansession=True)
    except ConnectError as exc:
        emit("connect_failed", code=getattr(exc, "return_code", None), error=repr(exc))
        return False
    emit("connected", code=code)
    return True


async def subscribe(client: MQTTClient, args: argparse.Namespace, deadline: float) -> None:
    codes = await client.subscribe([(topic, args.qos) for topic in args.topic])
    emit("suback", codes=list(codes))
    received = 0
    linger_until: float | None = None
    while True:
        if linger_until is None and received >= args.count:
            # Count reached: keep listening --linger seconds for anything extra.
            linger_until = min(deadline, time.monotonic() + args.linger)
        until = deadline if linger_until is None else linger_until
        remaining = until - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            message = await client.deliver_message(timeout_duration=remaining)
        except TimeoutError:
            emit("done" if linger_until is not None else "timeout", received=received)
            return
        if message is None:
            continue
        received += 1
        emit(
            "message",
            topic=message.topic,
            payload=bytes(message.data).decode(errors="replace"),
            qos=message.qos,
            retain=bool(message.retain),
        )


async def publish(client: MQTTClient, args: argparse.Namespace, deadline: float) -> None:
    messages = list(args.message or [])
    if args.topic:
        if args.payload is None or args.qos is None:
            raise SystemExit("publish --topic needs --payload and --qos")
        messages.insert(0, [args.topic[0], args.payload, str(args.qos)])
    for topic, payload, qos in messages:
        remaining = max(0.1, deadline - time.monotonic())
        sent = await asyncio.wait_for(
            client.publish(topic, payload.encode(), qos=int(qos), retain=args.retain),
            remaining,
        )
        acked = {
            0: True,
            1: sent.puback_packet is not None,
            2: sent.pubcomp_packet is not None,
        }[int(qos)]
        emit("published", topic=topic, qos=int(qos), retain=args.retain, acked=acked)
    emit("done", received=0)


async def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    client = make_client(args)
    if not await asyncio.wait_for(connect(client, args), args.timeout):
        return 2
    try:
        if args.command == "subscribe":
            await subscribe(client, args, deadline)
        else:
            await publish(client, args, deadline)
    except Exception as exc:
        emit("error", error=repr(exc))
        return 1
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), 2.0)
        except Exception as exc:
            print(f"disconnect failed: {exc!r}", file=sys.stderr)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("subscribe", "publish"):
        cmd = commands.add_parser(name)
        cmd.add_argument("--url", required=True, help="mqtt://user:token@host:port")
        cmd.add_argument("--client-id", default=None)
        cmd.add_argument("--timeout", type=float, default=10.0, help="whole-run deadline (s)")
        cmd.add_argument("--qos", type=int, choices=(0, 1, 2), default=None)
        cmd.add_argument(
            "--topic",
            action="append",
            required=name == "subscribe",
            help="subscribe: a filter (repeatable); publish: the topic",
        )
    sub = commands.choices["subscribe"]
    sub.add_argument("--count", type=int, default=1, help="exit after this many messages")
    sub.add_argument(
        "--linger", type=float, default=0.0, help="after --count, report extras for this long (s)"
    )
    pub = commands.choices["publish"]
    pub.add_argument("--payload")
    pub.add_argument("--retain", action="store_true")
    pub.add_argument(
        "--message",
        action="append",
        nargs=3,
        metavar=("TOPIC", "PAYLOAD", "QOS"),
        help="another message to publish, in order (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.command == "subscribe" and args.qos is None:
        args.qos = 0
    return args


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse(sys.argv[1:])
    try:
        return asyncio.run(run(args))
    except TimeoutError as exc:
        emit("error", error=f"timeout: {exc!r}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
