"""Checkpoint recognition, strict loading and the errors a user sees."""
from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch

from models import (CheckpointError, UnknownVariantError, WeightsDownloadError, create_model, infer_config,
                    load_model, read_state_dict)
from models.config import VARIANTS

ESC_X2 = "esc_x2_37x53_b1.pth"


@pytest.fixture(scope="module")
def sd(golden_dir):
    return torch.load(golden_dir / ESC_X2, weights_only=True)["params_ema"]


def test_wrappers_prefix_and_safetensors_are_accepted(tmp_path, sd):
    from safetensors.torch import save_file

    torch.save({"params": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "a.pth")
    torch.save(sd, tmp_path / "bare.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "c.safetensors")
    for name in ("a.pth", "bare.pth", "c.safetensors"):
        assert read_state_dict(tmp_path / name).keys() == sd.keys()
    model = load_model(tmp_path / "c.safetensors")
    assert (model.descriptor.variant, model.descriptor.scale) == ("esc", 2)


def test_inferred_config_matches_the_official_constructor(golden_dir, sd):
    import json

    case = next(c for c in json.loads((golden_dir / "index.json").read_text()) if c["name"] == ESC_X2[:-4])
    cfg = infer_config(sd)
    for key, value in case["official_kwargs"].items():
        field = {"window_size": "window_size"}.get(key, key)
        assert getattr(cfg, field) == value, key


def test_truncated_checkpoint_names_the_file_and_the_fix(tmp_path, golden_dir):
    data = (golden_dir / ESC_X2).read_bytes()
    bad = tmp_path / "half.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.pth.*truncated or corrupt"):
        load_model(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file at"):
        load_model(tmp_path / "nope.pth")


def test_not_an_esc_checkpoint_names_the_closest_variant(tmp_path):
    torch.save({"conv1.weight": torch.zeros(3), "proj.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"not an ESC checkpoint.*Closest ESC variant by key overlap: esc"):
        load_model(tmp_path / "other.pth")


def test_missing_and_unexpected_keys_are_summarised(tmp_path, sd):
    broken = dict(sd)
    for k in [k for k in broken if k.startswith("blocks.1.convffns.")]:
        del broken[k]
    broken["extra.weight"] = torch.zeros(1)
    torch.save({"params_ema": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "broken.pth")
    message = str(info.value)
    assert "closest official variant: esc" in message
    assert "missing key(s)" in message and "1 unexpected key(s) (extra.weight)" in message
    assert "\n" not in message  # one paragraph


def test_wrong_shape_is_reported(tmp_path, sd):
    broken = dict(sd)
    broken["blocks.0.conv_out.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(broken, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(tmp_path / "shape.pth")


def test_scale_and_variant_mismatch(golden_dir):
    with pytest.raises(CheckpointError, match=r"weights are for x2.*x4 was asked"):
        load_model(golden_dir / ESC_X2, scale=4)
    with pytest.raises(CheckpointError, match=r"not esc_light"):
        create_model("esc_light", 2, weights=golden_dir / ESC_X2)


def test_unknown_variant_suggests_a_name():
    with pytest.raises(UnknownVariantError, match="Did you mean 'esc_light'"):
        create_model("esc_lite", 4)
    with pytest.raises(UnknownVariantError, match="x4"):
        create_model("esc_real", 2)


def test_random_weights_warn_and_every_variant_builds():
    for name, variant in VARIANTS.items():
        with pytest.warns(UserWarning, match="meaningless"):
            with torch.device("meta"):
                model = create_model(name, variant.scales[-1])
        assert model.descriptor.variant == name and model.descriptor.exact_variant


def test_descriptor(golden_dir):
    d = load_model(golden_dir / "esc_fp_x4_41x47_b1.pth").descriptor
    assert (d.variant, d.arch, d.scale, d.window_size, d.input_multiple) == ("esc_fp", "esc_fp", 4, 32, 32)
    assert d.deployed and d.attention == "sdpa" and d.tiling and d.supports_half


# -- official weights by name, against a real HTTP server on loopback -----------------------

@pytest.fixture
def release_server(golden_dir, tmp_path):
    """Serve a folder where ESC_DIV2K_X2.pth is a golden checkpoint, as the release would."""
    root = tmp_path / "release"
    root.mkdir()
    (root / "ESC_DIV2K_X2.pth").write_bytes((golden_dir / ESC_X2).read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_official_name_downloads_once_into_the_cache(release_server, tmp_path, monkeypatch):
    monkeypatch.setenv("ESC_WEIGHTS_URL", release_server)
    monkeypatch.setenv("ESC_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model("official:ESC_DIV2K_X2")
    assert (model.descriptor.variant, model.scale) == ("esc", 2)
    cached = tmp_path / "cache" / "ESC_DIV2K_X2.pth"
    assert cached.is_file() and not list(cached.parent.glob("*.part"))
    monkeypatch.setenv("ESC_WEIGHTS_URL", "http://127.0.0.1:9")  # now unreachable: the cache must serve
    assert load_model("official:ESC_DIV2K_X2").scale == 2


def test_offline_error_names_the_url_and_the_local_alternative(tmp_path, monkeypatch, release_server):
    monkeypatch.setenv("ESC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ESC_WEIGHTS_URL", release_server)
    with pytest.raises(WeightsDownloadError, match=r"ESC_light_X4\.pth.*pass its path instead"):
        load_model("official:ESC_light_X4")  # 404 on this server
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def test_unknown_official_name():
    with pytest.raises(WeightsDownloadError, match="Did you mean official:ESC_DIV2K_X4"):
        load_model("official:ESC_DIV2K_X5")
