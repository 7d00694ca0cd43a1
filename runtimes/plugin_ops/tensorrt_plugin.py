"""TensorRT Python plugin ``esc::window_attention``: the fused Triton kernel inside an engine.

TensorRT >= 10.9 ``tensorrt.plugin`` ("quickly deployable plugins"). :func:`register_plugin`
(which imports TensorRT; importing this module does not) registers:

* ``@trtp.register("esc::window_attention")``: inputs ``qkv`` ``(B, 3*heads*16, H, W)`` and
  ``table`` ``(heads, (2w-1)^2)``, attributes ``window`` and ``heads``; output
  ``(B, heads*16, H, W)`` as shape expressions of the input dims, dtype = ``qkv``'s;
* ``@trtp.impl`` (JIT): a Python callback at run time that wraps TensorRT's buffers as
  torch CUDA tensors (``__cuda_array_interface__``) and calls
  :func:`models.kernels.window_attention_triton.window_attention_triton` on TensorRT's
  stream;
* ``@trtp.aot_impl`` (AOT): compiles the kernel for the tensor dtypes with
  ``triton.compile(ASTSource(...))`` to PTX and returns ``(kernel name, PTX,
  KernelLaunchParams, SymIntExprs)``: grid ``(w^2 / BLOCK_M, ceil(H/w) * ceil(W/w), B *
  heads)`` and the scalar arguments as symbolic expressions of the input shape, so the
  engine holds the kernel and runs without Python (``trtexec --loadEngine`` included).

Attributes are declared ``numpy.typing.NDArray[np.int32]`` (:data:`IntAttribute`), not
``int``: TensorRT's ONNX parser hands an INT attribute to the creator as a one-element INT32
field, and ``tensorrt.plugin`` 10.x turns an ``int``-annotated field into ``int(array)``,
which NumPy 2 refuses ("only 0-dimensional arrays can be converted to Python scalars"; 11.x
indexes the element first). An ``NDArray[np.int32]`` field is ``array.astype(np.int32)`` in
every version; :func:`attribute_int` reads the value back.

The ONNX parser binds a plugin node to this plugin when its ``op_type`` is the plugin name
(``window_attention``) and its ``plugin_namespace`` attribute the namespace (``esc``); the
node's ``aot`` attribute selects the AOT implementation (see :mod:`runtimes.plugin_ops.contract`).
Some parsers pass the node's *name* to ``create_plugin``; the registered creator
(:func:`_name_tolerant_creator_class`) creates the plugin under its own name either way.

AOT calling convention. TensorRT launches the PTX entry with the input pointers, then the
``SymIntExprs`` scalars (int32), then the output pointers: 8 arguments here
(:data:`AOT_PARAMS`). The shared kernel (``_window_attention_fwd``: ``qkv, table, out,
height, width, ...`` with two float scalars) does not have that order and TensorRT's extra
arguments are integers only, so a thin entry kernel, :func:`esc_window_attention`, takes
``(qkv, table, height, width, row_period, col_period, n_win_cols, out)`` and calls the
shared kernel with ``heads`` and the two scales as compile-time constants (the attributes
are not serialised into AOT engines; the kernel carries them). Triton appends two pointer
parameters (global and profile scratch) to every kernel's PTX entry, which TensorRT does not
pass: a launch would read two kernel-parameter slots past the 8 it provides. So
:func:`compile_kernel` refuses a compilation that needs scratch memory, and :func:`aot_ptx`
removes the two unused declarations (after checking the PTX never reads them), giving an
entry with exactly TensorRT's 8 parameters. Shared memory is kept within the 48 KiB a launch
may use without an opt-in (fewer pipeline stages if needed).

The PTX target and PTX-version cap come from one place, :func:`aot_options` (flags,
``ESC_TRT_PTX_TARGET``/``ESC_TRT_PTX_VERSION``, this GPU, the driver's PTX version), for the
registration the build uses and for ``to_trt --dry-run`` alike, so the dry run reports the
kernel the build embeds. ``tensorrt.plugin`` registers a plugin once per process, so the
decorators are registered on the first :func:`register_plugin` call and every call sets the
options the AOT implementation compiles with (a second build with another ``--ptx-target``
embeds that target's PTX). A registration that fails is remembered and raised again
(:class:`PluginRegistrationError`, chained to the cause) on every later call. Triton older
than :data:`models.kernels.triton_support.MIN_TRITON` is refused with a message
(:data:`TRITON_PROBLEM`), not an ``AttributeError``.

:func:`compile_ptx` runs without a GPU (``GPUTarget("cuda", 90, 32)`` by default), which
is how the tests check the AOT kernel on CPU-only machines. Triton must not be in
interpreter mode in that process (``TRITON_INTERPRET=1`` turns ``@triton.jit`` into an
interpreter that cannot emit PTX).

This module deliberately has no ``from __future__ import annotations``: ``tensorrt.plugin``
reads the registered functions' annotations as objects.
"""
import math
import os
import re
import threading
from typing import Any, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from models.kernels.reference import HEAD_DIM
from models.kernels.triton_support import MIN_TRITON, triton_too_old_message

