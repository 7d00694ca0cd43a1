"""Tests for ESC's fused window attention: reference, Triton kernel, custom op.

Without a GPU the Triton kernel runs in Triton's CPU interpreter, which is
slow (tens of ms per program), so the interpreter cases are small: window 16,
a few windows, blocks sized so that every case still takes several query
blocks and several online-softmax key steps. With a GPU the same cases run
the compiled kernel at its default blocks, plus a full-size check.
"""

import os

import torch

# --- Triton interpreter setup: must stay above every import of triton. ---
# Triton fixes interpreted-vs-compiled per process: TRITON_INTERPRET is read
# when `triton` is first imported (triton.language decorates its own helpers
# then), when the kernel module decorates the kernel, and by triton modules
# imported lazily during a launch. Without CUDA the kernel can only run
# interpreted, so the flag is set here, before the imports below (`import
# torch` does not import triton). With CUDA it is left alone, so these tests
# run the compiled kernel. The previous value is restored right after the
# imports and the `_interpreter_env` fixture sets the flag again around each
# test of this module: other test modules in the session would otherwise
# inherit it, and their CPU calls to esc::window_attention would be routed
# to the (slow) interpreter. If triton was imported earlier in the process
# without the flag, the kernel cannot run here: the kernel tests then skip and
# test_kernel_suite_in_fresh_process reruns this file in a fresh process.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from models.kernels import window_attention_triton as kernel_module  # noqa: E402
from models.kernels.ops import fused_window_attention  # noqa: E402
from models.kernels.reference import window_attention_reference  # noqa: E402
from models.kernels.window_attention_triton import window_attention_triton  # noqa: E402

if _PREVIOUS_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

_WANT_INTERPRETER = DEVICE.type == "cpu"
KERNEL_RUNNABLE = kernel_module.INTERPRETER_MODE == _WANT_INTERPRETER and (
    isinstance(tl.zeros, InterpretedFunction) == _WANT_INTERPRETER
)
needs_kernel = pytest.mark.skipif(
    not KERNEL_RUNNABLE,
    reason="triton was imported in this process before TRITON_INTERPRET was set as this device needs; "
    "test_kernel_suite_in_fresh_process runs these tests in a fresh process",
)

# Kernel bounds, not parity thresholds: the Triton kernel's own numerics (one op) against
# the reference op; whole-model parity uses validation.compare.threshold_for instead.
# Max abs error vs the fp32-computing reference. fp16/bf16 outputs are rounded
# by both sides, so one output ulp is the floor: fp16 ulp is <= 2e-3 below 4;
# bf16 keeps 8 significant bits (ulp 2**-7 relative), so its bound is relative
# for |ref| > 1 (an absolute 1e-2 would flag a 1-ulp rounding flip at |ref| > 1.3).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# Interpreter-sized blocks: per window, 2 query blocks x 4 online-softmax key
# steps for both window sizes. On GPU the kernel's defaults (64, 64) are used.
_INTERPRETER_BLOCKS = {16: {"block_m": 128, "block_n": 64}, 32: {"block_m": 512, "block_n": 256}}


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep TRITON_INTERPRET=1 set while this module's CPU tests run (see top)."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _blocks(window: int) -> dict[str, int]:
    return _INTERPRETER_BLOCKS[window] if DEVICE.type == "cpu" else {}


