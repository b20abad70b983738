"""ONNX export: Hadamard functions, QDQ parity with PyTorch (default ORT sessions, no optimisations,
an emulated AVX2-only CPU), FP parity, INT4 packing, graph shapes no fusion can change, errors."""

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from conftest import tiny_batches
from toolchain.export.hadamard_onnx import DOMAIN, function_protos
from toolchain.export.onnx_backend import export_onnx, validate_onnx
from toolchain.export.parts import part_module
from toolchain.export.qdq.layer_parity import layer_models, layer_parity, relative_error
from toolchain.export.qdq.runtime import ort_session
from toolchain.export.validate import compare
from toolchain.balance.hadamard import hadamard_matrix
from toolchain.errors import ExportError
from toolchain.methods import MethodContext
from toolchain.models import load_model
from toolchain.quant.api import quantize_
from toolchain.quant.calibrate import quant_layers
from toolchain.quant.config import QuantConfig


@pytest.mark.parametrize("n", [4, 12, 20, 40, 96, 320])
@pytest.mark.parametrize("layout", ["HadamardNCHW", "HadamardLast"])
def test_hadamard_function_equals_dense_product(n, layout):
    from toolchain.export.prepare import hadamard_factors

    hm, hp = hadamard_factors(n)
    shape = [2, n, 3, 5] if layout == "HadamardNCHW" else [2, 7, n]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(layout, ["x", "hm", "hp"], ["y"], domain=DOMAIN)], "h",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(hm.numpy(), "hm"), onnx.numpy_helper.from_array(hp.numpy(), "hp")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid(DOMAIN, 1)],
                                   functions=function_protos({layout}))
    onnx.checker.check_model(model, full_check=True)
    x = np.random.RandomState(n).randn(*shape).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    h = hadamard_matrix(n).astype(np.float64) / np.sqrt(n)
    xc = np.moveaxis(x, 1, -1) if layout == "HadamardNCHW" else x
    dense = xc.astype(np.float64) @ h.T
    dense = np.moveaxis(dense, -1, 1) if layout == "HadamardNCHW" else dense
    assert np.abs(y - dense).max() < 1e-5


def _quantized(path, method, bits, params=None):
    model = load_model(path)
    quantize_(model, QuantConfig.for_bits(method, bits, params=params or {}), MethodContext(tiny_batches(2)))
    return model


def test_fp_export_matches_pytorch(tiny_model_path, tmp_path):
    model = load_model(tiny_model_path)
    rep = export_onnx(model, tmp_path / "fp.onnx")
    _, inputs, names, _ = part_module(model, "full")
    with torch.no_grad():
        ref = model(inputs[0]).numpy()
    out = ort_session(rep["path"]).run(None, {names[0]: inputs[0].numpy()})[0]
    assert np.abs(out - ref).max() <= 1e-4
    assert rep["int4_weight_layers"] == 0


def test_w4a4_export_matches_fake_quant_end_to_end(tiny_model_path, tmp_path):
    model = _quantized(tiny_model_path, "minmax", "w4a4")
    rep = export_onnx(model, tmp_path / "q.onnx")
    assert rep["int4_weight_layers"] == len(list(quant_layers(model)))
    # ORT's thread count is pinned: MLAS splits float conv reductions differently per thread count (1-ULP
    # differences in 6249 of 8192 outputs of the first UNet conv at 4 threads vs 2), and at 4 bits one such
    # ULP that crosses a rounding boundary moves a value a whole step and the flips cascade (17.3 dB at 1
    # thread, 16.8 dB at 4, 148 dB at 2 on this input) — the "flaky" W4A4 figure was the machine's default
    # thread count, not the graph: every layer is exact on its own input at 1, 2 and 4 threads.
    # The pinned count is not enough on every CPU: MLAS picks its float kernels by ISA, so which input hits a flip
    # differs between machines (on an AMX Xeon, image 3 of seed 11 gives 23.7 dB at 1, 2 and 4 threads — and so does
    # PyTorch itself under a 1e-7 relative perturbation, `float_noise_floor`: that input sits on a rounding boundary).
    # Hence five inputs, and the exact match asserted for most of them (the median); an export fault (a wrong scale,
    # container, clip or fusion) moves every input, and every layer is checked exactly on its own input in
    # test_export_is_exact_per_layer_and_as_good_as_fake_quant.
    v = validate_onnx(rep["path"], model, "full", [(b[:1],) for b in tiny_batches(5, seed=11)], threads=2)
    assert v["ort_threads"] == 2
    # every QDQ op of a 4-bit design is exact in float, so both sessions match fake quant to float noise
    assert v["median_vs_fake_quant"] >= 45.0 and v["runs"]["no_optimizations"]["vs_fake_quant"]["median"] >= 45.0
    assert v["runs"]["default"]["vs_fake_quant"]["min"] == v["psnr_db_min"] and v["default_run"] == "default"
    # the shared validation also reports the distance to full precision: the export is no further from FP than fake quant
    assert abs(v["median_vs_fp"] - v["median_fake_quant_vs_fp"]) <= 1.0
    assert v["cpu"]["machine"] and isinstance(v["cpu"]["features"], list)
    inits = {i.name: i for i in onnx.load(rep["path"]).graph.initializer}
    int4 = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT4]
    assert int4 and all(i.name.endswith("weight_int") for i in int4)


