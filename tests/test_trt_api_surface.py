"""Every TensorRT name the project uses exists in TensorRT 10.13 (stubs) and 11.4 (bindings strings).

The project's TensorRT code runs here against a fake ``tensorrt`` generated from the
10.13 ``.pyi`` stubs (:mod:`trt_stub_api`: unknown names, calls that bind to no signature,
wrong argument classes and read-only attributes all fail as in pybind11): the engine build
for the plugin and native paths in each typing and precision, the runner's engine load,
I/O discovery and one enqueue. What it looked up is then checked name by name:

* against the 10.13 stubs: present by construction (the fake refused anything else) and
  with ``[DEPRECATED]`` notes reported;
* against TensorRT 11.4, which has no stubs: the owner class, the member and every keyword
  used occur among ``tensorrt.so``'s strings (pybind11 registers each by name; a name may be
  stored as the tail of a longer string). That shows the name is bound in 11.4, not which
  class holds it. Names the project only probes with ``hasattr`` may be absent there, and
  are listed.

The native path's ``IAttention`` classes (TensorRT >= 10.14) are not in the 10.13 stubs;
:data:`trt_stub_api.NATIVE_ATTENTION_API` declares them, and each of its names is checked in 11.4.
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
import trt_real
from optional_deps import skip_or_fail
from trt_stub_api import (
    FakeEnum,
    StubAPI,
    deprecation,
    fake_tensorrt,
    parsed_network,
    tensorrt_api_or_skip,
)

REPO = Path(__file__).resolve().parents[1]
#: The project's modules that call TensorRT directly.
TRT_SOURCES = ("export/trt_build.py", "runtimes/trt_runner.py")
NATIVE_NAMES = {("LayerType", "ATTENTION_INPUT"), ("LayerType", "ATTENTION_OUTPUT"), ("IAttention", "decomposable"),
                ("IAttention", "name"), ("IAttentionBoundaryLayer", "attention"),
                ("tensorrt", "IAttentionInputLayer"), ("tensorrt", "IAttentionOutputLayer")}


@pytest.fixture(scope="module")
def stubs() -> StubAPI:
    return tensorrt_api_or_skip()


@pytest.fixture(scope="module")
def strings_114() -> set[str]:
    try:
        return trt_real.bindings_strings("11.4")
    except trt_real.WheelUnavailable as exc:
        skip_or_fail(f"the TensorRT 11.4 bindings wheel is unavailable: {exc}")
        raise


def build_engine(fake_module: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options) -> None:
    from export import trt_build as tb
    from runtimes.plugin_ops import tensorrt_plugin

    monkeypatch.setattr(tensorrt_plugin, "import_tensorrt", lambda: (fake_module, None))
    monkeypatch.setattr(tensorrt_plugin, "register_plugin", lambda **kwargs: {"registered": True, **kwargs})
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"onnx")
    cache = tmp_path / "cache.timing-cache"
    if options.pop("existing_cache", False):
        cache.write_bytes(b"cache")
    tb._build_serialized_engine(onnx_path, tmp_path / "x.engine", tb.ShapeProfile.parse(), timing_cache=cache,
                                workspace_gib=1.0, **options)
    assert (tmp_path / "x.engine").read_bytes() == b"serialized"


class _Stream:
    cuda_stream = 0

    def wait_stream(self, other: Any) -> None:
        pass


def run_engine(fake_module: Any, fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The runner's construction and one ``_run`` with the fake TensorRT and CUDA calls stubbed out."""
    from runtimes.plugin_ops import tensorrt_plugin
    from runtimes.trt_runner import TensorRTRunner

    names = ["lr", "sr"]
    modes = {"lr": FakeEnum("TensorIOMode", "INPUT", 1), "sr": FakeEnum("TensorIOMode", "OUTPUT", 2)}
    fake.overrides.update({
        "ICudaEngine.num_io_tensors": lambda engine: 2,
        "ICudaEngine.get_tensor_name": lambda engine, index: names[index],
        "ICudaEngine.get_tensor_mode": lambda engine, name: modes[name],
        "ICudaEngine.get_tensor_dtype": lambda engine, name: FakeEnum("DataType", "FLOAT", 0),
        "ICudaEngine.get_tensor_profile_shape": lambda engine, name, index: [(1, 3, 16, 16), (1, 3, 32, 32),
                                                                              (2, 3, 64, 64)],
        "IExecutionContext.get_tensor_shape": lambda context, name: (1, 3, 32, 32),
    })
    monkeypatch.setattr(tensorrt_plugin, "import_tensorrt", lambda: (fake_module, None))
    monkeypatch.setattr(tensorrt_plugin, "register_plugin", lambda **kwargs: {"registered": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"serialized")
    runner = TensorRTRunner(engine, scale=2)
    runner._device = torch.device("cpu")   # the enqueue below runs on CPU tensors
    return runner._run(torch.rand(1, 3, 16, 16))


def probed_names() -> set[str]:
    """String literals the project's TensorRT code passes to ``hasattr`` (guards, not uses)."""
    names = set()
    for source in TRT_SOURCES:
        for node in ast.walk(ast.parse((REPO / source).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and len(node.args) == 2 \
                    and isinstance(node.args[1], ast.Constant):
                names.add(node.args[1].value)
    names |= {"FP16", "BF16"}   # hasattr(trt.BuilderFlag, flag) with flag from {"fp16": "FP16", "bf16": "BF16"}
    return names


def exercise_project(stubs: StubAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run every TensorRT-facing path once against one fake; its recorder holds what was used."""
    module, fake = fake_tensorrt(stubs)
    layers = parsed_network(fake, 2)
    for i, options in enumerate([
            dict(attention="plugin", precision="fp16", typing="strong"),
            dict(attention="plugin", precision="fp16", typing="weak", existing_cache=True),
            dict(attention="plugin", precision="bf16", typing="weak", jit=True, verbose=True),
            dict(attention="plugin", precision="fp32", typing="strong"),
            dict(attention="native", precision="fp16", typing="strong")]):
        folder = tmp_path / f"build{i}"
        folder.mkdir()
        with monkeypatch.context() as patch:
            build_engine(module, folder, patch, **options)
    assert all(layer["_attention"]["decomposable"] for layer in layers[1:])   # the native build marked them
    with monkeypatch.context() as patch:
        out = run_engine(module, fake, tmp_path, patch)
    assert tuple(out.shape) == (1, 3, 32, 32)
    return fake


def test_build_and_runner_use_only_what_tensorrt_1013_declares(stubs: StubAPI, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path runs on the stub-typed fake: no unknown name, no call that binds to no signature."""
    fake = exercise_project(stubs, tmp_path, monkeypatch)
    unguarded = [name for name in fake.uses.missing if name[1] not in probed_names()]
    assert not unguarded, unguarded
    assert ("INetworkDefinition", "get_layer") in fake.uses.names
    assert fake.uses.names[("IBuilderConfig", "set_timing_cache")] == {"ignore_mismatch"}


def test_every_name_used_exists_in_tensorrt_114(stubs: StubAPI, strings_114: set[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Owner, member and keywords of each use occur in TensorRT 11.4's bindings; deprecated ones are named."""
    fake = exercise_project(stubs, tmp_path, monkeypatch)
    probed = probed_names()
    rows, missing, deprecated, guarded = [], [], [], []
    for (owner, member), keywords in sorted(fake.uses.names.items()):
        if member.startswith("__"):
            continue
        owner_name = owner.rsplit(".", 1)[-1]
        names = [member, *sorted(keywords)] + ([] if owner == "tensorrt" else [owner_name])
        absent = [n for n in names if not trt_real.in_strings(n, strings_114)]
        info = stubs.lookup(owner, member) if owner != "tensorrt" else stubs.module.get(member)
        note = deprecation(info.doc) if info is not None and info.kind != "class" else None
        if note:
            deprecated.append(f"{owner}.{member}: {note}")
        if absent and member in probed:
            guarded.append(f"{owner}.{member} (absent in 11.4: {absent}; the project checks hasattr first)")
        elif absent:
            missing.append(f"{owner}.{member}: {absent}")
        rows.append((owner, member, keywords))
    # 11.4 has no stubs: a docstring that opens with [DEPRECATED] and names a used member (enum
    # members' docs are strings of their own, e.g. STRONGLY_TYPED's "Strongly typed mode is ...").
    deprecated_114 = sorted({f"{owner}.{member}: {deprecation(text)}" for text in strings_114
                             if text.strip().startswith("[DEPRECATED]") for owner, member, _ in rows
                             if len(member) > 6 and member.replace("_", " ").lower() in text.lower().replace("_", " ")})
    print(f"\n{len(rows)} TensorRT names checked ({sum(len(k) for *_, k in rows)} keywords), {len(missing)} missing "
          f"in 11.4, {len([r for r in rows if (r[0], r[1]) in NATIVE_NAMES])} from the native-attention supplement")
    print("deprecated (10.13 stubs):\n  " + "\n  ".join(deprecated))
    print("deprecated (11.4 strings naming a used member):\n  " + "\n  ".join(deprecated_114))
    print("guarded:\n  " + "\n  ".join(guarded))
    assert not missing, missing
    assert len(rows) >= 50, rows
    assert NATIVE_NAMES <= {(o, m) for o, m, _ in rows}
    assert any("EXPLICIT_BATCH" in d for d in deprecated)
    assert any(d.startswith("NetworkDefinitionCreationFlag.STRONGLY_TYPED: [DEPRECATED] Deprecated in TensorRT 11.0")
               for d in deprecated_114), deprecated_114


def test_stub_fake_refuses_what_pybind11_refuses(stubs: StubAPI) -> None:
    """The fake is no more permissive than the bindings: names, arguments, setters, casts."""
    module, _ = fake_tensorrt(stubs)
    logger = module.Logger(module.Logger.WARNING)
    builder = module.Builder(logger)
    with pytest.raises(AttributeError):
        builder.create_netwrok(0)
    with pytest.raises(TypeError, match="incompatible"):
        module.OnnxParser(builder, logger)            # a Builder is not an INetworkDefinition
    network = builder.create_network(0)
    with pytest.raises(TypeError, match="incompatible"):
        builder.create_builder_config().set_timing_cache(None, ignore_mismatsh=False)
    with pytest.raises(AttributeError, match="can't set"):
        network.num_layers = 3                        # a read-only property
    layer = network.get_layer(0)
    with pytest.raises(AttributeError):
        layer.attention                               # the base ILayer, until cast
    with pytest.raises(TypeError, match="not a subclass"):
        layer.__class__ = module.IAttention
    assert module.DataType.HALF != 1 and int(module.DataType.HALF) == 1
