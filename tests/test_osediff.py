"""OSEDiff as a model kind: `toolchain model import osediff` checked against a plainly written upstream
forward (peft LoRA merged by formula at scale 8/r = 2.0, conv_in replaced, ×4 bicubic, t = 999 closed
form), then restore, quantize (MinMax W8A8, checkpoint round trip) and ONNX export on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from release_files import OSEDIFF_UNET_TARGETS, OSEDIFF_VAE_TARGETS, osediff_pkl_dict, osediff_release
from toolchain.cli import main


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return osediff_release(tmp_path_factory.mktemp("osediff_release"))


def _args(files, out):
    return ["model", "import", "osediff", "--sd", str(files["sd"]), "--weights", str(files["weights"]),
            "--prompt-embedding", str(files["prompt_embedding"]), "--out", str(out)]


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("osediff_imported") / "osediff"
    assert main(_args(release, out)) == 0
    return out


def _reference(release, image):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(str(release["sd"] / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(release["sd"] / "vae")).eval()
    alphas = DDPMScheduler.from_pretrained(str(release["sd"] / "scheduler")).alphas_cumprod
    pkl = torch.load(release["weights"], weights_only=True)
    with torch.no_grad():
        unet.conv_in.weight.copy_(pkl["state_dict_unet"]["conv_in.base_layer.weight"])
        unet.conv_in.bias.copy_(pkl["state_dict_unet"]["conv_in.base_layer.bias"])
        for net, sd in ((unet, pkl["state_dict_unet"]), (vae, pkl["state_dict_vae"])):
            params = dict(net.named_parameters())
            for key, a in sd.items():
                if ".lora_A." in key:
                    module, adapter = key.split(".lora_A.")
                    b = sd[f"{module}.lora_B.{adapter}"]
                    w = params[f"{module}.weight"]
                    w += (8 / 4) * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)
        prompt = load_file(str(release["prompt_embedding"]))["prompt_embeds"].expand(image.shape[0], -1, -1)
        up = F.interpolate(image, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
        z = vae.encode(up).latent_dist.mode() * vae.config.scaling_factor
        eps = unet(z, 999, encoder_hidden_states=prompt).sample
        ab = alphas[999].double()
        x0 = ((z.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()).float()
        return vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1)


def test_import_equals_plain_upstream_forward(release, imported):
    import json

    from toolchain.models import load_model

    model = load_model(imported)
    assert model.config.kind == "osediff" and model.image_size == 8 and model.config.upscale == 4
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        ours = model(image)
    ref = _reference(release, image)
    assert ours.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, ref, atol=2e-4), (ours - ref).abs().max()
    report = json.loads((imported / "import_report.json").read_text())
    assert report["unet_lora"]["scale"] == [2.0] and report["unet_lora"]["rank"] == [4]
    assert report["unet_lora"]["targets"] == sum(len(v) for v in OSEDIFF_UNET_TARGETS.values())
    assert report["vae_lora"]["targets"] == len(OSEDIFF_VAE_TARGETS)


@pytest.mark.parametrize("case", ["lora_target_missing", "rank_mismatch", "no_conv_in", "not_a_pkl", "prompt_shape", "nan_lora",
                                  "nan_prompt", "truncated_pkl"])
def test_bad_inputs_give_one_error_line_naming_the_file(release, tmp_path, capsys, case):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    files = dict(release)
    if case in ("lora_target_missing", "rank_mismatch", "no_conv_in", "nan_lora"):
        d = osediff_pkl_dict(UNet2DConditionModel.from_pretrained(str(release["sd"] / "unet")).state_dict(),
                             AutoencoderKL.from_pretrained(str(release["sd"] / "vae")).state_dict())
        if case == "lora_target_missing":
            d["unet_lora_others_modules"] = d["unet_lora_others_modules"] + ["mid_block.nothing"]
        elif case == "rank_mismatch":
            d["rank_unet"] = 8
        elif case == "nan_lora":  # a diverged/damaged file: refused, not imported into a model nothing can load
            key = next(k for k in d["state_dict_unet"] if "lora_A" in k)
            d["state_dict_unet"][key] = d["state_dict_unet"][key].clone()
            d["state_dict_unet"][key].view(-1)[0] = float("nan")
        else:
            del d["state_dict_unet"]["conv_in.base_layer.weight"]
        files["weights"] = tmp_path / "bad_osediff.pkl"
        torch.save(d, files["weights"])
    elif case == "not_a_pkl":
        files["weights"] = files["prompt_embedding"]
    elif case == "truncated_pkl":
        files["weights"] = tmp_path / "cut_osediff.pkl"
        files["weights"].write_bytes(release["weights"].read_bytes()[:4000])
    elif case == "nan_prompt":
        files["prompt_embedding"] = tmp_path / "nan_prompt.safetensors"
        save_file({"p": torch.full((1, 77, 32), float("inf"))}, str(files["prompt_embedding"]))
    else:
        files["prompt_embedding"] = tmp_path / "bad_prompt.safetensors"
        save_file({"p": torch.zeros(1, 76, 32)}, str(files["prompt_embedding"]))
    bad = files["prompt_embedding"] if case in ("prompt_shape", "nan_prompt") else files["weights"]
    capsys.readouterr()
    assert main(_args(files, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and str(bad) in lines[0], err
    assert lines[0].isprintable()  # no bytes of the file on the terminal
    if case.startswith("nan"):
        assert "non-finite" in lines[0]
    if case == "truncated_pkl":
        assert "truncated or damaged" in lines[0]
    assert not (tmp_path / "out").exists()


def test_prompt_embedding_as_a_bare_tensor_pt(release, tmp_path):
    """`torch.save(t, "prompt.pt")` is the natural way to write the embedding: accepted like the safetensors file."""
    from safetensors.torch import load_file

    t = load_file(str(release["prompt_embedding"]))["prompt_embeds"]
    files = dict(release, prompt_embedding=tmp_path / "prompt.pt")
    torch.save(t.clone(), files["prompt_embedding"])
    assert main(_args(files, tmp_path / "m")) == 0
    assert (tmp_path / "m").is_dir()


def test_restore_quantize_and_export_on_osediff(imported, tmp_path):
    import numpy as np

    from toolchain.export.onnx_backend import export_onnx
    from toolchain.export.qdq.runtime import ort_session
    from toolchain.export.parts import part_module
    from toolchain.methods import MethodContext
    from toolchain.models import load_model
    from toolchain.pipeline.restore import restore_arrays
    from toolchain.io.images import LoadedImage
    from toolchain.quant.api import quantize_
    from toolchain.quant.checkpoint import load_quantized, save_quantized
    from toolchain.quant.config import QuantConfig

    model = load_model(imported)
    # restore: a 12×6 image comes back 4× larger (48×24)
    rgb = np.random.default_rng(0).random((12, 6, 3)).astype(np.float32)
    out = restore_arrays(model, [LoadedImage(rgb=rgb, alpha=None, mode="RGB", path=None)], model.image_size, progress=False)[0]
    assert out.shape == (48, 24, 3)
    # quantize: every UNet/VAE conv/linear except the constant time path; save → load reproduces outputs
    batches = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(k)) * 2 - 1 for k in range(2)]
    qm = load_model(imported)
    summary = quantize_(qm, QuantConfig.for_bits("minmax", "w8a8"), MethodContext(batches))
    assert summary
    x = batches[0]
    with torch.no_grad():
        q_out, fp_out = qm(x), model(x)
    assert 0 < (q_out - fp_out).abs().mean() < 0.05
    save_quantized(qm, QuantConfig.for_bits("minmax", "w8a8"), tmp_path / "ckpt")
    loaded, _ = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(x), q_out)
    # export: float ONNX of the whole ×4 pipeline matches PyTorch
    rep = export_onnx(model, tmp_path / "osediff.onnx")
    _, inputs, names, _ = part_module(model, "full")
    with torch.no_grad():
        ref = model(inputs[0]).numpy()
    got = ort_session(rep["path"]).run(None, {names[0]: inputs[0].numpy()})[0]
    assert got.shape == ref.shape == (1, 3, 32, 32) and np.abs(got - ref).max() <= 1e-4
    # and the W8A8 checkpoint exports as QDQ ONNX (parity per layer and end to end: tests/test_osediff_export.py;
    # an end-to-end PSNR against fake quant is not a parity measure at t = 999: one rounding flip in ε moves x0
    # 14.6× as far, and this checkpoint measured 38 dB)
    rep_q = export_onnx(loaded, tmp_path / "osediff_w8a8.onnx")
    assert rep_q["int4_weight_layers"] == 0


def test_osediff_tiny_preset_builds_saves_and_loads(tmp_path):
    from toolchain.models import build_model, load_model, preset, save_model
    from toolchain.topology import topology_of

    model = build_model(preset("osediff-tiny"), seed=0)
    assert topology_of(model).kind == "osediff" and "embedder" not in topology_of(model).export_parts
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 32, 32) and model.config.latent_size == 16
    save_model(model, tmp_path / "m", "dir")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(x), y)
    assert main(["model", "init", "--preset", "osediff-tiny", "--format", "diffusers", "--out", str(tmp_path / "d")]) == 2
