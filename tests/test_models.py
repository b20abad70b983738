"""Model layer: presets, storage formats, the traceable visual-prompt token selection."""

import pytest
import torch

from toolchain.errors import CheckpointError
from toolchain.models import build_model, load_model, preset, save_model
from toolchain.models.configs import sd_alpha_bar


def test_alpha_bar_matches_upstream():
    assert sd_alpha_bar(399) == pytest.approx(0.426086, abs=1e-6)


@pytest.mark.parametrize("fmt,name", [("file", "m.safetensors"), ("dir", "m"), ("diffusers", "mf")])
def test_save_load_round_trip(tmp_path, fmt, name):
    model = build_model(preset("tiny"), seed=5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        y = model(x)
    save_model(model, tmp_path / name, fmt)
    loaded = load_model(tmp_path / name)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_raw_safetensors_needs_preset(tmp_path):
    from safetensors.torch import save_file

    model = build_model(preset("tiny"), seed=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "raw.safetensors")
    with pytest.raises(CheckpointError, match="--preset"):
        load_model(tmp_path / "raw.safetensors")
    assert load_model(tmp_path / "raw.safetensors", "tiny") is not None


def test_wrong_architecture_is_reported(tmp_path):
    save_model(build_model(preset("tiny")), tmp_path / "t.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "t.safetensors")
    state["unet.conv_in.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="architecture|shape"):
        load_model(tmp_path / "bad.safetensors", "tiny")


def _loop_selection(embedder, z):
    """The upstream algorithm: positions sorted by distance, first T unique codes (batch 1)."""
    idx, dist = embedder.nearest_codes(z)
    order = torch.argsort(dist[0], stable=True)
    seen, picked = set(), []
    for pos in order.tolist():
        code = int(idx[0, pos])
        if code not in seen:
            seen.add(code)
            picked.append(code)
        if len(picked) == embedder.cfg.num_tokens:
            break
    tokens = torch.zeros(embedder.cfg.num_tokens, embedder.cfg.z_channels)
    tokens[: len(picked)] = embedder.codebook.weight[picked]
    return tokens


def test_traceable_token_selection_equals_upstream_loop():
    model = build_model(preset("tiny"), seed=3)
    emb = model.embedder
    for seed in range(4):
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        with torch.no_grad():
            z = emb.encode(x)
            assert torch.allclose(emb.select_tokens(z)[0], _loop_selection(emb, z))


def test_token_selection_pads_with_zero_rows():
    model = build_model(preset("tiny"), seed=3)
    emb = model.embedder
    z = emb.codebook.weight[:2].t().reshape(1, -1, 1, 2)  # two positions → two distinct codes
    z = torch.cat([z, z], dim=3)
    tokens = emb.select_tokens(z)
    assert tokens.shape == (1, emb.cfg.num_tokens, emb.cfg.z_channels)
    assert torch.count_nonzero(tokens.abs().sum(-1)) == 2


def test_reference_model_restores_better_than_input(ref_model_path, heldout_dir):
    from toolchain.calibration.dataset import CalibrationSet
    from toolchain.eval.metrics import psnr, st_lpips

    model = load_model(ref_model_path)
    data = CalibrationSet.open(heldout_dir)
    lq = torch.cat(data.batches(128, 12))
    hq = torch.cat(data.batches(128, 12, which="hq"))
    with torch.no_grad():
        out = model(lq)
    to01 = lambda t: (t + 1) / 2  # noqa: E731
    assert st_lpips(to01(out), to01(hq)).mean() < st_lpips(to01(lq), to01(hq)).mean() - 0.1
    assert psnr(to01(out), to01(hq)).mean() > psnr(to01(lq), to01(hq)).mean()
