"""The local services a test (or a benchmark) starts, in one place.

The launchers ``pixq up`` ships (``pixq.worker.ops``: Redis, SeaweedFS, a worker, Flower, the API) are
re-exported here under the names the tests use, beside the harness that only tests and benchmarks need:
a Redis replica and a Sentinel (failover tests), and a SeaweedFS restarted in place (storage faults). The
worker package ships none of the latter.
"""

from __future__ import annotations

from pathlib import Path

import redis
from pixq.worker.ops.argv import pixq_argv, python_module_argv
from pixq.worker.ops.launchers import start_api, start_flower, start_worker
from pixq.worker.ops.redisserver import redis_argv, redis_binary, start_redis
from pixq.worker.ops.seaweedfs import S3Endpoint, s3_client_for, start_seaweedfs
from pixq.worker.ops.service import Service, StackError, free_port, free_ports, owner_only_dir, write_private
from pixq.worker.ops.stacklock import stack_dir_lock

__all__ = [
    "S3Endpoint", "Service", "StackError", "free_port", "free_ports", "pixq_argv", "python_module_argv",
    "redis_argv", "restart_seaweedfs", "s3_client_for", "stack_dir_lock", "start_api", "start_flower",
    "start_redis", "start_replica", "start_seaweedfs", "start_sentinel", "start_worker",
]


def start_replica(data_dir: Path, primary_port: int, password: str | None = None, persist: bool = False,
                  port: int | None = None) -> tuple[Service, int]:
    """A redis-server replicating from ``primary_port`` on loopback; returns once it is in sync."""
    port = port or free_port()
    owner_only_dir(data_dir)
    argv = redis_argv(port, data_dir, password, persist) + ["--replicaof", "127.0.0.1", str(primary_port)]
    if password:
        argv += ["--masterauth", password]
    svc = Service(f"redis replica {port}", argv, data_dir / "redis.log").start()

    def synced() -> bool:
        with redis.Redis(port=port, password=password, socket_connect_timeout=1) as conn:
            return conn.info("replication").get("master_link_status") == "up"

    svc.wait_until(synced, 30)
    return svc, port


def start_sentinel(data_dir: Path, master_port: int, password: str | None = None, quorum: int = 2,
                   down_after_ms: int = 1000, failover_timeout_ms: int = 3000, master_name: str = "pixq",
                   port: int | None = None, sentinel_password: str | None = None) -> tuple[Service, int]:
    """``redis-server --sentinel`` watching the primary on ``master_port`` as ``master_name``
    (``password``: the data servers'; ``sentinel_password``: the one this sentinel asks of clients)."""
    port = port or free_port()
    owner_only_dir(data_dir)
    conf = data_dir / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own
    lines = [f"port {port}", "bind 127.0.0.1", f"dir {data_dir}",
             f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}",
             f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
             f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
             f"sentinel parallel-syncs {master_name} 1"]
    if password:
        lines.append(f"sentinel auth-pass {master_name} {password}")
    if sentinel_password:
        lines.append(f"requirepass {sentinel_password}")
    write_private(conf, "\n".join(lines) + "\n")
    svc = Service(f"sentinel {port}", [redis_binary(), str(conf), "--sentinel"], data_dir / "sentinel.log").start()

    def watching() -> bool:
        with redis.Redis(port=port, password=sentinel_password, socket_connect_timeout=1) as conn:
            return conn.execute_command("SENTINEL", "get-master-addr-by-name", master_name) is not None

    svc.wait_until(watching, 20)
    return svc, port


def restart_seaweedfs(svc: Service) -> None:
    """Start the same server again (same ports, data and credentials) after a stop (a storage fault)."""
    svc.proc = None
    svc.start()
