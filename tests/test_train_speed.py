"""The training-speed paths (issue: QD-LoRA step within 2× of plain training) against their references.

CPU: the one-GEMM form of the online Hadamard balancing equals the factored fast transform, and the
tensor-batch protocol of ``fit`` (which the CUDA graph and the data-parallel shards need) trains exactly like
the index protocol.
CUDA (skipped without a GPU; run on the H200 machine, see benchmarks/results/recipe_speed): a QD-LoRA
run with its forward + backward captured in a CUDA graph follows the eager run, and the GPU-only
shortcuts (dense Hadamard, no float16 round trip under autocast) keep the model's output.
"""


import pytest
import torch

from conftest import tiny_batches
from toolchain.balance import transform as T
from toolchain.lowrank import branch as B
from toolchain.lowrank.compensate import _branch_params, follow_trained_weights
from toolchain.methods import MethodContext
from toolchain.models import load_model
from toolchain.quant.api import quantize_
from toolchain.quant.calibrate import quant_layers
from toolchain.quant.config import QuantConfig
from toolchain.train.fit import fit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("channels,block,axis,shape,shift", [
    (320, 320, 1, (2, 320, 5, 7), False),  # SD-2.1's 320 = 20·16 (Paley block ⊗ butterflies), conv input
    (40, 20, -1, (2, 9, 40), True),  # block-diagonal, linear input, PassionSR-style shift
    (1280, 1280, -1, (3, 1280), False),
])
def test_dense_balance_equals_factored_transform(channels, block, axis, shape, shift):
    g = torch.Generator().manual_seed(channels)
    ob = T.OnlineBalance(channels, axis, True, block, shift=shift)
    ob.multiplier.copy_(torch.rand(channels, generator=g) + 0.5)
    if shift:
        ob.shift.copy_(torch.randn(channels, generator=g))
    x = torch.randn(*shape, generator=g)
    ax = axis if axis >= 0 else x.dim() + axis
    ref = ob(x)  # CPU: the factored transform (butterflies + dense block)
    dense = ob._forward_dense(x, ax)
    assert dense.shape == ref.shape
    assert torch.allclose(dense, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the cache follows the multiplier: a changed multiplier gives the new map
    ob.multiplier.mul_(2.0)
    assert torch.allclose(ob._forward_dense(x, ax), ob(x), rtol=1e-5, atol=1e-5 * float(ref.abs().max()) * 2)


def _qdlora_model(path, seed=0):
    model = load_model(path)
    quantize_(model, QuantConfig.for_bits("quantface", "w4a4", params={"svd_rank": 2, "lora_rank": 2, "train_steps": 0, "merge": False}),
              MethodContext(tiny_batches(2)))
    for p in model.parameters():
        p.requires_grad_(False)
    assert follow_trained_weights(model) == sum(layer.weight_quantizer is not None for _, layer in quant_layers(model))
    return model


def test_fit_tensor_inputs_train_like_the_index_protocol(tiny_model_path):
    batches = tiny_batches(3, seed=2)
    targets = [b.flip(-1) for b in batches]
    runs = []
    for protocol in ("index", "batches"):
        model = _qdlora_model(tiny_model_path)
        params = _branch_params(model)
        if protocol == "index":
            res = fit(params, lambda step, i: (torch.nn.functional.mse_loss(model(batches[i]), targets[i]), {}), 3, 5, 1e-3, 0,
                      torch.device("cpu"), None, "t")
        else:
            res = fit(params, lambda step, b: (torch.nn.functional.mse_loss(model(b[0]), b[1]), {}), 3, 5, 1e-3, 0,
                      torch.device("cpu"), None, "t", batches=lambda i: (batches[i], targets[i]), graphable=True)
        runs.append((res, {k: p.detach().clone() for k, p in params.items()}))
    (a, pa), (b, pb) = runs
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["history"][0]["loss"] != a["history"][-1]["loss"]  # it trained
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def _grads(params):
    return {k: p.grad.detach().float().clone() for k, p in params.items()}


def _close(a, b, rel):
    return all(float((a[k] - b[k]).abs().max()) <= rel * max(float(b[k].abs().max()), 1e-12) for k in b)


@cuda
def test_cuda_graph_step_equals_the_eager_step(tiny_model_path):
    from toolchain.train.graphs import GraphedStep

    model = _qdlora_model(tiny_model_path).cuda()
    params = _branch_params(model)
    for p in params.values():
        p.requires_grad_(True)
    xs = [b.cuda() for b in tiny_batches(2, seed=2)]

    def loss_fn(x):
        return torch.nn.functional.mse_loss(model(x).float(), x.flip(-1)), {"mean": x.mean()}

    def eager(x):
        for p in params.values():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(x)
        loss.backward()
        return float(loss), _grads(params)

    ref0, ref1 = eager(xs[0]), eager(xs[1])
    step = GraphedStep(list(params.values()), loss_fn, torch.bfloat16, warmup=1)
    step(xs[0])  # eager warm-up
    first = step(xs[0])  # capture + replay
    assert step.graph is not None and step.replays == 1
    l_first, g_first = float(first[0]), _grads(params)
    again = step(xs[0])  # a replay is deterministic
    assert float(again[0]) == l_first and all(torch.equal(g_first[k], v) for k, v in _grads(params).items())
    # bf16 autocast: cuDNN may pick other algorithms inside the capture, so bf16-level agreement
    assert l_first == pytest.approx(ref0[0], rel=1e-3) and _close(g_first, ref0[1], 3e-2)
    other = step(xs[1])  # new data through the static inputs, and the logs follow it
    assert float(other[0]) == pytest.approx(ref1[0], rel=1e-3) and _close(_grads(params), ref1[1], 3e-2)
    assert float(other[1]["mean"]) == pytest.approx(float(xs[1].mean()), rel=1e-6)
    small = step(xs[1][:1])  # another shape runs eagerly into the same gradient buffers
    assert step.replays == 3 and torch.isfinite(small[0])
    assert _close(_grads(params), eager(xs[1][:1])[1], 3e-2)


@cuda
def test_cuda_graph_in_fit_trains(tiny_model_path, monkeypatch):
    batches = [b.cuda() for b in tiny_batches(3, seed=2)]
    targets = [b.flip(-1) for b in batches]
    runs = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("TOOLCHAIN_CUDA_GRAPH", mode)
        model = _qdlora_model(tiny_model_path).cuda()
        params = _branch_params(model)
        res = fit(params, lambda step, b: (torch.nn.functional.mse_loss(model(b[0]).float(), b[1]), {}), 3, 9, 1e-3, 0,
                  torch.device("cuda"), None, "t", batches=lambda i: (batches[i], targets[i]), graphable=True)
        runs[mode] = [h["loss"] for h in res["history"]]
    eager, graphed = runs["off"], runs["on"]
    assert len(graphed) == 9 and all(map(lambda v: v == v, graphed))
    assert graphed[:3] == pytest.approx(eager[:3], rel=2e-2)  # same batches, same start
    assert sum(graphed[-3:]) < sum(graphed[:3]) and sum(eager[-3:]) < sum(eager[:3])  # both train


@cuda
def test_gpu_shortcuts_keep_each_layers_output(tiny_model_path):
    """Per layer, on the activations the model really feeds them (end to end, a VQ code choice or a
    4-bit rounding flip would turn rounding noise into a jump that says nothing about the paths)."""
    model = _qdlora_model(tiny_model_path).cuda()
    with torch.no_grad():
        for name, p in _branch_params(model).items():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).cuda() * 1e-2)
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, a[0].detach().clone()))
             for name, layer in quant_layers(model)]
    with torch.no_grad():
        model(tiny_batches(1, seed=5)[0].cuda())
    for h in hooks:
        h.remove()
    n_balance = n_branch = 0
    with torch.no_grad():
        for name, layer in quant_layers(model):
            x = seen[name].float()
            if isinstance(layer.input_transform, T.OnlineBalance) and layer.input_transform.rotate:
                ob = layer.input_transform
                T.DENSE_ON_GPU = False
                factored = ob(x)
                T.DENSE_ON_GPU = True
                dense = ob(x)
                assert float((dense - factored).abs().max()) <= 1e-5 * float(factored.abs().max()) + 1e-7, name
                n_balance += 1
            if layer.lowrank is not None:
                xt = layer.input_transform(x)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    fast = layer.lowrank(xt).float()
                    B.SKIP_ROUND_TRIP_UNDER_AUTOCAST = False
                    try:
                        slow = layer.lowrank(xt).float()
                    finally:
                        B.SKIP_ROUND_TRIP_UNDER_AUTOCAST = True
                assert float((fast - slow).abs().max()) <= 2e-2 * float(slow.abs().max()) + 1e-6, name  # ≤ a bf16 ulp or two
                n_branch += 1
    assert n_balance > 5 and n_branch > 10


@cuda
def test_dense_balance_under_bf16_autocast_is_no_less_accurate():
    g = torch.Generator().manual_seed(0)
    ob = T.OnlineBalance(640, 1, True, 640).cuda()
    ob.multiplier.copy_((torch.rand(640, generator=g) + 0.5).cuda())
    x = torch.randn(2, 640, 8, 8, generator=g).cuda()
    ref = ob.double()(x.double()).float()  # float64, factored
    ob.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        dense = ob(x.bfloat16()).float()
        T.DENSE_ON_GPU = False
        try:
            factored = ob(x.bfloat16()).float()
        finally:
            T.DENSE_ON_GPU = True
    assert float((dense - ref).abs().mean()) <= float((factored - ref).abs().mean())
