"""MQTT 3.1.1 devices driven by amqtt's MQTTClient, against a real gateway.

amqtt 0.12.1 pins websockets==15.0.1 while the gateway uses a newer websockets, so amqtt
never enters the gateway's environment: a session fixture builds an isolated virtualenv at
`<repo>/.venv-amqtt` (once; reused while `import amqtt` works there) and each device is
`tests/amqtt_driver.py` running in its own process under that venv's python, reporting what
it saw as JSON lines. The gateway runs in the test's event loop, as in the other tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from realtime.app import Gateway
from realtime.protocol import realtime_pb2 as pb

from .conftest import GatewayFactory, RawClient, make_token, publish

REPO = Path(__file__).resolve().parent.parent
AMQTT_VENV = REPO / ".venv-amqtt"
AMQTT_REQUIREMENT = "amqtt==0.12.1"
DRIVER = Path(__file__).resolve().parent / "amqtt_driver.py"
INSTALL_LOG = AMQTT_VENV / "install.log"
INSTALL_TIMEOUT = 900.0  # pip on a slow, cold machine; normally ~25 s

MQTT_CONFIG = {"mqtt": {"enabled": True, "host": "127.0.0.1", "port": 0}}


# ----------------------------------------------------------------------------- the venv


def _venv_python() -> Path:
    return AMQTT_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _clean_env() -> dict[str, str]:
    """The environment for the venv's processes, without the gateway venv leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _amqtt_works() -> bool:
    python = _venv_python()
    if not python.exists():
        return False
    check = "import amqtt, amqtt.client; assert amqtt.__version__ == '0.12.1'"
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", check],
            env=_clean_env(),
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _build_venv() -> None:
    shutil.rmtree(AMQTT_VENV, ignore_errors=True)
    AMQTT_VENV.mkdir(parents=True)
    steps = [
        # The interpreter running the tests (its base, not its venv) makes the new venv.
        [sys.executable, "-m", "venv", str(AMQTT_VENV)],
        [
            str(_venv_python()),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            AMQTT_REQUIREMENT,
        ],
    ]
    deadline = time.monotonic() + INSTALL_TIMEOUT
    with INSTALL_LOG.open("w") as log:
        for command in steps:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            try:
                done = subprocess.run(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_clean_env(),
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.write(f"\n{exc!r}\n")
                log.flush()
                pytest.fail(f"building {AMQTT_VENV} failed: {exc!r}\n{_tail(INSTALL_LOG)}")
            if done.returncode != 0:
                log.flush()
                pytest.fail(
                    f"building {AMQTT_VENV} failed (exit {done.returncode}): "
                    f"{' '.join(command)}\n--- {INSTALL_LOG} (tail) ---\n{_tail(INSTALL_LOG)}"
                )


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """Serialise builders (parallel pytest runs on one checkout) with an flock."""
    key = hashlib.sha256(str(AMQTT_VENV).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"amqtt-venv-{key}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def amqtt_python() -> Path:
    """The isolated venv's python with amqtt 0.12.1; built on first use, never skipped."""
    with _build_lock():
        if not _amqtt_works():
            started = time.monotonic()
            _build_venv()
            if not _amqtt_works():
                pytest.fail(
                    f"{AMQTT_VENV} was built but `import amqtt` (0.12.1) fails there\n"
                    f"--- {INSTALL_LOG} (tail) ---\n{_tail(INSTALL_LOG)}"
                )
            elapsed = time.monotonic() - started
            with INSTALL_LOG.open("a") as log:
                log.write(f"\nbuilt in {elapsed:.1f} s\n")
    return _venv_python()


# ----------------------------------------------------------------------------- the driver


class Amqtt:
    """One amqtt_driver.py process: its JSON-line events, read with bounded waits."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path, argv: list[str]) -> None:
        self.proc = proc
        self.stderr = stderr
        self.argv = argv
        self.events: list[dict[str, Any]] = []

    def describe(self) -> str:
        return (
            f"amqtt_driver {' '.join(self.argv)}\nevents so far: {self.events}\n"
            f"--- stderr ---\n{_tail(self.stderr)}"
        )

    async def event(self, timeout: float = 5.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            pytest.fail(f"no event from amqtt within {timeout} s\n{self.describe()}")
        if not line:
            pytest.fail(f"amqtt exited ({await self.proc.wait()}) early\n{self.describe()}")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    async def expect(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        event = await self.event(timeout)
        assert event["event"] == kind, self.describe()
        return event

    async def finish(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every remaining event, until the process exits successfully."""
        deadline = asyncio.get_running_loop().time() + timeout
        rest: list[dict[str, Any]] = []
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            event = await self.event(max(0.1, remaining))
            rest.append(event)
            if event["event"] in ("done", "timeout", "error", "connect_failed"):
                break
        try:
            code = await asyncio.wait_for(self.proc.wait(), max(0.5, remaining))
        except TimeoutError:
            pytest.fail(f"amqtt did not exit\n{self.describe()}")
        assert code == 0, f"exit {code}\n{self.describe()}"
        return rest

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5.0)


class AmqttDevices:
    """Starts amqtt devices against one gateway; kills leftovers at teardown."""

    def __init__(self, python: Path, workdir: Path) -> None:
        self.python = python
        self.workdir = workdir
        self.started: list[Amqtt] = []

    @staticmethod
    def url(gateway: Gateway, token: str, user: str = "device") -> str:
        assert gateway.mqtt is not None
        credentials = f"{quote(user, safe='')}:{quote(token, safe='')}"
        return f"mqtt://{credentials}@127.0.0.1:{gateway.mqtt.port}"

    async def start(
        self, command: str, gateway: Gateway, *args: str, token: str | None = None, **options: Any
    ) -> Amqtt:
        argv = [command, "--url", self.url(gateway, token or make_token("device"))]
        for name, value in options.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif isinstance(value, list):
                for item in value:
                    argv += [flag, *(str(v) for v in (item if isinstance(item, tuple) else [item]))]
            elif value is not None and value is not False:
                argv += [flag, str(value)]
        argv += args
        stderr = self.workdir / f"amqtt-{len(self.started)}.stderr"
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                str(self.python),
                "-I",
                str(DRIVER),
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=_clean_env(),
            )
        device = Amqtt(proc, stderr, argv)
        self.started.append(device)
        return device

    async def subscriber(
        self, gateway: Gateway, topics: list[str], qos: int, **options: Any
    ) -> tuple[Amqtt, list[int]]:
        """A subscribing device, returned once its SUBACK arrived (with the codes)."""
        device = await self.start("subscribe", gateway, topic=topics, qos=qos, **options)
        await device.expect("connected", timeout=15.0)  # the first start imports amqtt
        suback = await device.expect("suback")
        return device, suback["codes"]

    async def close(self) -> None:
        for device in self.started:
            await device.kill()


