"""Loading one PixArt-Σ pipeline onto one device, the model card's way."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixq.checkpoints import BASE_COMPONENTS, is_local
from pixq.worker.gpu.batch import BatchPolicy
from pixq.worker.gpu.compile import configure_compile_cache
from pixq.worker.gpu.speedups import RenderSpeedups, SpeedupOptions

if TYPE_CHECKING:
    from pixq.worker.gpu.artefacts import LoadedArtefacts

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class LoadedPipeline:
    """What a worker process keeps: the pipeline and its per-process speed-ups (``RenderSpeedups``).

    Pass this object (not ``.pipe``) to ``render``; a bare pipe also works, its speed-ups are
    attached to it.
    """

    pipe: Any  # diffusers.PixArtSigmaPipeline
    model_name: str
    device: str
    dtype: str
    load_s: float
    speedups: RenderSpeedups | None = None
    warmup_s: float = 0.0
    warmed: list[str] = field(default_factory=list)  # "1024x1024/exact", ...
    artefacts: LoadedArtefacts | None = None  # the AOT graphs it runs (pixq compile), when a set matched
    phases: dict[str, float] = field(default_factory=dict)  # start-up phase -> seconds (logged, published)
    batch: BatchPolicy | None = None  # the batch policy for this model (``BatchPolicy.for_model``), when given
    # The checkpoint's scheduler config, as loaded: every job's sampler is built from it (gpu/samplers.py), one
    # scheduler per pipeline call; ``pipe.scheduler`` itself is never stepped.
    scheduler_config: Any = None


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (width, height); ``"1024"`` -> square."""
    w, _, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h or w)
    except ValueError:
        raise ValueError(f"size must look like 1024x1024 (got {text!r})") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"size must be positive multiples of 8 (got {text!r})")
    return width, height


def resolve_dtype(device: str, dtype: str) -> Any:
    import torch

    if dtype == "auto":
        # bf16 on GPUs: T5 overflows in fp16 on real weights; fp32 on the CPU.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


@dataclass(frozen=True)
class PipelineOptions:
    """How ``load_pipeline`` loads, compiles and warms up a pipeline (the worker builds it from its options:
    ``pixq.worker.ops.options.WorkerOptions.pipeline_options``).

    ``dtype``: one of ``DTYPES``. ``offload`` keeps idle components in host memory (``enable_model_cpu_offload``)
    for cards of 24 GB or less. ``speedups`` sets the speed-ups (pixq.worker.gpu.speedups): ``compile`` (the
    transformer, with inductor's caches in ``compile_cache`` when given), prompt cache, text trimming, fast plan.
    ``warmup`` renders one short job per (width, height) and mode in ``warmup_modes`` so that compilation and
    kernel selection happen before the first real job. ``batch``: the worker's batch policy (sized for the model
    once loaded: ``LoadedPipeline.batch``).

    ``artefacts``: the root of compiled artefact sets (``pixq compile``). When one matches this
    pipeline its AOT graphs replace ``torch.compile`` (no dynamo, no inductor at start) and every
    size in it is warmed up in every mode (a short render each: nothing compiles); when none
    matches, one log line says why and ``speedups.compile`` is honoured as without artefacts.
    """

    dtype: str = "auto"
    offload: bool = False
    speedups: SpeedupOptions = field(default_factory=SpeedupOptions)
    compile_cache: str | None = None
    warmup: Sequence[tuple[int, int]] = ()
    warmup_modes: Sequence[str] = ("exact", "fast")
    batch: BatchPolicy | None = None
    artefacts: str | None = None