def test_graph_shapes_no_default_fusion_can_change(tiny_model_path, tmp_path):
    """What keeps a default ORT session exact (toolchain/export/ops.py): unsigned activation containers
    (symmetric grids shifted by 128), 5–8-bit weights in uint8 with zero point 128, narrowing Clips
    on the integers between Q and DQ, and float biases outside every conv/matmul with DQ inputs."""
    from toolchain.quant.config import LayerRule
    from toolchain.quant.quantizer import QuantSpec

    configs = {"w8a8": QuantConfig.for_bits("minmax", "w8a8"), "w4a4": QuantConfig.for_bits("minmax", "w4a4"),
               "w8a8-symmetric": QuantConfig.for_bits("minmax", "w8a8", activation=QuantSpec(8, symmetric=True)),
               "w6a16-mixed": QuantConfig.for_bits("minmax", "w6a6", rules=[LayerRule("unet.*attn1", 6, 16)])}
    for bits, cfg in configs.items():
        model = load_model(tiny_model_path)
        quantize_(model, cfg, MethodContext(tiny_batches(2)))
        rep = export_onnx(model, tmp_path / f"{bits}.onnx")
        if bits in ("w8a8-symmetric", "w6a16-mixed"):  # the other two are checked layer by layer below
            layer_errors = layer_parity(model, (tiny_batches(1, seed=12)[0][:1],))
            assert sum(e <= 1e-5 for e in layer_errors.values()) >= 0.95 * len(layer_errors) and max(layer_errors.values()) <= 0.1, bits
        proto = onnx.load(rep["path"])
        inits = {i.name: i for i in proto.graph.initializer}
        consts = {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
        producer = {o: n for n in proto.graph.node for o in n.output}

        def tensor(name: str) -> onnx.TensorProto:  # through Identity nodes the exporter puts on shared constants
            while name not in inits and name not in consts:
                name = producer[name].input[0]
            return inits[name] if name in inits else consts[name]

        dtype = lambda name: tensor(name).data_type  # noqa: E731

        q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
        assert q and all(dtype(n.input[2]) in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16) for n in q)
        assert any(dtype(n.input[2]) == onnx.TensorProto.UINT16 for n in q) == (bits == "w6a16-mixed")
        for n in proto.graph.node:
            if n.op_type == "QuantizeLinear":  # no float Clip in front that a Conv/Add fusion could absorb
                assert n.input[0] not in producer or producer[n.input[0]].op_type != "Clip", n.name
            if n.op_type == "DequantizeLinear" and n.input[0] in producer and producer[n.input[0]].op_type == "Clip":
                assert producer[producer[n.input[0]].input[0]].op_type == "QuantizeLinear", n.name
            if n.op_type in ("Conv", "MatMul") and n.input[0] in producer and producer[n.input[0]].op_type == "DequantizeLinear":
                assert len(n.input) < 3 or not n.input[2], f"{n.name}: a bias input lets ORT requantize it"
        clips = sum(n.op_type == "Clip" and producer[n.input[0]].op_type == "QuantizeLinear" for n in proto.graph.node)
        assert (clips > 0) == (bits != "w8a8"), bits  # narrower than the container: 4/6-bit, and the symmetric 8-bit grid ±127
        w_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_int")]
        want = onnx.TensorProto.INT4 if bits == "w4a4" else onnx.TensorProto.UINT8
        assert w_dq and all(tensor(n.input[0]).data_type == want for n in w_dq)
        if want == onnx.TensorProto.UINT8:
            assert all(set(onnx.numpy_helper.to_array(tensor(n.input[2])).tolist()) == {128} for n in w_dq)
        # what a default session makes of it: no MatMulNBits (its default accuracy_level 4 re-quantizes
        # activations to int8 on the fly), 8-bit MatMuls as exact u8·u8 MatMulIntegerToFloat
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{bits}_optimized.onnx")
        ort.InferenceSession(rep["path"], so, providers=["CPUExecutionProvider"])
        optimized = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
        assert "MatMulNBits" not in optimized and "MatMulInteger" not in optimized, bits
        assert ("MatMulIntegerToFloat" in optimized) == (bits != "w4a4"), bits  # u8 weights × ≤ 8-bit activations


