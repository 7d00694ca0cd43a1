"""Merge benchmark results from many machines into one cross-device table (paper Table 9 style).

    python -m benchmarks.table benchmarks/results/*/results.json --out benchmarks/results/merged
    python -m benchmarks.table --readme README.md        # refresh the README's table in place

Each ``results.json`` (written by ``benchmarks/run.py``, ``benchmarks/gpu_evidence.py`` or a
run on a Mac) holds a ``machine`` block and ``rows``. Rows are models; a column is one
``device / runtime / precision @ input size``, so rows measured at different input sizes
never share a column. Cells are latency (and peak memory where measured) or the row's
status (``Failed``, ``OOM``, ``skipped``) with its reason as a footnote.

The papers' published figures are reference columns headed ``paper: ...``; they are data
in :data:`PAPER_REFERENCES`, never mixed into measured columns.

Why a separate module: measuring happens on each device; merging happens anywhere, from
files alone, so a Mac user adds a Core ML column by running the benchmark there and
committing its ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.metadata import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GLOB = "benchmarks/results/*/results.json"
README_START = "<!-- benchmark-table:start (python -m benchmarks.table --readme README.md) -->"
README_END = "<!-- benchmark-table:end -->"

#: Statuses a row may carry and how a cell shows them.
STATUS_LABELS = {"ok": None, "failed": "Failed", "OOM": "OOM", "skipped": "skipped"}

#: What a results file must say to be merged honestly; missing fields are shown as "?"
#: in the column's provenance line instead of being guessed.
PROVENANCE_FIELDS = ("machine", "device_name", "date", "weights", "versions")

#: Model order: ESC variants, RIB family, then peers; unknown names sort last, by name.
MODEL_ORDER = ("esc_light", "esc", "esc_fp", "esc_real", "esc_xl", "esc_rib", "sst", "sst_plus",
               "sst_large", "sst_large_plus", "sst_xl_plus", "swinir_light", "omnisr", "span")


@dataclass(frozen=True)
class Reference:
    """A published figure: one model on one device, as the paper states it."""

    source: str
    device: str
    runtime: str
    precision: str
    input_size: str          # WIDTHxHEIGHT of the *input*
    model: str
    latency_ms: float | None
    memory_mb: float | None = None
    status: str = "ok"


#: Figures from the ESC paper (ICCV 2025) and its supplement, as quoted in this project's
#: issues: Table 9 (MacBook Air M2 at 128x128, iPhone 12 at 32x32) and the GPU table
#: (x4 to 1280x720, i.e. a 320x180 input, RTX 4090). Only figures stated there are listed.
PAPER_REFERENCES: tuple[Reference, ...] = (
    Reference("ESC suppl. Table 9", "MacBook Air M2", "coreml", "fp16", "128x128", "esc_light", 124.0),
    Reference("ESC suppl. Table 9", "MacBook Air M2", "coreml", "fp16", "128x128", "esc", 181.0),
    Reference("ESC suppl. Table 9", "iPhone 12", "coreml", "fp16", "32x32", "esc_light", 25.6),
    Reference("ESC suppl. Table 9", "iPhone 12", "coreml", "fp16", "32x32", "esc", 42.8),
    Reference("ESC paper", "RTX 4090", "torch", "fp32", "320x180", "esc", 21.9, 215.0),
    Reference("ESC paper", "RTX 4090", "torch", "fp32", "320x180", "esc_fp", 21.7, 158.0),
    Reference("ESC paper", "RTX 4090", "torch", "fp32", "320x180", "swinir_light", 222.9, 351.0),
    Reference("ESC paper", "RTX 4090", "torch (flex)", "fp32", "320x180", "esc_real", 59.9),
)


class TableError(ValueError):
    """A results file that cannot be merged; the message names the file and the field."""


@dataclass
class Column:
    """One device / runtime / precision / input size, with where its numbers came from."""

    device: str
    runtime: str
    precision: str
    input_size: str
    reference: bool = False
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str, bool]:
        return (self.device, self.runtime, self.precision, self.input_size, self.reference)

    @property
    def header(self) -> str:
        text = f"{self.device} · {self.runtime} · {self.precision} @ {self.input_size}"
        return f"paper: {text}" if self.reference else text


@dataclass
class Cell:
    status: str
    latency_ms: float | None = None
    memory_mb: float | None = None
    reason: str = ""


@dataclass
class Table:
    """Merged rows (models) x columns, with footnotes for non-ok cells."""

    columns: list[Column]
    models: list[str]
    cells: dict[tuple[str, tuple], Cell]

    def cell(self, model: str, column: Column) -> Cell | None:
        return self.cells.get((model, column.key))


# -- reading --------------------------------------------------------------------------------
def _machine_fields(data: dict[str, Any], source: str) -> dict[str, str]:
    machine = data.get("machine")
    if not isinstance(machine, dict):
        raise TableError(f"{source}: no 'machine' block; re-run the benchmark with this toolkit "
                         f"(benchmarks/run.py writes one)")
    versions = machine.get("versions") or {}
    kept = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v)
    config = data.get("config") or {}
    return {
        "machine": str(machine.get("machine") or machine.get("hostname") or "?"),
        "device_name": str(machine.get("device_name") or machine.get("gpu") or machine.get("cpu") or "?"),
        "date": str(machine.get("date") or "?")[:10],
        "weights": str(machine.get("weights") or config.get("weights") or "?"),
        "versions": kept or "?",
    }


def read_results(path: str | os.PathLike[str]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """``(provenance, rows)`` of one results file; a malformed one raises :class:`TableError`."""
    source = os.fspath(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TableError(f"{source}: cannot read results ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise TableError(f"{source}: expected a JSON object with a 'rows' list (a benchmarks/run.py results.json)")
    provenance = _machine_fields(data, source)
    rows = []
    for i, row in enumerate(data["rows"]):
        missing = [k for k in ("model", "runtime", "precision", "input_size", "status") if not row.get(k)]
        if missing:
            raise TableError(f"{source}: row {i} lacks {', '.join(missing)}")
        if row["status"] not in STATUS_LABELS:
            raise TableError(f"{source}: row {i} has unknown status {row['status']!r} "
                             f"(expected one of {', '.join(STATUS_LABELS)})")
        rows.append(row)
    return provenance, rows


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# -- merging --------------------------------------------------------------------------------
def merge(paths: Sequence[str | os.PathLike[str]], references: Iterable[Reference] = PAPER_REFERENCES) -> Table:
    """One table from ``paths`` plus the reference columns.

    Two files that measured the same column (same device, runtime, precision, input size)
    are merged when they are about different models; the same model twice is an error
    (which one is right cannot be told from the files).
    """
    columns: dict[tuple, Column] = {}
    cells: dict[tuple[str, tuple], Cell] = {}
    owners: dict[tuple[str, tuple], str] = {}
    for path in paths:
        provenance, rows = read_results(path)
        device = provenance["device_name"]
        for row in rows:
            column = Column(device, str(row["runtime"]), str(row["precision"]), str(row["input_size"]),
                            provenance=provenance)
            columns.setdefault(column.key, column)
            slot = (str(row["model"]), column.key)
            if slot in cells:
                raise TableError(f"{row['model']} in column '{column.header}' is measured in both "
                                 f"{owners[slot]} and {os.fspath(path)}; keep one of the files")
            owners[slot] = os.fspath(path)
            cells[slot] = Cell(str(row["status"]), _number(row.get("latency_median_ms")),
                               _number(row.get("peak_memory_mb")), str(row.get("reason") or ""))
    measured_models = {model for model, _ in cells}
    for ref in references:
        if ref.model not in measured_models:
            continue   # a reference column only for models we measured somewhere
        column = Column(ref.device, ref.runtime, ref.precision, ref.input_size, reference=True,
                        provenance={"source": ref.source})
        columns.setdefault(column.key, column)
        cells[(ref.model, column.key)] = Cell(ref.status, ref.latency_ms, ref.memory_mb)
    ordered = sorted(columns.values(), key=lambda c: (c.reference, c.input_size, c.device, c.runtime, c.precision))
    models = sorted(measured_models, key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m))
    return Table(ordered, models, cells)


# -- rendering ------------------------------------------------------------------------------
def _cell_text(cell: Cell | None, notes: dict[str, int]) -> str:
    if cell is None:
        return "–"
    label = STATUS_LABELS.get(cell.status)
    if label is not None:
        if cell.reason:
            number = notes.setdefault(cell.reason, len(notes) + 1)
            return f"{label}[^{number}]"
        return label
    if cell.latency_ms is None:
        return "?"
    text = f"{cell.latency_ms:,.1f} ms"
    return text + (f" / {cell.memory_mb:,.0f} MB" if cell.memory_mb is not None else "")


def to_markdown(table: Table) -> str:
    """The table as Markdown: a header row per column, provenance lines, footnotes."""
    notes: dict[str, int] = {}
    shown, skipped = [], []
    for column in table.columns:
        present = [cell for m in table.models if (cell := table.cell(m, column)) is not None]
        (skipped if present and all(c.status == "skipped" for c in present) else shown).append((column, present))
    head = ["model", *[c.header for c, _ in shown]]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(shown) + "|"]
    for model in table.models:
        cells = [_cell_text(table.cell(model, c), notes) for c, _ in shown]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    lines.append("")
    lines.append("Cells: median latency / peak memory. Columns headed `paper:` are published figures, "
                 "not measured here.")
    lines.append("")
    # A column every model skipped is one line, not a column of "skipped".
    lines += [f"- not run: {column.header}: " + "; ".join(sorted({c.reason or "skipped" for c in present}))
              for column, present in skipped]
    sources: dict[str, list[str]] = {}
    for column, _ in shown:
        p = column.provenance
        if column.reference:
            line = f"paper columns: {p.get('source', '?')}"
        else:
            line = (f"{p.get('device_name', '?')} ({p.get('machine', '?')}), {p.get('date', '?')}, "
                    f"weights: {p.get('weights', '?')}; {p.get('versions', '?')}")
        sources.setdefault(line, []).append(f"{column.runtime} {column.precision} @ {column.input_size}")
    lines += [f"- {line} — {', '.join(cols)}" for line, cols in sources.items()]
    if notes:
        lines.append("")
        lines += [f"[^{n}]: {reason}" for reason, n in notes.items()]
    return "\n".join(lines) + "\n"


def write_plot(table: Table, path: Path) -> Path:
    """Grouped bars (one group per model, one bar per column), log-scale latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(table.columns), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(table.models) * max(1, len(table.columns)) ** 0.5), 4.5))
    for j, column in enumerate(table.columns):
        xs, ys = [], []
        for i, model in enumerate(table.models):
            cell = table.cell(model, column)
            if cell is not None and cell.status == "ok" and cell.latency_ms:
                xs.append(i + (j - (len(table.columns) - 1) / 2) * width)
                ys.append(cell.latency_ms)
        ax.bar(xs, ys, width, label=column.header, hatch="//" if column.reference else None,
               alpha=0.6 if column.reference else 1.0)
    ax.set_xticks(range(len(table.models)), table.models, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def replace_readme_block(readme: str, markdown: str) -> str:
    """``readme`` with the text between the table markers replaced by ``markdown``."""
    if README_START not in readme or README_END not in readme:
        raise TableError(f"the README has no table markers; add the lines\n{README_START}\n{README_END}\n"
                         f"where the table belongs")
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{markdown}{README_END}{tail}"


def default_paths() -> list[Path]:
    """Every committed model-benchmark results file (a machine block and rows), in a stable order.

    Other results (the serving throughput run, the upscale memory run) live beside them in
    another shape, rows without a ``model``, and are left out. Comparison runs (a variant
    beside the rows it is compared with, measured in one run) live one level deeper, under
    ``benchmarks/results/comparisons/``, which the glob does not reach: their baseline rows
    re-measure cells the table already has, and one cell cannot hold two measurements.
    """
    def is_grid(path: Path) -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return True   # read_results names the problem
        if not isinstance(data, dict) or "machine" not in data or not isinstance(data.get("rows"), list):
            return False
        return all("model" in r for r in data["rows"] if isinstance(r, dict))

    return [p for p in sorted(ROOT.glob(DEFAULT_GLOB)) if is_grid(p)]


# -- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.table",
        description="Merge results.json files from several machines into one table (Markdown + plot).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m benchmarks.table                                  # committed results -> stdout\n"
               "  python -m benchmarks.table mac/results.json gpu/results.json --out merged/\n"
               "  python -m benchmarks.table --readme README.md               # refresh the README table\n"
               "add a device: run benchmarks/run.py there, commit its results.json under\n"
               "benchmarks/results/<device>/, then refresh the README table.")
    parser.add_argument("results", nargs="*", type=Path,
                        help=f"results.json files (default: {DEFAULT_GLOB})")
    parser.add_argument("--out", type=Path, default=None, help="folder for table.md and latency.png")
    parser.add_argument("--readme", type=Path, default=None,
                        help="rewrite the table between the benchmark-table markers of this file")
    parser.add_argument("--no-references", action="store_true", help="leave out the papers' figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = args.results or default_paths()
    if not paths:
        print(f"error: no results files given and none match {DEFAULT_GLOB}", file=sys.stderr)
        return 2
    try:
        table = merge(paths, () if args.no_references else PAPER_REFERENCES)
        markdown = to_markdown(table)
        if args.readme:
            write_text_atomic(args.readme, replace_readme_block(args.readme.read_text(), markdown))
            print(f"updated the table in {args.readme} ({len(table.models)} models x {len(table.columns)} columns)")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.out / "table.md", markdown)
            write_plot(table, args.out / "latency.png")
            print(f"wrote {args.out / 'table.md'} and {args.out / 'latency.png'}")
        if not args.readme and not args.out:
            print(markdown, end="")
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
