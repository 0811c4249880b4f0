"""The printed table and the bar plot of a run's results."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str, str, str, str, str]
HEADER: Row = ("config", "img/s", "p50 s", "p95 s", "GPU busy", "peak GiB", "cold start s", "× card")


def fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


class _Ratio:
    """images/s as a multiple of the card's (``-`` without one)."""

    def __init__(self, results: dict[str, Any]):
        self.base = results.get("card", {}).get("images_per_s")

    def __call__(self, ips: float | None) -> str:
        return f"{ips / self.base:.2f}" if ips and self.base else "-"


def _steady(r: dict[str, Any]) -> Any:
    return r.get("steady_images_per_s") or r["images_per_s"]


def _card_rows(card: dict[str, Any]) -> list[Row]:
    if not card:
        return []
    return [("card fp16 eager (pipe call)", fmt(card["images_per_s"]), fmt(card["p50_s"]), fmt(card["p95_s"]), "-",
             fmt(card.get("peak_gib"), ".1f"), "-", "1.00")]


def _inprocess_rows(key: str, res: dict[str, Any], ratio: _Ratio) -> list[Row]:
    rows: list[Row] = []
    for mode in ("exact", "fast"):
        r = res.get(mode)
        if r:
            rows.append((f"render {mode} {key[9:]}", fmt(r["images_per_s"]), fmt(r["p50_s"]), fmt(r["p95_s"]),
                         fmt(r.get("gpu_busy"), ".2f"), fmt(r.get("peak_gib"), ".1f"),
                         fmt(res.get("load_s", 0) + res.get("warmup_s", 0), ".1f") + " (in-proc)",
                         ratio(r["images_per_s"])))
    for mode in ("exact", "fast"):
        r = res.get(f"job_path_{mode}")
        if r:
            rows.append((f"job path {mode} (2 thr, no queue)", fmt(_steady(r)), "-", "-",
                         fmt(r.get("gpu_busy"), ".2f"), "-", "-", ratio(_steady(r))))
    return rows