def load_pipeline(model_name: str, device: str = "cpu", options: PipelineOptions | None = None) -> LoadedPipeline:
    """Load ``model_name`` once onto ``device``, then compile and warm up as ``options`` ask.

    A hub checkpoint loads its ``transformer`` subfolder beside the shared T5, tokenizer,
    SDXL VAE and scheduler (``BASE_COMPONENTS``), as the model card does; a local directory
    is one whole pipeline saved with ``save_pretrained``.
    """
    options = options or PipelineOptions()
    offload = options.offload
    started = time.perf_counter()
    phases: dict[str, float] = {}
    import torch

    # CUDA's context and its libraries' first kernels come up on a thread while diffusers and transformers import.
    torch_dtype = resolve_dtype(device, options.dtype)
    cuda_init = start_cuda_init(device, torch_dtype) if device.startswith("cuda") else None
    from diffusers import PixArtSigmaPipeline

    phases["import_s"] = time.perf_counter() - started
    if cuda_init is not None:
        cuda_init.join()
        torch.cuda.set_device(torch.device(device))  # per thread: this one renders
    phases["cuda_init_wait_s"] = time.perf_counter() - started - phases["import_s"]
    t0 = time.perf_counter()
    pipe = _from_pretrained(PixArtSigmaPipeline, model_name, device, torch_dtype, direct=not offload)
    if offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    elif getattr(pipe, "hf_device_map", None) is None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    phases["weights_s"] = time.perf_counter() - t0
    speedups = options.speedups
    if speedups.compile and offload:
        log.warning("--compile is ignored with --offload (offload hooks move weights under the compiled graph)")
        speedups = replace(speedups, compile=False)
    loaded = LoadedPipeline(pipe, model_name, device, str(torch_dtype).removeprefix("torch."), 0.0, phases=phases,
                            scheduler_config=pipe.scheduler.config)
    if options.artefacts and not offload:
        t0 = time.perf_counter()
        from pixq.worker.gpu.artefacts import load_artefacts

        loaded.artefacts, why = load_artefacts(pipe, model_name, device, Path(options.artefacts))
        phases["graphs_s"] = time.perf_counter() - t0
        if loaded.artefacts is None:
            log.warning("compiled artefacts not used: %s; %s", why,
                        "compiling at start instead" if speedups.compile else "running eager (no --compile)")
        else:
            speedups = replace(speedups, compile=False)  # the AOT graphs replace torch.compile
            log.info("compiled artefacts: %d graphs from %s in %.1f s (sizes %s)", len(loaded.artefacts.graphs()),
                     loaded.artefacts.folder, phases["graphs_s"],
                     ", ".join(f"{w}x{h}" for w, h in loaded.artefacts.sizes))
    if speedups.compile and options.compile_cache:
        configure_compile_cache(options.compile_cache)
    loaded.speedups = RenderSpeedups(pipe, speedups)
    if loaded.artefacts is not None:
        loaded.speedups.use_graphs(loaded.artefacts.transformer, loaded.artefacts.vae)
    if options.batch is not None:
        loaded.batch = options.batch.for_model(pipe.transformer.config.sample_size)
        if loaded.speedups is not None and loaded.speedups.options.compile_batches:
            loaded.speedups.router.batch_images = loaded.batch.largest()
    loaded.load_s = time.perf_counter() - started
    log.info("loaded %s on %s as %s in %.1f s (imports %.1f s, CUDA wait %.1f s, weights %.1f s)", model_name,
             device, torch_dtype, loaded.load_s, phases["import_s"], phases["cuda_init_wait_s"], phases["weights_s"])
    if loaded.artefacts is not None:
        # Nothing compiles: touch every graph in every mode (and each size's full batch) so that the first
        # job finds its kernels loaded.
        for width, height in loaded.artefacts.sizes:
            full = loaded.artefacts.batch_of(width, height)
            warm_up(loaded, [(width, height)], ("exact", "fast"), BatchPolicy(max_batch=full) if full > 1 else None,
                    steps=2, native=True)
    warmup = options.warmup
    if warmup and loaded.artefacts is not None:  # sizes whose rendered size the set covers are warm already
        from pixq.worker.gpu.artefacts import rendered_sizes

        warmup = [s for s in warmup if not set(rendered_sizes(pipe, [s])) <= set(loaded.artefacts.sizes)]
    if warmup:
        warm_up(loaded, warmup, options.warmup_modes, loaded.batch)
    phases["warmup_s"] = loaded.warmup_s
    return loaded


