"""Hadamard library and rotation-scaling balancing."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_batches
from toolchain.balance.hadamard import HadamardUnavailable, factorize, hadamard_matrix, hadamard_transform, paley1, paley2, sylvester
from toolchain.balance.stats import collect_input_absmax
from toolchain.balance.transform import MODES, BalanceConfig, OnlineBalance, apply_balancing, plan_balancing
from toolchain.methods import MethodContext
from toolchain.models import build_model, preset
from toolchain.quant.api import quantize_
from toolchain.quant.calibrate import prepare_model, quant_layers, quantizers_off
from toolchain.quant.checkpoint import load_quantized, save_quantized
from toolchain.quant.config import QuantConfig


def osdface_input_channels() -> set[int]:
    """C_in of every conv/linear of the full-size preset (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model(preset("osdface"), seed=None)
    return {m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.startswith("embedder.")}


def test_every_osdface_order_has_a_hadamard_matrix():
    orders = osdface_input_channels()
    assert {320, 640, 960, 1024, 1280, 1920, 2560, 5120, 128, 256, 512} <= orders
    for n in sorted(orders - {3}):
        h = hadamard_matrix(n)
        assert set(np.unique(h)) <= {-1, 1}
        hf = h.astype(np.float64)  # BLAS; ±1 sums up to 5120 are exact in float64
        assert np.array_equal(hf @ hf.T, n * np.eye(n)), n
    with pytest.raises(HadamardUnavailable, match="order 3"):
        factorize(3)


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 43, 59])
def test_paley_one(q):
    h = paley1(q)
    assert np.array_equal(h @ h.T, (q + 1) * np.eye(q + 1, dtype=np.int64))


@pytest.mark.parametrize("q", [5, 13, 17, 29])
def test_paley_two(q):
    h = paley2(q)
    n = 2 * (q + 1)
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 40, 96, 320, 960, 1920, 5120])
@pytest.mark.parametrize("transpose", [False, True])
def test_fast_transform_equals_dense_product(n, transpose):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    h = torch.tensor(hadamard_matrix(n), dtype=torch.float64) / np.sqrt(n)
    dense = x @ (h if transpose else h.T)
    assert torch.allclose(hadamard_transform(x, transpose=transpose), dense, atol=1e-12)
    assert torch.allclose(hadamard_transform(hadamard_transform(x), transpose=True), x, atol=1e-12)


@pytest.mark.parametrize("n", [6, 10, 3, 1000 * 4 * 7])
def test_orders_without_construction_fail_clearly(n):
    with pytest.raises(HadamardUnavailable):
        factorize(n) if n != 28000 else factorize(4 * 7 * 1009)
    assert sylvester(8).shape == (8, 8)


def _balanced_vs_original(model, batches, mode, dtype=torch.float32):
    model = model.to(dtype)
    x = batches[0].to(dtype)
    with torch.no_grad():
        ref = model(x)
    prepare_model(model, QuantConfig.for_bits("minmax", "w4a4", include=[".*"]))
    layers = dict(quant_layers(model))
    with quantizers_off(model):
        stats = collect_input_absmax(model, layers, [b.to(dtype) for b in batches])
        plans = plan_balancing(model, layers, stats, BalanceConfig(mode=mode, seed=3), batches=[b.to(dtype) for b in batches[:1]])
        apply_balancing(model, plans)
        with torch.no_grad():
            out = model(x)
    return float((out - ref).norm() / ref.norm()), plans


@pytest.mark.parametrize("mode", MODES)
def test_balanced_tiny_model_equals_original(mode):
    err, plans = _balanced_vs_original(build_model(preset("tiny"), seed=2), tiny_batches(2), mode)
    assert err <= 1e-5
    if mode != "none":
        assert len(plans) > 100
        assert any(p.producer for p in plans.values()), "attention to_out / VAE convs fold into their producers"


def test_balanced_equivalence_is_exact_in_float64():
    err, _ = _balanced_vs_original(build_model(preset("tiny"), seed=2), tiny_batches(2), "rotate-scale", torch.float64)
    assert err <= 1e-12