@pytest.mark.parametrize("method,bits,params", [
    ("minmax", "w8a8", {}),
    ("quantface", "w4a4", {"recipe": "paper", "svd_rank": 2, "lora_rank": 2, "train_steps": 2, "lr": 1e-3}),  # rotations: online Hadamards
    ("passionsr", "w4a4", {"epochs": 1, "lr": 1e-3}),  # online offset + scale before the quantizer
    ("passionsr", "w8a8", {"epochs": 1, "lr": 1e-3}),  # the same at 8 bits (the TFLite test exports this design too)
    ("qartsr", "w4a4", {"timestep_offsets": [-100], "steps_per_module": 0, "e2e_steps": 2}),  # a non-default timestep to fold
])
def test_export_is_exact_per_layer_and_as_good_as_fake_quant(tiny_model_path, tmp_path, method, bits, params):
    """Fake quantization is discontinuous at float precision (toolchain/export/validate.py): ORT and PyTorch agree
    until a one-ULP difference (different conv / Hadamard accumulation order) crosses a rounding
    boundary; fine 8-bit grids and the online rotations make that likely, and the flips then spread.
    So every layer must match on its real input (teacher-forced), and end to end the ORT model must be
    as far from full precision as the PyTorch fake-quant model is."""
    model = _quantized(tiny_model_path, method, bits, params)
    rep = export_onnx(model, tmp_path / "q.onnx")
    if method == "quantface":
        assert rep["hadamard_functions"] == ["HadamardLast", "HadamardNCHW"] and rep["op_counts"]["HadamardNCHW"] > 10
    x = tiny_batches(1, seed=12)[0][:1]
    errors = layer_parity(model, (x,))
    assert len(errors) == len(list(quant_layers(model)))
    assert sum(e <= 1e-5 for e in errors.values()) >= 0.95 * len(errors)
    assert max(errors.values()) <= 0.1  # a flipped element moves one step, never more
    xs = tiny_batches(8, batch=1, seed=13)
    fp = load_model(tiny_model_path)
    sess = ort_session(rep["path"])
    with torch.no_grad():
        ref = np.concatenate([model(b).numpy() for b in xs])
        full = np.concatenate([fp(b).numpy() for b in xs])
    for sess in (ort_session(rep["path"], threads=2), ort_session(rep["path"], threads=2, optimize=False)):  # threads: see the W4A4 test
        out = np.concatenate([sess.run(None, {"lq_image": b.numpy()})[0] for b in xs])
        assert abs(compare(out, full, True)["psnr_db"] - compare(ref, full, True)["psnr_db"]) <= 1.0


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                    reason="needs qemu-user (apt-get install qemu-user) to emulate an AVX2-only CPU; .ci/run installs it")
def test_default_session_is_exact_on_an_emulated_avx2_cpu(tiny_model_path, tmp_path):
    """ORT picks integer kernels by CPUID: without VNNI, u8·s8 products go through 16-bit pair sums
    that saturate (24 attention projections were 21–44 % off on an AVX2 EPYC). qemu's Haswell model
    (AVX2, no AVX-512, no VNNI) gives those kernels on any x86 host."""
    model = _quantized(tiny_model_path, "minmax", "w8a8")
    x = tiny_batches(1, seed=12)[0][:1]
    layers = layer_models(model, (x,))
    for i, (name, (proto, lx, _)) in enumerate(layers.items()):
        (tmp_path / f"layer{i:03d}.onnx").write_bytes(proto)
        np.savez(tmp_path / f"layer{i:03d}.npz", x=lx)
    full = {}
    for bits in ("w8a8", "w4a4"):
        m = model if bits == "w8a8" else _quantized(tiny_model_path, "minmax", bits)
        export_onnx(m, tmp_path / f"full_{bits}.onnx")
        np.savez(tmp_path / f"full_{bits}.npz", lq_image=x.numpy())
        with torch.no_grad():
            full[bits] = m(x).numpy()
    # the ORT-fusable format (8-bit weights in uint8 + 128): its reference is this machine's own ORT output
    export_onnx(model, tmp_path / "fused_w8a8.onnx", qdq_format="ort", calib_inputs=[(b[:1],) for b in tiny_batches(2, seed=3)])
    np.savez(tmp_path / "fused_w8a8.npz", lq_image=x.numpy())
    native_fused = ort_session(tmp_path / "fused_w8a8.onnx", threads=2).run(None, {"lq_image": x.numpy()})[0]
    script = Path(__file__).with_name("ort_emulated.py")
    subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(script), str(tmp_path), "--isa"], check=True, capture_output=True, timeout=900)
    isa = json.loads((tmp_path / "isa.json").read_text())
    assert isa["capability"] == "AVX2" and not isa["vnni"] and not isa["avx512"]
    for session in ("default", "no_optimizations"):
        errors = [relative_error(np.load(tmp_path / f"layer{i:03d}.{session}.npy"), y) for i, (_, _, y) in enumerate(layers.values())]
        assert sum(e <= 1e-5 for e in errors) >= 0.95 * len(errors) and max(errors) <= 0.1, (session, max(errors))
        for bits, ref in full.items():
            out = np.load(tmp_path / f"full_{bits}.{session}.npy")
            assert compare(out, ref, True)["psnr_db"] >= (45.0 if bits == "w4a4" else 40.0), (session, bits)
    # int8 weights in the fused units read 18 dB here (saturated pair sums); uint8 + 128 is exact
    fused = np.load(tmp_path / "fused_w8a8.default.npy")
    assert compare(fused, native_fused, True)["psnr_db"] >= 40.0  # measured: identical


