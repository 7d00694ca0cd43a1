"""The one schema of what an exported artifact says about itself (the ``esc.*`` keys).

Why one module: ONNX files, plugin-form ONNX, Core ML packages and TensorRT engines all
carry the same facts (variant, scale, window, precision, weights hash, ...) and every
runner reads them back. Written and parsed in one place, the keys cannot drift apart.

- :class:`ArtifactMetadata`: the common fields, typed, plus ``extra`` for format-specific
  keys (``plugin_domain``, ``target``, ``compression``, ...). ``to_props()`` gives the
  ``{"esc.KEY": "value"}`` strings every format stores; ``from_props()`` parses them
  back and ignores keys without the ``esc.`` prefix.
- ONNX: :func:`write_onnx_metadata` (into a ``ModelProto``) and :func:`read_onnx_metadata`
  (from a file, without loading external weights).
- Core ML: ``spec.description.metadata.userDefined`` holds ``to_props()``;
  :func:`read_coreml_metadata` parses a spec.
- TensorRT: an engine has no metadata slot, so a JSON sidecar ``<engine>.json`` holds
  ``{"metadata": to_props(), "build": {...}}``: :func:`write_sidecar`, :func:`read_sidecar`.
- :func:`resolve_scale`: the rule every runner applies (metadata wins; a caller's
  ``scale=`` must agree; neither means a clear error).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import ESCError

__all__ = [
    "PREFIX",
    "ArtifactMetadata",
    "MetadataError",
    "read_coreml_metadata",
    "read_onnx_metadata",
    "read_sidecar",
    "resolve_scale",
    "sidecar_path",
    "toolkit_version",
    "write_onnx_metadata",
    "write_sidecar",
    "write_text_atomic",
]

PREFIX = "esc."
DIST_NAME = "esc-deploy"
FALLBACK_VERSION = "0.1.0"


class MetadataError(ESCError, ValueError):
    """An artifact's ``esc.*`` metadata is malformed or contradicts the caller."""