from .contract import PLUGIN_ATTRIBUTES, PLUGIN_ID, PLUGIN_NAME, PLUGIN_NAMESPACE

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64
DEFAULT_NUM_WARPS = 4
DEFAULT_TARGET = "cuda:90"
MAX_LAUNCH_SHARED = 48 * 1024       # bytes of shared memory a launch gets without an opt-in
MIN_TRT_VERSION = (10, 9)           # tensorrt.plugin with aot_impl and ONNX "aot" attribute
ENTRY_NAME = "esc_window_attention"  # the PTX entry (the kernel name TensorRT launches)
AOT_PARAMS = 8                      # what TensorRT passes: qkv, table, 5 int32 scalars, out
#: How the plugin declares ``window``/``heads`` (see the module docstring: not ``int``).
IntAttribute = npt.NDArray[np.int32]
_LOG2E = math.log2(math.e)
_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16", "float16": "fp16",
                "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}

try:  # Triton is needed for compiling/launching, not for importing this module
    import triton
    import triton.language as tl
except ImportError as _exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_PROBLEM: Optional[str] = (f"Triton is not installed ({_exc}): pip install 'triton>={'.'.join(map(str, MIN_TRITON))}' "
                                     f"(CUDA builds of torch ship it)")
else:
    TRITON_PROBLEM = triton_too_old_message(triton.__version__)


class TensorRTUnavailableError(ImportError):
    """TensorRT (with ``tensorrt.plugin``) cannot be imported; the message says how to install it."""


def tensorrt_install_hint() -> str:
    """What to install for the TensorRT path (printed by ``export/to_trt.py``)."""
    return ("TensorRT >= 10.9 with its Python bindings (tensorrt.plugin) is needed: "
            "pip install tensorrt-cu12 (or tensorrt-cu13 for CUDA 13) on a machine that reaches NVIDIA's "
            "package index (the PyPI packages download from pypi.nvidia.com), or use an NGC TensorRT "
            "container; it needs an NVIDIA GPU with a recent driver (CUDA 12.x: driver >= 525)")


