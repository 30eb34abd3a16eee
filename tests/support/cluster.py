"""Real Redis Cluster (3 masters) and Redis Sentinel processes for the tests.

Each node is a ``redis-server --cluster-enabled yes`` on a free loopback port
(its cluster bus, port + 10000, free too) in its own temporary directory with
persistence off; ``redis-cli --cluster create`` joins them. The sentinel is
``redis-server --sentinel`` (the same binary in sentinel mode) watching a
plain master, so no extra package is needed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from lcic_guard.demo import EmbeddedRedis, find_redis_server, free_port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535 and port not in taken and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_cli() -> str:
    path = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if not Path(path).exists():
        raise RuntimeError("redis-cli is not installed (Debian: apt-get install redis-tools)")
    return path


def command(port: int, *args: str, timeout: float = 2.0) -> str:
    """Run one command on 127.0.0.1:port and return its raw reply text."""
    out = subprocess.run(
        [redis_cli(), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout


class RedisClusterProcs:
    """Three cluster-enabled redis-server processes joined as one cluster."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes: list[EmbeddedRedis] = []
        taken: set[int] = set()
        for _ in range(masters):
            port = cluster_port(taken)
            taken.add(port)
            node = EmbeddedRedis(port=port)
            node.extra_args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.dir / "nodes.conf"),
                "--cluster-node-timeout",
                "5000",
            ]
            self.nodes.append(node)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        """The lcic-guard URL of the cluster (any node seeds the client)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=true"

    def start(self, timeout: float = 20.0) -> RedisClusterProcs:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    redis_cli(),
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            )
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [command(p, "CLUSTER", "INFO") for p in self.ports]
            # Every node must see the cluster ok and all three masters.
            known = f"cluster_known_nodes:{len(self.nodes)}"
            if all("cluster_state:ok" in s and known in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout}s: {states}")
            time.sleep(0.05)

    def flushall(self) -> None:
        for port in self.ports:
            command(port, "FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelProcs:
    """A plain master (with a password) and one ``redis-server --sentinel``
    monitoring it."""

    def __init__(self, service: str = "lcicmaster", password: str = "") -> None:
        self.service = service
        self.password = password
        self.master = EmbeddedRedis()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="lcic-guard-sentinel-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dead_port(self) -> int:
        """A port nothing listens on (a sentinel that is down)."""
        return free_port()

    def url(
        self, db: int = 0, sentinels: list[str] | None = None, password: str | None = None
    ) -> str:
        pw = self.password if password is None else password
        auth = f":{quote(pw, safe='')}@" if pw else ""
        hosts = ",".join(sentinels or [f"127.0.0.1:{self.port}"])
        return f"redis+sentinel://{auth}{hosts}/{self.service}/{db}"

    def start(self, timeout: float = 15.0) -> SentinelProcs:
        try:
            self.master.start()
            lines = [
                f"port {self.port}",
                "bind 127.0.0.1",
                f'dir "{self.dir}"',
                f'logfile "{self.dir / "sentinel.log"}"',
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1",
                f"sentinel down-after-milliseconds {self.service} 5000",
            ]
            if self.password:
                command(self.master.port, "CONFIG", "SET", "requirepass", self.password)
                lines.append(f'sentinel auth-pass {self.service} "{self.password}"')
            conf = self.dir / "sentinel.conf"
            conf.write_text("\n".join([*lines, ""]))
            self.proc = subprocess.Popen(
                [find_redis_server(), str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(subprocess.SubprocessError):
                    reply = command(self.port, "SENTINEL", "get-master-addr-by-name", self.service)
                    if str(self.master.port) in reply:
                        return self
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server --sentinel exited at start")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sentinel not ready within {timeout}s")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.master.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
