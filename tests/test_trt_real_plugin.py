"""The TensorRT plugin through NVIDIA's real ``tensorrt.plugin`` of TensorRT 10.9, 10.13 and 11.4, on CPU.

Each version's bindings wheel is downloaded once (:mod:`trt_real`); its ``tensorrt.plugin``
runs over :mod:`trt_shim` (the compiled core), and :mod:`trt_qdp_driver` does what
TensorRT's ONNX parser and builder do with the golden esc x2 plugin-form file (5 nodes):

* the creator's declared fields and ``create_plugin`` from the node's attributes exactly as
  the parser passes them, with the node's name and with its op type (the parser passed the
  name up to 10.9 at least);
* the builder's calls in order, and the AOT launch expressions evaluated at real shapes
  against what the Triton launcher passes for the same shapes;
* the PTX entry TensorRT launches (exactly its 8 arguments), a JIT engine's attribute
  round trip, and a second registration with another PTX target.

No TensorRT library or GPU is needed; Triton compiles the kernel to PTX here.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trt_real
from optional_deps import need, skip_or_fail
from plugin_exports import PLUGIN_CASE, golden_plugin_export

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
VERSIONS = list(trt_real.BINDINGS)
DTYPES = ["fp16", "fp32", "bf16"]
SHAPES = [[1, 1, 1], [2, 37, 53], [3, 64, 64], [1, 65, 33], [4, 200, 17]]
RETARGET = ["cuda:80", 80]
AOT_ARGUMENTS = ["u64", "u64", "u32", "u32", "u32", "u32", "u32", "u64"]   # qkv, table, 5 x int32, out
MAX_LAUNCH_SHARED = 48 * 1024


def clean_env(*paths: Path) -> dict:
    """A subprocess environment: ``paths`` first, the repo and tests importable, Triton compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(REPO), str(HERE)])
    return env