def import_tensorrt() -> Tuple[Any, Any]:
    """``(tensorrt, tensorrt.plugin)`` or :class:`TensorRTUnavailableError` with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailableError(f"TensorRT is not installed ({exc}). {tensorrt_install_hint()}") from exc
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise TensorRTUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no tensorrt.plugin module ({exc}). "
            f"{tensorrt_install_hint()}") from exc
    return trt, trtp


def tensorrt_version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


# -- the AOT entry kernel ------------------------------------------------------------------------------
if TRITON_PROBLEM is None:
    from models.kernels.window_attention_triton import _window_attention_fwd

    @triton.jit
    def esc_window_attention(
        qkv_ptr,
        table_ptr,
        height,
        width,
        row_period,
        col_period,
        n_win_cols,
        out_ptr,
        HEADS: tl.constexpr,
        WINDOW: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        QK_SCALE: tl.constexpr,
        BIAS_SCALE: tl.constexpr,
    ):
        """TensorRT AOT entry: inputs, int32 scalars, output; see the module docstring."""
        _window_attention_fwd(
            qkv_ptr, table_ptr, out_ptr, height, width, row_period, col_period, n_win_cols, HEADS,
            QK_SCALE, BIAS_SCALE, WINDOW=WINDOW, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            DOT_DTYPE=DOT_DTYPE)
else:  # pragma: no cover
    esc_window_attention = None


def dtype_name(dtype: Any) -> str:
    """``fp32``/``fp16``/``bf16`` for a string, a torch dtype or a ``tensorrt.DataType``."""
    text = str(dtype).lower().replace("torch.", "").replace("datatype.", "")
    text = {"float": "fp32", "half": "fp16", "bf16": "bf16"}.get(text, text)
    if text not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype!r} for the window-attention kernel: use fp32, fp16 or bf16")
    return _DTYPE_NAMES[text]


def parse_target(target: Any = DEFAULT_TARGET) -> Any:
    """``"cuda:90"``, ``"sm_90"``, ``"sm90a"``, ``90`` or a ``GPUTarget`` -> ``GPUTarget("cuda", 90, 32)``."""
    from triton.backends.compiler import GPUTarget

    if isinstance(target, GPUTarget):
        return target
    if isinstance(target, tuple) and len(target) == 2:
        return GPUTarget("cuda", int(target[0]) * 10 + int(target[1]), 32)
    match = re.fullmatch(r"(?:cuda:|sm_?)?(\d{2,3})a?", str(target).strip().lower())
    if not match:
        raise ValueError(f"PTX target must look like cuda:90 or sm_90, got {target!r}")
    return GPUTarget("cuda", int(match.group(1)), 32)


def device_target(device: Any = None) -> str:
    """``cuda:<major><minor>`` of the current (or given) CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda:{major}{minor}"


def driver_ptx_version() -> Optional[int]:
    """Highest PTX ISA version (e.g. 84 for 8.4) the installed CUDA driver can JIT, or None.

    Triton writes PTX for the ptxas it ships (PTX 9.x for Triton 3.9), which an older
    driver refuses (``CUDA_ERROR_UNSUPPORTED_PTX_VERSION``) when TensorRT loads the AOT
    kernel; :func:`register_plugin` therefore caps the PTX version at the driver's.
    """
    try:
        import ctypes

        from triton.backends.nvidia.compiler import ptx_get_version

        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
        return int(ptx_get_version(f"{version.value // 1000}.{(version.value % 1000) // 10}"))
    except Exception:
        return None


def _triton_ptx_version(arch: int) -> Optional[int]:
    """The PTX version Triton writes by default for ``arch`` (its ptxas's), or None."""
    try:
        from types import SimpleNamespace

        from triton.backends.nvidia.compiler import get_ptx_version_from_options

        return int(get_ptx_version_from_options(SimpleNamespace(ptx_version=None), arch))
    except Exception:
        return None


def _check_blocks(window: int, block_m: int, block_n: int) -> None:
    if window % 16:
        raise ValueError(f"window must be a multiple of 16 for the Triton kernel, got {window}")
    tokens = window * window
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1) or tokens % block:
            raise ValueError(f"{name} must be a power of two >= 16 dividing window**2 = {tokens}, got {block}")


def kernel_signature(dtype: Any, table_dtype: Any = None) -> dict:
    """The entry kernel's Triton signature for ``qkv``/``out`` in ``dtype`` (table: ``table_dtype``)."""
    qkv = dtype_name(dtype)
    table = dtype_name(table_dtype if table_dtype is not None else dtype)
    signature = {"qkv_ptr": f"*{qkv}", "table_ptr": f"*{table}"}
    signature.update({name: "i32" for name in ("height", "width", "row_period", "col_period", "n_win_cols")})
    signature["out_ptr"] = f"*{qkv}"
    return signature


def _interpreter_active() -> bool:
    if esc_window_attention is None:
        return False
    return not isinstance(esc_window_attention, triton.runtime.jit.JITFunction)


