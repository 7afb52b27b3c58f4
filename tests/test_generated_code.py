"""The committed protobuf code must be what proto/realtime.proto generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto" / "realtime.proto"),
        ],
        check=True,
    )
    for name in ("realtime_pb2.py", "realtime_pb2.pyi"):
        committed = (ROOT / "realtime" / "protocol" / name).read_text()
        assert (tmp_path / name).read_text() == committed, (
            f"realtime/protocol/{name} is stale: run scripts/gen-proto and commit the result"
        )