def _queue_rows(key: str, res: dict[str, Any], ratio: _Ratio) -> list[Row]:
    rows: list[Row] = []
    for mode in ("exact", "fast"):
        r = res.get(mode)
        if r:
            rows.append((f"queue {mode} {key[5:]}", fmt(_steady(r)), fmt(r.get("service_p50_s")),
                         fmt(r.get("service_p95_s")), fmt(r.get("gpu_busy"), ".2f"),
                         fmt(r.get("gpu_mem_used_max_gib"), ".1f"), fmt(res.get("cold_start_warm_cache_s"), ".1f"),
                         ratio(_steady(r))))
    idle = res.get("idle_single_job")
    if idle:
        rows.append(("queue idle single job", "-", fmt(sorted(x["latency_s"] for x in idle)[len(idle) // 2]),
                     fmt(max(x["latency_s"] for x in idle)), "-", "-", "-", "-"))
    return rows


def _coldstart_rows(key: str, res: dict[str, Any], ratio: _Ratio) -> list[Row]:
    return [(f"cold start, cold cache {key[9:]}", "-", "-", "-", "-", "-",
             fmt(res.get("cold_start_cold_cache_s"), ".1f"), "-")]


# Result keys with a bracketed compile mode ("queue[default]"): rows in the order the run stored them.
_PER_MODE = (("inprocess[", _inprocess_rows), ("queue[", _queue_rows), ("coldstart[", _coldstart_rows))


def _levers_rows(levers: dict[str, Any], ratio: _Ratio) -> list[Row]:
    return [(f"lever: {name} (worker dtype)", fmt(r.get("images_per_s")), fmt(r.get("p50_s")), fmt(r.get("p95_s")),
             "-", "-", "-", ratio(r.get("images_per_s"))) for name, r in levers.items()]


def _coldsplit_rows(split: dict[str, Any], ratio: _Ratio) -> list[Row]:
    return [(f"cold start: {name}", "-", "-", "-", "-", "-", fmt(r.get("cold_start_s"), ".1f"), "-")
            for name, r in split.items() if isinstance(r, dict)]


def _twok_rows(twok: dict[str, Any], ratio: _Ratio) -> list[Row]:
    rows: list[Row] = []
    for name, r in twok.items():
        if not isinstance(r, dict):
            continue
        if "p50_s" in r:
            rows.append((f"{name} ({twok.get('compile')})", fmt(r["images_per_s"]), fmt(r["p50_s"]),
                         fmt(r["p95_s"]), "-", fmt(r.get("peak_gib"), ".1f"), "-", "-"))
        elif "s" in r:
            rows.append((name, "-", fmt(r["s"]), "-", "-", fmt(r.get("peak_gib"), ".1f"), "-", "-"))
        elif "psnr_db_min" in r:
            rows.append((f"{name}: PSNR min {r['psnr_db_min']:.1f} dB, max |d| {r['max_abs']:.0f}/255",
                         "-", "-", "-", "-", "-", "-", "-"))
    return rows


def _twokqueue_rows(tq: dict[str, Any], ratio: _Ratio) -> list[Row]:
    rows: list[Row] = []
    for mode in ("fast", "exact"):
        r = tq.get(mode)
        if r:
            rows.append((f"queue 2K model {mode}", fmt(_steady(r)), fmt(r.get("service_p50_s")),
                         fmt(r.get("service_p95_s")), fmt(r.get("gpu_busy"), ".2f"),
                         fmt(r.get("gpu_mem_used_max_gib"), ".1f"), fmt(tq.get("cold_start_s"), ".1f"), "-"))
    for r in tq.get("idle_single_job") or []:
        rows.append((f"queue 2K model idle {r['mode']}", "-", fmt(r["latency_s"]), "-", "-", "-", "-", "-"))
    return rows


def _vae_rows(vae: dict[str, Any], ratio: _Ratio) -> list[Row]:
    rows: list[Row] = []
    for name, r in vae.items():
        if isinstance(r, dict):
            note = f" (max |d| {r['max_abs_8bit']:.0f}/255)" if "max_abs_8bit" in r else ""
            rows.append((f"VAE decode {name}{note}", "-", fmt(r.get("p50_s")), fmt(r.get("p95_s")), "-",
                         fmt(r.get("peak_gib"), ".1f"), fmt(r.get("compile_s"), ".1f"), "-"))
    return rows


def _scopes_rows(scopes: dict[str, Any], ratio: _Ratio) -> list[Row]:
    rows: list[Row] = []
    for scope in ("model", "blocks"):
        res = scopes.get(scope)
        if not isinstance(res, dict):
            continue
        for mode in ("exact", "fast"):
            r = res.get(mode) or {}
            rows.append((f"render {mode}, compile {scope}", fmt(r.get("images_per_s")), fmt(r.get("p50_s")),
                         fmt(r.get("p95_s")), fmt(r.get("gpu_busy"), ".2f"), fmt(r.get("peak_gib"), ".1f"),
                         fmt(res.get("cold_compile_and_warmup_s"), ".1f") + " (compile)",
                         ratio(r.get("images_per_s"))))
    for name, r in (scopes.get("batching_blocks") or {}).items():
        rows.append((f"exact {name}, per image", "-", fmt(r.get("p50_s")), fmt(r.get("p95_s")), "-", "-", "-",
                     fmt(r.get("per_image_vs_batch_1", 1.0), ".3f") + " of b1"))
    return rows


def _offload_rows(off: dict[str, Any], ratio: _Ratio) -> list[Row]:
    return [(f"offload {mode}", "-", fmt(off[mode]["second_s"]), "-", "-", fmt(off[mode].get("peak_gib"), ".1f"),
             "-", "-") for mode in ("exact", "fast") if off.get(mode)]


# Whole-run result keys, in the table's order after the per-mode rows.
_SECTIONS = (("levers", _levers_rows), ("coldsplit", _coldsplit_rows), ("twok", _twok_rows),
             ("twokqueue", _twokqueue_rows), ("vae", _vae_rows), ("scopes", _scopes_rows),
             ("offload", _offload_rows))
_JSON_LINES = ("attention", "encode")  # printed as JSON under the table


def rows(results: dict[str, Any]) -> list[Row]:
    """The table's rows (without the header), one or more per result key it knows."""
    ratio = _Ratio(results)
    out = _card_rows(results.get("card", {}))
    for key, res in results.items():
        for prefix, make in _PER_MODE:
            if key.startswith(prefix) and isinstance(res, dict):
                out += make(key, res, ratio)
    for key, make_section in _SECTIONS:
        section = results.get(key)
        if isinstance(section, dict):
            out += make_section(section, ratio)
    return out


def table(results: dict[str, Any]) -> str:
    """The run's results as a fixed-width text table, then the JSON-only sections."""
    all_rows = [HEADER, *rows(results)]
    widths = [max(len(str(row[i])) for row in all_rows) for i in range(len(HEADER))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in all_rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for name in _JSON_LINES:
        if isinstance(results.get(name), dict):
            lines.append(f"{name}: {json.dumps(results[name], default=str)}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    labels, values = [], []
    for line in table(results).splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 2:  # the JSON lines under the table
            continue
        with contextlib.suppress(ValueError):
            values.append(float(cells[1]))
            labels.append(cells[0])
    if not values:
        return
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(values) + 1))
    ax.barh(labels[::-1], values[::-1])
    ax.set_xlabel("images/s (1024², 20 steps, CFG 4.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