@pytest.fixture
async def amqtt(amqtt_python: Path, tmp_path: Path) -> AsyncIterator[AmqttDevices]:
    devices = AmqttDevices(amqtt_python, tmp_path)
    yield devices
    await devices.close()


@pytest.fixture
async def mqtt_gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(**MQTT_CONFIG)


def messages(events: list[dict[str, Any]]) -> list[tuple[str, str, int, bool]]:
    return [
        (e["topic"], e["payload"], e["qos"], e["retain"]) for e in events if e["event"] == "message"
    ]


# ----------------------------------------------------------------------------- tests


async def test_amqtt_wildcard_subscriber_gets_api_and_websocket_publications(
    mqtt_gateway: Gateway, amqtt: AmqttDevices, clients: list[RawClient]
) -> None:
    device, codes = await amqtt.subscriber(
        mqtt_gateway, ["rooms/+"], qos=1, count=2, linger=0.3, timeout=10
    )
    assert codes == [1]
    app = await RawClient.open(mqtt_gateway)
    clients.append(app)

    await publish(mqtt_gateway, "rooms/7", {"from": "api"})
    reply = await app.request(publish=pb.PublishRequest(channel="rooms/42", data=b"from-app"))
    assert not reply.HasField("error"), reply.error

    events = await device.finish()
    # Non-MQTT publications count as QoS 1, so a QoS 1 subscription gets QoS 1.
    assert sorted(messages(events)) == [
        ("rooms/42", "from-app", 1, False),
        ("rooms/7", '{"from":"api"}', 1, False),
    ], device.describe()
    assert events[-1] == {"event": "done", "received": 2}  # nothing more in the linger


async def test_amqtt_publishes_each_qos_exactly_once(
    mqtt_gateway: Gateway, amqtt: AmqttDevices, clients: list[RawClient]
) -> None:
    app = await RawClient.open(mqtt_gateway)
    clients.append(app)
    for qos in (0, 1, 2):
        await app.subscribe(f"q/{qos}")
    # An amqtt subscriber at QoS 2 too: the QoS of each publication must come through.
    watcher, codes = await amqtt.subscriber(
        mqtt_gateway, ["q/#"], qos=2, count=3, linger=0.3, timeout=10
    )
    assert codes == [2]

    sender = await amqtt.start(
        "publish", mqtt_gateway, message=[(f"q/{qos}", f"m{qos}", qos) for qos in (0, 1, 2)]
    )
    await sender.expect("connected", timeout=15.0)
    events = await sender.finish()
    assert [(e["topic"], e["qos"], e["acked"]) for e in events if e["event"] == "published"] == [
        ("q/0", 0, True),
        ("q/1", 1, True),
        ("q/2", 2, True),
    ], sender.describe()

    pushes = [await app.publication() for _ in range(3)]
    assert [(p.channel, bytes(p.pub.data)) for p in pushes] == [
        ("q/0", b"m0"),
        ("q/1", b"m1"),
        ("q/2", b"m2"),
    ]
    assert all(p.pub.info.user == "device" for p in pushes)
    await asyncio.sleep(0.3)
    assert app.unexpected_pushes() == [], "a publication was delivered twice"

    seen = await watcher.finish()
    assert messages(seen) == [
        ("q/0", "m0", 0, False),
        ("q/1", "m1", 1, False),
        ("q/2", "m2", 2, False),
    ], watcher.describe()
    assert seen[-1] == {"event": "done", "received": 3}


