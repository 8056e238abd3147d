"""Real `epp-model-server` processes on loopback addresses, with dynamic ports.

Each server gets its own random 127.0.0.K address, HTTP port 0 and KV-event endpoints `tcp://*:*`
(ephemeral ports bound on that address), so test servers never collide with each other or with other
suites' servers; the server prints the bound addresses in its ready line.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

_READY = re.compile(r"epp-model-server ready: http://(?P<host>[^ ]+):(?P<port>\d+)(?P<rest>.*)")


@dataclass
class ModelServerProcess:
    proc: subprocess.Popen
    host: str
    port: int
    kv_endpoint: str | None = None
    replay_endpoint: str | None = None
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def random_loopback() -> str:
    return f"127.0.0.{random.randint(2, 254)}"


def start_model_server(*args: str, host: str | None = None, timeout: float = 60.0) -> ModelServerProcess:
    host = host or random_loopback()
    cmd = [sys.executable, "-m", "epp_model_server", "--host", host, "--port", "0", "--log-level", "warning",
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    output: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        m = _READY.search(line)
        if m:
            rest = m.group("rest")
            kv = re.search(r"kv-events=(\S+)", rest)
            replay = re.search(r"kv-replay=(\S+)", rest)
            return ModelServerProcess(proc, m.group("host"), int(m.group("port")),
                                      kv.group(1) if kv else None, replay.group(1) if replay else None, output)
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"model server did not become ready: {' '.join(cmd)}\n{''.join(output)}")


def kv_events_config(topic: str = "kv@test", replay: bool = True) -> str:
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:*", "topic": topic}
    if replay:
        cfg["replay_endpoint"] = "tcp://*:*"
    return json.dumps(cfg)


@pytest.fixture
def model_servers():
    """A factory starting model servers; all are stopped at the end of the test."""
    started: list[ModelServerProcess] = []

    def start(*args: str, **kwargs) -> ModelServerProcess:
        server = start_model_server(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
