"""The fast fake-quant path (one autograd node with a 1-byte mask, no device syncs, fused dynamic
min-max) against the reference formulation kept in FakeQuantizer._reference_forward: same outputs
and the same gradients, for a QD-LoRA training step (rotated inputs, tied SVD residual with dynamic
weight scales, LoRA branch) and for LSQ (learnable scales fall back to the reference graph)."""

import copy

import pytest
import torch

from conftest import tiny_batches
from toolchain.lowrank.compensate import _branch_params, follow_trained_weights
from toolchain.methods import MethodContext
from toolchain.models import load_model
from toolchain.quant import quantizer as Q
from toolchain.quant.api import quantize_
from toolchain.quant.calibrate import quant_layers
from toolchain.quant.config import QuantConfig


def _step(model, x, params):
    for p in params.values():
        p.grad = None
        p.requires_grad_(True)
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {k: p.grad.detach().clone() for k, p in params.items()}


@pytest.fixture()
def reference_path():
    yield
    Q.REFERENCE_PATH = False


def test_fast_path_equals_reference_in_a_qdlora_step(tiny_model_path, reference_path):
    model = load_model(tiny_model_path)
    quantize_(model, QuantConfig.for_bits("quantface", "w4a4", params={"svd_rank": 2, "lora_rank": 2, "train_steps": 0, "merge": False}),
              MethodContext(tiny_batches(2)))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # a non-zero LoRA B, as after some training, so both branches carry gradient
        for name, p in _branch_params(model).items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 1e-2)
    assert follow_trained_weights(model) == sum(layer.weight_quantizer is not None for _, layer in quant_layers(model))
    ref_model = copy.deepcopy(model)
    x = tiny_batches(1, seed=5)[0]
    fast_y, fast_g = _step(model, x, _branch_params(model))
    Q.REFERENCE_PATH = True
    ref_y, ref_g = _step(ref_model, x, _branch_params(ref_model))
    assert torch.equal(fast_y, ref_y)
    assert fast_g.keys() == ref_g.keys() and len(fast_g) > 10
    for k in fast_g:
        assert torch.allclose(fast_g[k], ref_g[k], rtol=1e-5, atol=1e-9), k
    assert any(g.abs().max() > 0 for g in fast_g.values())
    # the dynamic weight scales written into the buffers are the same too
    for (n, a), (_, b) in zip(quant_layers(model), quant_layers(ref_model)):
        assert torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale), n


def test_fast_path_gradient_masks_outside_the_grid_and_keeps_dtype():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.24, 0.75, 0.9, 5.0], requires_grad=True)
    scale, zero = torch.tensor(0.25), torch.tensor(4.0)
    y = Q.fake_quantize_ste(x, scale, zero, 0, 7)
    y.backward(torch.ones_like(y))
    x2 = x.detach().clone().requires_grad_(True)
    y2 = Q.fake_quantize(x2, scale, zero, 0, 7)
    y2.backward(torch.ones_like(y2))
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    # −3, 0.9 and 5 fall outside the grid [−1, 0.75]; 0.75 sits on its top, where torch.clamp's gradient is 0
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    xb = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    for scale in (torch.tensor(0.1), torch.full((4, 1), 0.1)):  # 0-dim keeps bf16, a per-channel float32 scale promotes
        xb.grad = None
        yb = Q.fake_quantize_ste(xb, scale, torch.zeros_like(scale), -7, 7)
        yb.sum().backward()
        assert yb.dtype == Q.fake_quantize(xb, scale, torch.zeros_like(scale), -7, 7).dtype and xb.grad.dtype == torch.bfloat16


def test_learnable_scales_take_the_reference_graph(tiny_model_path):
    """LSQ needs ∂/∂s: with a Parameter scale the quantizer uses the autograd formulation."""
    from toolchain.quant.learnable import learn_step_sizes

    model = load_model(tiny_model_path)
    quantize_(model, QuantConfig.for_bits("minmax", "w4a4"), MethodContext(tiny_batches(2)))
    quantizers = [layer.input_quantizer for _, layer in quant_layers(model) if layer.input_quantizer is not None]
    params = learn_step_sizes(quantizers)
    model(tiny_batches(1, seed=3)[0]).mean().backward()
    assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params.values()) > len(params) // 2
