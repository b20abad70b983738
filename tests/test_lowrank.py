"""Low-rank compensation: SVD branch, QD-LoRA training with resume, merging, SVDQuant."""

import json

import pytest
import torch
from torch import nn

from conftest import tiny_batches
from toolchain.lowrank.branch import LowRankBranch, Pair, merge_branch, peft_pair, svd_pair
from toolchain.lowrank.compensate import attach_branches, refine_svd, train_branches
from toolchain.methods import MethodContext
from toolchain.models import build_model, load_model, preset
from toolchain.quant.api import quantize_
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers, quantizers_off
from toolchain.quant.checkpoint import load_quantized, save_quantized
from toolchain.quant.config import QuantConfig
from toolchain.quant.layers import QuantConv2d
from toolchain.quant.quantizer import QuantSpec


def _conv_layer(dtype=torch.float32):
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1).to(dtype)
    return QuantConv2d.from_float(conv, QuantSpec(4, True, True), QuantSpec(4))


def test_peft_builds_the_conv_branch_shape():
    layer = _conv_layer()
    down, up = peft_pair(layer, 4, seed=0)
    assert isinstance(down, nn.Conv2d) and down.kernel_size == (3, 3) and down.stride == (2, 2) and down.out_channels == 4
    assert isinstance(up, nn.Conv2d) and up.kernel_size == (1, 1) and up.in_channels == 4
    assert torch.count_nonzero(up.weight) == 0 and down.weight.std() > 0  # LoRA init: Gaussian A, zero B


def test_svd_split_reproduces_the_weight_exactly():
    layer = _conv_layer(torch.float64)
    w = layer.weight.detach().clone()
    layer.lowrank = LowRankBranch({"svd": svd_pair(layer, layer.weight, 5, weight_dtype=torch.float64)})
    residual = layer.weight_to_quantize()
    assert torch.allclose(residual + layer.lowrank.parts["svd"].dense(), w, atol=1e-12)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    with quantizers_off(layer):
        y = layer(x)
    assert torch.allclose(y, nn.functional.conv2d(x, w, layer.bias, 2, 1), atol=1e-10)
    # the rank-r part is the best rank-r approximation: its error equals the tail singular values
    s = torch.linalg.svdvals(w.flatten(1))
    assert torch.allclose(residual.flatten(1).norm() ** 2, (s[5:] ** 2).sum())


def test_merged_branches_equal_separate_branches():
    torch.manual_seed(0)
    layer = _conv_layer()
    svd = svd_pair(layer, layer.weight, 3)
    down, up = peft_pair(layer, 2, seed=1)
    nn.init.normal_(up.weight, std=0.05)  # a trained (non-zero) LoRA part
    layer.lowrank = LowRankBranch({"svd": svd, "lora": Pair(down, up)})
    x = torch.randn(2, 16, 10, 10)
    layer.calibrate_weight()
    layer.input_quantizer.calibrate_weight(x)
    y = layer(x)
    merge_branch(layer)
    assert set(layer.lowrank.parts) == {"merged"} and layer.lowrank.rank == 5 and not layer.lowrank.tied
    assert torch.allclose(layer(x), y, atol=1e-5)


def test_lora_into_residual_variant_merges_exactly():
    torch.manual_seed(0)
    layer = _conv_layer()
    down, up = peft_pair(layer, 2, seed=1)
    nn.init.normal_(up.weight, std=0.05)
    layer.lowrank = LowRankBranch({"svd": svd_pair(layer, layer.weight, 3), "lora": Pair(down, up)}, lora_into_residual=True)
    x = torch.randn(2, 16, 10, 10)
    layer.calibrate_weight()
    layer.input_quantizer.calibrate_weight(x)
    y = layer(x)
    merge_branch(layer)
    assert layer.lowrank.rank == 3  # only the SVD branch stays 16-bit
    assert torch.allclose(layer(x), y, atol=1e-5)


def _qdlora_model(tiny_model_path, batches):
    model = load_model(tiny_model_path)
    prepare_model(model, QuantConfig.for_bits("quantface", "w4a4"))
    attach_branches(model, 2, 2, seed=0)
    calibrate_weights(model)
    calibrate_activations(model, batches)
    return model