def test_parts_and_dynamic_shapes(tiny_model_path, tmp_path):
    model = _quantized(tiny_model_path, "minmax", "w8a8")
    rep = export_onnx(model, tmp_path / "unet.onnx", part="unet")
    _, inputs, names, _ = part_module(model, "unet")
    assert names == ["latent", "prompt"]
    out = ort_session(rep["path"]).run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
    assert out.shape == tuple(inputs[0].shape)
    fp = load_model(tiny_model_path)
    rep = export_onnx(fp, tmp_path / "dyn.onnx", dynamic=True)
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    out = ort_session(rep["path"]).run(None, {"lq_image": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - fp(x).numpy()).max() <= 1e-4


@pytest.mark.parametrize("qdq_format, min_psnr", [("exact", 32.0), ("ort", 28.0)])
def test_quantized_dynamic_export_runs_at_other_batches_and_aspect_ratios(tiny_model_path, tmp_path, qdq_format, min_psnr):
    """A quantized --dynamic QDQ graph runs at batch 2 and non-square sizes other than the export's 32×32 and
    stays with the fake-quant model at that shape. Measured on this tiny W8A8 (random weights): exact
    34.4–35.0 dB, ort 30.0–30.5 dB (38.5 / 32.3 dB at 32×32). The gap is rounding noise, not the shape: the
    PyTorch fake-quant model itself gives one image a different output (max |Δ| 0.09) in a batch of 2 than
    alone, as batched float kernels move activations across 8-bit rounding boundaries."""
    model = _quantized(tiny_model_path, "minmax", "w8a8")
    rep = export_onnx(model, tmp_path / f"{qdq_format}.onnx", dynamic=True, qdq_format=qdq_format,
                      calib_inputs=[(b,) for b in tiny_batches(2)])
    session = ort_session(rep["path"])
    faces = torch.cat(tiny_batches(1, batch=2, seed=7))
    for size in ((64, 48), (48, 64)):
        x = torch.nn.functional.interpolate(faces, size=size, mode="bilinear")
        out = session.run(None, {"lq_image": x.numpy()})[0]
        assert out.shape == tuple(x.shape)
        with torch.no_grad():
            ref = model(x)
        assert compare(out, ref.numpy(), True)["psnr_db"] >= min_psnr, (qdq_format, size)


def test_unsupported_layers_are_named(tiny_model_path, tmp_path):
    model = _quantized(tiny_model_path, "minmax", "w4a4")
    model.unet.conv_out.input_transform = nn.Tanh()
    with pytest.raises(ExportError, match=r"unet\.conv_out.*Tanh"):
        export_onnx(model, tmp_path / "bad.onnx")
    model = _quantized(tiny_model_path, "minmax", "w8a8")
    from toolchain.quant.quantizer import FakeQuantizer, QuantSpec

    layer = model.vae.decoder.conv_in
    layer.weight_quantizer = FakeQuantizer(QuantSpec(12, True, True), layer.weight.shape[0])
    layer.calibrate_weight()
    with pytest.raises(ExportError, match=r"vae\.decoder\.conv_in.*12-bit"):
        export_onnx(model, tmp_path / "bad2.onnx")
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "bad2.onnx").exists()


