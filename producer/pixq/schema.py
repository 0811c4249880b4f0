"""The job request: what a caller may ask for, with the rules it must follow.

Field names and defaults follow diffusers' ``PixArtSigmaPipeline`` and DashAI's
``PixArtSigmaModel`` wrapper.
"""

from __future__ import annotations

import enum
import inspect
import secrets
import unicodedata
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from pixq.checkpoints import DEFAULT_MODEL, KNOWN_MODELS, model_name_problem, model_spec
from pixq.errors import InvalidRequest

MAX_PROMPT_CHARS = 4000
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
MAX_IMAGES_PER_PROMPT = 4
MAX_SEED = 2**32 - 1
MIN_SIDE = 64
RANDOM_SEED = -1
# A native render's latent (side / 8) must split into the transformer's 2×2 patches.
NATIVE_MULTIPLE = 16


class OutputFormat(str, enum.Enum):
    png = "png"
    webp = "webp"
    jpeg = "jpeg"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        return "jpg" if self is OutputFormat.jpeg else self.value


class RenderMode(str, enum.Enum):
    """``exact``: the plain pipeline's output. ``fast``: opt-in approximations that do less work
    per image; their measured difference from ``exact`` is stated in docs/performance.md."""

    exact = "exact"
    fast = "fast"


class Scheduler(str, enum.Enum):
    """The sampler: the diffusers scheduler that runs the denoising steps, built per job from the checkpoint's own
    scheduler config (``from_config``: its training betas, prediction type and timestep spacing carry over).
    ``dpm-solver++`` (DPMSolverMultistepScheduler, the checkpoint's default), ``sa-solver`` (SASolverScheduler:
    predictor and corrector order 2, tau 1 for 200 <= t <= 800 else 0, data prediction, as the PixArt-Σ repository's
    app runs it), ``unipc`` (UniPCMultistepScheduler), ``euler`` (EulerDiscreteScheduler), ``euler-ancestral``
    (EulerAncestralDiscreteScheduler) and ``ddim`` (DDIMScheduler with trailing timesteps, unclipped)."""

    dpm_solver = "dpm-solver++"
    sa_solver = "sa-solver"
    unipc = "unipc"
    euler = "euler"
    euler_ancestral = "euler-ancestral"
    ddim = "ddim"


# The fewest steps a sampler can run. With the checkpoint's "linspace" timestep spacing, Euler's one step is
# t = 0: it would never start from noise (the image comes out flat grey), so these need two.
MIN_STEPS: dict[Scheduler, int] = {Scheduler.euler: 2, Scheduler.euler_ancestral: 2}
# Fast mode's step plan (worker/pixq/worker/gpu/fastmode.py) is measured with DPM-Solver++ only
# (docs/performance.md); another sampler joins when its difference from exact is measured on a GPU
# (benchmarks/device/samplers.py) and recorded in fastmode.MEASURED_DIFFERENCES.
FAST_SCHEDULERS: tuple[Scheduler, ...] = (Scheduler.dpm_solver,)


Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
MAX_WEBHOOK_URL_CHARS = 2000


class WebhookEvent(str, enum.Enum):
    """The job events a webhook can ask for."""

    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


