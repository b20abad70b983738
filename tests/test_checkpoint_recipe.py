"""The checkpoint stores the recipe it executed and the loader rebuilds from it.

``quantize_`` completes the QuantConfig with exact-name rules for what a method decided from data;
the loader takes which layers are quantized, and at what bits, from that stored recipe and refuses a
layer table that disagrees with it (an edited or damaged checkpoint).
"""

import json
import re

import pytest
import torch

from conftest import tiny_batches
from toolchain.errors import CheckpointError
from toolchain.methods import MethodContext
from toolchain.models import load_model
from toolchain.quant.api import quantize_
from toolchain.quant.executed import record_method_decisions
from toolchain.quant.calibrate import calibrate_activations, quant_layers
from toolchain.quant.checkpoint import load_quantized, save_quantized
from toolchain.quant.config import LayerRule, QuantConfig, quantizable_layers
from toolchain.quant.quantizer import FakeQuantizer


@pytest.fixture(scope="module")
def saved(tiny_model_path, tmp_path_factory):
    """A W4A4 MinMax checkpoint of the tiny model whose method 'decided' 8-bit activations for one layer
    (as QuantFace does for widths without a Hadamard matrix) and left one in-scope layer float."""
    model = load_model(tiny_model_path)
    cfg = QuantConfig.for_bits("minmax", "w4a4", rules=[LayerRule(r"vae\.decoder\.conv_out$", skip=True)])
    quantize_(model, cfg, MethodContext(tiny_batches(2)))
    layers = dict(quant_layers(model))
    raised = "unet.conv_in"
    q = layers[raised].input_quantizer
    layers[raised].input_quantizer = FakeQuantizer(q.spec.with_bits(8))
    calibrate_activations(model, tiny_batches(2), names={raised})
    added = record_method_decisions(model, cfg)
    out = tmp_path_factory.mktemp("ckpt") / "q"
    save_quantized(model, cfg, out)
    return model, cfg, out, raised, added


def test_method_decisions_become_exact_rules_and_the_recipe_gives_every_layer(saved):
    model, cfg, _, raised, added = saved
    assert added == [f"^{re.escape(raised)}$"]
    assert cfg.layer_specs(raised)[0].bits == 4 and cfg.layer_specs(raised)[1].bits == 8
    done = dict(quant_layers(model))
    float_model_names = [n for n, _ in quantizable_layers(model) if not any(n.startswith(q + ".") for q in done)]
    for name in float_model_names:
        specs = cfg.layer_specs(name)
        if name in done:
            assert (specs[0].bits, specs[1].bits) == (done[name].w_bits, done[name].a_bits), name
        else:
            assert specs is None, name
    assert record_method_decisions(model, cfg) == []  # complete: a second pass adds nothing


def test_loader_rebuilds_from_the_stored_recipe_exactly(saved):
    model, _, out, raised, _ = saved
    loaded, meta = load_quantized(out)
    assert meta["version"] == 2
    x = tiny_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert dict(quant_layers(loaded))[raised].a_bits == 8
    assert "vae.decoder.conv_out" not in dict(quant_layers(loaded))


def _tampered(out, tmp_path, edit):
    import shutil

    dst = tmp_path / "tampered"
    shutil.copytree(out, dst)
    meta = json.loads((dst / "quant_config.json").read_text())
    edit(meta)
    (dst / "quant_config.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["layers"]["unet.conv_out"].update(w_bits=8) or m["layers"]["unet.conv_out"]["weight"].update(bits=8),
     r"'unet\.conv_out' is W8A4, the recipe says W4A4"),
    (lambda m: m["layers"].pop("unet.conv_out"), r"'unet\.conv_out' is missing \(the recipe quantizes it at W4A4\)"),
    (lambda m: m["quant_config"]["rules"].pop(), r"'unet\.conv_in' is W4A8, the recipe says W4A4"),
    (lambda m: m["quant_config"]["rules"].pop(0), r"'vae\.decoder\.conv_out' is missing"),
    (lambda m: m["quant_config"].update(weight={"bits": 99}), r"stored recipe is invalid"),
    (lambda m: m["layers"]["unet.conv_out"]["weight"].update(bits=8), r"'unet\.conv_out' has w_bits 4 but its weight spec says 8 bits"),
    (lambda m: m["layers"]["unet.conv_out"]["activation"].update(bits=6), r"'unet\.conv_out' has a_bits 4 but its activation spec says 6"),
    (lambda m: m["layers"]["unet.conv_out"].update(w_bits="4"), r"'unet\.conv_out': 'w_bits' must be an integer, not \"4\""),
    (lambda m: m["layers"]["unet.conv_out"].update(weight=None), r"'unet\.conv_out' has w_bits 4 but its weight spec says null"),
    (lambda m: m["quant_config"].update(method="nosuch"), r"method 'nosuch', which is not registered"),
    (lambda m: m.update(quant_config=[1]), r"'quant_config' must be a JSON object, not array"),
    (lambda m: m.update(version=1) or m["layers"]["unet.conv_out"]["weight"].update(bits=8), r"has w_bits 4 but its weight spec says 8"),
])
def test_a_table_that_disagrees_with_the_stored_recipe_is_refused(saved, tmp_path, edit, message):
    _, _, out, _, _ = saved
    with pytest.raises(CheckpointError, match=message):
        load_quantized(_tampered(out, tmp_path, edit))


def test_version_1_checkpoints_still_load_from_their_table(saved, tmp_path):
    model, _, out, _, _ = saved

    def as_v1(meta):
        meta["version"] = 1
        meta["quant_config"]["rules"] = []  # v1 recipes lacked the method's decisions

    loaded, _ = load_quantized(_tampered(out, tmp_path, as_v1))
    x = tiny_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_passionsr_first_last_8bit_pins_are_in_the_stored_recipe(tiny_model_path, tmp_path):
    model = load_model(tiny_model_path)
    cfg = QuantConfig.for_bits("passionsr", "w4a4", params={"epochs": 0})
    summary = quantize_(model, cfg, MethodContext(tiny_batches(1)))
    assert "method_rules" not in summary  # the pins were rules already; nothing left to record
    save_quantized(model, cfg, tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "quant_config.json").read_text())
    stored = QuantConfig.from_dict(meta["quant_config"])
    assert stored.layer_specs("unet.conv_out")[0].bits == 8 and meta["layers"]["unet.conv_out"]["w_bits"] == 8
    load_quantized(tmp_path / "p")
