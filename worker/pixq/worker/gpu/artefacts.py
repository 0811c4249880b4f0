"""A worker's compiled artefact set: AOT graphs for every shape it serves, versioned by what they depend on.

``pixq compile`` builds one set per (model architecture, GPU kind, torch and diffusers versions,
dtype) under a root directory (a volume beside the weights), in a folder named by that key::

    ROOT/pixart-<gpu>-<dtype>-torch<version>-<hash>/manifest.json
    ROOT/pixart-<gpu>-<dtype>-torch<version>-<hash>/transformer-1024x1024.pt2, vae-1024x1024.pt2, ...

The graphs do not depend on the weights' values (the packages hold no weights; the loaded model's
tensors are bound at start), so the key hashes the transformer's and VAE's configs and every
weight's name, shape and dtype, not the 10 GB of values: a fine-tune of the same architecture
reuses the set. The manifest records the key, the sizes, the batch and text ranges, each package's
sha256 and the constants it binds; a worker loads a set only if all of that matches what it
loaded, else it logs why in one line and compiles as before (``load_artefacts`` returns ``None``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pixq.worker.gpu.aot import MAX_TEXT, Graph, GraphSpec, build_graph, decoder_call, example_inputs, transformer_call
from pixq.worker.gpu.loadcheck import check_compiler, check_loads

log = logging.getLogger(__name__)

# The layout of the set and the call signature the graphs were traced with (2: the CPU's ISA in the key; 3: each
# package was loaded in a fresh process before the set was put in place, ``loadcheck``).
FORMAT = 3
MANIFEST = "manifest.json"
# Where torch.export cannot keep the row count dynamic (CUDA), one graph per row count: exact mode's CFG pair
# and fast mode's conditional row, for one image per call, and the same two for the full batch of jobs the
# worker's batch policy gives that size (``batch_rows``); other counts (several images per prompt, partial
# batches) run eager.
STATIC_ROWS = {"transformer": (2, 1), "vae": (1,)}
# Transformer rows per call a set covers: CFG's 2 rows × 4 images per prompt (the schema's maximum).
DEFAULT_MAX_ROWS = 8


@dataclass(frozen=True)
class ArtefactKey:
    """What compiled graphs depend on; two keys equal means one set serves both."""

    model: str  # the name the worker serves (informational: architecture decides)
    architecture: str  # sha256 of the configs and weight shapes/dtypes of the transformer and the VAE
    device_kind: str  # "NVIDIA H200", "cpu"
    dtype: str
    torch: str
    diffusers: str
    cpu_isa: str = ""  # the host's vector extensions the packages' C++ wrapper may use ("avx2 avx512 ...")
    format: int = FORMAT

    def folder(self) -> str:
        kind = re.sub(r"[^A-Za-z0-9]+", "-", self.device_kind).strip("-").lower()
        version = self.torch.split("+")[0]
        return f"pixart-{kind}-{self.dtype}-torch{version}-{self.digest()[:16]}"

    def digest(self) -> str:
        """Of everything but the model's name: the architecture decides, not where the weights came from."""
        fields = {k: v for k, v in asdict(self).items() if k != "model"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def differences(self, other: dict[str, Any]) -> list[str]:
        """``field: theirs -> ours`` for each field that differs from a manifest's key."""
        ours = asdict(self)
        return [f"{k}: {other.get(k)!r} -> {v!r}" for k, v in ours.items() if k != "model" and other.get(k) != v]


def architecture_digest(pipe: Any) -> str:
    h = hashlib.sha256()
    for name in ("transformer", "vae"):
        module = getattr(pipe, name)
        # Not the config's private keys: _name_or_path is where it was loaded from, not what it is.
        config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
        h.update(json.dumps([type(module).__name__, config], sort_keys=True, default=str).encode())
        for key, tensor in module.state_dict().items():
            h.update(f"{key}:{list(tensor.shape)}:{tensor.dtype};".encode())
    return h.hexdigest()


def device_kind(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    return device.split(":")[0]


def cpu_isa() -> str:
    """The CPU's vector extensions as inductor sees them (read from the CPU, nothing compiled)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return platform.machine()
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    return " ".join(sorted(x86_isa_checker()))


def artefact_key(pipe: Any, model: str, device: str) -> ArtefactKey:
    import diffusers
    import torch

    dtype = str(pipe.transformer.dtype).removeprefix("torch.")
    return ArtefactKey(model=model, architecture=architecture_digest(pipe), device_kind=device_kind(device),
                       dtype=dtype, torch=torch.__version__, diffusers=diffusers.__version__, cpu_isa=cpu_isa())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rendered_sizes(pipe: Any, sizes: Sequence[tuple[int, int]], native: bool = False) -> list[tuple[int, int]]:
    """The (width, height) the pipeline renders these request sizes at: the trained bin nearest in aspect
    ratio (diffusers' resolution binning, the default for jobs), and with ``native`` each size as given."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    bins = {256: "ASPECT_RATIO_2048_BIN", 128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN",
            32: "ASPECT_RATIO_256_BIN"}
    table = getattr(sigma, bins.get(int(pipe.transformer.config.sample_size), ""), None)
    out: list[tuple[int, int]] = []
    for width, height in sizes:
        if table is not None:
            h, w = pipe.image_processor.classify_height_width_bin(height, width, ratios=table)
            out.append((int(w), int(h)))
        if native or table is None:
            out.append((width, height))
    return list(dict.fromkeys(out))


def batch_rows(images: int) -> tuple[int, ...]:
    """The transformer's static row counts for a size whose full batch is ``images`` images: one image
    (exact: 2 rows, fast: 1) and, when the policy batches that size, the full batch in each mode."""
    rows = list(STATIC_ROWS["transformer"])
    if images > 1:
        rows += [2 * images, images]
    return tuple(dict.fromkeys(rows))


def _specs(sizes: Sequence[tuple[int, int]], max_rows: int, images: Callable[[int, int], int] | None = None
           ) -> list[GraphSpec]:
    """One spec per (size, component); the transformer's covers the size's full batch (``images``) too."""
    out = []
    for w, h in dict.fromkeys(sizes):
        full = images(w, h) if images is not None else 1
        out.append(GraphSpec("transformer", w, h, max(max_rows, 2 * full), batch=full))
        out.append(GraphSpec("vae", w, h, max(max_rows, full)))
    return out


def _static_rows(spec: GraphSpec) -> tuple[int, ...]:
    """The row counts a spec needs one graph each for where the row count cannot be dynamic (CUDA)."""
    return batch_rows(spec.batch) if spec.component == "transformer" else STATIC_ROWS[spec.component]


def _module(pipe: Any, spec: GraphSpec) -> Any:
    return transformer_call(pipe.transformer) if spec.component == "transformer" else decoder_call(pipe.vae.decoder)


def covered(manifest: dict[str, Any], sizes: Sequence[tuple[int, int]], max_rows: int,
            images: Callable[[int, int], int] | None = None) -> bool:
    """Whether a set's manifest already has a graph of every component for these sizes, whose rows cover
    ``max_rows`` and each size's full batch (``images``: images per call for a rendered size)."""
    graphs = manifest.get("graphs", [])
    for spec in _specs(sizes, max_rows, images):
        mine = [g for g in graphs if (g["component"], g["width"], g["height"]) == (spec.component, spec.width,
                                                                                   spec.height)]
        dynamic = any(not g.get("rows") and int(g.get("max_rows", 0)) >= spec.max_rows for g in mine)
        static = {int(g["rows"]) for g in mine if g.get("rows")}
        if not dynamic and not (static and set(_static_rows(spec)) <= static):
            return False
    return True


def _compile_graphs(pipe: Any, work: Path, queue: list[GraphSpec], say: Callable[[str], None]
                    ) -> list[dict[str, Any]]:
    """Build each spec's package into ``work``; the manifest's entries for them. Where export fixes a spec's
    row count, that spec becomes one graph per row count it needs (``_static_rows``)."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    graphs: list[dict[str, Any]] = []
    while queue:
        spec = queue.pop(0)
        t0 = time.perf_counter()
        module = _module(pipe, spec)
        args, dynamic = example_inputs(spec, module, scale, int(pipe.transformer.config.in_channels),
                                       int(pipe.transformer.config.caption_channels or 4096))
        path = work / f"{spec.name}.pt2"
        try:
            info = build_graph(module, args, dynamic, path)
        except Exception as exc:  # torch.export: the code fixes the row count (seen on CUDA: SDPA's mask)
            if spec.rows or "specialized" not in str(exc):
                raise
            fixed = [r for r in _static_rows(spec) if r <= spec.max_rows]
            say(f"{spec.name}: the row count cannot be dynamic here ({str(exc).splitlines()[0][:80]}); "
                f"one graph per row count: {', '.join(map(str, fixed))}")
            queue[:0] = [replace(spec, rows=r) for r in fixed]
            continue
        info["max_text"] = min(int(info.get("max_text", spec.max_text)), spec.max_text)
        info["max_rows"] = min(int(info.get("max_rows", spec.max_rows)), spec.max_rows)
        graphs.append({**asdict(spec), "file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size,
                       **info})
        say(f"compiled {spec.name} (rows {info.get('min_rows')}..{info['max_rows']}"
            + (f", text {info.get('min_text')}..{info['max_text']}" if spec.component == "transformer" else "")
            + f") in {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 1e6:.1f} MB")
    return graphs


def build_artefacts(pipe: Any, model: str, device: str, root: Path, sizes: Sequence[tuple[int, int]],
                    max_rows: int = DEFAULT_MAX_ROWS, say: Callable[[str], None] = log.info,
                    images: Callable[[int, int], int] | None = None) -> Path:
    """Compile every (component, size) graph into a new set under ``root``; returns its folder.

    ``images(width, height)``: the images per call the workers' batch policy gives a rendered size (the
    transformer's graphs then cover that full batch in both modes); ``None``: one.

    Written to a temporary folder, its packages loaded in a fresh process (``loadcheck``: a package that
    crashes the loader raises), and renamed into place, so a reader never sees half a set; a failure removes
    the temporary folder.
    """
    check_compiler()  # a toolchain whose packages would crash the loader fails here, before minutes of compiling
    key = artefact_key(pipe, model, device)
    final = root / key.folder()
    work = root / f".building-{key.folder()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    try:  # a failed build or a package that crashes a fresh loader leaves nothing behind, least of all in place
        graphs = _compile_graphs(pipe, work, _specs(sizes, max_rows, images), say)
        check_s = check_loads([work / g["file"] for g in graphs], device)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"loaded the {len(graphs)} packages in a fresh process in {check_s:.1f} s")
    manifest = {"key": asdict(key), "created_at": time.time(), "build_s": round(time.perf_counter() - started, 2),
                "load_check_s": round(check_s, 2), "sizes": [list(s) for s in dict.fromkeys(sizes)],
                "max_rows": max_rows, "max_text": MAX_TEXT, "graphs": graphs}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    return final


@dataclass
class LoadedArtefacts:
    folder: Path
    transformer: dict[tuple[int, int], list[Graph]]  # (latent height, latent width) -> graphs (by row count)
    vae: dict[tuple[int, int], list[Graph]]
    sizes: list[tuple[int, int]]  # (width, height) in pixels
    load_s: float

    def graphs(self) -> list[Graph]:
        return [g for table in (self.transformer, self.vae) for graphs in table.values() for g in graphs]

    def batch_of(self, width: int, height: int) -> int:
        """Images of the full batch whose graphs the set holds for this size (1: one image per call)."""
        return max([g.spec.batch for graphs in self.transformer.values() for g in graphs
                    if (g.spec.width, g.spec.height) == (width, height)] or [1])


def find_artefacts(root: Path, key: ArtefactKey) -> tuple[dict[str, Any] | None, str]:
    """The manifest of the set for ``key`` under ``root``, or ``None`` and why not (one line)."""
    manifest_path = root / key.folder() / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            return None, f"{manifest_path} is unreadable ({exc})"
        differs = key.differences(manifest.get("key", {}))
        if differs:
            return None, f"{manifest_path} was built for another setup ({'; '.join(differs)})"
        return manifest, ""
    others = []
    for path in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
        try:
            other = json.loads(path.read_text()).get("key", {})
        except (OSError, ValueError):
            continue
        if other.get("architecture") == key.architecture or other.get("model") == key.model:
            others.append(f"{path.parent.name} ({'; '.join(key.differences(other))})")
    if others:
        return None, f"the sets under {root} are stale for this worker: {', '.join(others)}"
    return None, f"no compiled artefacts under {root} for {key.folder()}"


def load_artefacts(pipe: Any, model: str, device: str, root: Path) -> tuple[LoadedArtefacts | None, str]:
    """Load the set matching this pipeline, or ``(None, reason)``: never a set built for something else."""
    started = time.perf_counter()
    key = artefact_key(pipe, model, device)
    manifest, why = find_artefacts(root, key)
    if manifest is None:
        return None, why
    folder = root / key.folder()
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    transformer: dict[tuple[int, int], list[Graph]] = {}
    vae: dict[tuple[int, int], list[Graph]] = {}
    try:
        for entry in manifest["graphs"]:
            spec = GraphSpec(entry["component"], int(entry["width"]), int(entry["height"]), int(entry["max_rows"]),
                             int(entry.get("max_text", MAX_TEXT)), int(entry.get("rows", 0)),
                             int(entry.get("min_rows", 1)), int(entry.get("min_text", 1)), int(entry.get("batch", 1)))
            path = folder / entry["file"]
            t0 = time.perf_counter()
            if _sha256(path) != entry["sha256"]:
                return None, f"{path} does not match its manifest (sha256): rebuild the set with pixq compile"
            checked_s = time.perf_counter() - t0
            graph = Graph.load(spec, path, _module(pipe, spec), entry)
            log.info("graph %s: sha256 %.2f s, package load %.2f s, weights bound %.2f s", spec.name, checked_s,
                     graph.timings["package"], graph.timings["bind"])
            table = transformer if spec.component == "transformer" else vae
            table.setdefault((spec.height // scale, spec.width // scale), []).append(graph)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        return None, f"{folder}: {exc}"
    sizes = [(int(w), int(h)) for w, h in manifest["sizes"]]
    return LoadedArtefacts(folder, transformer, vae, sizes, time.perf_counter() - started), ""
