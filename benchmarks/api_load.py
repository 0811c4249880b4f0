"""Speed of the submit paths and the HTTP API on loopback (issue 12's speed section).

    python -m benchmarks.api_load --out benchmarks/results/api-2026-12-01-A.json

Starts its own redis-server and one `pixq api` process (no worker: jobs only queue), then measures
from this process: `Client.submit` and `Client.submit_many` jobs/s, `Client.status` latency; and,
from a second process (an asyncio + httpx load generator, `--load` below), `POST /v1/jobs` and
`GET /v1/jobs/{id}` requests/s with p50/p99; and how long after a job's record says it ended its
webhook reaches a receiver (the API's relay). Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load(base: str, key: str, path: str, body: dict[str, Any] | None, ids: list[str], concurrency: int,
                duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    deadline = time.perf_counter() + duration_s
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        async def one_worker(n: int) -> None:
            i = n
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                if body is None:
                    r = await client.get(path.format(id=ids[i % len(ids)]))
                else:
                    r = await client.post(path, json=body)
                latencies.append(time.perf_counter() - started)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(one_worker(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"path": path, "requests": len(latencies), "per_s": len(latencies) / elapsed, "codes": codes,
            "p50_ms": 1000 * pct(latencies, 0.5), "p99_ms": 1000 * pct(latencies, 0.99), "concurrency": concurrency}


def load_main(args: argparse.Namespace) -> None:
    """The second process: one load phase, its result as JSON on stdout."""
    ids = json.loads(args.ids) if args.ids else []
    body = json.loads(args.body) if args.body else None
    print(json.dumps(asyncio.run(_load(args.base, args.key, args.path, body, ids, args.concurrency, args.seconds))))


WRK_SCRIPT = """
local ids = {%(ids)s}
local n = 0
wrk.method = "%(method)s"
wrk.headers["Authorization"] = "Bearer %(key)s"
%(body)s
request = function()
  n = n + 1
  local path = "%(path)s"
  if #ids > 0 then path = string.gsub(path, "{id}", ids[(n %% #ids) + 1]) end
  return wrk.format(nil, path)
end
done = function(summary, latency, requests)
  io.write(string.format('WRK {"requests": %%d, "duration_us": %%d, "non_2xx": %%d, "errors": %%d, '
    .. '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d}\\n', summary.requests, summary.duration,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def run_wrk(wrk: str, base: str, key: str, path: str, body: dict[str, Any] | None, ids: list[str], seconds: float,
            concurrency: int, tmp: Path) -> dict[str, Any]:
    """One phase from wrk (its own process, one thread); the same fields as ``_load``'s."""
    script = tmp / f"wrk-{'post' if body is not None else 'get'}.lua"
    literal = json.dumps(json.dumps(body))  # a JSON string literal is a Lua string literal here
    post = f'wrk.body = {literal}\nwrk.headers["Content-Type"] = "application/json"' if body is not None else ""
    script.write_text(WRK_SCRIPT % {"ids": ", ".join(json.dumps(i) for i in ids), "key": key, "body": post,
                                    "method": "POST" if body is not None else "GET", "path": path})
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
            base]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("WRK "))
    summary = json.loads(line[4:])
    return {"path": path, "generator": "wrk", "requests": summary["requests"],
            "per_s": summary["requests"] / (summary["duration_us"] / 1e6), "non_2xx": summary["non_2xx"],
            "socket_errors": summary["errors"], "p50_ms": summary["p50_us"] / 1000,
            "p90_ms": summary["p90_us"] / 1000, "p99_ms": summary["p99_us"] / 1000,
            "max_ms": summary["max_us"] / 1000, "concurrency": concurrency}


