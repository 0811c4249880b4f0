"""How long the light CLI takes to answer (issue 11): start-up against a live Redis, and a closed port.

    python -m benchmarks.cli_startup [--runs 10] [--out FILE.json]

Starts its own redis-server on a free loopback port, then runs each command ``--runs`` times as a new
process (what a shell user or a script pays: interpreter, imports, settings, one round trip) and
prints the median, minimum and maximum. It then stops Redis and times the read commands against the
closed port: each must print its one line (exit 7) within about a second, not ride out the
write path's retries. The machine's load average is printed with the numbers: on a shared 2-core
host it moves them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = "0123456789abcdef0123456789abcdef"
COMMANDS = (("--help",), ("status", JOB), ("queue",), ("dead",))


def timed(argv: tuple[str, ...], env: dict[str, str], runs: int) -> dict[str, float | int]:
    seconds, codes = [], set()
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pixq", *argv], env=env, capture_output=True, timeout=60)
        seconds.append(time.perf_counter() - start)
        codes.add(done.returncode)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3), "exit": sorted(codes)[0] if len(codes) == 1 else -1}


def main() -> None:
    from tests.services import start_redis

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_svc, url = start_redis(Path(tmp) / "redis")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIXQ_")}
        env.update(PIXQ_REDIS_URL=url, PIXQ_S3_BUCKET="pixq-bench", PIXQ_MODEL="PixArt-alpha/PixArt-Sigma-XL-2-512-MS")
        load_before = os.getloadavg()[0]
        try:
            live = {" ".join(c): timed(c, env, args.runs) for c in COMMANDS}
        finally:
            redis_svc.stop()
        closed = {" ".join(c): timed(c, env, max(3, args.runs // 3)) for c in COMMANDS[1:]}
    result = {"date": time.strftime("%Y-%m-%d"), "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "live_redis": live, "closed_port": closed}
    print(f"load average (1 min) before/after: {result['load_1min']}")
    print(f"{'command':<12} {'live median':>12} {'min':>7} {'max':>7} {'closed median':>14} {'exit':>5}")
    for name, row in live.items():
        shut = closed.get(name)
        print(f"{name.split()[0]:<12} {row['median_s']:>11.3f}s {row['min_s']:>6.3f}s {row['max_s']:>6.3f}s "
              + (f"{shut['median_s']:>13.3f}s {shut['exit']:>5}" if shut else f"{'':>14} {'':>5}"))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
