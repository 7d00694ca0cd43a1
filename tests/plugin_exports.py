"""Plugin-form ONNX files shared by the TensorRT test modules (built once per run through ``artifacts``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: The golden case whose plugin export the TensorRT tests read (5 blocks, window 32, 4 heads).
PLUGIN_CASE = "esc_x2_37x53_b1"


def golden_plugin_export(artifacts: Any, golden_dir: Path, name: str) -> dict:
    """The golden checkpoint ``name`` exported in plugin form at its golden size, batch 1, and its golden I/O."""

    def build() -> dict:
        from export.plugin_onnx import export_plugin_onnx
        from models import load_model

        model = load_model(golden_dir / f"{name}.pth", attention="sdpa")
        io = torch.load(golden_dir / f"{name}.io.pt", weights_only=True)
        h, w = io["lr"].shape[-2:]
        path = artifacts.folder(("plugin-onnx", name)) / f"{name}.onnx"
        report = export_plugin_onnx(model, path, shape=(h, w), batch=1, check_parity=False)
        attn = model.attention_modules()
        return {"report": report, "io": io, "n_blocks": len(attn), "window": attn[0].window, "heads": attn[0].heads,
                "scale": model.scale}

    return artifacts.get(("plugin-onnx", name), build)


def window16_checkpoint(tiny_checkpoint: Path, folder: Path) -> Path:
    """conftest's tiny checkpoint with a (1, 31^2) bias table, i.e. 16x16 windows: the fused kernel's smallest."""
    state = torch.load(tiny_checkpoint, weights_only=True)["params_ema"]
    gen = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if key.endswith("relative_position_bias"):
            state[key] = torch.randn(value.shape[0], 31 * 31, generator=gen) * 0.1
    path = folder / "tiny_esc_x2_window16.pth"
    torch.save({"params_ema": state}, path)
    return path