class Webhook(BaseModel):
    """Where to push the job's events (Standard Webhooks, signed with the API key's secret)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: Annotated[str, StringConstraints(min_length=1, max_length=MAX_WEBHOOK_URL_CHARS)] = Field(
        description="https:// URL (http:// only for destinations on the operator's PIXQ_WEBHOOK_ALLOW list)."
    )
    events: list[Annotated[WebhookEvent, Strict(False)]] = Field(
        default_factory=lambda: list(WebhookEvent), min_length=1, description="Events to deliver (default: all)."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an https:// URL with a host")
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise ValueError("has a malformed port") from None
        return url

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[WebhookEvent]) -> list[WebhookEvent]:
        if len(set(events)) != len(events):
            raise ValueError("must not repeat an event")
        return events


class JobRequest(BaseModel):
    """One text-to-image job. Unknown fields and wrong types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Prompt = Field(description="What to draw. Required, not blank.")
    negative_prompt: Prompt = Field("", description="What to steer away from.")
    num_inference_steps: int = Field(20, ge=1, le=MAX_STEPS, description="Denoising steps.")
    guidance_scale: float = Field(
        4.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="Classifier-free guidance scale, a finite number (1 or less: no guidance).",
    )
    seed: int = Field(
        RANDOM_SEED,
        ge=RANDOM_SEED,
        le=MAX_SEED,
        description="Seed of image 0 (image i uses seed + i, so seed + num_images_per_prompt - 1 is at most "
        f"{MAX_SEED}); -1 draws one at submit and records it.",
    )
    width: int = Field(1024, ge=MIN_SIDE, description="Width in pixels, a multiple of 8 (16 when rendered natively).")
    height: int = Field(1024, ge=MIN_SIDE, description="Height in pixels, a multiple of 8 (16 when rendered natively).")
    use_resolution_binning: bool = Field(
        True,
        description="True (diffusers' default): render at the checkpoint's trained size nearest in aspect ratio "
        "(e.g. 2048x2048 for a 4096x4096 request to the 2K model), then resize to width x height. False: render "
        "natively at width x height (multiples of 16; off the trained sizes, slower, no resize).",
    )
    num_images_per_prompt: int = Field(1, ge=1, le=MAX_IMAGES_PER_PROMPT, description="Images to render.")
    model_name: str = Field(
        DEFAULT_MODEL,
        description="A PixArt-Σ checkpoint (" + ", ".join(KNOWN_MODELS) + ") or an absolute path to a "
        "local directory holding a pipeline saved with save_pretrained.",
    )
    # Not strict: JSON callers can only send the format as a string.
    output_format: Annotated[OutputFormat, Strict(False)] = Field(OutputFormat.png, description="Image file format.")
    priority: int = Field(0, ge=0, le=9, description="0 (default) to 9 (most urgent); higher runs first.")
    mode: Annotated[RenderMode, Strict(False)] = Field(RenderMode.exact, description=RenderMode.__doc__)
    scheduler: Annotated[Scheduler, Strict(False)] = Field(
        Scheduler.dpm_solver, description=inspect.cleandoc(Scheduler.__doc__ or "")
    )
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        None, description="Two submits with the same key give one job."
    )
    webhook: Webhook | None = Field(None, description="Push the job's events to this URL.")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, side: int) -> int:
        if side % 8:
            raise ValueError(f"must be a multiple of 8 (got {side})")
        return side

    @model_validator(mode="after")
    def _check_rules(self) -> JobRequest:
        errors: list[tuple[str, str]] = []
        if not _visible(self.prompt):
            errors.append(("prompt", "must not be empty or blank (only spaces or control characters)"))
        last_seed = self.seed + self.num_images_per_prompt - 1
        if self.seed != RANDOM_SEED and last_seed > MAX_SEED:
            errors.append(("seed", f"must be at most {MAX_SEED - self.num_images_per_prompt + 1} with "
                                   f"num_images_per_prompt {self.num_images_per_prompt} (image i uses seed + i, "
                                   f"at most {MAX_SEED}; got {self.seed})"))
        spec = model_spec(self.model_name)
        if (problem := model_name_problem(self.model_name)) is not None:
            errors.append(("model_name", problem))
        elif spec is None:
            errors.append(
                (
                    "model_name",
                    f"unknown model {self.model_name!r}; use one of {', '.join(KNOWN_MODELS)} "
                    "or an absolute path to a local pipeline directory",
                )
            )
        for field in ("width", "height"):
            side = getattr(self, field)
            if spec is not None and side > spec.max_side:
                errors.append((field, f"must be at most {spec.max_side} for {spec.name} (got {side})"))
            if not self.use_resolution_binning and side % NATIVE_MULTIPLE:
                errors.append((field, f"must be a multiple of {NATIVE_MULTIPLE} when use_resolution_binning is "
                                      f"false (got {side})"))
        errors.extend(("scheduler", problem) for problem in _scheduler_problems(self))
        if errors:
            raise ValueError(_ErrorList(errors))
        return self

    def with_seed(self) -> JobRequest:
        """This request with ``seed`` -1 replaced by a freshly drawn seed."""
        if self.seed != RANDOM_SEED:
            return self
        return self.model_copy(update={"seed": draw_seed()})

    def image_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images_per_prompt)]

    def with_prompt(self, prompt: object) -> JobRequest | None:
        """This (validated) request with another prompt and a fresh seed if ``seed`` is -1, when
        validating it in full would accept it: no other rule reads the prompt, so only the prompt's own
        rules are checked here. ``None`` when the prompt breaks or may break them (the caller then
        validates in full, for the errors). ``Client.submit_many``'s path: one validation per shape."""
        if type(prompt) is not str or len(prompt) > MAX_PROMPT_CHARS or not _visible(prompt):
            return None
        if not prompt.isascii():
            try:
                prompt.encode()
            except UnicodeEncodeError:  # a lone surrogate: pydantic refuses it
                return None
        update: dict[str, Any] = {"prompt": prompt}
        if self.seed == RANDOM_SEED:
            update["seed"] = draw_seed()
        return self.model_copy(update=update)


