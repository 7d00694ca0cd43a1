"""Each export-friendly rewrite and each deploy-time fold is an equivalence: test each alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.attention.windows import dense_bias, merge, pad_to_windows, partition
from models.blocks import DecomposedConvAttention
from models.deploy import fold_large_kernels, fold_layernorm_affine, precompute_attention_bias
from models.layers import (BicubicUpsample, dynamic_depthwise3x3, geometric_ensemble, pixel_shuffle,
                           reflect_indices, reflect_pad, repeat_channels)

torch.manual_seed(0)


@pytest.mark.parametrize("size,pad", [(5, 3), (9, 8), (32, 31), (40, 24)])
def test_reflect_pad_equals_torch_where_torch_can(size, pad):
    x = torch.randn(1, 2, size, size + 1)
    ours = reflect_pad(x, pad, pad, pad, pad)
    assert torch.equal(ours, F.pad(x, (pad, pad, pad, pad), mode="reflect"))


@pytest.mark.parametrize("size,pad", [(1, 5), (2, 7), (3, 31), (6, 20)])
def test_reflect_pad_iterates_where_torch_cannot(size, pad):
    import numpy as np

    x = torch.randn(size)
    idx = reflect_indices(size, 0, pad)
    assert torch.equal(x[idx], torch.from_numpy(np.pad(x.numpy(), (0, pad), mode="reflect" if size > 1 else "edge")))


def test_dynamic_depthwise_equals_grouped_conv_per_image():
    x, k = torch.randn(3, 5, 9, 7), torch.randn(3, 5, 3, 3)
    expected = torch.cat([F.conv2d(x[i:i + 1], k[i][:, None], padding=1, groups=5) for i in range(3)])
    assert torch.allclose(dynamic_depthwise3x3(x, k), expected, atol=1e-5)


def test_geometric_ensemble_is_dihedral_mean_and_invariant():
    k = torch.randn(4, 4, 5, 5)
    ens = geometric_ensemble(k)
    # Invariant under each generator of the dihedral group, and idempotent.
    assert torch.allclose(ens, ens.flip(3), atol=1e-6)
    assert torch.allclose(ens, torch.rot90(ens, 1, (2, 3)), atol=1e-6)
    assert torch.allclose(geometric_ensemble(ens), ens, atol=1e-6)
    assert not torch.allclose(ens, k)


def test_pixel_shuffle_and_repeat_match_torch():
    x = torch.randn(2, 3 * 16, 5, 6)
    assert torch.equal(pixel_shuffle(x, 4), F.pixel_shuffle(x, 4))
    y = torch.randn(2, 3, 5, 6)
    assert torch.equal(repeat_channels(y, 9), torch.repeat_interleave(y, 9, dim=1))


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (17, 11)])
def test_bicubic_upsample_equals_interpolate(scale, size):
    x = torch.rand(2, 3, *size)
    ref = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    assert torch.allclose(BicubicUpsample(scale)(x), ref, atol=1e-5)


def _upstream_partition(qkv, w, heads):
    """Upstream's rank-8 rearrange 'b (qkv h c) (nh wh) (nw ww) -> qkv (b nh nw) h (wh ww) c'."""
    b, c3, hp, wp = qkv.shape
    x = qkv.reshape(b, 3, heads, 16, hp // w, w, wp // w, w).permute(1, 0, 4, 6, 2, 5, 7, 3)
    return x.reshape(3, -1, heads, w * w, 16)


def test_rank5_partition_matches_upstream_layout_and_merge_inverts_it():
    w, heads = 8, 2
    qkv = torch.randn(2, 3 * heads * 16, 16, 24)
    q, k, v = partition(qkv, w, heads)
    ref = _upstream_partition(qkv, w, heads)
    assert torch.equal(q, ref[0]) and torch.equal(k, ref[1]) and torch.equal(v, ref[2])
    out = merge(v, 2, 16, 24, w)
    assert torch.equal(out, qkv[:, 2 * heads * 16:])


def test_pad_to_windows_matches_upstream_reflect():
    x = torch.randn(1, 4, 37, 53)
    assert torch.equal(pad_to_windows(x, 32), F.pad(x, (0, 11, 0, 27), mode="reflect"))


def test_dense_bias_uses_upstream_index_rule():
    w, heads = 4, 2
    table = torch.randn(heads, (2 * w - 1) ** 2)
    bias = dense_bias(table, w)[0]
    for qi in range(w * w):
        for ki in range(w * w):
            rel = (ki // w - qi // w + w - 1) * (2 * w - 1) + (ki % w - qi % w + w - 1)
            assert torch.equal(bias[:, qi, ki], table[:, rel])


# -- deploy-time folds, one at a time ---------------------------------------------------------

def _pair(name, scale=2):
    with pytest.warns(UserWarning, match="random weights"):
        model = create_model(name, scale, attention="naive")
    for p in model.parameters():  # non-trivial LayerNorm affines so the fold has work to do
        if p.dim() == 1:
            p.data.add_(torch.randn_like(p) * 0.1)
    twin = create_model(name, scale, attention="naive")
    twin.load_state_dict(model.state_dict())
    return model, twin


def _same(a, b, x, atol=2e-5):
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item() < atol


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("name", ["esc_light", "esc_fp"])
def test_layernorm_affine_fold_is_exact(name):
    model, twin = _pair(name)
    folded = fold_layernorm_affine(twin)
    assert folded > 0 and twin.blocks[0].ln_attn.weight is None
    assert _same(model, twin, torch.rand(1, 3, 21, 34))


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_large_kernel_fold_is_exact_and_happens_once():
    model, twin = _pair("esc_light")
    fold_large_kernels(twin)
    fold_large_kernels(twin)
    assert _same(model, twin, torch.rand(1, 3, 19, 23))
    assert torch.allclose(twin.plk_filter, geometric_ensemble(model.plk_filter))


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_bias_precompute_is_exact():
    model, twin = _pair("esc_light")
    assert precompute_attention_bias(twin) == len(twin.blocks)
    assert twin.blocks[0].attn.cached_bias is not None
    assert _same(model, twin, torch.rand(1, 3, 40, 33), atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_full_deploy_is_exact_and_idempotent():
    model, twin = _pair("esc_light")
    twin.deploy().deploy()
    assert twin.descriptor.deployed and twin.num_params() == model.num_params()
    assert _same(model, twin, torch.rand(2, 3, 30, 30))


def test_decomposed_conv_attention_equals_upstream_padded_kernel_form():
    """ESC-FP: static depthwise 13x13 + dynamic 3x3 == upstream's per-image (lk + pad(dk)) conv."""
    torch.manual_seed(1)
    pdim, b = 16, 2
    mod = DecomposedConvAttention(pdim)
    for p in mod.parameters():
        p.data.normal_(0, 0.3)
    lk_channel, lk_spatial = torch.randn(pdim, pdim, 1, 1) * 0.2, torch.randn(pdim, 1, 13, 13) * 0.1
    x = torch.randn(b, 24, 15, 18)
    with torch.no_grad():
        ours = mod(x, lk_channel, lk_spatial)
        x1 = x[:, :pdim]
        dk = mod.proj(x1).reshape(b * pdim, 1, 3, 3)
        kernel = F.pad(dk, (5, 5, 5, 5)) + lk_spatial.repeat(b, 1, 1, 1)
        mixed = F.conv2d(x1, lk_channel).reshape(1, b * pdim, 15, 18)
        y1 = F.conv2d(mixed, kernel, padding=6, groups=b * pdim).reshape(b, pdim, 15, 18)
        upstream = torch.cat([y1, x[:, pdim:]], dim=1)
    assert torch.allclose(ours, upstream, atol=1e-5)
