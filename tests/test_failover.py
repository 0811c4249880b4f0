"""Redis is not a single point of failure (issue 15): a primary, a replica and three sentinels on
loopback, real workers, the primary killed or cut off mid-run.

Each scenario checks: every submit that returned an id ends ``succeeded``, exactly one object per
image with the sha256 its record names, and prints the failover's duration and the longest delay.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from pixq.client import Client
from pixq.errors import PixqError
from pixq.records import JobRecord, JobState
from pixq.settings import Settings

from tests.services import (
    S3Endpoint,
    Service,
    free_ports,
    redis_argv,
    start_redis,
    start_replica,
    start_sentinel,
    start_worker,
)
from tests.support import stack_env, wait_for

pytestmark = pytest.mark.slow

PASSWORD = "ha-pw-7f3a"
MASTER = "pixq"
QUICK = dict(width=128, height=128, num_inference_steps=2)


@dataclass
class HA:
    root: Path
    primary: Service
    primary_port: int
    replica: Service
    replica_port: int
    sentinels: list[tuple[Service, int]]
    env: dict[str, str]
    s3_client: object
    model: str
    workers: list[Service] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    def client(self, **env: str) -> Client:
        c = Client(Settings.from_env({**self.env, **env}))
        self.clients.append(c)
        return c

    def start_workers(self, n: int) -> None:
        for i in range(len(self.workers), len(self.workers) + n):
            self.workers.append(start_worker(self.env, self.model, self.root / f"w{i}.log", name=f"w{i}@ha"))

    def master_port(self) -> int | None:
        for _, port in self.sentinels:
            try:
                with redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1) as s:
                    addr = s.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
                    return int(addr[1])
            except (redis.RedisError, TypeError):
                continue
        return None

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD, socket_connect_timeout=1, socket_timeout=5)

    def check_delivered(self, record: JobRecord) -> None:
        """Succeeded, exactly its images stored, each object's bytes hashing to the record's sha256."""
        assert record.state is JobState.succeeded, record
        prefix = f"{self.env['PIXQ_S3_PREFIX']}/{record.id}/"
        listing = self.s3_client.list_objects_v2(Bucket=self.env["PIXQ_S3_BUCKET"], Prefix=prefix)  # type: ignore[attr-defined]
        keys = sorted(o["Key"] for o in listing.get("Contents", []))
        assert keys == sorted(i.key for i in record.images) and len(keys) == record.request.num_images_per_prompt
        for image in record.images:
            body = self.s3_client.get_object(Bucket=image.bucket, Key=image.key)["Body"].read()  # type: ignore[attr-defined]
            assert hashlib.sha256(body).hexdigest() == image.sha256, image.key


@pytest.fixture()
def ha(tmp_path: Path, s3: S3Endpoint, s3_client, tiny_model: str) -> Iterator[HA]:  # type: ignore[no-untyped-def]
    primary, url = start_redis(tmp_path / "primary", password=PASSWORD, persist=True)
    primary_port = int(url.rsplit(":", 1)[1].split("/")[0])
    replica, replica_port = start_replica(tmp_path / "replica", primary_port, password=PASSWORD, persist=True)
    sentinels = [start_sentinel(tmp_path / f"sentinel{i}", primary_port, password=PASSWORD, master_name=MASTER,
                                down_after_ms=1000, failover_timeout_ms=3000) for i in range(3)]
    hosts = ",".join(f"127.0.0.1:{port}" for _, port in sentinels)
    env = stack_env(f"redis+sentinel://:{PASSWORD}@{hosts}/{MASTER}/0", s3, tiny_model,
                    PIXQ_S3_PREFIX=f"ha-{uuid.uuid4().hex[:8]}", PIXQ_LEASE_TTL_S="3")
    h = HA(tmp_path, primary, primary_port, replica, replica_port, sentinels, env, s3_client, tiny_model)
    yield h
    for c in h.clients:
        c.close()
    for svc in h.workers:
        svc.signal(signal.SIGKILL)
        svc.stop()
    for svc, _ in sentinels:
        svc.stop()
    replica.stop()
    primary.signal(signal.SIGCONT)
    primary.stop()


def submit_many(client: Client, n: int, ids: list[str], refused: list[str], prefix: str) -> None:
    for i in range(n):
        try:
            ids.append(client.submit(f"{prefix} {i}", **QUICK).id)
        except PixqError as exc:  # refused to the caller: allowed; an id returned must never be lost
            refused.append(f"{type(exc).__name__}: {exc}")


def test_primary_killed_mid_run_then_back_as_a_replica(ha: HA) -> None:
    ha.start_workers(3)
    client = ha.client()
    ids: list[str] = []
    refused: list[str] = []
    submit_many(client, 150, ids, refused, "before")
    assert not refused, refused
    wait_for(lambda: sum(client.status(j).state is JobState.succeeded for j in ids[:60]) >= 30, 120,
             "the run to be under way")
    # kill -9 the primary while jobs run and more are submitted
    during = threading.Thread(target=submit_many, args=(ha.client(), 60, ids, refused, "during"))
    during.start()
    ha.primary.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: ha.master_port() == ha.replica_port, 60, "Sentinel to promote the replica", poll_s=0.1)
    promoted_s = time.monotonic() - killed
    during.join(120)
    assert len(ids) >= 200, (len(ids), refused)
    records = {j: client.wait(j, timeout_s=240) for j in ids}
    drained_s = time.monotonic() - killed
    for record in records.values():
        ha.check_delivered(record)
    assert len(set(ids)) == len(ids)
    delay = max((r.finished_at or 0) - r.created_at for r in records.values())
    print(f"\nfailover: replica promoted {promoted_s:.1f} s after kill -9; {len(ids)} jobs, all succeeded, "
          f"0 lost, 0 duplicate objects; {len(refused)} submits refused during the switch; longest job "
          f"(submit to end) {delay:.1f} s; drained {drained_s:.1f} s after the kill")

    # Workers keep consuming after the switch (the reconnect bug fixed for restarts, celery#8030's
    # family, must stay fixed for failovers): NEW jobs, submitted once everything before was drained,
    # are taken by every one of the three workers that were connected to the old primary.
    after_switch = time.monotonic()
    fresh = [client.submit(f"after the failover {i}", **QUICK).id for i in range(30)]
    fresh_records = [client.wait(j, timeout_s=90) for j in fresh]
    fresh_s = time.monotonic() - after_switch
    for record in fresh_records:
        ha.check_delivered(record)
    takers = {r.worker for r in fresh_records}
    assert takers == {f"w{i}@ha" for i in range(3)}, takers
    for i, svc in enumerate(ha.workers):
        text = (ha.root / f"w{i}.log").read_text(errors="replace")
        assert svc.alive() and "Unrecoverable error" not in text, text[-3000:]
    print(f"after the failover: 30 new jobs taken by all 3 workers ({sorted(str(t) for t in takers)}), "
          f"done in {fresh_s:.1f} s")

    new = ha.node(ha.replica_port)
    sample = ids[0]
    record_bytes = new.memory_usage(f"pixq:job:{sample}") or 0
    meta_bytes = sum(new.memory_usage(k) or 0 for k in new.scan_iter(f"celery-task-meta-{sample}*"))
    print(f"memory per finished job (1 image): record {record_bytes} B, Celery task meta {meta_bytes} B")

    # The old primary comes back: Sentinel makes it a replica; it serves the new primary's data, not its own.
    assert ha.primary.proc is not None
    ha.primary.proc.wait(10)
    ha.primary.proc = None
    ha.primary.argv += ["--masterauth", PASSWORD]  # as every node of a Sentinel set has: it may become a replica
    ha.primary.start()
    old = ha.node(ha.primary_port)
    wait_for(lambda: _role(old) == "slave" and old.info("replication").get("master_link_status") == "up", 60,
             "the old primary to rejoin as a replica", poll_s=0.2)
    late = client.wait(client.submit("after the rejoin", **QUICK).id, timeout_s=60)
    ha.check_delivered(late)
    wait_for(lambda: old.dbsize() == new.dbsize(), 30, "the rejoined replica to catch up")
    for job_id in [*ids[-5:], late.id]:
        assert old.hget(f"pixq:job:{job_id}", "state") == b"succeeded"
    print(f"old primary rejoined as a replica {time.monotonic() - killed:.1f} s after the kill; "
          f"{old.dbsize()} keys, as on the new primary")
    old.close()
    new.close()


def _role(conn: redis.Redis) -> str | None:
    try:
        return str(conn.info("replication").get("role"))
    except redis.RedisError:
        return None


def test_partitioned_primary_refuses_writes_it_cannot_replicate(ha: HA) -> None:
    """SIGSTOP the primary past down-after: Sentinel promotes the replica. After SIGCONT the old
    primary briefly still thinks it is primary; a write it takes then has no replica to reach, so
    WAIT returns 0 and the caller gets an error instead of an id that the demotion would erase."""
    from pixq.durable import Durability
    from pixq.errors import NotDurable

    ha.start_workers(1)
    strict = {"PIXQ_REDIS_MIN_REPLICAS": "1", "PIXQ_REDIS_WAIT_TIMEOUT_MS": "500"}
    client = ha.client(**strict)
    before = [client.submit(f"before {i}", **QUICK).id for i in range(5)]
    isolated = ha.node(ha.primary_port)
    isolated.ping()
    ha.primary.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    ids: list[str] = []
    refused: list[str] = []
    submitters = [threading.Thread(target=submit_many, args=(ha.client(**strict), 3, ids, refused, f"cut {n}"))
                  for n in range(3)]
    for t in submitters:
        t.start()
    try:
        wait_for(lambda: ha.master_port() == ha.replica_port, 60, "Sentinel to promote the replica", poll_s=0.1)
    finally:
        ha.primary.signal(signal.SIGCONT)
    promoted_s = time.monotonic() - stopped
    # What the isolated primary accepts now reaches no replica: refused, not "ok".
    with pytest.raises((NotDurable, redis.ReadOnlyError, redis.ConnectionError)):
        Durability(isolated, min_replicas=1, timeout_ms=500).run(
            "a write on the cut-off primary", lambda p: p.set("pixq:partition:probe", "1"))
    for t in submitters:
        t.join(120)
    wait_for(lambda: _role(ha.node(ha.primary_port)) == "slave", 60, "the old primary to be demoted", poll_s=0.2)
    for job_id in [*before, *ids]:
        ha.check_delivered(client.wait(job_id, timeout_s=120))
    assert ha.node(ha.replica_port).get("pixq:partition:probe") is None  # the refused write is gone, as told
    print(f"\npartition: promoted {promoted_s:.1f} s after SIGSTOP; {len(ids)} submits during it returned an id "
          f"(all succeeded), {len(refused)} refused: {sorted(set(r.split(':')[0] for r in refused))}")
    isolated.close()


def test_a_command_in_flight_when_the_primary_dies_is_retried_on_the_new_primary(ha: HA) -> None:
    """A command whose connection breaks under it is retried, and the retry must reconnect to the
    primary the sentinels name now, not to the dead one's address (redis/redis-py#3874,
    ``pixq/sentinelconn.py``). A ``BLPOP`` is in flight on each client (the workers' records
    client and the API's asyncio one) when the primary is killed; the value pushed on the new
    primary must reach both. Before the fix both retried the dead address until their retries ran
    out (a minute for workers: a worker stopped consuming after the failover) and raised."""
    import asyncio

    endpoint = Settings.from_env(ha.env).redis_endpoint()
    conn = endpoint.client()  # as workers build it: 25 backoff steps (~1 min)
    got: dict[str, object] = {}

    def sync_pop() -> None:
        try:
            got["sync"] = conn.blpop(["follow:sync"], timeout=40)
        except Exception as exc:  # reported by the assertion below
            got["sync"] = exc

    def async_pop() -> None:
        async def pop() -> object:
            aconn = endpoint.async_client()  # as the API builds it: 7 backoff steps (≈ 10 s)
            try:
                return await aconn.blpop(["follow:async"], timeout=40)
            finally:
                await aconn.aclose()
                # The sentinels' own connections too: left open, their streams are collected after this
                # loop is closed and warn ("loop is closed") inside whichever test runs then.
                for sentinel in aconn.connection_pool.sentinel_manager.sentinels:
                    await sentinel.aclose()

        try:
            got["async"] = asyncio.run(pop())
        except Exception as exc:
            got["async"] = exc

    threads = [threading.Thread(target=sync_pop), threading.Thread(target=async_pop)]
    for t in threads:
        t.start()
    primary = ha.node(ha.primary_port)
    wait_for(lambda: primary.info("clients")["blocked_clients"] >= 2, 30, "both BLPOPs to block on the primary")
    primary.close()
    ha.primary.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: ha.master_port() == ha.replica_port, 60, "Sentinel to promote the replica", poll_s=0.1)
    new = ha.node(ha.replica_port)
    new.rpush("follow:sync", "after the failover")
    new.rpush("follow:async", "after the failover")
    for t in threads:
        t.join(45)
    took = time.monotonic() - killed
    popped = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in got.items()}
    assert popped == {"sync": [b"follow:sync", b"after the failover"],
                      "async": [b"follow:async", b"after the failover"]}, got
    print(f"\nBLPOPs in flight at the kill returned from the new primary {took:.1f} s after it")
    conn.close()
    new.close()
    import gc

    gc.collect()  # anything of the asyncio client left unclosed warns here, in this test, not in a later one


# -- durable acknowledgements across replica syncs (issue 23, item 1) ------------------------------

SYNC_DELAY = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "4"]  # a 4 s window per full sync


def replica_state(conn: redis.Redis) -> str | None:
    """The first replica's ``state`` in the primary's ``INFO replication`` (None: none connected)."""
    try:
        replica = conn.info("replication").get("slave0")
    except redis.RedisError:
        return None
    return str(replica["state"]) if isinstance(replica, dict) else None


@dataclass
class Stream:
    """Submits one after another; what each met, with the replica's state seen just before it."""

    client: Client
    ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    states: list[str | None] = field(default_factory=list)

    def submit(self, watched: redis.Redis, label: str) -> None:
        import warnings

        from pixq.errors import NoWorkerWarning

        self.states.append(replica_state(watched))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoWorkerWarning)  # no worker here: the jobs only wait
                self.ids.append(self.client.submit(label, **QUICK).id)
        except PixqError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def until(self, watched: redis.Redis, done: Callable[[], bool], label: str, timeout_s: float = 60,
              then_s: float = 1.5) -> None:
        """Submit until ``done()``, then ``then_s`` more."""
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out: {label}"
            self.submit(watched, label)
        end = time.monotonic() + then_s
        while time.monotonic() < end:
            self.submit(watched, label)


