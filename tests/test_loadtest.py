"""The locust swarm (loadtests/) against a real gateway process: the CI profile passes with
zero failures, and a threshold it cannot meet makes locust exit non-zero.

Locust (gevent, which monkey-patches the standard library) never enters this process:
the gateway and locust both run as subprocesses. Only loadtests/tokens.py (plain PyJWT)
is imported here.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import jwt
import pytest

from tests.conftest import API_KEY, SECRET

ROOT = Path(__file__).resolve().parent.parent
LOADTESTS = ROOT / "loadtests"


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    ws_url: str
    mqtt_url: str


def _start_gateway() -> Gateway:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REALTIME_", "LOCUST_"))}
    env.update(
        REALTIME_SERVER__HOST="127.0.0.1",
        REALTIME_SERVER__PORT="0",
        REALTIME_SERVER__DRAIN_TIMEOUT="1.0",
        REALTIME_API__HOST="127.0.0.1",
        REALTIME_API__PORT="0",
        REALTIME_API__KEY=API_KEY,
        REALTIME_AUTH__HMAC_SECRET=SECRET,
        REALTIME_MQTT__HOST="127.0.0.1",
        REALTIME_MQTT__PORT="0",
        REALTIME_LOG__LEVEL="warning",
    )
    config = str(LOADTESTS / "gateway.toml")
    process = subprocess.Popen(
        [sys.executable, "-m", "realtime", "serve", "--config", config],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    banner = ""
    deadline = time.monotonic() + 30
    try:
        while "server API" not in banner:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic())).decode()
            banner += line
        ws = re.search(r"websocket\s+(ws://[\d.]+:\d+/\S+)", banner)
        mqtt = re.search(r"mqtt\s+(mqtt://[\d.]+:\d+)", banner)
        assert ws and mqtt, banner
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Gateway(process, ws.group(1), mqtt.group(1))


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    gw = _start_gateway()
    yield gw
    gw.process.send_signal(signal.SIGTERM)
    try:
        gw.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        gw.process.kill()
        gw.process.wait()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loadtest") / "secret"
    path.write_text(SECRET + "\n")
    return path


def _locust(gateway: Gateway, secret_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REALTIME_", "LOCUST_"))}
    command = [
        sys.executable,
        "-m",
        "locust",
        "--config",
        str(LOADTESTS / "profiles" / "ci.conf"),
        "--locustfile",
        str(LOADTESTS / "locustfile.py"),
        "--ws-url",
        gateway.ws_url,
        "--mqtt-url",
        gateway.mqtt_url,
        "--secret-file",
        str(secret_file),
        *args,
    ]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _summary(output: str) -> dict[str, str]:
    match = re.search(r"^loadtest summary: (PASS|FAIL) (.*)$", output, re.MULTILINE)
    assert match, output[-3000:]
    fields = dict(re.findall(r"(\w+)=(\S+)", match.group(2).split(" thresholds:")[0]))
    fields["verdict"] = match.group(1)
    return fields


def test_ci_profile_passes_with_zero_failures(gateway: Gateway, secret_file: Path) -> None:
    result = _locust(gateway, secret_file)
    output = result.stdout + result.stderr
    summary = _summary(output)
    assert result.returncode == 0, output[-5000:]
    assert summary["verdict"] == "PASS", output[-5000:]
    assert summary["failures"] == "0", output[-5000:]
    assert summary["lost"] == "0"
    assert int(summary["e2e"]) >= 1000  # own messages, feed deliveries and device telemetry
    # Every user class took part: its rows are in locust's final table.
    for row in ("WS       e2e feed", "MQTT     e2e", "WS       recover", "MQTT     resume"):
        assert row in output, row
    assert gateway.process.poll() is None  # the gateway survived the swarm


def test_impossible_threshold_fails_the_run(gateway: Gateway, secret_file: Path) -> None:
    result = _locust(gateway, secret_file, "--users", "30", "--run-time", "4s", "--max-p95-ms", "0")
    output = result.stdout + result.stderr
    summary = _summary(output)
    assert summary["verdict"] == "FAIL", output[-5000:]
    assert re.search(r"\| .*p95 e2e [\d.]+ ms > 0 ms", output), output[-3000:]
    assert result.returncode == 3, output[-3000:]


def _tokens_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadtest_tokens", LOADTESTS / "tokens.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_minting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = _tokens_module()
    for name in tokens.SECRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(tokens.TokenError, match="no token source"):
        tokens.read_secret("")  # never a default secret
    # The secret from a gateway config, the dev secrets file, a bare file, the environment.
    (tmp_path / "gw.toml").write_text(f'[auth]\nhmac_secret = "{SECRET}"\n')
    (tmp_path / "dev.toml").write_text(f'hmac_secret = "{SECRET}"\napi_key = "x"\n')
    (tmp_path / "bare").write_text(f"{SECRET}\n")
    for name in ("gw.toml", "dev.toml", "bare"):
        assert tokens.read_secret(str(tmp_path / name)) == SECRET
    monkeypatch.setenv("LOADTEST_HMAC_SECRET", SECRET)
    assert tokens.read_secret("") == SECRET

    out = tmp_path / "tokens.txt"
    code = tokens.main(["--count", "3", "--prefix", "u-", "--kind", "device", "--out", str(out)])
    assert code == 0
    lines = out.read_text().split()
    assert len(lines) == 3
    claims = [jwt.decode(t, SECRET, algorithms=["HS256"]) for t in lines]
    assert [c["sub"] for c in claims] == ["u-0", "u-1", "u-2"]
    assert claims[0]["subscribe"] == ["iot/#"] and claims[0]["publish"] == ["iot/#"]
    assert claims[0]["exp"] > time.time()

    source = tokens.TokenSource(token_file=str(out))
    assert source.token("anyone", 4, "chat") == lines[1]  # line index % count