def test_w4_file_is_smaller_than_w8(tiny_model_path, tmp_path):
    s4 = export_onnx(_quantized(tiny_model_path, "minmax", "w4a8"), tmp_path / "a.onnx")["bytes"]
    s8 = export_onnx(_quantized(tiny_model_path, "minmax", "w8a8"), tmp_path / "b.onnx")["bytes"]
    fp = export_onnx(load_model(tiny_model_path), tmp_path / "c.onnx")["bytes"]
    assert s4 < s8 < fp
    assert compare(np.zeros(3), np.zeros(3), False)["max_abs_error"] == 0.0


def test_cli_validate_prints_one_json_document(tiny_model_path, calib_dir, tmp_path, capfd):
    """`export --validate` writes one JSON document on stdout (summary with the validation inside), which
    names both ORT sessions and the CPU, and says how to read a low figure."""
    from toolchain.cli import main

    out = tmp_path / "fp.onnx"
    capfd.readouterr()
    assert main(["export", "--model", str(tiny_model_path), "--target", "onnx", "--out", str(out), "--validate",
                 "--calib", str(calib_dir), "--images", "2"]) == 0
    doc = json.loads(capfd.readouterr().out)  # raises on two documents
    v = doc["validation"]
    assert set(v["runs"]) == {"default", "no_optimizations"} and v["cpu"]["features"] is not None and v["target"] == "onnx"
    assert "layer_parity" in v["note"] and v["psnr_db_min"] > 100  # a float graph: ORT = PyTorch to float noise


def test_float_layers_stored_as_float16_in_quantized_exports(tiny_model_path, tmp_path):
    """--float-weights auto: the float (not quantized) conv/linear weights of a quantized export — the embedder —
    are float16 initializers equal to the PyTorch weights rounded to float16, the file shrinks by half of their
    bytes, validation compares with the alike-rounded model (still exact), and a float model keeps float32."""
    import onnx

    from toolchain.export.prepare import export_module, float_layers

    model = _quantized(tiny_model_path, "minmax", "w4a4")
    names = float_layers(export_module(model).module)
    assert names and all(n.startswith("embedder.") for n in names)
    rep16 = export_onnx(model, tmp_path / "q16.onnx")
    rep32 = export_onnx(model, tmp_path / "q32.onnx", float_weights="fp32")
    assert rep16["float_weights"] == "fp16" and rep16["float16_layers"] == len(names) and rep32["float16_layers"] == 0
    f16 = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(rep16["path"]).graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert len(f16) == len(names)
    for n in names:
        key = next(k for k in f16 if k.endswith("." + n + ".weight16"))
        assert np.array_equal(f16[key], model.get_submodule(n).weight.detach().numpy().astype(np.float16))
    saved = rep32["bytes"] - rep16["bytes"]
    expected = sum(model.get_submodule(n).weight.numel() * 2 for n in names)
    assert abs(saved - expected) <= 0.02 * expected + 16384, (saved, expected)  # + one Cast node per layer
    # five inputs, most of them exact: W4A4 rounding-flip cascades hit single inputs, CPU-dependently (see above)
    v = validate_onnx(rep16["path"], model, "full", [(b[:1],) for b in tiny_batches(5, seed=11)], threads=2)
    assert v["float16_layers"] == len(names) and "float16" in v["reference"] and v["median_vs_fake_quant"] >= 45.0
    assert export_onnx(load_model(tiny_model_path), tmp_path / "fp.onnx")["float_weights"] == "fp32"