def run_driver(version: str, onnx_path: Path, artifacts, **extra) -> dict:
    """:mod:`trt_qdp_driver`'s report for ``version`` (one process per version: QDP registries are global)."""
    need("triton", "the AOT kernel is compiled with Triton")
    stage = trt_real.staged(version, artifacts)

    def run() -> dict:
        config = {"onnx": str(onnx_path), "target": "cuda:90", "retarget": RETARGET, "dtypes": DTYPES,
                  "shapes": SHAPES, **extra}
        path = artifacts.folder(("trt-driver", version)) / "config.json"
        path.write_text(json.dumps(config))
        done = subprocess.run([sys.executable, str(HERE / "trt_qdp_driver.py"), str(path)], capture_output=True,
                              text=True, env=clean_env(stage), cwd=REPO, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return artifacts.get(("trt-driver", version), run)


@pytest.fixture(scope="module")
def plugin_onnx(artifacts, golden_dir: Path) -> Path:
    return golden_plugin_export(artifacts, golden_dir, PLUGIN_CASE)["report"].path


@pytest.fixture(scope="module", params=VERSIONS)
def report(request: pytest.FixtureRequest, artifacts, plugin_onnx: Path) -> dict:
    return run_driver(request.param, plugin_onnx, artifacts)


def _ok(entry: dict) -> dict:
    assert "error" not in entry, f"{entry.get('error')}\n{entry.get('where', '')}"
    return entry


def test_creator_takes_the_fields_the_onnx_parser_passes(report: dict) -> None:
    """Declared fields, INT attributes as one-element INT32 fields, STRICT_AOT from ``aot``, any NumPy.

    On the old code 10.9/10.13 failed here with "TypeError: only 0-dimensional arrays can be
    converted to Python scalars" (``int``-annotated attributes under NumPy 2).
    """
    assert report["registered"] == {"registered": True, "aot": True, "target": "cuda:90", "ptx_version": None}
    assert report["declared_fields"] == [["window", "INT32"], ["heads", "INT32"]]
    made = _ok(report["create"]["op_type"])
    assert made == {"plugins": 5, "request": "STRICT_AOT", "class": "_TemplateAOTPlugin",
                    "attrs": {"window": [32], "heads": [4]}}


def test_creator_accepts_the_node_name_as_older_parsers_pass_it(report: dict) -> None:
    """``create_plugin("blocks.0.attn/window_attention", ...)`` (onnx-tensorrt <= 10.9) makes the same plugin.

    On the old code: KeyError 'esc::blocks.0.attn/window_attention' in every version.
    """
    assert _ok(report["create"]["node"]) == report["create"]["op_type"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_builder_calls_and_launch_match_the_triton_launcher(report: dict, dtype: str) -> None:
    """Every AOT method in the builder's order; grid and int32 scalars at real shapes = the JIT launcher's."""
    built = _ok(report["build"][dtype])
    name = {"fp16": "HALF", "fp32": "FLOAT", "bf16": "BF16"}[dtype]
    assert built["out_dtype"] == name and built["kernel"] == "esc_window_attention"
    assert built["combos"] == [[name, "LINEAR"]] * 3
    assert built["ptx"]["entry"] and built["ptx"]["target"].startswith("sm_90")
    for shape, got in built["at"].items():
        b, h, w = map(int, shape.split("x"))
        assert got["grid"] == built["triton"][shape]["grid"], shape
        assert got["scalars"] == built["triton"][shape]["scalars"], shape
        assert got["out_shape"] == [b, 64, h, w] and got["block"] == [128, 1, 1], shape
        assert 0 < got["shared"] <= MAX_LAUNCH_SHARED, shape


def test_aot_entry_takes_exactly_the_arguments_tensorrt_passes(report: dict) -> None:
    """Inputs, the 5 int32 extra arguments, the output: no Triton scratch pointers past them (old code: 10)."""
    for dtype in DTYPES:
        assert _ok(report["build"][dtype])["ptx"]["params"] == AOT_ARGUMENTS, dtype


def test_jit_engine_attributes_round_trip(report: dict) -> None:
    """``aot=0``: the JIT plugin serialises window/heads as INT32 and a RUNTIME-phase creation reads them back."""
    jit = _ok(report["jit"])
    assert jit["request"] == "STRICT_JIT" and jit["class"] == "_TemplateJITPlugin"
    assert jit["serialized"] == [["window", "INT32", [32]], ["heads", "INT32", [4]]]
    assert jit["deserialized"] == {"window": [32], "heads": [4]}


def test_second_registration_sets_the_ptx_target_of_the_next_build(report: dict) -> None:
    """``register_plugin(target="cuda:80", ptx_version=80)`` after a cuda:90 one: the next plugin embeds sm_80 PTX 8.0.

    On the old code the first registration was returned unchanged and the PTX stayed sm_90a.
    """
    retarget = _ok(report["retarget"])
    assert retarget == {"state": RETARGET, "target": "sm_80", "version": "8.0"}


def test_plugin_api_the_project_uses_exists(report: dict) -> None:
    """Every ``tensorrt.plugin`` name the registration uses is in that version's real package."""
    assert report["plugin_api"] and all(report["plugin_api"].values()), report["plugin_api"]


def test_aot_ptx_assembles_with_eight_kernel_parameters(tmp_path: Path) -> None:
    """The PTX TensorRT gets is valid: Triton's ptxas assembles it and the cubin's kernel takes 8 parameters.

    ``cuobjdump -elf`` lists one ``EIATTR_KPARAM_INFO`` per parameter of the cubin's kernel.
    """
    need("triton", "the AOT kernel is compiled with Triton")
    code = (f"from runtimes.plugin_ops.tensorrt_plugin import compile_ptx\n"
            f"open({str(tmp_path / 'k.ptx')!r}, 'w').write(compile_ptx('fp16', 32, 4, target='cuda:90'))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=REPO,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas_tool = Path(get_ptxas(90).path)   # the ptxas Triton itself uses for sm_90 (the PTX's version)
    cuobjdump = ptxas_tool.parent / "cuobjdump"
    if not ptxas_tool.is_file() or not cuobjdump.is_file():
        skip_or_fail(f"Triton {triton.__version__} ships no ptxas/cuobjdump beside {ptxas_tool}")
    ptxas = subprocess.run([str(ptxas_tool), "-arch=sm_90a", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    assert ptxas.returncode == 0, ptxas.stderr[-3000:]
    elf = subprocess.run([str(cuobjdump), "-elf", str(tmp_path / "k.cubin")], capture_output=True,
                         text=True, timeout=300)
    assert elf.returncode == 0, elf.stderr[-3000:]
    kparams = re.findall(r"EIATTR_KPARAM_INFO", elf.stdout)
    assert len(kparams) == len(AOT_ARGUMENTS), elf.stdout[-3000:]
