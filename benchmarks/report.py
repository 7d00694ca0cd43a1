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
import os
from pathlib import Path
from typing import Any

COLUMNS = (
    "model", "family", "runtime", "precision", "device", "scale", "input_size", "output_size",
    "params", "flops_g", "latency_median_ms", "latency_p10_ms", "latency_p90_ms", "peak_memory_mb",
    "memory_kind", "setup_s", "export_s", "compile_s", "warmup", "repeat", "status", "reason", "runtime_version",
    "torch_version", "onnxruntime_version", "openvino_version", "threads", "timestamp",
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    _atomic_write(path, buf.getvalue())


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | params | FLOPs (G) | runtime | precision | latency ms | memory MB |",
             "|---|---:|---:|---|---|---:|---:|"]
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
        lines.append(f"| {row['model']} | {fmt_params(row.get('params'))} | {fmt_num(row.get('flops_g'))} | "
                     f"{row['runtime']} | {row['precision']} | {lat} | {mem} |")
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
        f"FLOPs: torch.utils.flop_counter (a multiply-add = 2 FLOPs). Random weights. {info['date']}.",
        "",
        f"Versions: {versions}.",
        "",
    ]
    _atomic_write(path, "\n".join(head) + "\n" + markdown_table(data["rows"]) + "\n")


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
    _atomic_write(out / "results.json", json.dumps(data, indent=1, default=str) + "\n")
    write_csv(data["rows"], out / "results.csv")
    write_markdown(data, out / "results.md")
    if plots:
        cfg = data["config"]
        where = data["machine"].get("gpu") or data["machine"]["cpu"]
        write_plots(data["rows"], out, f"x{cfg['scale']} to {cfg['output_size']} on {where}")