def compile_kernel(dtype: Any, window: int, heads: int, block_m: int = DEFAULT_BLOCK_M,
                   block_n: int = DEFAULT_BLOCK_N, target: Any = DEFAULT_TARGET, *, table_dtype: Any = None,
                   num_warps: int = DEFAULT_NUM_WARPS, max_shared: int = MAX_LAUNCH_SHARED,
                   ptx_version: Optional[int] = None) -> Any:
    """Compile the AOT entry kernel for ``target`` (no GPU needed); a Triton ``CompiledKernel``.

    The default pipelining is tried first, then fewer stages until the kernel fits in
    ``max_shared`` bytes of shared memory. ``ptx_version`` (e.g. 84 for PTX ISA 8.4)
    caps the PTX version for older drivers (default: Triton's). Raises ``RuntimeError``
    when Triton is missing, in interpreter mode, or the kernel would need Triton scratch
    memory.
    """
    if TRITON_PROBLEM is not None:
        raise RuntimeError(TRITON_PROBLEM)
    if _interpreter_active():
        raise RuntimeError(
            "Triton is in interpreter mode in this process (TRITON_INTERPRET=1 was set when triton was first "
            "imported), which cannot emit PTX: compile in a process without TRITON_INTERPRET")
    _check_blocks(window, block_m, block_n)
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    from triton.compiler import ASTSource

    name = dtype_name(dtype)
    dot_dtype = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[name]
    constexprs = {"HEADS": int(heads), "WINDOW": int(window), "HEAD_DIM": HEAD_DIM, "BLOCK_M": int(block_m),
                  "BLOCK_N": int(block_n), "DOT_DTYPE": dot_dtype, "QK_SCALE": HEAD_DIM ** -0.5 * _LOG2E,
                  "BIAS_SCALE": _LOG2E}
    signature = kernel_signature(name, table_dtype)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    gpu = parse_target(target)
    kernel = None
    for stages in (None, 2, 1):
        # FP fusion as Triton 3.9's default (said explicitly: 3.10 changes the default).
        options = {"num_warps": num_warps, "enable_fp_fusion": True}
        if ptx_version is not None:
            own = _triton_ptx_version(gpu.arch)
            options["ptx_version"] = int(ptx_version) if own is None else min(int(ptx_version), own)
        if stages is not None:
            options["num_stages"] = stages
        kernel = triton.compile(ASTSource(fn=esc_window_attention, signature=signature, constexprs=constexprs),
                                target=gpu, options=options)
        if kernel.metadata.shared <= max_shared:
            break
    metadata = kernel.metadata
    if metadata.shared > max_shared:
        raise RuntimeError(f"the kernel needs {metadata.shared} bytes of shared memory (> {max_shared}) even with "
                           f"one pipeline stage: use smaller block_m/block_n")
    if getattr(metadata, "global_scratch_size", 0) or getattr(metadata, "profile_scratch_size", 0):
        raise RuntimeError("the compiled kernel needs Triton scratch memory, which TensorRT's AOT launch does not "
                           "provide")
    return kernel


def compile_ptx(dtype: Any, window: int, heads: int, block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
                target: Any = DEFAULT_TARGET, ptx_version: Optional[int] = None) -> str:
    """The PTX TensorRT embeds for ``dtype`` (fp32/fp16/bf16): :func:`aot_ptx`, no GPU needed."""
    return aot_ptx(compile_kernel(dtype, window, heads, block_m, block_n, target, ptx_version=ptx_version))


def aot_ptx(kernel: Any) -> str:
    """``kernel``'s PTX with an entry that takes exactly TensorRT's :data:`AOT_PARAMS` arguments.

    Triton declares two scratch pointers after the kernel's own parameters; TensorRT
    passes only the inputs, the extra scalars and the outputs. The declarations are
    dropped only if the PTX never reads them (:func:`compile_kernel` already refused any
    kernel that needs scratch memory), so the entry TensorRT launches reads exactly the
    arguments it is given.
    """
    return entry_with_params(kernel.asm["ptx"], kernel.metadata.name, AOT_PARAMS)


