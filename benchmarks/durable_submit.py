"""What durable acknowledgements cost (issue 15): submit latency and rate with WAIT and without.

    python -m benchmarks.durable_submit [--jobs 500]

Starts a primary and a replica on loopback (no worker: a submit writes the record, the message and
the index, then WAITs), submits ``--jobs`` jobs one after another with ``PIXQ_REDIS_MIN_REPLICAS``
0 and 1, and prints p50/p99 latency and jobs/s for each. Loopback: the replica's round trip is
tens of microseconds; across hosts add one network round trip per acknowledged write.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path


def measure(url: str, min_replicas: int, jobs: int) -> dict[str, float]:
    from pixq.client import Client
    from pixq.errors import NoWorkerWarning
    from pixq.settings import Settings

    client = Client(Settings.from_env({"PIXQ_REDIS_URL": url, "PIXQ_MODEL": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
                                       "PIXQ_REDIS_MIN_REPLICAS": str(min_replicas)}))
    latencies = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoWorkerWarning)
        client.submit("warm", width=128, height=128)
        started = time.perf_counter()
        for i in range(jobs):
            t0 = time.perf_counter()
            client.submit(f"bench {i}", width=128, height=128)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
    client.close()
    latencies.sort()
    return {"min_replicas": min_replicas, "jobs": jobs, "jobs_per_s": round(jobs / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    args = parser.parse_args()
    from tests.services import start_redis, start_replica

    with tempfile.TemporaryDirectory() as tmp:
        primary, url = start_redis(Path(tmp) / "primary", persist=True)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        replica, _ = start_replica(Path(tmp) / "replica", port, persist=True)
        try:
            rows = [measure(url, n, args.jobs) for n in (0, 1, 0, 1)]  # twice each, interleaved
        finally:
            replica.stop()
            primary.stop()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
