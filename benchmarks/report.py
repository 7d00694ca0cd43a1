"""Reporting: a benchmark's rows as results.json, results.csv, results.md and two plots.

Pure output code: it reads the row dictionaries :mod:`benchmarks.measure` produces and
never measures, so a table can be re-rendered (or merged, see :mod:`benchmarks.table`)
without re-running anything. Every file is written atomically: an interrupted run never
leaves a half-written table.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from runtimes.metadata import write_text_atomic

COLUMNS = (
    "model", "family", "runtime", "precision", "device", "scale", "input_size", "output_size",
    "params", "flops_g", "latency_median_ms", "latency_p10_ms", "latency_p90_ms", "peak_memory_mb",
    "achieved_gflops", "floor_ratio", "memory_bytes_per_input_pixel", "psnr_vs_fp32_db", "max_abs_vs_fp32",
    "parity", "weights", "recompiles_while_timed", "memory_kind", "setup_s", "export_s", "compile_s", "warmup", "repeat", "status", "reason", "runtime_version",
    "torch_version", "onnxruntime_version", "openvino_version", "threads", "timestamp",
)


#: The peer the ESC ratios are taken against (the papers' usual light transformer).
RATIO_BASELINE = "swinir_light"


def add_roofline(row: dict[str, Any], matmul_gflops: float | None) -> None:
    """Add achieved GFLOP/s, the ratio to the compute floor and memory per input pixel to an ok row.

    ``floor_ratio`` = latency / (model FLOPs at the machine's matmul rate): how many times
    slower than a model made of one big matmul would run. Missing inputs give no field
    rather than a guess.
    """
    latency, flops = row.get("latency_median_ms"), row.get("flops_g")
    if row.get("status") != "ok" or not latency:
        return
    if flops:
        row["achieved_gflops"] = _significant(flops / (latency / 1000.0))
        if matmul_gflops:
            row["floor_ratio"] = _significant(latency / (flops / matmul_gflops * 1000.0))
    size, memory = str(row.get("input_size", "")), row.get("peak_memory_mb")
    if memory is not None and "x" in size:
        w, h = (int(v) for v in size.split("x"))
        row["memory_bytes_per_input_pixel"] = _significant(memory * 2**20 / (w * h))


def _significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (tiny test sizes give figures far below 1)."""
    return float(f"{value:.{digits}g}")


def peer_ratios(rows: list[dict[str, Any]], baseline: str = RATIO_BASELINE) -> list[str]:
    """Markdown lines: each ESC model's latency and memory over ``baseline``'s, per runtime and precision."""
    ok = {(r["model"], r["runtime"], r["precision"]): r for r in rows if r.get("status") == "ok"}
    lines = []
    for (model, runtime, precision), row in ok.items():
        base = ok.get((baseline, runtime, precision))
        if row.get("family") != "esc" or base is None:
            continue
        lat = row["latency_median_ms"] / base["latency_median_ms"]
        mem = (f"{row['peak_memory_mb'] / base['peak_memory_mb']:.2f}x"
               if row.get("peak_memory_mb") and base.get("peak_memory_mb") else "-")
        lines.append(f"| {model} / {baseline} | {runtime} | {precision} | {lat:.2f}x | {mem} |")
    if not lines:
        return []
    return ["| ratio | runtime | precision | latency | memory |", "|---|---|---|---:|---:|", *lines]


def fmt_num(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return "-"
    try:
        return f"{float(value):,.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def fmt_params(n: Any) -> str:
    if not n:
        return "-"
    return f"{int(n) / 1000:,.0f}K"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    write_text_atomic(path, buf.getvalue())


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [("| model | params | FLOPs (G) | runtime | precision | latency ms | memory MB | GFLOP/s | x floor "
              "| B / input px | PSNR vs fp32 |"),
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    notes: list[str] = []
    for row in rows:
        if row.get("status") == "ok":
            lat = f"{fmt_num(row.get('latency_median_ms'))} ({fmt_num(row.get('latency_p10_ms'))}–" \
                  f"{fmt_num(row.get('latency_p90_ms'))})"
            mem = fmt_num(row.get("peak_memory_mb"))
        else:
            label = {"failed": "Failed", "OOM": "OOM", "skipped": "skipped"}.get(row.get("status"), "?")
            note = f"{row.get('status')}: {row.get('reason', '')}"
            if note not in notes:  # one footnote per distinct reason
                notes.append(note)
            lat, mem = f"{label}[^{notes.index(note) + 1}]", "-"
        quality = fmt_num(row.get("psnr_vs_fp32_db"), 1)
        if quality != "-" and row.get("parity", "pass") != "pass":
            quality += " (" + ("no threshold" if row["parity"] == "no threshold" else "fails its threshold") + ")"
        lines.append(f"| {row['model']} | {fmt_params(row.get('params'))} | {fmt_num(row.get('flops_g'))} | "
                     f"{row['runtime']} | {row['precision']} | {lat} | {mem} | {fmt_num(row.get('achieved_gflops'))} | "
                     f"{fmt_num(row.get('floor_ratio'), 2)} | {fmt_num(row.get('memory_bytes_per_input_pixel'), 0)} | "
                     f"{quality} |")
    if notes:
        lines.append("")
        lines.extend(f"[^{i}]: {text}" for i, text in enumerate(notes, 1))
    return "\n".join(lines)


def write_markdown(data: dict[str, Any], path: Path) -> None:
    info = data["machine"]
    cfg = data.get("config", {})
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    head = [
        f"# ESC benchmark: {info.get('gpu') or info['cpu']}",
        "",
        f"x{cfg.get('scale')} to {cfg.get('output_size')} (input {cfg.get('input_size')}), batch 1, device "
        f"{info['device']}, {info.get('cpu_affinity') or info['cpu_count']} cores; warmup {cfg.get('warmup')}, "
        f"repeat {cfg.get('repeat')}; latency is the median (p10–p90); memory is "
        + ("peak allocated by PyTorch." if str(info["device"]).startswith("cuda")
           else "peak RSS growth over the process after setup."),
        (f"FLOPs: torch.utils.flop_counter (a multiply-add = 2 FLOPs). Weights: {info.get('weights', '?')}. "
         f"{info['date']}."),
        "",
        f"Versions: {versions}.",
        "",
    ]
    rates = info.get("matmul_gflops")
    if rates:
        head += [(f"Compute floor: model FLOPs at this run's 2048x2048 fp32 matmul rate ({rates.get('fp32')} GFLOP/s); "
                  "`x floor` = latency / floor (every precision against the fp32 rate). PSNR vs fp32: the row's "
                  "output against the fp32 ONNX file's on a Set5 x4 picture."), ""]
    ratios = peer_ratios(data["rows"])
    tail = ["", f"ESC / {RATIO_BASELINE} (same runtime and precision):", "", *ratios] if ratios else []
    write_text_atomic(path, "\n".join(head) + "\n" + markdown_table(data["rows"]) + "\n"
                      + ("\n".join(tail) + "\n" if tail else ""))


def write_plots(rows: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("latency_median_ms") is not None]
    models = list(dict.fromkeys(r["model"] for r in ok))
    missing = [m for m in dict.fromkeys(r["model"] for r in rows) if m not in models]
    series = list(dict.fromkeys(f"{r['runtime']} {r['precision']}" for r in ok))
    written = []

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(models) * max(1, len(series)) + 2), 4.5))
    if missing:
        fig.text(0.01, 0.01, f"no successful rows (see results.md): {', '.join(missing)}", fontsize=7)
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs, ys = [], []
        for i, model in enumerate(models):
            match = [r for r in ok if r["model"] == model and f"{r['runtime']} {r['precision']}" == name]
            if match:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(match[0]["latency_median_ms"])
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models)
    ax.set_ylabel("latency, median (ms)")
    if ok and max(r["latency_median_ms"] for r in ok) / max(1e-9, min(r["latency_median_ms"] for r in ok)) > 30:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    written.append("latency.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "osD^v<>px*"
    for j, name in enumerate(series):
        pts = [r for r in ok if f"{r['runtime']} {r['precision']}" == name and r.get("params")]
        if not pts:
            continue
        ax.scatter([r["params"] / 1e3 for r in pts], [r["latency_median_ms"] for r in pts],
                   marker=markers[j % len(markers)], label=name)
        for r in pts:
            ax.annotate(r["model"], (r["params"] / 1e3, r["latency_median_ms"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("parameters (K)")
    ax.set_ylabel("latency, median (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    if ok:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_params.png", dpi=120)
    plt.close(fig)
    written.append("latency_vs_params.png")
    return written


def write_outputs(data: dict[str, Any], out: Path, plots: bool) -> None:
    write_text_atomic(out / "results.json", json.dumps(data, indent=1, default=str) + "\n")
    write_csv(data["rows"], out / "results.csv")
    write_markdown(data, out / "results.md")
    if plots:
        cfg = data["config"]
        where = data["machine"].get("gpu") or data["machine"]["cpu"]
        write_plots(data["rows"], out, f"x{cfg['scale']} to {cfg['output_size']} on {where}")
