"""OSEDiff as a super-resolution pipeline: latent/VAE tiling, the AdaIN colour fix and
`restore --upstream-preprocessing` for both kinds, each checked against a plainly written reference
(numpy statistics, Pillow/torch resizes written out in the test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from toolchain.cli import main


@pytest.fixture(scope="module")
def sr_model():
    from toolchain.models import build_model, preset

    return build_model(preset("osediff-tiny"), seed=0)


@pytest.fixture(scope="module")
def sr_model_dir(sr_model, tmp_path_factory):
    from toolchain.models import save_model

    out = tmp_path_factory.mktemp("osediff_tiny") / "m"
    save_model(sr_model, out, "dir")
    return out


def _lr(size, seed=0):
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _untiled(model, x):
    saved = model.latent_tile, model.vae_encoder_tile, model.vae_decoder_tile
    model.latent_tile = model.vae_encoder_tile = model.vae_decoder_tile = None
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.latent_tile, model.vae_encoder_tile, model.vae_decoder_tile = saved


def test_tile_starts_cover_and_overlap():
    from toolchain.models.osediff import tile_starts

    assert tile_starts(64, 96, 32) == [0]
    assert tile_starts(160, 96, 32) == [0, 64]
    for n, t, o in ((200, 96, 32), (97, 96, 32), (33, 16, 8)):
        s = tile_starts(n, t, o)
        assert s[0] == 0 and s[-1] + t == n and all(b - a <= t - o for a, b in zip(s, s[1:]))


def test_latent_tile_covering_the_latent_equals_untiled(sr_model):
    x = _lr((16, 16))  # latent 32×32
    ref = _untiled(sr_model, x)
    sr_model.latent_tile, sr_model.latent_overlap = 32, 8
    with torch.no_grad():
        assert torch.equal(sr_model(x), ref)
    sr_model.latent_tile, sr_model.latent_overlap = 96, 32


def test_latent_tiling_on_a_larger_input_is_finite_and_close_to_untiled(sr_model):
    x = _lr((16, 16), seed=1)  # latent 32×32, tiles of 24 with overlap 8: 2×2 tiles
    ref = _untiled(sr_model, x)
    sr_model.latent_tile, sr_model.latent_overlap = 24, 8
    try:
        with torch.no_grad():
            y = sr_model(x)
    finally:
        sr_model.latent_tile, sr_model.latent_overlap = 96, 32
    assert y.shape == ref.shape == (1, 3, 64, 64) and torch.isfinite(y).all()
    d = (y - ref).abs()
    # measured on this random tiny model over seeds 0-4 (GroupNorm statistics differ per tile; outputs span
    # [-1, 1]): mean 0.048-0.058, 99th percentile 0.22-0.26, max 0.51-0.84
    assert d.mean() < 0.08 and d.quantile(0.99) < 0.35, (d.mean(), d.quantile(0.99))


def test_vae_tiling_is_finite_and_close_to_untiled(sr_model):
    x = _lr((16, 16), seed=2)
    ref = _untiled(sr_model, x)
    sr_model.latent_tile, sr_model.vae_encoder_tile, sr_model.vae_decoder_tile = None, 32, 16
    try:
        with torch.no_grad():
            y = sr_model(x)
    finally:
        sr_model.latent_tile, sr_model.vae_encoder_tile, sr_model.vae_decoder_tile = 96, None, None
    assert y.shape == ref.shape and torch.isfinite(y).all()
    d = (y - ref).abs()
    # measured over seeds 0-4: mean 0.090-0.112, 99th percentile 0.39-0.55 (per-tile GroupNorm in encoder and decoder)
    assert d.mean() < 0.15 and d.quantile(0.99) < 0.7, (d.mean(), d.quantile(0.99))


def test_adain_color_fix_matches_numpy():
    from toolchain.models.osediff import adain_color_fix

    g = torch.Generator().manual_seed(3)
    img, ref = torch.rand(2, 3, 10, 12, generator=g), torch.rand(2, 3, 20, 24, generator=g) * 0.5 + 0.2
    got = adain_color_fix(img, ref).numpy()
    a, r = img.double().numpy(), ref.double().numpy()
    expected = np.empty_like(a)
    for b in range(2):
        for c in range(3):
            ma, sa = a[b, c].mean(), np.sqrt(a[b, c].var(ddof=1) + 1e-5)
            mr, sr = r[b, c].mean(), np.sqrt(r[b, c].var(ddof=1) + 1e-5)
            expected[b, c] = (a[b, c] - ma) / sa * sr + mr
    assert np.abs(got - expected).max() < 1e-5


def test_restore_arrays_with_adain_matches_the_statistics_of_the_upscaled_input(sr_model):
    from toolchain.io.images import LoadedImage
    from toolchain.pipeline.restore import restore_arrays

    rgb = np.random.default_rng(4).random((8, 8, 3)).astype(np.float32)  # model size: no padding, no resize
    out = restore_arrays(sr_model, [LoadedImage(rgb, None, "RGB")], sr_model.image_size, progress=False, color_fix="adain")[0]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None] * 2 - 1
    up = ((F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1) + 1) / 2)[0].numpy()
    unclipped = (out > 1e-6) & (out < 1 - 1e-6)
    assert unclipped.mean() > 0.9  # the fix itself is not clamped; the saved image is
    for c in range(3):
        assert abs(out[..., c].mean() - up[c].mean()) < 0.02


def _save(path, arr):
    Image.fromarray(arr).save(path)
    return path


def test_upstream_osediff_preprocessing_is_pillow_bicubic():
    from toolchain.io.images import LoadedImage
    from toolchain.pipeline.restore import upstream_osediff_input

    arr = (np.random.default_rng(5).random((10, 12, 3)) * 255).round().astype(np.uint8)
    got = upstream_osediff_input(LoadedImage(arr.astype(np.float32) / 255, None, "RGB"), 4, 128)
    # written out: short side 10 < 128 → 128 × int(12·12.8) = 153, ×4 → 612×512, Lanczos → 608×512
    im = Image.fromarray(arr).resize((153, 128), Image.BICUBIC).resize((612, 512), Image.BICUBIC).resize((608, 512), Image.LANCZOS)
    ref = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    assert got.shape == (1, 3, 512, 608) and torch.equal(got, ref)
    # Pillow's bicubic is not torch's: the two ×4 upscales of the same image differ visibly
    small = Image.fromarray(arr[:8, :8])
    pil = np.asarray(small.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    tch = F.interpolate(torch.from_numpy(arr[:8, :8].astype(np.float32) / 255).permute(2, 0, 1)[None], scale_factor=4,
                        mode="bicubic", align_corners=False)[0].permute(1, 2, 0).clamp(0, 1).numpy()
    assert np.abs(pil - tch).max() > 2 / 255


def test_upstream_osediff_restore(sr_model, sr_model_dir, tmp_path):
    from toolchain.io.images import load_image
    from toolchain.pipeline.restore import restore_upstream

    (tmp_path / "in").mkdir()
    arr = (np.random.default_rng(7).random((5, 7, 3)) * 255).round().astype(np.uint8)
    src = _save(tmp_path / "in" / "a.png", arr)
    # model input size 8: short side 5 → 8 × int(7·1.6) = 11, ×4 → 44×32, Lanczos → 40×32
    im = Image.fromarray(arr).resize((11, 8), Image.BICUBIC).resize((44, 32), Image.BICUBIC).resize((40, 32), Image.LANCZOS)
    x_up = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        y = ((sr_model.forward_upscaled(x_up) + 1) / 2).clamp(0, 1)
    ref = y[0].permute(1, 2, 0).numpy()
    got = restore_upstream(sr_model, [load_image(src)], progress=False)[0]
    assert got.shape == ref.shape == (32, 40, 3) and np.abs(got - ref).max() < 1e-5
    from toolchain.models.osediff import adain_color_fix

    fixed = restore_upstream(sr_model, [load_image(src)], progress=False, color_fix="adain")[0]
    ref_fix = adain_color_fix(y, (x_up + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(fixed - ref_fix).max() < 1e-5
    # through the CLI: RGB, upstream's size, rounded (not truncated) 8-bit values
    assert main(["restore", str(src), "--model", str(sr_model_dir), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--upstream-preprocessing"]) == 0
    with Image.open(tmp_path / "out" / "a.png") as f:
        assert f.mode == "RGB" and f.size == (40, 32)
        written = np.asarray(f).astype(int)
    rounded, truncated = np.floor(ref * 255 + 0.5).astype(int), np.floor(ref * 255).astype(int)
    assert np.abs(written - rounded).max() <= 1 and (written == rounded).mean() > 0.99 > (written == truncated).mean()


def test_upstream_osdface_square_and_non_square(tiny_model_path, tmp_path):
    from toolchain.models import load_model

    model = load_model(tiny_model_path)
    size = model.image_size
    rng = np.random.default_rng(6)
    sq = (rng.random((20, 20, 3)) * 255).round().astype(np.uint8)
    ns = (rng.random((19, 30, 4)) * 255).round().astype(np.uint8)  # RGBA: alpha dropped upstream
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "sq.png", sq)
    _save(tmp_path / "in" / "ns.png", ns)
    assert main(["restore", str(tmp_path / "in"), "--model", str(tiny_model_path), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--upstream-preprocessing"]) == 0
    # square: bilinear align_corners=True to the model size, output stays at that size, rounded to 8 bits
    x = torch.from_numpy(sq.astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    with torch.no_grad():
        ref = ((model(x) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(tmp_path / "out" / "sq.png"))
    assert got.shape == (size, size, 3)
    assert np.abs(got.astype(int) - np.floor(ref * 255 + 0.5).astype(int)).max() <= 1
    # non-square: native size, output cropped to multiples of 8 (19×30 → 16×24), RGB
    x = torch.from_numpy(ns[..., :3].astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        ref = ((model(x) + 1) / 2).clamp(0, 1)[0, :, :16, :24].permute(1, 2, 0).numpy()
    with Image.open(tmp_path / "out" / "ns.png") as f:
        assert f.mode == "RGB"
        got = np.asarray(f)
    assert got.shape == (16, 24, 3)
    assert np.abs(got.astype(int) - np.floor(ref * 255 + 0.5).astype(int)).max() <= 1


def test_color_fix_on_osdface_is_one_error_line(tiny_model_path, tmp_path, capsys):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    capsys.readouterr()
    assert main(["restore", str(tmp_path / "a.png"), "--model", str(tiny_model_path), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--color-fix", "adain"]) == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] and "osediff" in err and "Traceback" not in err


def test_constant_prompt_kv_fold_equals_unfolded_and_leaves_the_quant_scope(sr_model):
    import copy

    from toolchain.models.osediff import ConstantProjection
    from toolchain.quant.config import quantizable_layers

    model = copy.deepcopy(sr_model)
    with torch.no_grad():
        model.prompt_embeds.normal_(generator=torch.Generator().manual_seed(9))  # a non-zero prompt
    x = _lr((8, 8), seed=10).expand(2, -1, -1, -1)
    cross = [n for n, m in model.unet.named_modules() if n.endswith(".attn2")]
    assert cross
    # the independent reference: W_k·c + b_k computed by hand for one cross-attention
    attn = model.unet.get_submodule(cross[0])
    c = model.prompt_embeds[0]
    k_ref = c @ attn.to_k.weight.T + (attn.to_k.bias if attn.to_k.bias is not None else 0)
    with torch.no_grad():
        ref = model(x)
    names = {n for n, _ in quantizable_layers(model)}
    assert not any(n.endswith((".attn2.to_k", ".attn2.to_v")) for n in names)
    assert any(n.endswith(".attn2.to_q") for n in names)
    assert model.fold_constant_prompt() == 2 * len(cross) and model.fold_constant_prompt() == 0
    assert isinstance(attn.to_k, ConstantProjection) and torch.allclose(attn.to_k.value[0], k_ref, atol=1e-6)
    with torch.no_grad():
        folded = model(x)
    assert (folded - ref).abs().max() <= 1e-5
    assert not any(n.endswith((".attn2.to_k", ".attn2.to_v")) for n, _ in quantizable_layers(model))


def test_osediff_preset_has_sd21_sizes():
    from toolchain.models.configs import preset
    from toolchain.topology import topology

    cfg = preset("osediff")
    assert (cfg.kind, cfg.image_size, cfg.upscale, cfg.latent_size, cfg.timestep) == ("osediff", 128, 4, 64, 999)
    assert cfg.prompt_shape == (77, 1024) and cfg.unet == preset("osdface").unet and cfg.embedder is None
    assert topology(cfg.kind).constant_prompt_modules
