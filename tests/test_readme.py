"""The README cannot drift from the code: its Python snippets run, its commands parse.

* Every ```python block runs, in order, in a scratch folder that holds what the snippets
  name: ``ESC_DIV2K_X4.pth`` (random weights) and, in a private cache, the official
  ``ESC_light_X4`` asset (random weights too), so no network is needed.
* Every command line of a ```bash block (``python export/to_onnx.py``, ``python -m
  runtimes.upscale``, ``esc-deploy parity``, ...) is parsed by that command's own argument
  parser: a renamed or removed flag, or a value the parser rejects, fails here without
  running the (slow, GPU or network) job. ``pip`` and ``pytest`` lines are the install and
  test steps themselves and are only counted.
* Every command's ``--help`` prints examples.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

#: How the README starts each command -> the module whose ``build_parser``/``main`` it runs.
PROGRAMS = {
    "python export/to_onnx.py": "export.to_onnx",
    "python export/to_trt.py": "export.to_trt",
    "python export/to_coreml.py": "export.to_coreml",
    "python -m runtimes.upscale": "runtimes.upscale",
    "python validation/parity.py": "validation.parity",
    "python validation/bicubic_baseline.py": "validation.bicubic_baseline",
    "python benchmarks/run.py": "benchmarks.run",
    "python -m apps.quickstart": "apps.quickstart",
    "python export/to_triton.py": "export.to_triton",
    "python -m runtimes.serve": "runtimes.serve",
    "python -m runtimes.serve_client": "runtimes.serve_client",
    "python -m models.params": "models.params",
    "python -m benchmarks.table": "benchmarks.table",
    "python -m benchmarks.serve_bench": "benchmarks.serve_bench",
    "python benchmarks/gpu_evidence.py": "benchmarks.gpu_evidence",
    "python benchmarks/profile_eager.py": "benchmarks.profile_eager",
    "python benchmarks/upscale_memory.py": "benchmarks.upscale_memory",
    "python benchmarks/mac_evidence.py": "benchmarks.mac_evidence",
}


def _console_commands() -> dict[str, tuple[str, str]]:
    from apps.cli import COMMANDS

    return COMMANDS


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _commands() -> list[list[str]]:
    """Each bash line (continuations joined, comments dropped) as argv words."""
    lines = []
    for block in _blocks("bash") + _blocks(""):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            if not line.startswith(("python ", "esc-deploy", "pip ")):
                continue  # output shown in a plain block (the parameter table)
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    lines.append(words)
    return lines


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) for a README command line; None for pip / pytest lines."""
    if words[0] == "esc-deploy":
        from apps.cli import COMMANDS

        if len(words) == 1 or words[1].startswith("-"):
            return "apps.cli", words[1:]
        return COMMANDS[words[1]][0], words[2:]
    for prefix, module in PROGRAMS.items():
        n = len(prefix.split())
        if words[:n] == prefix.split():
            return module, words[n:]
    if words[0] == "pip" or words[:3] == ["python", "-m", "pytest"]:
        return None
    raise AssertionError(f"README command with no known program (add it to PROGRAMS): {' '.join(words)}")


def test_readme_keeps_two_commands() -> None:
    two = [b for b in _blocks("bash") if "pip install" in b or "pytest" in b]
    assert two[:2] == ['pip install torch==2.13.0 && pip install -e ".[all,test]" && esc-deploy quickstart\n',
                       "python -m pytest -q\n"]


@pytest.mark.parametrize("words", _commands(), ids=lambda w: " ".join(w)[:70])
def test_readme_command_parses(words: list[str]) -> None:
    found = _program(words)
    if found is None:
        return
    module_name, args = found
    module = importlib.import_module(module_name)
    if "--help" in args or not args and module_name == "apps.cli":
        _help_text(module_name)
        return
    parser: argparse.ArgumentParser = module.build_parser()
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{module_name} rejects the README's arguments {args}") from exc


def _help_text(module_name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        importlib.import_module(module_name).main(["--help"])
    assert info.value.code == 0
    return out.getvalue()


#: --help texts still without an example, with who adds it (strict: the fix turns into a failure here).
HELP_WITHOUT_EXAMPLE: dict[str, str] = {}


@pytest.mark.parametrize("module_name", [
    pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason=HELP_WITHOUT_EXAMPLE[name])]
                 if name in HELP_WITHOUT_EXAMPLE else [])
    for name in sorted({*PROGRAMS.values(), "apps.cli", *(module for module, _ in _console_commands().values())})
])
def test_every_help_teaches_with_an_example(module_name: str) -> None:
    text = _help_text(module_name)
    assert re.search(r"^\s*(python|esc-deploy) \S+.* --?\w", text, flags=re.M), \
        f"{module_name} --help shows no example command"


def test_console_command_delegates_with_exit_status() -> None:
    """``esc-deploy`` runs without installation too (``python -m apps.cli``); a usage error exits 2."""
    run = [sys.executable, "-m", "apps.cli"]
    result = subprocess.run([*run, "upscale", "in.png", "out.png"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--artifact" in result.stderr and "Traceback" not in result.stderr
    from apps.cli import main

    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2


def test_readme_python_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models import create_model

    cache = tmp_path / "cache"
    cache.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        for name, variant, target in (("ESC_DIV2K_X4", "esc", tmp_path), ("ESC_light_X4", "esc_light", cache)):
            torch.save({"params_ema": create_model(variant, 4).state_dict()}, target / f"{name}.pth")
    monkeypatch.setenv("ESC_CACHE_DIR", str(cache))
    monkeypatch.setenv("ESC_WEIGHTS_URL", "http://127.0.0.1:9/offline")  # a download would fail fast
    monkeypatch.chdir(tmp_path)
    snippets = _blocks("python")
    assert len(snippets) >= 2, "the README's Models and runtimes.load snippets"
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for snippet in snippets:
            exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