def _inputs(
    batch: int,
    heads: int,
    height: int,
    width: int,
    window: int,
    dtype: torch.dtype,
    table_dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random qkv map and bias table; the table has unit scale so a wrong bias gather shows."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3 * 16 * heads, height, width, generator=gen).to(DEVICE, dtype)
    table = torch.randn(heads, (2 * window - 1) ** 2, generator=gen).to(DEVICE, table_dtype)
    return qkv, table


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs()
    scale = ref.float().abs().clamp(min=1.0) if dtype == torch.bfloat16 else torch.ones_like(err)
    worst = (err / scale).max().item()
    assert worst <= TOLERANCE[dtype], f"max (scaled) abs error {worst:.3g} > {TOLERANCE[dtype]}"


# ---------------------------------------------------------------- reference --


def _brute_force_window_attention(qkv: torch.Tensor, table: torch.Tensor, window: int, heads: int) -> torch.Tensor:
    """Upstream-style float64 window attention: F.pad reflect, explicit per-window loops.

    Independent of the reference's index gather, reshapes and vectorised bias
    index; only valid while the pad is smaller than the image (torch's
    reflect pad refuses larger pads).
    """
    batch, _, height, width = qkv.shape
    channels = heads * 16
    tokens = window * window
    n_rows, n_cols = math.ceil(height / window), math.ceil(width / window)
    padded = F.pad(qkv.double(), (0, n_cols * window - width, 0, n_rows * window - height), mode="reflect")
    out = torch.zeros(batch, channels, n_rows * window, n_cols * window, dtype=torch.float64)
    side = 2 * window - 1
    for h in range(heads):
        row = table[h].double().tolist()
        bias = torch.tensor(
            [
                [
                    row[(ki - qi + window - 1) * side + (kj - qj + window - 1)]
                    for ki in range(window)
                    for kj in range(window)
                ]
                for qi in range(window)
                for qj in range(window)
            ],
            dtype=torch.float64,
        )
        for b in range(batch):
            for r in range(n_rows):
                for c in range(n_cols):
                    ys, xs = slice(r * window, (r + 1) * window), slice(c * window, (c + 1) * window)
                    q, k, v = (
                        padded[b, s * channels + h * 16 : s * channels + h * 16 + 16, ys, xs].reshape(16, tokens).T
                        for s in range(3)
                    )
                    attn = torch.softmax(q @ k.T / 4.0 + bias, dim=-1)
                    out[b, h * 16 : h * 16 + 16, ys, xs] = (attn @ v).T.reshape(16, window, window)
    return out[:, :, :height, :width]


def test_reference_matches_upstream_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 3 * 16 * 2, 20, 13, generator=gen)  # pads 12 < 20 rows, 3 < 13 cols
    table = torch.randn(2, 31 * 31, generator=gen)
    ref = window_attention_reference(qkv, table, 16, 2)
    brute = _brute_force_window_attention(qkv, table, 16, 2)
    assert (ref.double() - brute).abs().max().item() <= 1e-5


def test_reference_matches_model_naive_backend() -> None:
    """Same semantics as the attention path the golden vectors were produced with."""
    from models.attention.backends import NaiveBackend
    from models.attention.module import WindowAttention

    attn = WindowAttention(dim=32, window=16, heads=2)
    torch.nn.init.normal_(attn.relative_position_bias)
    qkv = torch.randn(2, 96, 5, 21, generator=torch.Generator().manual_seed(6))  # rows need pad >= size
    expected = NaiveBackend()(qkv, attn)
    actual = window_attention_reference(qkv, attn.relative_position_bias.detach(), 16, 2)
    assert (actual - expected).abs().max().item() <= 1e-5


# ------------------------------------------------------------------- kernel --

# (batch, heads, H, W, window, qkv dtype, table dtype)
KERNEL_CASES = {
    "fp32-w16-h1-padded-20x37": (2, 1, 20, 37, 16, torch.float32, torch.float32),
    "fp32-w16-h2-unpadded-16x32": (2, 2, 16, 32, 16, torch.float32, torch.float32),
    "fp32-w16-h3-pad>size-5x7": (2, 3, 5, 7, 16, torch.float32, torch.float32),
    "fp32-w16-h4-single-row-1x18": (2, 4, 1, 18, 16, torch.float32, torch.float32),
    "fp32-w32-h1-padded-20x40": (2, 1, 20, 40, 32, torch.float32, torch.float32),
    "fp16-w16-h2-padded-20x37-fp32table": (2, 2, 20, 37, 16, torch.float16, torch.float32),
    "fp16-w16-h4-unpadded-16x16-fp16table": (2, 4, 16, 16, 16, torch.float16, torch.float16),
    "fp16-w32-h1-pad>size-9x33": (2, 1, 9, 33, 32, torch.float16, torch.float32),
    "bf16-w16-h3-padded-17x18": (2, 3, 17, 18, 16, torch.bfloat16, torch.float32),
}