class SDBlocks(nn.Module):
    """Random-init SD-2.1-sized UNet pieces: a down block (320→640) and an up block with the 1920/960 concat inputs."""

    def __init__(self):
        super().__init__()
        from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D

        common = dict(temb_channels=1280, cross_attention_dim=1024, use_linear_projection=True, resnet_groups=32)
        self.down = CrossAttnDownBlock2D(in_channels=320, out_channels=640, num_layers=2, num_attention_heads=10, **common)
        self.up = CrossAttnUpBlock2D(in_channels=320, out_channels=640, prev_output_channel=1280, num_layers=3, num_attention_heads=10,
                                     add_upsample=False, **common)

    def forward(self, x):
        g = torch.Generator().manual_seed(0)
        temb = torch.randn(x.shape[0], 1280, generator=g)
        ctx = torch.randn(x.shape[0], 7, 1024, generator=g)
        h, skips = self.down(x, temb, encoder_hidden_states=ctx)
        prev = torch.randn(x.shape[0], 1280, 4, 4, generator=g)
        res = (torch.randn(x.shape[0], 320, 4, 4, generator=g), torch.randn(x.shape[0], 640, 4, 4, generator=g), skips[-1])
        return self.up(prev, res, temb, encoder_hidden_states=ctx)


def test_balanced_osdface_sized_unet_block_equals_original():
    torch.manual_seed(0)
    blocks = SDBlocks().eval()
    batches = [torch.randn(1, 320, 8, 8)]
    with torch.no_grad():
        ref = blocks(batches[0])
    prepare_model(blocks, QuantConfig.for_bits("minmax", "w4a4", include=[".*"]))
    layers = dict(quant_layers(blocks))
    orders = {l.weight.shape[1] for l in layers.values()}
    assert {320, 640, 960, 1024, 1280, 1920, 2560} <= orders
    with quantizers_off(blocks):
        stats = collect_input_absmax(blocks, layers, batches)
        apply_balancing(blocks, plan_balancing(blocks, layers, stats, BalanceConfig(mode="rotate-scale")))
        with torch.no_grad():
            out = blocks(batches[0])
    assert float((out - ref).norm() / ref.norm()) <= 1e-5


def test_online_transform_matches_its_description(tiny_model_path, tmp_path):
    from toolchain.models import load_model

    model = load_model(tiny_model_path)
    cfg = QuantConfig.for_bits("quantface", "w4a4", params={"recipe": "paper", "svd_rank": 0, "lora_rank": 0, "train_steps": 0})
    summary = quantize_(model, cfg, MethodContext(tiny_batches(2)))
    assert summary["balance"]["unrotated_for_lack_of_hadamard"] == ["vae.encoder.conv_in"]
    layers = dict(quant_layers(model))
    assert layers["vae.encoder.conv_in"].a_bits == 8  # fallback precision for the 3-channel input
    online = [l.input_transform for l in layers.values() if isinstance(l.input_transform, OnlineBalance)]
    assert online and all(o.describe()["type"] == "balance" for o in online)
    assert not isinstance(layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"].input_transform, OnlineBalance)
    save_quantized(model, cfg, tmp_path / "ck")
    loaded, meta = load_quantized(tmp_path / "ck")
    x = tiny_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["layers"]["unet.conv_in"]["transform"]["hadamard_factors"] == [1, 4]


def test_auto_mode_never_worse_than_fixed_modes_per_layer():
    from toolchain.balance.transform import AUTO_ALPHAS, select_by_output_error, _layer_plan  # noqa: F401

    model = build_model(preset("tiny"), seed=2)
    prepare_model(model, QuantConfig.for_bits("minmax", "w4a4"))
    layers = dict(quant_layers(model))
    batches = tiny_batches(1)
    with quantizers_off(model):
        stats = collect_input_absmax(model, layers, batches)
        auto = plan_balancing(model, layers, stats, BalanceConfig(mode="auto"), batches=batches)
    chosen = {p.mode for p in auto.values()}
    assert chosen <= {"none", "scale", "rotate", "rotate-scale"} and len(auto) == len(layers)
