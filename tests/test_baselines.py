"""The trained baselines (PassionSR, EfficientDM, Q-Diffusion, QArtSR) on the tiny preset.

Every method trains through ``toolchain.train.fit.fit``; a spy around it records, for each
training phase, which tensors were handed to the optimiser and checks that no other parameter of
the model moved while that phase ran — so "only X trains, base weights unchanged" is measured, not
claimed. Each method's checkpoint must reload to bit-identical outputs.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import tiny_batches
from toolchain.methods import MethodContext, get_method
from toolchain.models import load_model
from toolchain.quant.calibrate import quant_layers
from toolchain.quant.checkpoint import load_quantized, save_quantized
from toolchain.quant.config import QuantConfig
from toolchain.quant.quantizer import FakeQuantizer


def _run(model, method: str, params: dict, monkeypatch, batches, bits: str = "w4a4", workdir=None):
    """Quantize with a spy on every training phase; returns (summary, config, phases)."""
    import toolchain.train.fit as fit_module

    module = __import__(f"toolchain.methods.{method}", fromlist=["fit"])
    phases: list[dict] = []
    real_fit = fit_module.fit

    def spy(params_, loss_fn, n, steps, *args, **kwargs):
        trained = {id(p) for p in params_.values()}
        before = {k: p.detach().clone() for k, p in model.named_parameters() if id(p) not in trained}
        result = real_fit(params_, loss_fn, n, steps, *args, **kwargs)
        moved = [k for k, p in model.named_parameters() if k in before and not torch.equal(p.detach(), before[k])]
        phases.append({"names": list(params_), "moved": moved, "result": result})
        return result

    monkeypatch.setattr(module, "fit", spy)
    config = QuantConfig.for_bits(method, bits, params=params)
    summary = get_method(method, params).apply(model, config, MethodContext(batches, workdir=workdir))
    return summary, config, phases


def _losses_fall(phase: dict) -> bool:
    h = phase["result"]["history"]
    return h[-1]["loss"] < h[0]["loss"]


def _round_trip(model, config, summary, tmp_path, batch):
    save_quantized(model, config, tmp_path / "ckpt", summary)
    loaded, meta = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a, b)
    assert torch.isfinite(b).all()
    return loaded, meta


def test_passionsr_trains_only_its_transform_and_bounds(tiny_model, monkeypatch, tmp_path):
    batches = tiny_batches(1)
    summary, config, phases = _run(tiny_model, "passionsr", {"epochs": 6, "lr": 1e-2}, monkeypatch, batches)
    assert [p["result"]["steps"] for p in phases] == [6] * 6  # LET then LBQ for each of the 3 stages
    for i, phase in enumerate(phases):
        allowed = r"\.(log_scale|shift)$" if i % 2 == 0 else r"\.(lo|hi)$"
        assert phase["names"] and all(re.search(allowed, n) for n in phase["names"]), phase["names"][:3]
        assert phase["moved"] == [], f"phase {i} changed {phase['moved'][:3]}"
    # first/last layers at 8 bits; offsets only where they fold exactly into a bias
    layers = dict(quant_layers(tiny_model))
    assert layers["unet.conv_out"].w_bits == 8 and layers["vae.decoder.conv_out"].a_bits == 8
    assert summary["let_offsets"] > 0
    for name, layer in layers.items():
        if layer.input_transform.shift is not None:
            assert getattr(layer, "kernel_size", (1, 1)) == (1, 1) and layer.bias is not None, name
        assert type(layer.input_quantizer) is FakeQuantizer  # bounds turned back into a standard quantizer
    _round_trip(tiny_model, config, summary, tmp_path, batches[0])


def test_let_and_learnable_bounds_reduce_a_layers_error():
    """On a layer with an outlier input channel, training LET scales/offset and then LBQ bounds
    lowers the quantized output error: the gradients reach both through the fake quantizers."""
    from torch import nn

    from toolchain.methods.passionsr import bake_let, install_let
    from toolchain.quant.layers import QuantLinear
    from toolchain.quant.learnable import BoundQuantizer
    from toolchain.quant.quantizer import QuantSpec
    from toolchain.train.fit import fit

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(32, 16), QuantSpec(4, True, True), QuantSpec(4))
    x = torch.randn(256, 32) + 2.0
    x[:, 3] *= 25
    with torch.no_grad():
        target = nn.functional.linear(x, layer.weight, layer.bias)
    let = install_let(layer, x.abs().amax(0), 0.3)
    layer.weight_quantizer.dynamic = True
    layer.input_quantizer.dynamic = True
    layer.input_quantizer.calibrate_weight(x)
    layer.input_quantizer.dynamic = True
    mse = lambda step, i: (nn.functional.mse_loss(layer(x), target), {})  # noqa: E731
    res = fit(dict(let.named_parameters()), mse, 1, 60, 1e-2, 0, torch.device("cpu"), None, "LET")
    assert res["loss_last_10pct"] < 0.9 * res["loss_first_10pct"]
    bake_let(layer)
    layer.calibrate_weight()
    layer.input_quantizer.dynamic = False
    layer.input_quantizer.calibrate_weight(layer.input_transform(x))
    bounds = BoundQuantizer(layer.input_quantizer)
    layer.input_quantizer = bounds
    res = fit(dict(bounds.named_parameters()), mse, 1, 60, 1e-2, 0, torch.device("cpu"), None, "LBQ")
    assert res["loss_last_10pct"] < 0.9 * res["loss_first_10pct"]
    q = bounds.to_fake_quantizer()
    layer.input_quantizer = q
    with torch.no_grad():  # the frozen quantizer computes what the trained bounds computed
        assert torch.allclose(q(layer.input_transform(x)), bounds(layer.input_transform(x)), atol=1e-6)


def test_passionsr_transformation_is_exact_before_training(tiny_model):
    """LET at its initial scales (offset zero) and after a trained offset is the same float function."""
    from toolchain.methods.passionsr import bake_let, install_let
    from toolchain.quant.calibrate import prepare_model, quantizers_off

    prepare_model(tiny_model, QuantConfig.for_bits("passionsr", "w8a8"))
    layer = tiny_model.get_submodule("unet.down_blocks.0.attentions.0.proj_in")
    x = torch.randn(2, 16, layer.in_features) * 3 + 1
    with quantizers_off(tiny_model):
        ref = layer(x)
        let = install_let(layer, x.abs().flatten(0, 1).amax(0), 0.3)
        with torch.no_grad():
            let.shift.normal_()
            let.log_scale.add_(0.3 * torch.randn_like(let.log_scale))
        assert torch.allclose(layer(x), ref, atol=1e-5)
        bake_let(layer)
        assert torch.allclose(layer(x), ref, atol=1e-5)


def test_efficientdm_trains_lora_and_step_sizes_then_merges(tiny_model, monkeypatch, tmp_path):
    batches = tiny_batches(1)
    summary, config, (phase,) = _run(tiny_model, "efficientdm", {"lora_rank": 2, "train_steps": 8, "lr": 3e-3}, monkeypatch, batches)
    n_layers = summary["quantized_layers"]
    assert sum(".lowrank." in n for n in phase["names"]) == 2 * n_layers  # A and B per layer
    assert sum(n.endswith("input_quantizer.scale") for n in phase["names"]) == n_layers
    assert len(phase["names"]) == 3 * n_layers and phase["moved"] == []
    assert _losses_fall(phase)
    assert all(layer.lowrank is None for _, layer in quant_layers(tiny_model))  # merged into the weight
    assert not any(isinstance(q.scale, torch.nn.Parameter) for _, l in quant_layers(tiny_model) for q in (l.input_quantizer, l.weight_quantizer) if q)
    _round_trip(tiny_model, config, summary, tmp_path, batches[0])


def test_qdiffusion_adaround_beats_nearest_rounding_and_splits_skips(tiny_model, monkeypatch, tmp_path):
    batches = tiny_batches(2)
    summary, config, phases = _run(tiny_model, "qdiffusion", {"steps_per_block": 40}, monkeypatch, batches)
    assert phases and all(p["names"] and all(n.endswith(".v") for n in p["names"]) and p["moved"] == [] for p in phases)
    blocks = summary["blocks"]
    nearest = sum(b["block_error_nearest"] for b in blocks.values())
    learned = sum(b["block_error_adaround"] for b in blocks.values())
    assert learned < nearest
    assert sum(b["weights_rounded_differently_from_nearest"] for b in blocks.values()) > 0
    # baked weights lie exactly on the kept grid
    for _, layer in quant_layers(tiny_model):
        q = layer.weight_quantizer
        w = layer.weight.detach() / q.scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        assert torch.allclose(w, torch.round(w), atol=1e-4)
    # split quantizers: two ranges, one per concatenated input
    assert summary["split_quantizers"]
    for name in summary["split_quantizers"]:
        scale = tiny_model.get_submodule(name).input_quantizer.scale
        assert torch.unique(scale).numel() == 2
    _round_trip(tiny_model, config, summary, tmp_path, batches[0])
    from toolchain.errors import ExportError
    from toolchain.export.onnx_backend import export_onnx

    with pytest.raises(ExportError, match="split_shortcut"):
        export_onnx(tiny_model, tmp_path / "q.onnx")


def test_qartsr_sweeps_the_timestep_and_calibrates_in_reverse(tiny_model, monkeypatch, tmp_path):
    batches = tiny_batches(1)
    summary, config, phases = _run(tiny_model, "qartsr", {"steps_per_module": 2, "e2e_steps": 10, "lr": 3e-3,
                                                          "timestep_offsets": [-100, 0, 100]}, monkeypatch, batches, workdir=tmp_path / "work")
    trq = summary["trq"]
    assert [r["timestep"] for r in trq["sweep"]] == [299, 399, 499]
    assert trq["chosen_timestep"] == min(trq["sweep"], key=lambda r: r["mse_vs_fp"])["timestep"] == int(tiny_model.timestep)
    assert (tmp_path / "work" / "trq_timestep_sweep.png").is_file()
    order = summary["rpq"]["order"]
    assert order[0].startswith("vae.decoder") and order[-1].startswith("vae.encoder")  # output side first
    for phase in phases:
        assert all(n.endswith("scale") for n in phase["names"]) and phase["moved"] == []
    assert _losses_fall(phases[-1])  # the end-to-end stage
    loaded, meta = _round_trip(tiny_model, config, summary, tmp_path, batches[0])
    assert meta["model_config"]["timestep"] == trq["chosen_timestep"]


def test_baselines_resume_after_interruption(tiny_model_path, tmp_path, monkeypatch):
    """Kill a training run mid-way; the rerun resumes from the stage checkpoint and ends with
    exactly the model an uninterrupted run produces."""
    import toolchain.methods.efficientdm as edm
    import toolchain.train.fit as fit_module
    from toolchain.quant.api import quantize_

    batches = tiny_batches(2)
    params = {"lora_rank": 2, "train_steps": 4, "lr": 1e-3, "checkpoint_every": 1}

    def quantized(workdir):
        model = load_model(tiny_model_path)
        quantize_(model, QuantConfig.for_bits("efficientdm", "w4a4", params=params), MethodContext(batches, workdir=workdir))
        with torch.no_grad():
            return model(batches[0])

    def dying_fit(p, loss_fn, *args, **kwargs):
        def loss(step, i):
            if step == 2:
                raise KeyboardInterrupt("simulated kill")
            return loss_fn(step, i)
        return fit_module.fit(p, loss, *args, **kwargs)

    monkeypatch.setattr(edm, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        quantized(tmp_path / "interrupted")
    monkeypatch.setattr(edm, "fit", fit_module.fit)
    assert (tmp_path / "interrupted" / "efficientdm" / "trainer_state.pt").is_file()
    assert torch.equal(quantized(tmp_path / "interrupted"), quantized(tmp_path / "fresh"))