def toolkit_version() -> str:
    """The installed ``esc-deploy`` version, or ``0.1.0`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return FALLBACK_VERSION


_INT_FIELDS = ("scale", "window_size", "input_multiple", "opset", "params")
_BOOL_FIELDS = ("exact_variant",)


@dataclass
class ArtifactMetadata:
    """What every artifact records. ``None`` fields are not written.

    ``shape`` is ``"dynamic"`` or ``"HxW"``; ``batch`` ``"dynamic"`` or a number;
    ``weights_sha256`` is the checkpoint's hash or ``"random"``; ``io_dtype`` the graph's
    input/output element type (``"float32"``/``"float16"``).
    """

    variant: str | None = None
    arch: str | None = None
    scale: int | None = None
    window_size: int | None = None
    input_multiple: int | None = None
    attention: str | None = None
    #: the weights' bias form: "table", "flashbias rank R" or "rib factors" (descriptor.bias)
    bias: str | None = None
    precision: str | None = None
    io_dtype: str | None = None
    opset: int | None = None
    shape: str | None = None
    batch: str | None = None
    params: int | None = None
    exact_variant: bool | None = None
    weights_sha256: str | None = None
    toolkit_version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: Any, weights_sha256: str | None = None, **fields: Any) -> "ArtifactMetadata":
        """The fields a model's descriptor knows, plus ``fields`` (format choices).

        Unknown keyword names go to ``extra`` (stringified), so a format adds its own
        keys without a schema change.
        """
        desc = model.descriptor
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        base: dict[str, Any] = dict(
            variant=desc.variant, arch=desc.arch, scale=desc.scale, window_size=desc.window_size,
            input_multiple=desc.input_multiple, attention=desc.attention, bias=desc.bias, params=desc.params,
            exact_variant=desc.exact_variant, weights_sha256=weights_sha256 or "random",
            toolkit_version=toolkit_version())
        extra = {k: _text(v) for k, v in fields.items() if k not in known}
        base.update({k: v for k, v in fields.items() if k in known})
        return cls(**base, extra=extra)

    # -- string form ---------------------------------------------------------------------
    def to_props(self) -> dict[str, str]:
        """``{"esc.KEY": "value"}`` for every set field and every ``extra`` entry."""
        props = {PREFIX + f.name: _text(getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name != "extra" and getattr(self, f.name) is not None}
        props.update({PREFIX + k: _text(v) for k, v in self.extra.items()})
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, Any], source: str = "artifact") -> "ArtifactMetadata":
        """Parse ``esc.*`` entries (others ignored); a malformed number names key and source."""
        values: dict[str, Any] = {}
        extra: dict[str, str] = {}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key, raw in props.items():
            if not str(key).startswith(PREFIX):
                continue
            name, text = str(key)[len(PREFIX):], str(raw)
            if name not in known:
                extra[name] = text
            elif text == "":
                continue
            elif name in _INT_FIELDS:
                try:
                    values[name] = int(text)
                except ValueError:
                    raise MetadataError(f"{source}: metadata {key}={text!r} is not a whole number; "
                                        f"re-export the artifact with this toolkit") from None
            elif name in _BOOL_FIELDS:
                values[name] = text.lower() in ("1", "true", "yes")
            else:
                values[name] = text
        return cls(**values, extra=extra)

    def get(self, key: str, default: str | None = None) -> str | None:
        """A field or ``extra`` entry as text (``key`` without the prefix)."""
        if key in self.extra:
            return self.extra[key]
        value = getattr(self, key, None) if key != "extra" else None
        return default if value is None else _text(value)

    @property
    def fixed_shape(self) -> tuple[int, int] | None:
        """``(H, W)`` when ``shape`` names one, else ``None``."""
        if not self.shape or self.shape == "dynamic" or "x" not in self.shape:
            return None
        h, _, w = self.shape.partition("x")
        return (int(h), int(w)) if h.isdigit() and w.isdigit() else None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# -- the rule every runner applies -------------------------------------------------------
def resolve_scale(meta: ArtifactMetadata, scale: int | None, source: str) -> int:
    """The artifact's scale: from metadata, checked against the caller's ``scale``."""
    if meta.scale is not None:
        if scale is not None and int(scale) != meta.scale:
            raise MetadataError(f"{source} upscales x{meta.scale} (esc.scale metadata), but scale={scale} was given")
        return meta.scale
    if scale is None:
        raise MetadataError(f"{source} has no esc.scale metadata, so its upscaling factor is unknown; "
                            f"pass scale=N (--scale N), or re-export it with this toolkit")
    return int(scale)


# -- ONNX ----------------------------------------------------------------------------------
def write_onnx_metadata(proto: Any, meta: ArtifactMetadata) -> None:
    """Replace ``proto.metadata_props`` with ``meta``'s ``esc.*`` entries (keys sorted)."""
    del proto.metadata_props[:]
    for key, value in sorted(meta.to_props().items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_onnx_metadata(path: str | os.PathLike[str]) -> ArtifactMetadata:
    """The ``esc.*`` metadata of an ONNX file (external weights are not loaded)."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    return ArtifactMetadata.from_props({p.key: p.value for p in proto.metadata_props}, source=os.fspath(path))


# -- Core ML -------------------------------------------------------------------------------
def read_coreml_metadata(spec: Any, source: str = "Core ML package") -> ArtifactMetadata:
    """The ``esc.*`` metadata of a Core ML spec (``description.metadata.userDefined``)."""
    return ArtifactMetadata.from_props(dict(spec.description.metadata.userDefined), source=source)


# -- TensorRT sidecar ------------------------------------------------------------------------
def sidecar_path(engine: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_sidecar(engine: str | os.PathLike[str], meta: ArtifactMetadata, build: Mapping[str, Any]) -> Path:
    """Write ``<engine>.json`` atomically: ``{"metadata": esc.* strings, "build": build}``.

    ``build`` holds what only the builder knows (TensorRT version, GPU, precision flags,
    profile, plugin library); the runner checks it before deserialising.
    """
    path = sidecar_path(engine)
    text = json.dumps({"metadata": meta.to_props(), "build": dict(build)}, indent=2, sort_keys=True) + "\n"
    write_text_atomic(path, text)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_sidecar(engine: str | os.PathLike[str]) -> tuple[ArtifactMetadata, dict[str, Any]]:
    """``(metadata, build info)`` from ``<engine>.json``; empty ones when there is none.

    An unreadable sidecar is an error naming the file (a silently ignored sidecar would
    turn into a confusing scale or precision error later).
    """
    path = sidecar_path(engine)
    if not path.is_file():
        return ArtifactMetadata(), {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MetadataError(f"{path} is not a readable engine sidecar ({exc}); delete it and rebuild "
                            f"the engine with export/to_trt.py") from None
    return (ArtifactMetadata.from_props(data.get("metadata", {}), source=str(path)),
            dict(data.get("build", {})))
