"""`toolchain model import osdface`: release-layout files → our model folder, checked against a plainly
written upstream forward (VRE with F.conv2d on the release keys, the first-77-unique-codes Python loop,
LoRA merged by formula into a diffusers UNet, x0 in float64, diffusers VAE)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from release_files import (LORA_TARGETS, decoy_keys, lightning_ckpt, malicious_pickle, osdface_release,
                                 release_vre_state, sample_images, unique_code_counts, upstream_first_unique_codes, upstream_vre_latent)
from toolchain.cli import main


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return osdface_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "osdface"
    args = ["model", "import", "osdface", "--out", str(out)] + [x for k in ("sd", "vre", "proj", "lora") for x in (f"--{k}", str(release[k]))]
    assert main(args) == 0
    return out


# ----- the plain upstream forward (lq_embed/vqvae.py, lq_embed/inference.py, infer.py) ------------

def _projection_reference(proj: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    x = tokens.permute(0, 2, 1)
    x = F.silu(F.conv1d(x, proj["conv1.weight"], proj["conv1.bias"]))
    x = F.silu(F.conv1d(x, proj["conv2.weight"], proj["conv2.bias"]))
    return x.permute(0, 2, 1)


def _osdface_reference(release, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(str(release["sd"] / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(release["sd"] / "vae")).eval()
    alphas = DDIMScheduler.from_pretrained(str(release["sd"] / "scheduler")).alphas_cumprod
    lora = load_file(str(release["lora"]))
    with torch.no_grad():
        weights = dict(unet.named_parameters())
        for key in lora:
            if key.endswith(".lora_A.weight"):
                a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
                w = weights[key[len("unet."):].replace(".lora_A.weight", ".weight")]
                w += 1.0 * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)  # rank 4, alpha 4
        z = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
        eps = unet(z, 399, encoder_hidden_states=prompt).sample
        ab = alphas[399].double()
        x0 = ((z.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()).float()
        return vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1)


# ----- tests -------------------------------------------------------------------------------------

def test_import_equals_plain_upstream_forward_batch_of_two(release, imported, tmp_path):
    from toolchain.models import load_model

    model = load_model(imported)
    assert model.config.image_size == 32 and model.config.embedder.input_size == 512
    image = sample_images()  # two different images in one batch
    with torch.no_grad():
        ours_prompt = model.prompt(image)
        ours = model(image)
    state = release_vre_state()  # what the generator wrote into associate_2.ckpt (used here without any loader)
    book = state["vqvae_LQ.quantize.embedding.weight"]
    with torch.no_grad():
        z = upstream_vre_latent(state, image)
    ref_prompt = _projection_reference(torch.load(release["proj"], weights_only=True), upstream_first_unique_codes(z, book))
    assert not torch.allclose(ref_prompt[0], ref_prompt[1])
    # the selection is exercised both ways: one image has more than 77 distinct codes, the other fewer (zero rows)
    unique = unique_code_counts(z, book)
    assert max(unique) > 77 and min(unique) < 77, unique
    assert torch.allclose(ours_prompt, ref_prompt, atol=1e-5, rtol=1e-4), (ours_prompt - ref_prompt).abs().max()
    ref = _osdface_reference(release, image, ref_prompt)
    assert torch.allclose(ours, ref, atol=2e-4), (ours - ref).abs().max()
    # and through `toolchain restore` (a 32×32 PNG: no resize or padding; 8-bit output)
    import numpy as np
    from PIL import Image

    src = tmp_path / "in" / "face.png"
    src.parent.mkdir()
    Image.fromarray(np.round((image[0].permute(1, 2, 0).numpy() + 1) / 2 * 255).astype(np.uint8)).save(src)
    assert main(["restore", str(src), "--model", str(imported), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    restored = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "face.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    assert (restored - (ref[0] + 1) / 2).abs().max() <= 1.0 / 255
    assert math.isclose(model.config.alpha_bar, 0.4260861277580261, rel_tol=1e-7)


def test_import_report_records_sources_lora_and_dropped_keys(release, imported):
    import json

    from safetensors.torch import load_file

    from toolchain.io.hashing import sha256_file
    from toolchain.models import load_model

    report = json.loads((imported / "import_report.json").read_text())
    for flag in ("vre", "proj", "lora"):
        assert report["sources"][flag]["sha256"] == sha256_file(release[flag])
    assert report["lora"]["targets"] == len(LORA_TARGETS) and report["lora"]["rank"] == [4] and report["lora"]["scale"] == [1.0]
    assert report["vre"]["release_tensors"] == 173 and report["vre"]["unused_tensors"] == 6
    assert sum(report["vre"]["dropped_keys"].values()) == len(decoy_keys())
    # the merged weight is W + B·A for a conv and a linear target
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(str(release["sd"] / "unet")).state_dict()
    lora, unet = load_file(str(release["lora"])), load_model(imported).unet.state_dict()
    for t in ("down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"):
        a, b = lora[f"unet.{t}.lora_A.weight"], lora[f"unet.{t}.lora_B.weight"]
        want = base[f"{t}.weight"] + (b.flatten(1) @ a.flatten(1)).reshape(base[f"{t}.weight"].shape)
        assert torch.allclose(unet[f"{t}.weight"], want, atol=1e-6) and not torch.allclose(unet[f"{t}.weight"], base[f"{t}.weight"])


def _broken_vre(path, drop=None, reshape=None):
    state = {**release_vre_state(), **decoy_keys()}
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = torch.zeros(7, 7, 3, 3)
    return lightning_ckpt(path, state)


@pytest.mark.parametrize("case", ["missing_key", "misshaped_key", "proj_as_vre", "vre_as_proj", "proj_as_lora",
                                  "vre_as_lora_safetensors", "lora_target_not_in_unet", "malicious_vre", "inf_lora", "truncated_vre"])
def test_bad_inputs_give_one_error_line_naming_the_file(release, tmp_path, capsys, case):
    files = dict(release)
    marker = tmp_path / "ran"
    if case == "missing_key":
        files["vre"] = _broken_vre(tmp_path / "assoc_missing.ckpt", drop="vqvae_LQ.encoder.down.5.attn.1.q.weight")
    elif case == "misshaped_key":
        files["vre"] = _broken_vre(tmp_path / "assoc_shape.ckpt", reshape="vqvae_LQ.encoder.mid.block_1.conv1.weight")
    elif case == "proj_as_vre":
        files["vre"] = release["proj"]
    elif case == "vre_as_proj":
        files["proj"] = release["vre"]
    elif case == "proj_as_lora":
        files["lora"] = release["proj"]
    elif case == "vre_as_lora_safetensors":
        files["lora"] = tmp_path / "assoc.safetensors"
        assert main(["model", "convert", str(release["vre"]), str(files["lora"])]) == 0
    elif case == "lora_target_not_in_unet":
        from safetensors.torch import load_file, save_file

        lora = load_file(str(release["lora"]))
        lora["unet.down_blocks.9.nothing.lora_A.weight"] = torch.zeros(4, 8)
        lora["unet.down_blocks.9.nothing.lora_B.weight"] = torch.zeros(8, 4)
        files["lora"] = tmp_path / "bad_lora.safetensors"
        save_file(lora, str(files["lora"]))
    elif case == "malicious_vre":
        files["vre"] = malicious_pickle(tmp_path / "associate_evil.ckpt", marker)
    elif case == "inf_lora":
        from safetensors.torch import load_file, save_file

        lora = load_file(str(release["lora"]))
        key = next(k for k in lora if "lora_B" in k)
        lora[key] = lora[key].clone()
        lora[key].view(-1)[0] = float("inf")
        files["lora"] = tmp_path / "inf_lora.safetensors"
        save_file(lora, str(files["lora"]))
    elif case == "truncated_vre":
        files["vre"] = tmp_path / "assoc_cut.ckpt"
        files["vre"].write_bytes(release["vre"].read_bytes()[:200_000])
    out = tmp_path / "out"
    capsys.readouterr()
    args = ["model", "import", "osdface", "--out", str(out)] + [x for k in ("sd", "vre", "proj", "lora") for x in (f"--{k}", str(files[k]))]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    bad_flag = {"missing_key": "vre", "misshaped_key": "vre", "proj_as_vre": "vre", "vre_as_proj": "proj", "proj_as_lora": "lora",
                "vre_as_lora_safetensors": "lora", "lora_target_not_in_unet": "lora", "malicious_vre": "vre", "inf_lora": "lora",
                "truncated_vre": "vre"}[case]
    assert str(files[bad_flag]) in lines[0], lines[0]
    assert lines[0].isprintable(), lines[0]  # no bytes of the file on the terminal
    if case == "inf_lora":
        assert "non-finite" in lines[0]
    if case == "truncated_vre":
        assert "truncated or damaged" in lines[0]
    assert not out.exists() and not marker.exists()
