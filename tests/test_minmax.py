"""MinMax end to end: quality ordering, checkpoint round trip, resumable calibration."""

import pytest
import torch

from conftest import tiny_batches
from toolchain.eval.metrics import psnr
from toolchain.methods import MethodContext
from toolchain.models import load_model
from toolchain.quant.api import quantize_
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers
from toolchain.quant.checkpoint import load_quantized, save_quantized
from toolchain.quant.config import LayerRule, QuantConfig


def _quantized(path, bits, batches):
    model = load_model(path)
    cfg = QuantConfig.for_bits("minmax", bits)
    quantize_(model, cfg, MethodContext(batches))
    return model, cfg


def _psnr(a, b):
    return float(psnr((a + 1) / 2, (b + 1) / 2).mean())


def test_w8a8_close_to_fp_and_w4a4_worse(tiny_model_path):
    batches = tiny_batches(3)
    x = tiny_batches(1, batch=4, seed=9)[0]
    with torch.no_grad():
        fp = load_model(tiny_model_path)(x)
        q8 = _quantized(tiny_model_path, "w8a8", batches)[0](x)
        q4 = _quantized(tiny_model_path, "w4a4", batches)[0](x)
    assert _psnr(q8, fp) > 30.0
    assert _psnr(q4, fp) < _psnr(q8, fp) - 10.0


def test_trained_reference_w8a8_is_near_lossless(ref_model_path, heldout_dir):
    from toolchain.calibration.dataset import CalibrationSet

    data = CalibrationSet.open(heldout_dir)
    batches = data.batches(128, 4, limit=8)
    x = torch.cat(data.batches(128, 4, start=8))
    with torch.no_grad():
        fp = load_model(ref_model_path)(x)
        q8 = _quantized(ref_model_path, "w8a8", batches)[0](x)
    assert _psnr(q8, fp) > 38.0


def test_checkpoint_round_trip_is_exact(tiny_model_path, tmp_path):
    model, cfg = _quantized(tiny_model_path, "w4a4", tiny_batches(2))
    x = tiny_batches(1, seed=3)[0]
    save_quantized(model, cfg, tmp_path / "ckpt", {"note": "test"})
    loaded, meta = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["summary"]["note"] == "test"
    some = next(iter(meta["layers"].values()))
    assert some["w_bits"] == 4 and some["a_bits"] == 4 and "act_scale" in some


def test_rules_and_scope(tiny_model):
    cfg = QuantConfig.for_bits("minmax", "w4a4", rules=[LayerRule(r"conv_in$", 8, 8), LayerRule(r"vae\.decoder\.conv_out$", skip=True)])
    names = prepare_model(tiny_model, cfg)
    layers = dict(quant_layers(tiny_model))
    assert layers["unet.conv_in"].w_bits == 8 and layers["vae.encoder.conv_in"].a_bits == 8
    assert "vae.decoder.conv_out" not in names
    assert layers["unet.conv_out"].w_bits == 4
    assert not any(n.startswith("embedder.") for n in names)


def test_config_json_round_trip():
    cfg = QuantConfig.for_bits("minmax", "w4a6", rules=[LayerRule("x$", 8, None)], params={})
    again = QuantConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_interrupted_calibration_resumes_to_the_same_scales(tiny_model_path, tmp_path):
    batches = tiny_batches(6, seed=4)

    def prepared():
        m = load_model(tiny_model_path)
        prepare_model(m, QuantConfig.for_bits("minmax", "w4a4"))
        calibrate_weights(m)
        return m

    reference = prepared()
    calibrate_activations(reference, batches)

    interrupted = prepared()
    calls = {"n": 0}

    def crashing_forward(x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return interrupted(x)

    with pytest.raises(KeyboardInterrupt):
        calibrate_activations(interrupted, batches, state_dir=tmp_path / "state", checkpoint_every=2, forward=crashing_forward)
    assert (tmp_path / "state" / "progress.json").is_file()
    resumed = prepared()
    seen = []
    calibrate_activations(resumed, batches, state_dir=tmp_path / "state", checkpoint_every=2, forward=lambda x: (seen.append(1), resumed(x))[1])
    assert len(seen) == 2  # batches 0-3 were restored from the checkpoint
    for (name, a), (_, b) in zip(quant_layers(reference), quant_layers(resumed)):
        assert torch.equal(a.input_quantizer.scale, b.input_quantizer.scale), name
        assert torch.equal(a.input_quantizer.zero_point, b.input_quantizer.zero_point), name
    assert not (tmp_path / "state").exists()