def _scheduler_problems(request: JobRequest) -> list[str]:
    """Why ``request.scheduler`` cannot run this request's step count or mode, each naming the samplers that can."""
    scheduler, steps = Scheduler(request.scheduler), request.num_inference_steps
    problems: list[str] = []
    if steps < MIN_STEPS.get(scheduler, 1):
        able = [s.value for s in Scheduler if steps >= MIN_STEPS.get(s, 1)]
        problems.append(f"{scheduler.value} needs at least {MIN_STEPS[scheduler]} num_inference_steps (got {steps}); "
                        f"with {steps} use one of {', '.join(able)}")
    if RenderMode(request.mode) is RenderMode.fast and scheduler not in FAST_SCHEDULERS:
        problems.append(f"{scheduler.value} cannot run mode fast (fast mode is measured with "
                        f"{', '.join(s.value for s in FAST_SCHEDULERS)} only); with mode fast use one of "
                        f"{', '.join(s.value for s in FAST_SCHEDULERS)}, or mode exact")
    return problems


def draw_seed() -> int:
    """A random seed that leaves room for every image's ``seed + i``."""
    return secrets.randbelow(MAX_SEED + 1 - MAX_IMAGES_PER_PROMPT)


def _visible(text: str) -> bool:
    """Whether ``text`` holds a character that is neither white space nor a control or format
    character (NUL, escape codes, zero-width marks): what "not blank" means for a prompt."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf") for ch in text)


class _ErrorList(list):  # type: ignore[type-arg]
    """Several field errors raised from one model validator."""

    def __str__(self) -> str:
        return "; ".join(f"{f}: {m}" for f, m in self)


def parse_request(data: dict[str, Any]) -> JobRequest:
    """Validate a request, turning pydantic's errors into one ``InvalidRequest``."""
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(_field_errors(exc)) from None


def _field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for err in exc.errors():
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, ValueError) and isinstance(ctx_error.args[0], _ErrorList):
            errors.extend(ctx_error.args[0])
            continue
        field = ".".join(str(p) for p in err["loc"]) or '""'  # an empty field name, shown as such
        if err["type"] == "extra_forbidden":
            errors.append((field, "unknown field"))
        elif err["type"] == "missing":
            errors.append((field, "is required"))
        else:
            errors.append((field, err["msg"].removeprefix("Value error, ")))
    return errors


def request_schema() -> dict[str, Any]:
    """The request's JSON schema (what DashAI's ``get_schema`` gives for its wrapper)."""
    return JobRequest.model_json_schema()