def entry_with_params(ptx: str, entry: str, count: int) -> str:
    """``ptx`` whose ``.entry entry(...)`` keeps its first ``count`` parameters; the rest must be unused."""
    match = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise RuntimeError(f"the PTX has no .entry {entry}")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    if len(params) < count:
        raise RuntimeError(f".entry {entry} has {len(params)} parameters, fewer than the {count} TensorRT passes")
    body = ptx[match.end():]
    for declaration in params[count:]:
        name = declaration.split()[-1]
        if re.search(r"\b" + re.escape(name) + r"\b", body):
            raise RuntimeError(f".entry {entry} reads its parameter {name}, which TensorRT's AOT launch does not "
                               f"pass: the kernel cannot run as a TensorRT AOT plugin")
    kept = ",\n".join(f"\t{p}" for p in params[:count])
    return ptx[:match.start(1)] + f"\n{kept}\n" + ptx[match.end(1):]


def attribute_int(value: Any) -> int:
    """The int a plugin attribute holds: ``tensorrt.plugin`` hands a one-element integer array over."""
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"a {PLUGIN_ID} attribute must be one integer, got {value!r}")
    return int(array.reshape(-1)[0])


def launch_config(batch: Any, height: Any, width: Any, window: int, heads: int, block_m: int = DEFAULT_BLOCK_M,
                  cdiv: Any = None, smax: Any = None) -> Tuple[Tuple[Any, Any, Any], Tuple[Any, ...]]:
    """``(grid, scalars)`` of one launch, for ints or TensorRT shape expressions.

    ``grid = (w^2 / block_m, ceil(H/w) * ceil(W/w), B * heads)``; ``scalars = (H, W,
    max(2(H-1), 1), max(2(W-1), 1), ceil(W/w))`` in the entry kernel's order. With
    ``tensorrt.plugin`` expressions pass ``cdiv=trtp.cdiv`` and ``smax=trtp.max``.
    """
    cdiv = cdiv or (lambda a, b: -(-a // b))
    smax = smax or max
    n_win_rows, n_win_cols = cdiv(height, window), cdiv(width, window)
    grid = ((window * window) // block_m, n_win_rows * n_win_cols, batch * heads)
    scalars = (height, width, smax((height - 1) * 2, 1), smax((width - 1) * 2, 1), n_win_cols)
    return grid, scalars


# -- torch views of TensorRT buffers (JIT implementation) ------------------------------------------------
class _CudaArray:
    def __init__(self, interface: dict) -> None:
        self.__cuda_array_interface__ = interface


def tensor_to_torch(tensor: Any) -> Any:
    """A torch CUDA tensor sharing a ``tensorrt.plugin.Tensor``'s buffer (no copy).

    ``__cuda_array_interface__`` has no bfloat16 type, so bf16 buffers are viewed as int16
    and reinterpreted.
    """
    import torch

    if dtype_name_of_trt(tensor.dtype) == "bf16":
        interface = {"shape": tuple(tensor.shape), "typestr": "<i2", "data": (tensor.data_ptr, False),
                     "strides": tuple(int(s) * 2 for s in tensor.strides), "version": 3, "stream": None}
        return torch.as_tensor(_CudaArray(interface), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(tensor, device="cuda")


def dtype_name_of_trt(dtype: Any) -> str:
    """``fp32``/``fp16``/``bf16`` for a ``tensorrt.DataType`` (FLOAT, HALF, BF16)."""
    text = str(dtype).rsplit(".", 1)[-1].upper()
    names = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
    if text not in names:
        raise ValueError(f"the window-attention plugin supports FLOAT, HALF and BF16 tensors, got {dtype}")
    return names[text]


# -- registration -------------------------------------------------------------------------------------
_LOCK = threading.Lock()
#: What is registered, and the AOT options the AOT implementation compiles with (set by every call).
_STATE: dict = {"registered": False, "aot": False, "error": None, "target": None, "ptx_version": None,
                "block_m": DEFAULT_BLOCK_M, "block_n": DEFAULT_BLOCK_N, "num_warps": DEFAULT_NUM_WARPS}


_CREATORS: list = []


class PluginRegistrationError(RuntimeError):
    """Registering the plugin failed; ``__cause__`` is the original error.

    Raised again on every later :func:`register_plugin` call of the process (with the
    same cause), so a second runner or build names the real problem instead of failing
    later as an engine that "was built for another TensorRT version or GPU".
    """


def plugin_registered() -> bool:
    return bool(_STATE["registered"])


def aot_options(target: Optional[str] = None, ptx_version: Optional[int] = None) -> Tuple[str, Optional[int]]:
    """``(PTX target, PTX ISA cap)`` the AOT kernel is compiled with: the build's and the dry run's.

    ``target``: given, else ``ESC_TRT_PTX_TARGET``, else the current CUDA device, else
    ``cuda:90``. ``ptx_version``: given, else ``ESC_TRT_PTX_VERSION``, else what the
    installed driver accepts (:func:`driver_ptx_version`), else None (Triton's own).
    One function for both, so a dry run reports the kernel the build embeds.
    """
    if target is None:
        target = os.environ.get("ESC_TRT_PTX_TARGET")
    if target is None:
        try:
            target = device_target()
        except Exception:  # no CUDA here (a dry run on a CPU machine): the documented default
            target = DEFAULT_TARGET
    if ptx_version is None and os.environ.get("ESC_TRT_PTX_VERSION"):
        ptx_version = int(os.environ["ESC_TRT_PTX_VERSION"])
    if ptx_version is None:
        ptx_version = driver_ptx_version()
    return str(target), ptx_version


def register_plugin(target: Optional[str] = None, block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
                    num_warps: int = DEFAULT_NUM_WARPS, ptx_version: Optional[int] = None) -> dict:
    """Register ``esc::window_attention`` with TensorRT and set the AOT options; returns the state.

    The decorators are registered once per process (``tensorrt.plugin`` refuses a second
    definition); every call sets the options the AOT implementation compiles with from
    then on: ``target``/``ptx_version`` (see :func:`aot_options`), the block sizes and
    warps. So the engine a build makes after ``register_plugin(target=...)`` embeds that
    target's PTX, whatever an earlier build asked for. Raises
    :class:`TensorRTUnavailableError` when TensorRT is missing; any other failure raises
    :class:`PluginRegistrationError` (chained to the cause), now and on every later call.
    The AOT implementation is registered when ``tensorrt.plugin`` has ``aot_impl``
    (TensorRT >= 10.9).
    """
    with _LOCK:
        if _STATE["error"] is not None:
            cause = _STATE["error"]
            raise PluginRegistrationError(f"registering the {PLUGIN_ID} TensorRT plugin failed earlier in this "
                                          f"process: {type(cause).__name__}: {cause}") from cause
        resolved = aot_options(target, ptx_version)
        if not _STATE["registered"]:
            trt, trtp = import_tensorrt()
            try:
                has_aot = _register(trt, trtp)
            except Exception as exc:
                _STATE["error"] = exc
                raise PluginRegistrationError(f"registering the {PLUGIN_ID} TensorRT plugin failed: "
                                              f"{type(exc).__name__}: {exc}") from exc
            _STATE.update(registered=True, aot=has_aot, version=getattr(trt, "__version__", "?"), plugin=PLUGIN_ID,
                          name=PLUGIN_NAME, namespace=PLUGIN_NAMESPACE)
        _STATE.update(target=resolved[0], ptx_version=resolved[1], block_m=block_m, block_n=block_n,
                      num_warps=num_warps)
        return dict(_STATE)


def _register(trt: Any, trtp: Any) -> bool:
    """The ``tensorrt.plugin`` decorators and the creator; returns whether the AOT implementation was registered."""
    creator_class = _name_tolerant_creator_class()

    @trtp.register(PLUGIN_ID, lazy_register=creator_class is not None)
    def window_attention_desc(qkv: trtp.TensorDesc, table: trtp.TensorDesc, window: IntAttribute,
                              heads: IntAttribute) -> trtp.TensorDesc:
        dims = qkv.shape_expr
        return trtp.from_shape_expr((dims[0], attribute_int(heads) * HEAD_DIM, dims[2], dims[3]), dtype=qkv.dtype)

    @trtp.impl(PLUGIN_ID)
    def window_attention_impl(qkv, table, window, heads, outputs, stream):
        import torch

        from models.kernels.window_attention_triton import window_attention_triton

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            result = window_attention_triton(tensor_to_torch(qkv), tensor_to_torch(table), attribute_int(window),
                                             attribute_int(heads), block_m=_STATE["block_m"],
                                             block_n=_STATE["block_n"])
            tensor_to_torch(outputs[0]).copy_(result)

    has_aot = hasattr(trtp, "aot_impl") and hasattr(trtp, "KernelLaunchParams")
    if has_aot:
        launch_return = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

        def window_attention_aot(qkv, table, window, heads, outputs, tactic) -> launch_return:
            options = dict(_STATE)   # the options of the build that is running (set by register_plugin)
            window, heads = attribute_int(window), attribute_int(heads)
            kernel = compile_kernel(dtype_name_of_trt(qkv.dtype), window, heads, options["block_m"],
                                    options["block_n"], options["target"], table_dtype=dtype_name_of_trt(table.dtype),
                                    num_warps=options["num_warps"], ptx_version=options["ptx_version"])
            dims = qkv.shape_expr
            grid, scalars = launch_config(dims[0], dims[2], dims[3], window, heads, options["block_m"],
                                          cdiv=trtp.cdiv, smax=trtp.max)
            params = trtp.KernelLaunchParams()
            params.grid_x, params.grid_y, params.grid_z = grid
            params.block_x = kernel.metadata.num_warps * 32
            params.shared_mem = kernel.metadata.shared
            extra = trtp.SymIntExprs(len(scalars))
            for i, value in enumerate(scalars):
                extra[i] = trtp.SymInt32(value)
            return kernel.metadata.name, aot_ptx(kernel), params, extra

        trtp.aot_impl(PLUGIN_ID)(window_attention_aot)
    if creator_class is not None:
        _register_creator(trt, creator_class)
    return has_aot


def _name_tolerant_creator_class() -> Any:
    """A ``tensorrt.plugin`` creator that creates the plugin under its registered name, or None.

    TensorRT's ONNX parser may call ``create_plugin`` with the ONNX node's *name* (10.6 does,
    10.15 passes the op type; see :mod:`runtimes.plugin_ops.contract`), and
    ``tensorrt.plugin``'s own creator then fails to find ``esc::<node name>``. This subclass
    of its creator (``tensorrt.plugin._lib._TemplatePluginCreator``, the class every
    ``trtp.register`` uses in 10.9-11.4) passes :data:`PLUGIN_NAME` instead, so the node may
    be named after its block. None where that class is missing (the plugin is then
    registered the ordinary way and needs a parser that passes the op type).
    """
    try:
        import importlib

        base = getattr(importlib.import_module("tensorrt.plugin._lib"), "_TemplatePluginCreator", None)
    except ImportError:
        return None
    if base is None:
        return None

    class NameTolerantCreator(base):
        def create_plugin(self, name, namespace, fc, phase, qpcr=None):
            if qpcr is None:   # JIT-only TensorRT (no QuickPluginCreationRequest)
                return super().create_plugin(PLUGIN_NAME, namespace, fc, phase)
            return super().create_plugin(PLUGIN_NAME, namespace, fc, phase, qpcr)

    return NameTolerantCreator


def _register_creator(trt: Any, creator_class: Any) -> None:
    """Register one :func:`_name_tolerant_creator_class` creator for the plugin's int32 attributes."""
    creator = creator_class(PLUGIN_NAME, PLUGIN_NAMESPACE, {name: (False, np.int32) for name in PLUGIN_ATTRIBUTES})
    if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"TensorRT's plugin registry refused a second creator for {PLUGIN_ID}")
    _CREATORS.append(creator)   # the registry holds a pointer: keep the Python object alive
