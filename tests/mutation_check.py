"""Mutation check: each deliberate breakage of a gate must make the test that guards it fail.

    python tests/mutation_check.py                    # every mutation below (tens of minutes)
    python tests/mutation_check.py --only compare-fp32-atol,serve-width
    python tests/mutation_check.py --list

A gate that a broken change does not trip is a check that cannot fail. For every mutation
this copies the working tree (tracked and untracked, not ignored files) to a scratch folder,
applies one exact text replacement (it must occur exactly once), runs the test that is meant
to catch it, and expects pytest's "tests failed" status (1): a collection error, a skip or a
pass is a miss. Each test is first run on the unmutated copy and must pass there, so a catch
means the mutation, not a broken test. Exit status 0 only when every mutation was caught.

When you add a gate, add its mutation here with the test that proves it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str          # repository-relative
    old: str           # must occur exactly once in the file
    new: str
    test: str          # the pytest node id that must fail


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("compare-fp32-atol", "validation/compare.py", '"fp32": Threshold(atol=1e-4)',
             '"fp32": Threshold(atol=1e-3)', "tests/test_gates.py::test_export_gate_max_abs_leg[fp32]"),
    Mutation("compare-fp16-psnr-leg", "validation/compare.py",
             "    if min_psnr is not None and result.psnr < min_psnr:",
             "    if False and min_psnr is not None and result.psnr < min_psnr:",
             "tests/test_gates.py::test_export_gate_psnr_leg"),
    Mutation("compare-fp16-atol", "validation/compare.py", '"fp16": Threshold(atol=2e-2, min_psnr=50.0)',
             '"fp16": Threshold(atol=3e-2, min_psnr=50.0)', "tests/test_gates.py::test_export_gate_max_abs_leg[fp16]"),
    Mutation("trt-gate-threshold", "export/to_trt.py",
             "parity = verify_artifact(engine, reference, images, precision,",
             'parity = verify_artifact(engine, reference, images, "bf16",',
             "tests/test_gates.py::test_trt_parity_gate_max_abs_leg"),
    # TensorRT plugin (issue 21): the real tensorrt.plugin sources of 10.13 / 11.4 catch these.
    Mutation("plugin-launch-int-first", "runtimes/plugin_ops/tensorrt_plugin.py", "smax((height - 1) * 2, 1)",
             "smax(2 * (height - 1), 1)",
             "tests/test_trt_real_plugin.py::test_builder_calls_and_launch_match_the_triton_launcher[11.4-fp16]"),
    Mutation("plugin-int-attributes", "runtimes/plugin_ops/tensorrt_plugin.py",
             "window: IntAttribute,\n                              heads: IntAttribute) ->",
             "window: int,\n                              heads: int) ->",
             "tests/test_trt_real_plugin.py::test_creator_takes_the_fields_the_onnx_parser_passes[10.13]"),
    Mutation("plugin-node-name", "runtimes/plugin_ops/tensorrt_plugin.py",
             "return super().create_plugin(PLUGIN_NAME, namespace, fc, phase, qpcr)",
             "return super().create_plugin(name, namespace, fc, phase, qpcr)",
             "tests/test_trt_real_plugin.py::test_creator_accepts_the_node_name_as_older_parsers_pass_it[11.4]"),
    Mutation("plugin-ptx-params", "runtimes/plugin_ops/tensorrt_plugin.py",
             'return kernel.metadata.name, aot_ptx(kernel), params, extra',
             'return kernel.metadata.name, kernel.asm["ptx"], params, extra',
             "tests/test_trt_real_plugin.py::test_aot_entry_takes_exactly_the_arguments_tensorrt_passes[11.4]"),
    Mutation("onnx-export-gate-threshold", "export/onnx_export.py", "    limit = threshold_for(precision)\n",
             '    limit = threshold_for("bf16")\n',
             "tests/test_onnx_attention_memory.py::test_rewrite_gate_at_the_fp32_bound[1.1x-atol]"),
    Mutation("parity-cli-threshold", "validation/parity.py", "        threshold = THRESHOLDS[runner.precision]",
             '        threshold = THRESHOLDS["bf16"]',
             "tests/test_parity.py::test_parity_verdict_at_the_fp32_bound[1.1x-atol]"),
    Mutation("serve-channels", "runtimes/serve.py", "    if c != 3:", "    if False:",
             "tests/test_serve_requests.py::test_each_field_is_checked"),
    Mutation("serve-width", "runtimes/serve.py", "    if h > max_side or w > max_side:", "    if h > max_side:",
             "tests/test_serve_requests.py::test_each_field_is_checked"),
    Mutation("serve-dtype", "runtimes/serve.py", "    if lr.dtype != np.float32:", "    if False:",
             "tests/test_serve_requests.py::test_each_field_is_checked"),
    Mutation("tiler-no-overlap", "export/triton_tiler.py",
             "rows, cols = axis_windows(h, th, overlap), axis_windows(w, tw, overlap)",
             "rows, cols = axis_windows(h, th, 0), axis_windows(w, tw, 0)",
             "tests/test_triton_repo.py::test_tiler_keeps_every_pixel_its_context"),
    Mutation("fp16-prescale-eps", "models/fp16_safety.py", "super().__init__(dim, eps=norm.eps * input_scale ** 2)",
             "super().__init__(dim, eps=norm.eps)",
             "tests/test_fp16_safety.py::test_prescaled_layernorm_scales_epsilon_where_it_matters"),
    Mutation("atomic-no-lock", "export/common.py", "    with _folder_lock(dst.parent):",
             "    with contextlib.nullcontext():",
             "tests/test_atomic_output.py::test_two_racing_exports_leave_one_complete_package[new path]"),
    Mutation("atomic-no-exchange", "export/common.py", "        elif _exchange(src, dst):", "        elif False:",
             "tests/test_atomic_output.py::test_two_racing_exports_leave_one_complete_package[replacing a package]"),
    Mutation("trt-native-marking-refusal", "export/trt_build.py", "    if not marked:", "    if False:",
             "tests/test_trt_path.py::test_native_marking_refuses_a_network_without_attention"),
    Mutation("fp16-guard-refuses-nothing", "export/calibration.py",
             "    refused = [p for p in report.problems if p.quantity not in fp32_quantities]", "    refused = []",
             "tests/test_fp16_guard.py::test_an_output_just_past_the_limit_is_refused_by_name_and_just_inside_passes"),
    Mutation("onnx-fp16-guard-skipped", "export/onnx_export.py",
             "        traced, safety = fp16_guard(reference, shape, calibration_images, progress)",
             "        traced = copy.deepcopy(reference)",
             "tests/test_fp16_guard.py::test_onnx_fp16_export_runs_the_guard_and_says_so"),
    Mutation("lint-first-function-only", "export/coreml/lint.py", "    for name in function_names(path):",
             "    for name in function_names(path)[:1]:",
             "tests/test_coreml_lint.py::test_lint_checks_every_function_of_a_multifunction_package"),
)


def working_tree_files(root: Path) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    return [p for p in listed.split("\0") if p and (root / p).is_file()]


def copy_tree(root: Path, files: list[str], dest: Path) -> None:
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def run_test(tree: Path, test: str, timeout: float) -> int:
    env = dict(os.environ)
    env.setdefault("ESC_SHARED_DIR", str(REPO.parent / "shared"))   # the copy is not beside ../shared
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1
    return done.returncode


def apply(tree: Path, mutation: Mutation) -> None:
    path = tree / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: {mutation.old!r} occurs {count} times in {mutation.file} "
                         f"(must be once): update the mutation list")
    path.write_text(text.replace(mutation.old, mutation.new))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mutation_check", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests, then exit")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per test run (default 1200)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(sorted(unknown))}; --list shows them")
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.file}  ->  {m.test}")
        return 0
    files = working_tree_files(REPO)
    rows, controls = [], {}
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        base = Path(scratch) / "base"
        copy_tree(REPO, files, base)
        for m in chosen:
            if m.test not in controls:
                controls[m.test] = run_test(base, m.test, args.timeout)
            if controls[m.test] != 0:
                rows.append((m, f"test does not pass unmutated (exit {controls[m.test]})"))
                continue
            tree = Path(scratch) / m.name
            copy_tree(REPO, files, tree)
            apply(tree, m)
            status = run_test(tree, m.test, args.timeout)
            rows.append((m, "caught" if status == 1 else f"MISSED (exit {status})"))
            shutil.rmtree(tree)
            print(f"{m.name}: {rows[-1][1]}", file=sys.stderr, flush=True)
    print("| mutation | file | test | result |\n|---|---|---|---|")
    for m, result in rows:
        print(f"| {m.name} | {m.file} | {m.test} | {result} |")
    return 0 if all(result == "caught" for _, result in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
