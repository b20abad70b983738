"""QuantFace's named recipes, per-kind activation observers and the layer-kind table."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_batches
from toolchain.errors import ConfigError
from toolchain.methods import MethodContext
from toolchain.quant.registry import get_method
from toolchain.quant.api import quantize_
from toolchain.quant.calibrate import prepare_model, quant_layers
from toolchain.quant.config import QuantConfig
from toolchain.quant.kinds import KIND_NAMES, layer_kind, parse_kind_observers

# The QuantFace settings before the W4A4 analysis (git 197129c, QuantFaceParams), written out here
# independently of the RECIPES table: the paper recipe must keep reproducing them.
OLD_DEFAULTS = {"balance": "rotate-scale", "alpha": 0.5, "fallback_a_bits": 8, "svd_rank": 8, "lora_rank": 8, "rank_ratio": 0.0,
                "lora_into_residual": False, "train_steps": 200, "lr": 1e-5, "lpips_weights": None, "w_perceptual": 0.5,
                "w_mse": 0.5, "gradient_checkpointing": False, "checkpoint_every": 50, "merge": True, "observers": ()}


def _params(**given):
    return vars(get_method("quantface", given).params)


def test_paper_recipe_reproduces_the_old_settings():
    p = _params(recipe="paper")
    assert {k: p[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS
    assert p["recipe"] == "paper"


def test_explicit_parameters_override_the_recipe():
    p = _params(recipe="paper", balance="auto", rank_ratio=0.02)
    assert (p["balance"], p["rank_ratio"], p["svd_rank"]) == ("auto", 0.02, 8)


@pytest.mark.parametrize("bad, match", [
    ({"recipe": "fast"}, "expected one of paper, default"),
    ({"recipe": 3}, "expected one of"),
    ({"observers": ["unet.attn_qkv"]}, "KIND=OBSERVER"),
    ({"observers": ["unet.qkv=mse"]}, "unknown layer kind 'unet.qkv'"),
    ({"observers": ["unet.ff=median"]}, "observer 'median' is not one of"),
    ({"observers": ["unet.ff=percentile:high"]}, "must be a number"),
])
def test_bad_recipe_or_observers_is_one_config_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        get_method("quantface", bad)


def test_layer_kinds_cover_every_quantizable_layer(tiny_model):
    names = prepare_model(tiny_model, QuantConfig.for_bits("minmax", "w4a4"))
    kinds = {n: layer_kind(n) for n in names}
    assert "other" not in kinds.values()
    assert kinds["unet.conv_in"] == kinds["unet.conv_out"] == "unet.conv_io"
    assert kinds["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"] == "unet.attn_qkv"
    assert kinds["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"] == "unet.attn_out"
    assert kinds["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"] == "unet.ff"
    assert kinds["unet.down_blocks.0.resnets.0.conv1"] == "unet.conv"
    assert kinds["vae.encoder.conv_in"] == kinds["vae.decoder.conv_out"] == "vae.image_io"
    assert kinds["vae.quant_conv"] == kinds["vae.decoder.conv_in"] == "vae.latent_io"
    assert kinds["vae.decoder.mid_block.attentions.0.to_q"] == "vae.attn"
    assert kinds["vae.decoder.up_blocks.0.resnets.0.conv1"] == "vae.decoder_conv"
    assert layer_kind("unet.time_embedding.linear_1") == "unet.time_embedding"
    assert layer_kind("embedder.proj.0") == "embedder"
    assert set(kinds.values()) <= set(KIND_NAMES)
    assert parse_kind_observers(["*=mse", "unet.ff=percentile:99.9"]) == {"*": "mse", "unet.ff": "percentile:99.9"}


def test_per_kind_observer_sets_the_range_it_names(tiny_model):
    """unet.conv_in's input is the scaled latent: with no transform, its A4 scale must be the mean of the
    per-batch 1st/99th percentiles over 15 levels (percentile:99), other layers keep min-max ranges."""
    batches = tiny_batches(3)
    seen = []
    hook = tiny_model.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            tiny_model(b)
    hook.remove()
    lo = sum(float(torch.quantile(x.flatten(), 0.01)) for x in seen) / len(seen)
    hi = sum(float(torch.quantile(x.flatten(), 0.99)) for x in seen) / len(seen)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    params = {"recipe": "paper", "balance": "none", "svd_rank": 0, "lora_rank": 0, "train_steps": 0,
              "observers": ["unet.conv_io=percentile:99"]}
    # only two UNet layers in scope, so conv_in sees the float latent during calibration (as in the hook)
    cfg = QuantConfig.for_bits("quantface", "w4a4", params=params, include=[r"^unet\.conv_in$", r"^unet\.down_blocks\.0\.resnets\.0\.conv1$"])
    summary = quantize_(tiny_model, cfg, MethodContext(batches, log=lambda *_: None))
    layers = dict(quant_layers(tiny_model))
    assert summary["observers"] == {"percentile:99": 1}
    q = layers["unet.conv_in"].input_quantizer
    assert q.spec.observer == "percentile" and q.spec.percentile == 99.0
    assert float(q.scale) == pytest.approx((hi - lo) / 15, rel=1e-4)
    # a layer of another kind: min-max range of its own input
    mm = layers["unet.down_blocks.0.resnets.0.conv1"].input_quantizer
    assert mm.spec.observer == "minmax"


def test_default_recipe_is_the_measured_best():
    """The default is what benchmarks/results/w4a4_analysis_ref measured best at W4A4 on `ref`: per-layer
    balance choice and the best activation observer per layer kind (stage b's table)."""
    import json
    from pathlib import Path

    res = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/w4a4_analysis_ref/results.json").read_text())
    best = res["b"]["best_act_observer"]
    p = _params()
    assert p["balance"] == "auto" and p["recipe"] == "default"
    mapping = parse_kind_observers(p["observers"])
    for kind, obs in best.items():
        assert mapping.get(kind, mapping["*"]) == obs, kind
    rows = res["c"]
    default_row = rows["auto, rank 8+8, best observers"]["vs_fp"]["psnr"]
    assert default_row > rows["paper (rotate-scale, rank 8+8, min-max)"]["vs_fp"]["psnr"] + 3.0
