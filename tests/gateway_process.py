"""`realtime serve` in a process of its own, for tests that kill a node (SIGKILL) or need
several nodes on one Redis. Configured entirely through the environment."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

from tests.conftest import API_KEY, SECRET


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    ws_port: int
    api_port: int
    mqtt_port: int = 0  # with REALTIME_MQTT__ENABLED="true"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/connection/websocket"

    async def kill(self) -> None:
        """SIGKILL: the node dies without a word, as when its machine goes away."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()


async def start_gateway_process(
    redis_url: str, prefix: str, name: str = "", **settings: str
) -> GatewayProcess:
    """A node on the Redis broker at `redis_url` (keys under `prefix`); `settings` are more
    REALTIME_* variables, e.g. ``REALTIME_PRESENCE__TTL="3"``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    env.update(
        REALTIME_SERVER__HOST="127.0.0.1",
        REALTIME_SERVER__PORT="0",
        REALTIME_SERVER__NODE_NAME=name,
        REALTIME_API__HOST="127.0.0.1",
        REALTIME_API__PORT="0",
        REALTIME_API__KEY=API_KEY,
        REALTIME_AUTH__HMAC_SECRET=SECRET,
        REALTIME_MQTT__ENABLED="false",
        REALTIME_MQTT__HOST="127.0.0.1",
        REALTIME_MQTT__PORT="0",
        REALTIME_LOG__LEVEL="warning",
        REALTIME_BROKER__TYPE="redis",
        REALTIME_BROKER__REDIS_URLS=f'["{redis_url}"]',
        REALTIME_BROKER__KEY_PREFIX=prefix,
    )
    env.update(settings)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "realtime", "serve", env=env, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        banner = ""
        while "server API" not in banner:
            line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
            assert line, f"serve exited before printing its banner: {banner}"
            banner += line
        ws = re.search(r"websocket\s+ws://[\d.]+:(\d+)/", banner)
        api = re.search(r"server API http://[\d.]+:(\d+)/", banner)
        mqtt = re.search(r"mqtt\s+mqtt://[\d.]+:(\d+)", banner)
        assert ws and api, banner
    except BaseException:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        raise
    mqtt_port = int(mqtt.group(1)) if mqtt else 0
    return GatewayProcess(process, int(ws.group(1)), int(api.group(1)), mqtt_port)