def start_cuda_init(device: str, dtype: Any = None) -> threading.Thread:
    """Create ``device``'s CUDA context on a thread (it overlaps the imports that follow), then load what
    the first render would load in front of its job: cuBLAS(Lt), cuDNN and the attention kernels
    (``first_kernels``). Those calls leave the GIL while the libraries load, so the imports go on."""
    import torch

    def init() -> None:
        try:
            torch.cuda.set_device(torch.device(device))
            torch.empty(1, device=device)
            if dtype is not None:
                first_kernels(device, dtype)
        except Exception as exc:  # reported by the load that follows, which needs the device anyway
            log.warning("CUDA init on %s: %s", device, exc)

    thread = threading.Thread(target=init, name="pixq-cuda-init", daemon=True)
    thread.start()
    return thread


def first_kernels(device: str, dtype: Any) -> None:
    """One small call of each library a render uses, in the model's dtype: on an H200 the first bf16
    convolution took 0.45 s (cuDNN's libraries load), the first attention 0.59 s (its kernels' module),
    the first matrix product 0.08 s (cuBLAS's handle), each paid once per process
    (``benchmarks/startup_profile.py``). The attention's head size is PixArt's (72)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        a = torch.randn(64, 64, device=device, dtype=dtype)
        _ = a @ a
        x = torch.randn(1, 8, 16, 16, device=device, dtype=dtype)
        _ = F.conv2d(x, torch.randn(8, 8, 3, 3, device=device, dtype=dtype), padding=1)
        q = torch.randn(2, 16, 64, 72, device=device, dtype=dtype)
        _ = F.scaled_dot_product_attention(q, q, q)
        _ = F.layer_norm(a, (64,))
        torch.cuda.synchronize(device)


def _from_pretrained(cls: Any, model_name: str, device: str, torch_dtype: Any, direct: bool, **extra: Any) -> Any:
    """The pipeline, its safetensors read straight onto a CUDA device when ``direct`` (no host copy)."""
    from diffusers import PixArtTransformer2DModel

    if direct and device.startswith("cuda"):
        try:  # device_map: the current device (set by the caller)
            return _from_pretrained(cls, model_name, device, torch_dtype, direct=False, device_map="cuda")
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            log.warning("loading straight onto %s failed (%s); loading on the host, then moving", device, exc)
    if is_local(model_name):
        return cls.from_pretrained(model_name, torch_dtype=torch_dtype, **extra)
    transformer = PixArtTransformer2DModel.from_pretrained(model_name, subfolder="transformer",
                                                           torch_dtype=torch_dtype, **extra)
    return cls.from_pretrained(BASE_COMPONENTS, transformer=transformer, torch_dtype=torch_dtype, **extra)


def warm_up(loaded: LoadedPipeline, sizes: Sequence[tuple[int, int]], modes: Sequence[str],
            batch: BatchPolicy | None = None, steps: int = 20, native: bool = False) -> None:
    """Render one job per size and mode (compiles the graphs those shapes need, selects kernels);
    where ``batch`` (the model's policy: ``LoadedPipeline.batch``) gives more than one image per call, a
    batch of jobs too (eager: its first call's allocations and kernel choices; with ``compile_batches``,
    the full batch's static graphs).

    ``native``: render at exactly these sizes (the sizes AOT graphs were built for), not their bins."""
    from pixq.schema import JobRequest, RenderMode
    from pixq.worker.gpu.batch import render_batch
    from pixq.worker.gpu.render import render

    started = time.perf_counter()
    for width, height in sizes:
        for mode in modes:
            t0 = time.perf_counter()
            request = JobRequest.model_validate({
                "prompt": "warm-up: a red cube on a blue sphere", "width": width, "height": height, "seed": 0,
                "model_name": loaded.model_name, "mode": RenderMode(mode), "num_inference_steps": steps,
                "use_resolution_binning": not native,
            })
            render(loaded, request)
            images = batch.limit(width, height, not native) if batch is not None else 1
            graphs = loaded.artefacts is not None and loaded.artefacts.batch_of(width, height) == images
            if loaded.speedups is not None and images != loaded.speedups.router.batch_images and not graphs:
                images = min(images, 4)  # eager: a small batch brings up its kernels
            if images > 1 and loaded.speedups is not None:
                render_batch(loaded, [request.model_copy(update={"seed": i}) for i in range(images)])
            loaded.warmed.append(f"{width}x{height}/{mode}")
            log.info("warm-up %dx%d %s: %.1f s", width, height, mode, time.perf_counter() - t0)
    loaded.warmup_s += time.perf_counter() - started