@needs_kernel
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_reference(case: str) -> None:
    batch, heads, height, width, window, dtype, table_dtype = KERNEL_CASES[case]
    qkv, table = _inputs(batch, heads, height, width, window, dtype, table_dtype, seed=len(case))
    out = window_attention_triton(qkv, table, window, heads, **_blocks(window))
    _assert_close(out, window_attention_reference(qkv, table, window, heads), dtype)


@needs_kernel
def test_kernel_default_blocks() -> None:
    qkv, table = _inputs(1, 1, 16, 16, 16, torch.float32, torch.float32, seed=1)
    out = window_attention_triton(qkv, table, 16, 1)
    _assert_close(out, window_attention_reference(qkv, table, 16, 1), torch.float32)


@needs_kernel
def test_kernel_accepts_non_contiguous_inputs() -> None:
    qkv, table = _inputs(1, 2, 10, 20, 16, torch.float32, torch.float32, seed=2)
    expected = window_attention_reference(qkv, table, 16, 2)
    channels_last = qkv.contiguous(memory_format=torch.channels_last)
    out = window_attention_triton(channels_last, table.t().contiguous().t(), 16, 2, **_blocks(16))
    _assert_close(out, expected, torch.float32)


@needs_kernel
def test_model_fused_backend_matches_naive_backend() -> None:
    """The model's ``fused`` back-end reaches this kernel through the op and agrees."""
    from models.attention.backends import FusedBackend, NaiveBackend
    from models.attention.module import WindowAttention

    attn = WindowAttention(dim=32, window=16, heads=2)
    torch.nn.init.normal_(attn.relative_position_bias)
    attn = attn.to(DEVICE)
    qkv = torch.randn(1, 96, 12, 16, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with torch.no_grad():
        _assert_close(FusedBackend()(qkv, attn), NaiveBackend()(qkv, attn), torch.float32)


@pytest.mark.parametrize(
    ("shape", "table_shape", "window", "heads", "dtype", "kwargs", "message"),
    [
        ((1, 96, 8, 8), (1, 31 * 31), 16, 1, torch.float32, {}, "expected 3 \\* 16 \\* heads = 48"),
        ((1, 48, 8, 8), (1, 23 * 23), 12, 1, torch.float32, {}, "multiple of 16"),
        ((1, 48, 8, 8), (1, 63 * 63), 16, 1, torch.float32, {}, "table must be"),
        ((48, 8, 8), (1, 31 * 31), 16, 1, torch.float32, {}, "qkv must be"),
        ((1, 48, 8, 8), (1, 31 * 31), 16, 1, torch.float64, {}, "dtype must be one of"),
        ((1, 48, 8, 8), (1, 31 * 31), 16, 1, torch.float32, {"block_m": 48}, "block_m must be"),
        ((1, 48, 8, 8), (1, 31 * 31), 16, 1, torch.float32, {"block_n": 512}, "block_n must be"),
        ((1, 48, 0, 8), (1, 31 * 31), 16, 1, torch.float32, {}, "spatial size"),
    ],
)
def test_kernel_rejects_bad_arguments(
    shape: tuple[int, ...],
    table_shape: tuple[int, int],
    window: int,
    heads: int,
    dtype: torch.dtype,
    kwargs: dict[str, int],
    message: str,
) -> None:
    qkv = torch.zeros(shape, dtype=dtype, device=DEVICE)
    table = torch.zeros(table_shape, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        window_attention_triton(qkv, table, window, heads, **kwargs)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: full-size check of the compiled kernel (the CPU interpreter is too slow at this size)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("height", [180, 192], ids=["LR-180x320-padded", "192x320-unpadded"])
def test_full_size_on_gpu(height: int, dtype: torch.dtype) -> None:
    """ESC x4 HD shape: LR 180x320 (padded to 192x320), C=64, 4 heads, w=32, in each precision."""
    qkv, table = _inputs(1, 4, height, 320, 32, dtype, torch.float32, seed=3)
    out = window_attention_triton(qkv, table, 32, 4)
    _assert_close(out, window_attention_reference(qkv, table, 32, 4), dtype)


@pytest.mark.skipif(KERNEL_RUNNABLE, reason="the kernel runs in this process, so no fresh process is needed")
def test_kernel_suite_in_fresh_process() -> None:
    env = dict(os.environ)
    if DEVICE.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", __file__, "-k", "not fresh_process"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # Exit 0 alone would also be "everything skipped": each kernel test must have passed there.
    passed = set(re.findall(r"::(\S+) PASSED", result.stdout))
    kernel_tests = {f"test_kernel_matches_reference[{case}]" for case in KERNEL_CASES} | {
        "test_kernel_default_blocks", "test_kernel_accepts_non_contiguous_inputs",
        "test_model_fused_backend_matches_naive_backend"}
    assert kernel_tests <= passed, f"not run (or not passed) in the fresh process: {sorted(kernel_tests - passed)}"


# ---------------------------------------------------------------- custom op --


def test_op_routes_cpu_by_triton_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []

    def spy(qkv: torch.Tensor, table: torch.Tensor, window: int, heads: int) -> torch.Tensor:
        calls.append(qkv.device)
        return window_attention_reference(qkv, table, window, heads)

    monkeypatch.setattr(kernel_module, "window_attention_triton", spy)
    qkv = torch.randn(1, 48, 4, 4)
    table = torch.randn(1, 31 * 31)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused_window_attention(qkv, table, 16, 1)
    assert calls == [qkv.device]
    monkeypatch.delenv("TRITON_INTERPRET")
    fused_window_attention(qkv, table, 16, 1)
    assert calls == [qkv.device], "without TRITON_INTERPRET, CPU tensors must use the reference"


def test_op_passes_opcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # registration check, not numerics: CPU -> reference
    qkv, table = _inputs(1, 2, 10, 20, 16, torch.float32, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.esc.window_attention.default, (qkv, table, 16, 2))


def test_fake_kernel_shape_dtype_and_validation() -> None:
    qkv = torch.empty(2, 3 * 16 * 3, 20, 37, dtype=torch.float16, device="meta")
    table = torch.empty(3, 31 * 31, device="meta")
    out = fused_window_attention(qkv, table, 16, 3)
    assert out.shape == (2, 48, 20, 37) and out.dtype == torch.float16 and out.device.type == "meta"
    with pytest.raises(ValueError, match="table must be"):
        fused_window_attention(qkv, table[:2], 16, 3)


class _WindowAttention(torch.nn.Module):
    """Minimal ESC-like block: 1x1 ``to_qkv`` conv followed by the fused op."""

    def __init__(self, dim: int = 16, heads: int = 2, window: int = 16) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.to_qkv = torch.nn.Conv2d(dim, 3 * 16 * heads, 1)
        self.table = torch.nn.Parameter(torch.randn(heads, (2 * window - 1) ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_window_attention(self.to_qkv(x), self.table, self.window, self.heads)


def _call_targets(graph: torch.fx.Graph) -> list[str]:
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


def test_export_keeps_one_esc_node_with_dynamic_spatial_dims(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # graph capture check: CPU -> reference
    model = _WindowAttention().eval()
    x = torch.randn(1, 16, 20, 37)
    dims = {"x": {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}}
    exported = torch.export.export(model, (x,), dynamic_shapes=dims)
    assert _call_targets(exported.graph) == ["aten.conv2d.default", "esc.window_attention.default"]
    other = torch.randn(1, 16, 9, 50)
    torch.testing.assert_close(exported.module()(other), model(other))


def test_compile_sees_one_esc_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # graph capture check: CPU -> reference
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(
        lambda q, t: fused_window_attention(q, t, 16, 2), backend=recording_backend, fullgraph=True
    )
    qkv, table = _inputs(1, 2, 10, 20, 16, torch.float32, torch.float32, seed=5)
    torch.testing.assert_close(compiled(qkv, table), window_attention_reference(qkv, table, 16, 2))
    assert [target for gm in graphs for target in _call_targets(gm.graph)] == ["esc.window_attention"]