def test_submits_go_on_across_a_replicas_first_sync_and_an_old_primarys_rejoin(tmp_path: Path) -> None:
    """The default rule (``PIXQ_REDIS_MIN_REPLICAS`` unset) counts only replicas that can confirm a write
    (``state=online``). Before, it counted ``connected_slaves``: a replica waiting for its first full
    sync made every submit wait for it and fail ``NotDurable``, on a fresh primary and again on the new
    primary of a failover while the old one rejoined and resynced. Writes still wait once it is online."""
    from pixq.errors import NotDurable

    primary_port, replica_port = free_ports(2)
    primary = Service("primary", redis_argv(primary_port, tmp_path / "p", persist=True) + SYNC_DELAY,
                      tmp_path / "p" / "redis.log")
    (tmp_path / "p").mkdir()
    primary.start()
    primary.wait_until(lambda: bool(redis.Redis(port=primary_port).ping()), 20)
    services = [primary]
    try:
        sentinel, sentinel_port = start_sentinel(tmp_path / "s", primary_port, quorum=1, master_name=MASTER,
                                                 down_after_ms=1000, failover_timeout_ms=3000)
        services.append(sentinel)
        old, new = redis.Redis(port=primary_port), redis.Redis(port=replica_port)

        # 1. A replica's first sync (a fresh HA stack): nothing to confirm with, so nothing waits for it.
        (tmp_path / "r").mkdir()
        replica = Service("replica", redis_argv(replica_port, tmp_path / "r", persist=True) + SYNC_DELAY
                          + ["--replicaof", "127.0.0.1", str(primary_port)], tmp_path / "r" / "redis.log").start()
        services.append(replica)
        wait_for(lambda: replica_state(old) == "wait_bgsave", 20, "the replica to ask for its first sync")
        client = Client(Settings.from_env({"PIXQ_REDIS_URL": f"redis+sentinel://127.0.0.1:{sentinel_port}/{MASTER}/0"}))
        first = Stream(client)
        first.until(old, lambda: replica_state(old) == "online", "first sync")
        syncing = sum(1 for s in first.states if s not in (None, "online"))
        assert not first.errors, first.errors[:3]
        assert syncing >= 10, first.states  # the stream did cross the sync

        # 2. Online: every write waits for it (WAIT on the primary), and one it cannot confirm is refused.
        waits = int(old.info("commandstats")["cmdstat_wait"]["calls"])
        for i in range(5):
            first.submit(old, f"online {i}")
        assert not first.errors and int(old.info("commandstats")["cmdstat_wait"]["calls"]) >= waits + 5
        replica.signal(signal.SIGSTOP)
        try:
            with pytest.raises(NotDurable, match="did not confirm the submit of job"):
                client.submit("the replica is stopped", **QUICK)
        finally:
            replica.signal(signal.SIGCONT)

        # 3. Failover: the new primary has no replica; the cached count (1) meets a WAIT of 0 and is re-read.
        def sentinel_knows_the_replica() -> bool:  # from the primary's INFO, every 10 s
            with redis.Redis(port=sentinel_port) as s:
                return any(int(r["port"]) == replica_port and not r["is_sdown"] for r in s.sentinel_slaves(MASTER))

        wait_for(sentinel_knows_the_replica, 30, "the sentinel to find the replica", poll_s=0.2)
        primary.signal(signal.SIGKILL)
        assert primary.proc is not None
        primary.proc.wait(10)
        primary.proc = None

        def promoted() -> bool:
            with redis.Redis(port=sentinel_port) as s:
                return int(s.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)[1]) == replica_port

        failover = Stream(client)
        failover.until(new, promoted, "failover")
        assert not [e for e in failover.errors if e.startswith("NotDurable")], failover.errors

        # 4. The old primary rejoins as a replica of the new one: a full resync, another window.
        primary.start()
        rejoin = Stream(client)
        rejoin.until(new, lambda: replica_state(new) is not None, "the old primary to rejoin", then_s=0)
        rejoin.until(new, lambda: replica_state(new) == "online", "the rejoined replica's sync")
        assert not rejoin.errors, rejoin.errors[:3]
        assert sum(1 for s in rejoin.states if s not in (None, "online")) >= 10, rejoin.states
        # Writes wait for it again once the client has re-read the count (every 2 s while steady).
        wait_for(client.durability.required, 10, "the client to count the rejoined replica", poll_s=0.1)
        waits = int(new.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
        rejoin.submit(new, "after the rejoin")
        assert not rejoin.errors and int(new.info("commandstats")["cmdstat_wait"]["calls"]) == waits + 1

        for job_id in [*first.ids, *failover.ids, *rejoin.ids]:
            assert new.hget(f"pixq:job:{job_id}", "state") == b"queued", job_id
        print(f"\n{len(first.ids)} submits across a first sync ({syncing} while it ran), {len(failover.ids)} "
              f"across the failover ({len(failover.errors)} refused), {len(rejoin.ids)} "
              "across the old primary's rejoin: none NotDurable")
        client.close()
        old.close()
        new.close()
    finally:
        for svc in reversed(services):
            svc.signal(signal.SIGCONT)
            svc.stop()
