"""Core ML packages without Core ML: read an ML program and execute it with numpy.

- :mod:`.reader`: the package (spec protobuf, weight blobs) as a :class:`MILProgram`;
- :mod:`.registry`: the kernel table and the :class:`Call` view of one op's inputs;
- :mod:`.kernels`, :mod:`.shape_kernels`, :mod:`.constexpr`: one numpy kernel per op the
  exported ESC packages use;
- :mod:`.fp16_kernels`: fp16 arithmetic and fp16 accumulation inside ops (the ``"ane"`` mode);
- :mod:`.interpreter`: runs a program op by op, in fp32, fp16 between ops, or fp16 inside ops;
- :mod:`.fp16_parity`: a package's fp16 parity against PyTorch fp32, both fp16 modes side by side;
- :mod:`.tools`: coremltools, imported quietly.

:class:`runtimes.coreml_runner.CoreMLRunner` puts this behind the Runner interface.
"""
from .interpreter import PRECISIONS, Interpreter
from .reader import InterpreterError, MILProgram, UnsupportedOpError, load_program

__all__ = ["PRECISIONS", "Interpreter", "InterpreterError", "MILProgram", "UnsupportedOpError", "load_program"]
