"""The release-architecture VRE embedder: per-image selection in a batch, and its code-index dtype."""

from __future__ import annotations

import pytest
import torch

from release_files import upstream_first_unique_codes
from toolchain.models.configs import EmbedderConfig
from toolchain.models.embedder import VisualPromptEmbedder


def _embedder(codebook_size=256, z=8, dtype=torch.float32):
    cfg = EmbedderConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32, z_channels=z,
                         codebook_size=codebook_size, num_tokens=77, proj_hidden=8, cross_attention_dim=16,
                         double_normalize=True, attention_levels=(1,), input_size=32)
    torch.manual_seed(0)
    emb = VisualPromptEmbedder(cfg).eval()
    with torch.no_grad():
        emb.codebook.weight.copy_(torch.randn(codebook_size, z))
    return emb.to(dtype)


def test_batch_selection_matches_upstream_loop_per_image():
    emb = _embedder()
    book = emb.codebook.weight.detach()
    g = torch.Generator().manual_seed(1)
    many = book[torch.randperm(256, generator=g)[:256]] + 0.05 * torch.randn(256, 8, generator=g)  # 256 distinct codes
    few = book[torch.randint(0, 20, (256,), generator=g)] + 0.05 * torch.randn(256, 8, generator=g)  # ≤ 20 codes
    z = torch.stack([many, few]).transpose(1, 2).reshape(2, 8, 16, 16)
    got = emb.select_tokens(z)
    want = upstream_first_unique_codes(z, book)
    assert torch.equal(got, want)
    assert (want[1].abs().sum(-1) == 0).sum() >= 77 - 20  # zero rows for the image with few codes
    assert torch.equal(emb.select_tokens(z[1:]), want[1:])  # batch composition does not change a row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_code_index_path_is_exact_for_code_1023_in_half_precisions(dtype):
    # Upstream casts code indices to the activation dtype: in bfloat16 index 1023 becomes 1024.
    assert torch.tensor(1023.0).to(torch.bfloat16).item() == 1024.0
    emb = _embedder(codebook_size=1024, z=8, dtype=dtype)
    book = emb.codebook.weight.detach()
    z = book[torch.tensor([1023, 5, 7, 5])].float() + 1e-3
    z = z.t().reshape(1, 8, 2, 2).to(dtype)
    idx, _ = emb.nearest_codes(z)
    assert idx.dtype == torch.int64 and idx[0, 0].item() == 1023
    tokens = emb.select_tokens(z)
    assert tokens.dtype == dtype
    assert {tuple(r.tolist()) for r in tokens[0, :3]} == {tuple(book[i].tolist()) for i in (1023, 5, 7)}
    assert not tokens[0, 3:].any()  # three distinct codes, then zero rows
    assert emb(torch.zeros(1, 3, 32, 32, dtype=dtype)).dtype == dtype  # whole embedder runs in that dtype


def test_release_architecture_embedder_exports_to_onnx_and_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    emb = _embedder(codebook_size=64)
    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1  # resized to 32 inside
    path = tmp_path / "vre.onnx"
    torch.onnx.export(emb, (image,), str(path), input_names=["lq_image"], output_names=["prompt"], opset_version=17, dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"lq_image": image.numpy()})[0]
    with torch.no_grad():
        want = emb(image)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5)


def test_release_grammar_at_release_width_is_the_osdface_preset_embedder():
    import math

    import torch as _t

    from toolchain.models.configs import preset
    from toolchain.models.release.vre import VreWidths, release_grammar

    grammar = release_grammar(VreWidths(ch=64, in_channels=3, z_channels=512, embed_dim=512, n_embed=1024))
    assert len(grammar) == 173 and sum(math.prod(e.shape) for e in grammar.values()) == 29_172_416  # UPSTREAM.md
    with _t.device("meta"):
        ours = VisualPromptEmbedder(preset("osdface").embedder).state_dict()
    mapped = {e.ours: e.shape for e in grammar.values() if e.ours is not None}
    assert set(mapped) == set(ours) - {"proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"}
    for key, shape in mapped.items():
        assert math.prod(ours[key].shape) == math.prod(shape), key  # attention 1×1 convs become Linear weights
