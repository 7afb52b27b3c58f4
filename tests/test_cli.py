"""The command line as a new user meets it: `realtime serve --dev`, `realtime token`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from realtime.client import Client

REALTIME = [sys.executable, "-m", "realtime"]


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REALTIME, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    env.update(extra)
    return env


def test_serve_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    result = run("serve", cwd=tmp_path, env=clean_env())
    assert result.returncode == 2
    assert "auth.hmac_secret is empty" in result.stderr and "--dev" in result.stderr


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_subscriptons = 5\n")
    result = run("check-config", "--config", str(bad), cwd=tmp_path, env=clean_env())
    assert result.returncode == 2
    assert "limits.max_subscriptons: unknown key; did you mean 'max_subscriptions'" in result.stderr


def test_token_without_a_key_says_what_to_do(tmp_path: Path) -> None:
    result = run("token", "--user", "a", cwd=tmp_path, env=clean_env())
    assert result.returncode == 2 and "realtime serve --dev" in result.stderr


@pytest.fixture
async def dev_server(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    env = clean_env(
        REALTIME_SERVER__PORT="0",
        REALTIME_API__PORT="0",
        REALTIME_MQTT__PORT="0",
        REALTIME_LOG__LEVEL="warning",
    )
    process = await asyncio.create_subprocess_exec(
        *REALTIME, "serve", "--dev", cwd=tmp_path, env=env, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    banner = []
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        assert line, "serve exited before printing its banner"
        banner.append(line)
        if "dev token" in line:
            break
    text = "".join(banner)
    ws = re.search(r"websocket\s+(ws://\S+)", text)
    api = re.search(r"server API (http://\S+)/api/v1/", text)
    key = re.search(r"API key\s+(\S+)", text)
    assert ws and api and key, text
    yield {
        "ws": ws.group(1),
        "api": api.group(1),
        "key": key.group(1),
        "banner": text,
        "cwd": tmp_path,
        "env": env,
        "process": process,
    }
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)


async def http_post(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    def post() -> dict[str, Any]:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"X-API-Key": key}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    return await asyncio.to_thread(post)


async def test_quickstart_flow(dev_server: dict[str, Any]) -> None:
    """The README's quickstart, step by step, against a real `realtime serve --dev`."""
    banner = dev_server["banner"]
    assert "broker     memory" in banner and "DEV MODE" in banner
    assert "push       off  ([push.apns] or [push.fcm]" in banner
    minted = await asyncio.to_thread(
        run,
        "token",
        "--user",
        "alice",
        "--subscribe",
        "news/#",
        cwd=dev_server["cwd"],
        env=dev_server["env"],
    )
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()

    async with Client(dev_server["ws"], token=token) as client, connect(dev_server["ws"]) as plain:
        sub = await client.subscribe("news/1")
        await plain.send(json.dumps({"id": 1, "connect": {"token": token}}))
        assert "connect" in json.loads(await plain.recv())
        await plain.send(json.dumps({"id": 2, "subscribe": {"channel": "news/1"}}))
        assert json.loads(await plain.recv()) == {"id": 2, "subscribe": {}}

        result = await http_post(
            dev_server["api"] + "/api/v1/publish",
            dev_server["key"],
            {"channel": "news/1", "data": {"text": "hello"}},
        )
        assert result["duplicate"] is False
        pub = await sub.get(timeout=5)
        assert json.loads(pub.data) == {"text": "hello"}
        assert json.loads(await plain.recv()) == {
            "push": {"channel": "news/1", "pub": {"data": {"text": "hello"}}}
        }

    process = dev_server["process"]
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 15) == 0