async def test_amqtt_retained_message_reaches_a_later_subscriber(
    mqtt_gateway: Gateway, amqtt: AmqttDevices
) -> None:
    sender = await amqtt.start(
        "publish", mqtt_gateway, topic="status/door", payload="open", qos=1, retain=True
    )
    await sender.expect("connected", timeout=15.0)
    events = await sender.finish()
    assert events[0]["event"] == "published" and events[0]["retain"] is True, sender.describe()

    late, codes = await amqtt.subscriber(
        mqtt_gateway, ["status/#"], qos=1, count=1, linger=0.3, timeout=10
    )
    assert codes == [1]
    seen = await late.finish()
    assert messages(seen) == [("status/door", "open", 1, True)], late.describe()
    assert seen[-1] == {"event": "done", "received": 1}


async def test_amqtt_refused_subscription_and_forbidden_publish(
    mqtt_gateway: Gateway, amqtt: AmqttDevices, clients: list[RawClient]
) -> None:
    limited = make_token("limited", subscribe=["rooms/+"], publish=["rooms/1"])

    # A SUBSCRIBE with a forbidden and an allowed filter: amqtt returns the raw SUBACK
    # return codes, 0x80 (128) for the refused one, without raising.
    device, codes = await amqtt.subscriber(
        mqtt_gateway, ["secret/#", "rooms/+"], qos=1, token=limited, count=1, linger=0.3
    )
    assert codes == [0x80, 1], device.describe()
    # The refused filter is not active: only the rooms/ publication arrives.
    await publish(mqtt_gateway, "secret/plans", "hidden")
    await publish(mqtt_gateway, "rooms/1", "visible")
    seen = await device.finish()
    assert messages(seen) == [("rooms/1", '"visible"', 1, False)], device.describe()

    # Publishing where the token does not allow it: 3.1.1 has no negative PUBACK, so the
    # flows complete, but nothing reaches subscribers. rooms/1 (allowed) goes last as a
    # marker: once it arrived, the earlier forbidden ones would have too.
    app = await RawClient.open(mqtt_gateway)
    clients.append(app)
    await app.subscribe("rooms/1")
    await app.subscribe("rooms/2")
    watcher, codes = await amqtt.subscriber(
        mqtt_gateway, ["rooms/#", "secret/#"], qos=2, count=1, linger=0.3, timeout=10
    )
    assert codes == [2, 2]
    sender = await amqtt.start(
        "publish",
        mqtt_gateway,
        token=limited,
        message=[
            ("rooms/2", "no-0", 0),
            ("rooms/2", "no-1", 1),
            ("secret/x", "no-2", 2),
            ("rooms/1", "marker", 1),
        ],
    )
    await sender.expect("connected", timeout=15.0)
    events = await sender.finish()
    published = [(e["topic"], e["acked"]) for e in events if e["event"] == "published"]
    assert published == [
        ("rooms/2", True),
        ("rooms/2", True),
        ("secret/x", True),
        ("rooms/1", True),
    ], sender.describe()

    push = await app.publication()
    assert (push.channel, bytes(push.pub.data)) == ("rooms/1", b"marker")
    await asyncio.sleep(0.3)
    assert app.unexpected_pushes() == []
    seen = await watcher.finish()
    assert messages(seen) == [("rooms/1", "marker", 1, False)], watcher.describe()


async def test_amqtt_connect_with_a_bad_token_is_refused(
    mqtt_gateway: Gateway, amqtt: AmqttDevices
) -> None:
    device = await amqtt.start("subscribe", mqtt_gateway, token="not-a-token", topic=["#"])
    event = await device.event(timeout=15.0)
    assert event["event"] == "connect_failed", device.describe()
    assert event["code"] == 4  # 3.1.1 CONNACK: bad user name or password
    assert await asyncio.wait_for(device.proc.wait(), 5.0) == 2
