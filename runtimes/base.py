"""One interface over every back-end that runs an ESC model, and the registry that picks one.

The design follows Polygraphy's runners: each back-end (PyTorch, ONNX Runtime, later
TensorRT engines, Core ML packages, OpenVINO) is one :class:`Runner` subclass that

* loads its artifact once, in ``__init__`` (all validation happens there, so a bad
  artifact fails before any image is touched);
* exposes the same attributes (``name``, ``artifact``, ``scale``, ``input_multiple``,
  ``fixed_shape``, ``precision``);
* implements exactly one method, :meth:`Runner._infer`: float32 ``(B, 3, h, w)`` in [0, 1]
  to float32 ``(B, 3, h * scale, w * scale)``, on the input's device.  Dtype conversion
  (fp16 weights or fp16 graph inputs) and static batch sizes are the runner's business,
  never the caller's.  The public :meth:`Runner.infer` (input checks, timing, output
  shape check) is written once in the base class, as Polygraphy's ``infer``/``infer_impl``;
* may override two hooks instead of the shared methods: :meth:`Runner.check_size` (which
  call sizes the artifact accepts: a TensorRT profile, Core ML enumerated shapes) and
  :meth:`Runner.default_tile` (tiles :meth:`Runner.upscale` uses when none is asked for);
* reports what actually ran through :meth:`Runner.describe` (runtime and version, the
  device / execution provider really used, precision, attention form, variant).

Everything else (tiling, alpha planes) is shared here, so the numbers a user gets do not
depend on which runner produced them.

Picking a runner: :func:`load` looks at the artifact (an ``nn.Module``, a ``torch:`` or
``official:`` prefix, or the file suffix) and builds the registered runner for it.  A new
back-end plugs in with one line, either in :data:`_BUILTIN_RUNNERS` below (imported lazily,
so ``import runtimes.base`` never imports onnxruntime or TensorRT) or by calling
:func:`register_runner` from its own module::

    register_runner((".engine", ".plan"), "runtimes.tensorrt_runner:TensorRTRunner")
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from models.errors import ESCError

from .memory import BudgetError, TilePlan, default_budget, plan_tiles
from .metadata import ArtifactMetadata, MetadataError, resolve_scale
from .tiling import TileOptions, tiled_upscale, upscale_alpha

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = [
    "InferTimings",
    "Runner",
    "RunnerError",
    "artifact_scale",
    "load",
    "metadata_errors",
    "register_runner",
    "registered_runners",
    "runner_class_for",
    "supported_suffixes",
]


class RunnerError(ESCError, ValueError):
    """A user-facing problem with an artifact or a runner option.

    The message names the problem and the fix; command-line tools print it as
    ``error: ...`` and exit with status 2 instead of showing a traceback.
    """


@contextlib.contextmanager
def metadata_errors() -> Iterator[None]:
    """Re-raise a :class:`runtimes.metadata.MetadataError` as a :class:`RunnerError`.

    Why: callers of :func:`load` catch one error type for "this artifact cannot run",
    whether the problem was found by the runner or by the metadata schema.
    """
    try:
        yield
    except MetadataError as exc:
        raise RunnerError(str(exc)) from None


def artifact_scale(meta: ArtifactMetadata, scale: int | None, source: str, static_scale: int | None = None) -> int:
    """:func:`runtimes.metadata.resolve_scale`, where a static graph's shapes may stand in for metadata.

    ``static_scale`` is what a fixed-shape graph's output/input sides imply; it is used
    only when the artifact has no ``esc.scale`` (files exported elsewhere).
    """
    if meta.scale is None and static_scale is not None:
        meta = dataclasses.replace(meta, scale=static_scale)
    with metadata_errors():
        return resolve_scale(meta, scale, source)


@dataclass
class InferTimings:
    """Wall-clock seconds of every :meth:`Runner.infer` call, recorded in one place.

    Why here: benchmarks and reports need the time of the back-end call itself, and
    timing it once in the template means every runner is measured the same way
    (CUDA outputs are synchronised before the clock stops).  ``recent`` keeps the
    last ``maxlen`` calls so a long-running server does not grow without bound;
    ``count`` and ``total_s`` cover every call since the last :meth:`reset`.
    """

    count: int = 0
    total_s: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=1024))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, seconds: float) -> None:
        """Add one call (thread-safe: a served runner is called from several threads)."""
        with self._lock:
            self.count += 1
            self.total_s += seconds
            self.recent.append(seconds)

    @property
    def last_s(self) -> float | None:
        """Seconds of the latest call, ``None`` before the first."""
        return self.recent[-1] if self.recent else None

    @property
    def mean_s(self) -> float | None:
        return self.total_s / self.count if self.count else None

    def reset(self) -> None:
        """Forget every call (e.g. after warm-up)."""
        with self._lock:
            self.count, self.total_s = 0, 0.0
            self.recent.clear()


#: Tile overlap for a model the runner knows nothing about (no descriptor, no
#: ``esc.variant``): the toolkit's earlier fixed default, enough for small conv stacks.
UNKNOWN_MODEL_CONTEXT = 16


class Runner(ABC):
    """A loaded model artifact that upscales images, whatever executes it.

    Template: the public :meth:`infer` is written once, here.  It checks the batch
    (:meth:`check_batch`), times the call (:attr:`timings`), runs the back-end's
    :meth:`_infer` and checks the output shape, so a back-end implements only
    ``_infer`` and every runner refuses bad input with the same message.

    Attributes:
        name: short runtime name (``"torch"``, ``"onnxruntime"``, ...), a class attribute.
        artifact: what was loaded (a path, ``official:NAME``, or ``"<nn.Module>"``).
        scale: integer upscaling factor.
        input_multiple: input sides that are multiples of this need no internal
            padding (ESC: the attention window).  Informational: the runners here
            accept any size because the graph pads itself.
        fixed_shape: ``(height, width)`` every call must have, for static-shape
            artifacts; ``None`` when any size runs.
        precision: ``"fp32"`` or ``"fp16"``: the arithmetic the model runs in.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        timings: :class:`InferTimings` of the :meth:`infer` calls (created on first use).
    """

    #: Short runtime name; subclasses set it.
    name: ClassVar[str] = "runner"
    #: Keyword options ``load()`` accepts for this runner (besides ``device``).
    options: ClassVar[tuple[str, ...]] = ()
    #: Sides every call is padded up to a multiple of by the *tiler*.  1 for runners
    #: whose graph pads internally (padding outside would change edge pixels); a
    #: runtime that needs window-multiple inputs sets it to ``input_multiple``.
    pad_multiple: ClassVar[int] = 1

    artifact: str
    scale: int
    input_multiple: int
    fixed_shape: tuple[int, int] | None
    precision: str
    device: str

    # -- the one method a back-end implements ---------------------------------------
    @abstractmethod
    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Back-end inference on a batch :meth:`check_batch` accepted.

        ``batch`` is a floating ``(B, 3, h, w)`` tensor in [0, 1] on the CPU or a CUDA
        device; return ``(B, 3, h*scale, w*scale)`` float32 on ``batch``'s device.  Dtype
        conversion and static batch sizes are the back-end's business.
        """

    def runtime_details(self) -> dict[str, Any]:
        """Back-end specific entries for :meth:`describe` (version, providers, ...)."""
        return {}

    def default_tile(self, size: tuple[int, int]) -> int | None:
        """Tile side :meth:`upscale` uses for an image of ``size`` (H, W) when none is asked for.

        ``None`` (the default) runs the image in one call.  A runtime with a size
        limit (a TensorRT profile's max sides) returns a tile instead of overriding
        :meth:`upscale`.
        """
        return None

    def check_size(self, height: int, width: int) -> None:
        """Refuse a call of ``height`` x ``width`` this artifact cannot run in one go.

        Default: a fixed-shape artifact takes exactly :attr:`fixed_shape`.  Runtimes
        that accept a range (TensorRT profiles, Core ML enumerated shapes) override it.
        """
        if self.fixed_shape is not None and (height, width) != tuple(self.fixed_shape):
            raise RunnerError(
                f"{self.artifact} takes {self.fixed_shape[0]}x{self.fixed_shape[1]} inputs, got {height}x{width} "
                f"(use upscale(), which tiles at the fixed shape)")

    def check_batch(self, batch: Any) -> None:
        """Refuse what no back-end can run, naming the problem and the fix.

        Why once here: five runners used to carry their own copy of this check,
        with different messages and different gaps (dtype, device).
        """
        if not isinstance(batch, torch.Tensor):
            raise RunnerError(f"infer() takes a torch.Tensor (B, 3, H, W), got {type(batch).__name__}; "
                              f"convert with torch.from_numpy(array).permute(0, 3, 1, 2) for NHWC arrays")
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise RunnerError(f"expected a (B, 3, H, W) batch, got shape {tuple(batch.shape)}; add a batch "
                              f"dimension with x[None] and pass RGB (3 channels, no alpha: see upscale_alpha)")
        if 0 in batch.shape:
            raise RunnerError(f"the batch is empty (shape {tuple(batch.shape)}); pass at least one pixel")
        if not batch.is_floating_point():
            raise RunnerError(f"expected floating-point pixels in [0, 1], got {batch.dtype}; "
                              f"convert with x.float() / 255 for 8-bit images")
        if batch.device.type not in ("cpu", "cuda"):
            raise RunnerError(f"the {self.name} runner takes CPU or CUDA tensors, got one on {batch.device}; "
                              f"move it with x.cpu()")
        self.check_size(int(batch.shape[2]), int(batch.shape[3]))

    # -- shared behaviour ------------------------------------------------------------
    @property
    def timings(self) -> InferTimings:
        """Timing of every :meth:`infer` call (see :class:`InferTimings`)."""
        timings = self.__dict__.get("_timings")
        # dict.setdefault is atomic, so two threads' first calls share one object
        return timings if timings is not None else self.__dict__.setdefault("_timings", InferTimings())

    @torch.no_grad()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 ``(B, 3, h, w)`` in [0, 1] -> float32 ``(B, 3, h*scale, w*scale)``.

        The output is on the input's device and is *not* clamped (models overshoot
        [0, 1] near edges; writers and metrics clamp).

        Raises:
            RunnerError: a batch the runner cannot take (see :meth:`check_batch`), or a
                back-end output of the wrong shape (usually a wrong ``scale``).
        """
        self.check_batch(batch)
        start = time.perf_counter()
        out = self._infer(batch)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)  # CUDA is asynchronous: stop the clock when done
        self.timings.record(time.perf_counter() - start)
        b, _, h, w = batch.shape
        expected = (b, 3, h * self.scale, w * self.scale)
        if tuple(out.shape) != expected:
            raise RunnerError(f"{self.artifact} returned {tuple(out.shape)} for input {tuple(batch.shape)}; "
                              f"expected {expected} (is scale x{self.scale} right?)")
        return out

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.infer(batch)

    def tiling_grid(self) -> tuple[int, int]:
        """(align, context): the grid tile origins sit on and the overlap that reaches the output floor.

        From the model's descriptor (:class:`models.base.TilingBehaviour`) when the
        runner holds the model; for an exported ESC artifact (``esc.variant`` known) its
        window (``input_multiple``) and ESC's measured context; otherwise no grid and
        :data:`UNKNOWN_MODEL_CONTEXT`.
        """
        tiling = getattr(getattr(getattr(self, "model", None), "descriptor", None), "tiling", None)
        if tiling:
            return int(tiling.align), int(tiling.context)
        if getattr(self, "variant", None):
            from models.base import ESCBase

            return max(int(self.input_multiple), 1), ESCBase.TILE_CONTEXT
        return max(int(self.input_multiple), 1), UNKNOWN_MODEL_CONTEXT

    def _window(self, tile: int | None, fixed_shape: tuple[int, int] | None) -> tuple[int | None, tuple[int, int] | None]:
        """Resolve (tile, fixed_shape) for the tiler, refusing what this artifact cannot run."""
        if self.fixed_shape is not None:
            if fixed_shape is not None and tuple(fixed_shape) != self.fixed_shape:
                raise RunnerError(
                    f"{self.artifact} only accepts {self.fixed_shape[0]}x{self.fixed_shape[1]} inputs, "
                    f"not {fixed_shape[0]}x{fixed_shape[1]}")
            if tile is not None and (tile, tile) != self.fixed_shape:
                raise RunnerError(
                    f"{self.artifact} is a fixed-shape artifact built for {self.fixed_shape[0]}x"
                    f"{self.fixed_shape[1]} inputs: it is tiled at that size, so leave tile unset "
                    f"(got tile={tile}), or export a dynamic-shape artifact")
            return None, self.fixed_shape
        if fixed_shape is not None and tile is not None:
            raise RunnerError("pass either tile or fixed_shape, not both")
        return tile, (tuple(fixed_shape) if fixed_shape is not None else None)  # type: ignore[return-value]

    @property
    def memory_cost_key(self) -> str:
        """Row of :data:`runtimes.memory.RUNTIME_COSTS` the planner charges: the runtime's
        name, unless a runner's cost depends on how it runs the model (it overrides this)."""
        return self.name

    def plan_tiles(self, size: tuple[int, int], images: int = 1, **options: Unpack[TileOptions]) -> TilePlan:
        """The tile, overlap and batch :meth:`upscale` uses for ``images`` pictures of ``size`` (H, W).

        Given options win; the rest comes from :func:`runtimes.memory.plan_tiles` with this
        runner's per-pixel cost (:attr:`memory_cost_key`), its :meth:`tiling_grid` and the memory
        budget (``memory_budget`` bytes, default a safe share of free memory on
        :attr:`device`). Public so a caller can print the plan or reuse it for a
        reference run (parity tiles the reference exactly like the candidate).
        """
        tile, window = self._window(options.get("tile"), options.get("fixed_shape"))
        align, context = self.tiling_grid()
        budget = options.get("memory_budget")
        budget, source = default_budget(self.device) if budget is None else (int(budget), "memory_budget given")
        if window is not None:
            tile = max(window)
        max_tile = self.default_tile(size) if tile is None else None
        try:
            return plan_tiles(size, self.scale, self.memory_cost_key, budget, source, images=images, align=align,
                              context=context, tile=tile, overlap=options.get("overlap"),
                              batch_size=options.get("batch_size"), max_tile=max_tile)
        except BudgetError as exc:
            raise RunnerError(str(exc)) from None

    def _tiling_args(self, size: tuple[int, int], plan: TilePlan,
                     fixed_shape: tuple[int, int] | None) -> dict[str, Any]:
        """Keyword arguments for the tiler for an image of ``size`` (H, W) under ``plan``."""
        tile, window = self._window(None if (fixed_shape or self.fixed_shape) else plan.tile, fixed_shape)
        overlap = plan.overlap
        sides = window if window is not None else ((tile, tile) if tile is not None else None)
        if sides is None or (size[0] <= sides[0] and size[1] <= sides[1]):
            overlap = 0  # one call per image: no neighbouring tile, so no context to crop
        if sides is not None and min(sides) <= 2 * overlap:
            raise RunnerError(
                f"overlap={overlap} is too large for {sides[0]}x{sides[1]} model calls: every call must be "
                f"larger than 2 * overlap = {2 * overlap}. Lower the overlap or use larger tiles")
        # Tiles start on the attention-window grid unless the caller's tile and overlap leave
        # less than one window between overlaps: then they are spaced evenly, as before.
        align = self.tiling_grid()[0] if window is None else 1
        if tile is not None and tile - 2 * overlap < align:
            align = 1
        return {"tile": tile, "fixed_shape": window, "multiple": self.pad_multiple, "overlap": overlap,
                "align": align, "batch_size": plan.batch_size}

    def _tiled(self, tiler: Callable[..., torch.Tensor], planes: torch.Tensor, options: TileOptions) -> torch.Tensor:
        """Run ``tiler`` (colour or alpha) over ``planes`` with this runner's tiling rules."""
        unknown = sorted(set(options) - set(TileOptions.__annotations__))
        if unknown:
            raise RunnerError(f"unknown tiling option(s) {', '.join(unknown)}; "
                              f"use {', '.join(TileOptions.__annotations__)}")
        if not isinstance(planes, torch.Tensor) or planes.ndim != 4:
            shape = tuple(planes.shape) if isinstance(planes, torch.Tensor) else type(planes).__name__
            raise RunnerError(f"expected an (N, C, H, W) tensor, got {shape}; add a batch dimension with x[None]")
        size = (int(planes.shape[-2]), int(planes.shape[-1]))
        plan = self.plan_tiles(size, int(planes.shape[0]), **options)
        args = self._tiling_args(size, plan, options.get("fixed_shape"))
        return tiler(self.infer, planes, self.scale, progress=options.get("progress", False), **args)

    @torch.no_grad()
    def upscale(self, image: torch.Tensor, **options: Unpack[TileOptions]) -> torch.Tensor:
        """Upscale ``image`` (N, 3, H, W) in [0, 1] through :func:`runtimes.tiling.tiled_upscale`.

        Options (:class:`runtimes.tiling.TileOptions`): ``tile``, ``overlap`` and
        ``batch_size`` left at ``None`` are chosen by :meth:`plan_tiles` from
        ``memory_budget`` (bytes; default a safe share of free memory): the whole image
        in one call when it fits, else the largest tile on the model's window grid that
        does, with the model's measured context as overlap.  ``progress=False``;
        ``fixed_shape=None`` lets a dynamic runner mimic a fixed-shape one exactly
        (parity checks tile the reference the way the candidate is tiled).
        Fixed-shape artifacts always tile at their own shape.  Returns float32
        (N, 3, H*scale, W*scale), unclamped.
        """
        return self._tiled(tiled_upscale, image, options)

    @torch.no_grad()
    def upscale_alpha(self, alpha: torch.Tensor, **options: Unpack[TileOptions]) -> torch.Tensor:
        """Upscale an alpha plane (N, 1, H, W) with the colour model (see :func:`upscale_alpha`).

        Takes the options of :meth:`upscale`.
        """
        return self._tiled(upscale_alpha, alpha, options)

    def describe(self) -> dict[str, Any]:
        """What runs: runtime, device, precision, artifact, attention, variant, scale.

        Common keys: ``runner``, ``runtime``, ``runtime_version``, ``device``,
        ``precision``, ``artifact``, ``variant``, ``scale``, ``attention``,
        ``input_multiple``, ``fixed_shape``; runners add their own (``providers`` for
        ONNX Runtime, ``threads``, ...).
        """
        info: dict[str, Any] = {
            "runner": self.name,
            "runtime": self.name,
            "runtime_version": None,
            "device": self.device,
            "precision": self.precision,
            "artifact": self.artifact,
            "variant": getattr(self, "variant", None),
            "scale": self.scale,
            "attention": getattr(self, "attention", None),
            "input_multiple": self.input_multiple,
            "fixed_shape": list(self.fixed_shape) if self.fixed_shape is not None else None,
        }
        info.update(self.runtime_details())
        return info

    def close(self) -> None:
        """Release the back-end's resources (sessions, engines); idempotent."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        shape = f", fixed_shape={self.fixed_shape}" if self.fixed_shape else ""
        return (f"{type(self).__name__}({self.artifact!r}, x{self.scale}, {self.precision}, "
                f"device={self.device!r}{shape})")


# ----------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------


@dataclass
class _Entry:
    suffixes: tuple[str, ...]
    prefixes: tuple[str, ...]
    target: type[Runner] | str  # the class, or "module:Class" imported on first use
    accepts_module: bool = False

    def resolve(self) -> type[Runner]:
        if isinstance(self.target, str):
            module_name, _, class_name = self.target.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise RunnerError(
                    f"the runner for {'/'.join(self.suffixes or self.prefixes)} artifacts cannot be imported "
                    f"({exc}); install the runtime it needs (pip install 'esc-deploy[all]')") from exc
            self.target = getattr(module, class_name)
        return self.target


#: Built-in back-ends, imported on first use.  A new back-end adds one line here.
_BUILTIN_RUNNERS: tuple[tuple[tuple[str, ...], tuple[str, ...], str, bool], ...] = (
    ((".pth", ".pt", ".safetensors"), ("torch:", "official:"), "runtimes.torch_runner:TorchRunner", True),
    ((".onnx",), ("onnx:",), "runtimes.onnx_runner:OnnxRunner", False),
    ((".mlpackage", ".mlmodel"), ("coreml:",), "runtimes.coreml_runner:CoreMLRunner", False),
    ((".xml",), ("openvino:",), "runtimes.openvino_runner:OpenVINORunner", False),
    ((".engine", ".plan"), ("trt:", "tensorrt:"), "runtimes.trt_runner:TensorRTRunner", False),
)

# Newest registration first (a later register_runner call overrides a built-in).
_REGISTRY: list[_Entry] = [_Entry(s, p, t, m) for s, p, t, m in reversed(_BUILTIN_RUNNERS)]


def _normalise_suffix(suffix: str) -> str:
    suffix = suffix.strip().lower()
    if not suffix:
        raise ValueError("a runner suffix cannot be empty")
    return suffix if suffix.startswith(".") else "." + suffix


def register_runner(
    suffixes: str | Iterable[str],
    cls: type[Runner] | str,
    *,
    prefixes: Iterable[str] = (),
    accepts_module: bool = False,
) -> type[Runner] | str:
    """Register ``cls`` (a Runner subclass, or ``"module:Class"`` imported lazily).

    ``suffixes``: file suffixes it runs (``".engine"``; directories such as
    ``.mlpackage`` work too).  ``prefixes``: spec prefixes it claims (``"trt:"``).
    A later registration of a suffix wins over an earlier one, so a project can
    replace a built-in runner.  Returns ``cls`` so it can decorate a class.
    """
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    if isinstance(cls, type) and not issubclass(cls, Runner):
        raise TypeError(f"{cls.__name__} is not a Runner subclass")
    entry = _Entry(tuple(_normalise_suffix(s) for s in suffixes), tuple(prefixes), cls, accepts_module)
    _REGISTRY.insert(0, entry)
    return cls


def supported_suffixes() -> list[str]:
    """Every registered suffix, in registration order, without duplicates."""
    seen: dict[str, None] = {}
    for entry in reversed(_REGISTRY):
        for suffix in entry.suffixes:
            seen.setdefault(suffix, None)
    return list(seen)


def registered_runners() -> list[dict[str, Any]]:
    """(suffixes, prefixes, class or lazy target) of every registration, newest first."""
    return [{"suffixes": e.suffixes, "prefixes": e.prefixes,
             "runner": e.target if isinstance(e.target, str) else f"{e.target.__module__}:{e.target.__qualname__}"}
            for e in _REGISTRY]


def _supported_text() -> str:
    prefixes = sorted({p for e in _REGISTRY for p in e.prefixes})
    return (f"supported artifacts: files ending in {', '.join(supported_suffixes())}; "
            f"specs starting with {', '.join(prefixes)}; or a torch nn.Module")


def runner_class_for(artifact: Any) -> type[Runner]:
    """The registered runner class for ``artifact``, or a :class:`RunnerError`."""
    if isinstance(artifact, torch.nn.Module):
        for entry in _REGISTRY:
            if entry.accepts_module:
                return entry.resolve()
        raise RunnerError(f"no runner accepts an nn.Module; {_supported_text()}")
    if not isinstance(artifact, (str, os.PathLike)):
        raise RunnerError(f"cannot run a {type(artifact).__name__}; {_supported_text()}")
    spec = os.fspath(artifact)
    for entry in _REGISTRY:
        if any(spec.startswith(p) for p in entry.prefixes):
            return entry.resolve()
    name = Path(spec).name.lower()
    matches = [(len(s), i, e) for i, e in enumerate(_REGISTRY) for s in e.suffixes if name.endswith(s)]
    if matches:
        longest = max(m[0] for m in matches)
        # Longest suffix wins (".fp16.onnx" over ".onnx"); among equals, the newest registration.
        entry = min((m for m in matches if m[0] == longest), key=lambda m: m[1])[2]
        return entry.resolve()
    suffix = Path(spec).suffix or "(no suffix)"
    raise RunnerError(f"cannot tell which runtime runs {spec!r} (suffix {suffix}); {_supported_text()}")


def _strip_prefix(spec: str, entry_prefixes: Sequence[str]) -> str:
    for prefix in entry_prefixes:
        if prefix != "official:" and spec.startswith(prefix):
            return spec[len(prefix):]
    return spec


def load(artifact: Any, device: str = "cpu", **options: Any) -> Runner:
    """Build the runner for ``artifact`` (a path, a prefixed spec, or an ``nn.Module``).

    ``device`` is ``"cpu"`` or ``"cuda[:N]"``; other keyword options go to the runner
    (``attention``/``precision`` for PyTorch, ``provider``/``threads`` for ONNX
    Runtime, ...).  An option the chosen runner does not take is refused by name.

    Raises:
        RunnerError: unknown kind of artifact (the message lists the supported
            suffixes), missing file, bad option, or a runtime that cannot run here.
    """
    cls = runner_class_for(artifact)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise RunnerError(
            f"the {cls.name} runner does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(('device',) + cls.options)}")
    if isinstance(artifact, (str, os.PathLike)):
        spec = os.fspath(artifact)
        entry_prefixes = [p for e in _REGISTRY for p in e.prefixes]
        spec = _strip_prefix(spec, entry_prefixes)
        if not spec.startswith("official:") and not Path(spec).exists():
            raise RunnerError(f"no such artifact: {spec}")
        artifact = spec
    return cls(artifact, device=device, **options)