def test_training_reduces_distillation_loss(tiny_model_path, tmp_path):
    batches = tiny_batches(1, batch=4)
    model = _qdlora_model(tiny_model_path, batches)
    res = train_branches(model, batches, tmp_path / "w", steps=15, lr=1e-3, seed=0, device=torch.device("cpu"), checkpoint_every=50)
    losses = [h["loss"] for h in res["history"]]
    assert res["trained_parameters"] > 0
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0]
    assert (tmp_path / "w" / "loss_curve.png").is_file()
    assert all(not p.requires_grad for p in model.parameters())
    assert all(not l.weight_quantizer.dynamic for _, l in quant_layers(model))


def test_interrupted_training_resumes_with_identical_losses(tiny_model_path, tmp_path):
    batches = tiny_batches(3)
    kwargs = dict(steps=6, lr=3e-3, seed=0, device=torch.device("cpu"), checkpoint_every=2)
    full = train_branches(_qdlora_model(tiny_model_path, batches), batches, tmp_path / "a", **kwargs)["history"]

    model = _qdlora_model(tiny_model_path, batches)
    calls = {"n": 0}

    def kill(module, args):
        calls["n"] += 1
        if calls["n"] == 3 + 5:  # 3 teacher passes, then die during step 5
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(kill)
    with pytest.raises(KeyboardInterrupt):
        train_branches(model, batches, tmp_path / "b", **kwargs)
    handle.remove()
    assert json.loads((tmp_path / "b" / "history.json").read_text())[-1]["step"] == 4
    resumed = train_branches(_qdlora_model(tiny_model_path, batches), batches, tmp_path / "b", **kwargs)["history"]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]


def test_missing_lpips_weights_file_is_an_error(tmp_path):
    from toolchain.errors import MissingWeightsError
    from toolchain.lowrank.losses import distillation_loss

    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        distillation_loss(tmp_path / "nowhere.pth")


def test_substitute_loss_is_announced(capsys):
    from toolchain.lowrank.losses import distillation_loss

    loss = distillation_loss(None)
    assert "ST-LPIPS" in loss.label and "WARNING" in capsys.readouterr().err


def test_quantface_checkpoint_with_merged_branches_round_trips(tiny_model_path, tmp_path):
    model = load_model(tiny_model_path)
    cfg = QuantConfig.for_bits("quantface", "w4a4", params={"train_steps": 3, "lr": 1e-3, "svd_rank": 2, "lora_rank": 2})
    summary = quantize_(model, cfg, MethodContext(tiny_batches(2), workdir=tmp_path / "work"))
    assert summary["lowrank"]["merged_layers"] == summary["quantized_layers"]
    save_quantized(model, cfg, tmp_path / "ck")
    loaded, meta = load_quantized(tmp_path / "ck")
    x = tiny_batches(1, seed=4)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["layers"]["unet.conv_out"]["lowrank"]["parts"] == {"merged": 4}


def test_svdquant_refinement_never_increases_error(tiny_model_path):
    from toolchain.balance.stats import collect_input_absmax

    batches = tiny_batches(1)
    model = load_model(tiny_model_path)
    prepare_model(model, QuantConfig.for_bits("svdquant", "w4a4"))
    layers = dict(quant_layers(model))
    with quantizers_off(model):
        absmax = collect_input_absmax(model, layers, batches)
    attach_branches(model, 4, 0)
    before = {n: l.lowrank.parts["svd"].dense().clone() for n, l in layers.items()}
    refine_svd(model, absmax, iterations=5)

    def err(layer, lr, m):
        w = layer.weight.detach().double()
        r = w - lr.double()
        v = r.flatten(1)
        amax = v.abs().max(1).values.clamp(min=1e-8) / 7
        q = torch.clamp(torch.round(v / amax[:, None]), -7, 7) * amax[:, None]
        return float(((r - q.reshape(r.shape)) * m.double().reshape(1, -1, *([1] * (r.dim() - 2)))).pow(2).sum())

    for n, l in layers.items():
        assert err(l, l.lowrank.parts["svd"].dense(), absmax[n]) <= err(l, before[n], absmax[n]) * (1 + 1e-6)


def test_svdquant_method_end_to_end(tiny_model_path):
    model = load_model(tiny_model_path)
    summary = quantize_(model, QuantConfig.for_bits("svdquant", "w4a4", params={"rank": 4, "iterations": 2}), MethodContext(tiny_batches(2)))
    assert summary["lowrank"]["layers"] == summary["quantized_layers"]
    assert all(l.lowrank is not None and l.lowrank.rank <= 4 for _, l in quant_layers(model))