def run_load(base: str, key: str, path: str, body: dict[str, Any] | None, ids: list[str], seconds: float,
             concurrency: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.api_load", "--load", "--base", base, "--key", key, "--path", path,
            "--seconds", str(seconds), "--concurrency", str(concurrency)]
    if body is not None:
        argv += ["--body", json.dumps(body)]
    if ids:
        argv += ["--ids", json.dumps(ids)]
    out = subprocess.run(argv, cwd=HERE.parent, capture_output=True, text=True, timeout=seconds + 120, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per client phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per HTTP phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--webhooks", type=int, default=50)
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                        help="HTTP load from wrk (auto: when on PATH) or the asyncio + httpx generator")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    for name in ("--base", "--key", "--path", "--body", "--ids"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        load_main(args)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pixq.client import Client
    from pixq.settings import Settings

    from tests.apitools import Receiver, api_env, make_key, start_api
    from tests.services import start_redis

    tmp = Path(tempfile.mkdtemp(prefix="pixq-api-bench-"))
    redis_svc, url = start_redis(tmp / "redis", password="bench-password-0123")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXQ_")}
    env.update({"PIXQ_REDIS_URL": url, "PIXQ_S3_BUCKET": "bench", "PIXQ_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    env = api_env(env)
    wrk = shutil.which("wrk") if args.generator != "python" else None
    if args.generator == "wrk" and wrk is None:
        sys.exit("api_load: --generator wrk: no wrk on PATH (apt-get install wrk)")
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, loopback, one API process (uvicorn, 1 worker)",
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "load_average_before": os.getloadavg(),
                               "http_load_generator": f"{wrk} ({wrk_version(wrk)})" if wrk else
                               "asyncio + httpx (benchmarks/api_load.py --load)"}
    api_svc = None
    try:
        settings = Settings.from_env(env)
        client = Client(settings)
        body = {"prompt": "a benchmark cactus", "width": 512, "height": 512}
        client.submit_request(client_request(body))  # warm: scripts loaded, Celery app built
        started = time.perf_counter()
        for _ in range(args.jobs):
            client.submit_request(client_request(body))
        results["client_submit_per_s"] = args.jobs / (time.perf_counter() - started)
        started = time.perf_counter()
        batch = 500
        for _ in range(args.jobs // batch):
            client.submit_many([body] * batch)
        results["client_submit_many_per_s"] = (args.jobs // batch * batch) / (time.perf_counter() - started)
        job_id = client.submit_request(client_request(body)).id
        lat = []
        for _ in range(args.jobs):
            t = time.perf_counter()
            client.status(job_id)
            lat.append(time.perf_counter() - t)
        results["client_status_ms"] = {"p50": 1000 * pct(lat, 0.5), "p99": 1000 * pct(lat, 0.99)}
        client.conn.delete(*[k for k in client.conn.scan_iter("pixq.*")])  # drop the queued messages

        key = make_key(env, "bench", "--scope", "submit,read")
        api_svc, base = start_api(env, tmp / "api.log")
        ids = [httpx.post(f"{base}/v1/jobs", json=body, headers={"Authorization": f"Bearer {key['key']}"}).json()["id"]
               for _ in range(50)]
        if wrk:
            results["api_post_jobs"] = run_wrk(wrk, base, key["key"], "/v1/jobs", body, [], args.seconds,
                                               args.concurrency, tmp)
            # Latency depends on how many requests wait at once (16 connections at ~2,500/s queue ~6 ms each):
            # POST again with half the connections, for p99 at a throughput still past the target.
            results["api_post_jobs_half_concurrency"] = run_wrk(wrk, base, key["key"], "/v1/jobs", body, [],
                                                                args.seconds, max(1, args.concurrency // 2), tmp)
            results["api_get_job"] = run_wrk(wrk, base, key["key"], "/v1/jobs/{id}", None, ids, args.seconds,
                                             args.concurrency, tmp)
        else:
            results["api_post_jobs"] = run_load(base, key["key"], "/v1/jobs", body, [], args.seconds,
                                                args.concurrency)
            results["api_get_job"] = run_load(base, key["key"], "/v1/jobs/{id}", None, ids, args.seconds,
                                              args.concurrency)
        results["webhook_after_end_ms"] = webhook_latency(base, key, body, args.webhooks, Receiver, client)
        results["load_average_after"] = os.getloadavg()
    finally:
        if api_svc is not None:
            api_svc.stop()
        redis_svc.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def client_request(body: dict[str, Any]) -> Any:
    from pixq.schema import parse_request

    return parse_request({"model_name": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", **body})


def webhook_latency(base: str, key: dict[str, str], body: dict[str, Any], n: int, receiver_cls: Any,
                    client: Any) -> dict[str, float]:
    """Cancel queued jobs one at a time; time from the record's finished_at to the webhook's arrival."""
    receiver = receiver_cls()
    headers = {"Authorization": f"Bearer {key['key']}"}
    delays = []
    try:
        for i in range(n):
            hooked = {**body, "webhook": {"url": receiver.url, "events": ["canceled"]}}
            job_id = httpx.post(f"{base}/v1/jobs", json=hooked, headers=headers).json()["id"]
            ended = httpx.post(f"{base}/v1/jobs/{job_id}/cancel", headers=headers).json()["finished_at"]
            hits = receiver.wait(lambda h, i=i: len(h) > i, 30, "the webhook")
            delays.append(hits[i].at - ended)
    finally:
        receiver.close()
    return {"n": n, "p50": 1000 * statistics.median(delays), "p99": 1000 * pct(delays, 0.99),
            "max": 1000 * max(delays)}


if __name__ == "__main__":
    main()
