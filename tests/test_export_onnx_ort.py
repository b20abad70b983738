"""`--qdq-format ort`: node units ONNX Runtime's own QDQ transformer fuses into integer ops (counted in
the session-optimised graph), the node-unit rules NPU EPs check, parity with the PyTorch fake-quant
model on held-out faces, and the one-line errors."""

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_batches
from toolchain.export.onnx_backend import export_onnx
from toolchain.export.qdq.output_grids import default_calib_inputs
from toolchain.export.qdq.runtime import FUSED_OPS, ort_fused_nodes, ort_session
from toolchain.export.validate import compare
from toolchain.errors import ExportError
from toolchain.methods import MethodContext
from toolchain.models import load_model
from toolchain.quant.api import quantize_
from toolchain.quant.calibrate import quant_layers
from toolchain.quant.config import QuantConfig


def _quantized(path, bits, batches):
    model = load_model(path)
    quantize_(model, QuantConfig.for_bits("minmax", bits), MethodContext(batches))
    return model


@pytest.mark.parametrize("bits", ["w4a8", "w8a8"])
def test_ort_units_follow_the_node_unit_rules(tiny_model_path, tmp_path, bits):
    """Per unit: DQ(uint8 activation, per tensor) → Conv/MatMul ← DQ(weight, per channel: axis 0 for OIHW
    convs, 1 for (in, out) MatMul weights) [← DQ(int32 bias, scale = s_x·s_w, axis 0)] → Q(uint8). Weights:
    ≤ 7-bit designs int8 with zero point 0; 8-bit designs uint8 with zero point 128 (u8 × s8 kernels saturate
    without VNNI for |w| > 64: see test_export_onnx's emulated-AVX2 test)."""
    model = _quantized(tiny_model_path, bits, tiny_batches(2))
    rep = export_onnx(model, tmp_path / "q.onnx", qdq_format="ort", calib_inputs=[(b[:1],) for b in tiny_batches(2, seed=3)])
    proto = onnx.load(rep["path"])
    raw = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    raw |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    producer = {o: n for n in proto.graph.node for o in n.output}

    class _Values(dict):  # constants through the Identity nodes the exporter puts on shared values
        def __getitem__(self, name):
            while name not in raw:
                name = producer[name].input[0]
            return raw[name]

    inits = _Values()
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    units = 0
    for n in proto.graph.node:
        if n.op_type not in ("Conv", "MatMul") or n.input[1] not in producer or producer[n.input[1]].op_type != "DequantizeLinear":
            continue
        x_dq, w_dq = producer[n.input[0]], producer[n.input[1]]
        assert x_dq.op_type == "DequantizeLinear" and producer[x_dq.input[0]].op_type == "QuantizeLinear", n.name
        assert inits[x_dq.input[2]].dtype == np.uint8 and inits[x_dq.input[1]].ndim == 0  # per-tensor uint8 activation
        w = inits[w_dq.input[0]]
        if bits == "w4a8":
            assert w.dtype == np.int8 and np.abs(w).max() <= 7  # 4-bit design in an int8 container, the designed grid
            assert inits[w_dq.input[2]].dtype == np.int8 and not inits[w_dq.input[2]].any()  # symmetric: zero point 0
        else:
            assert w.dtype == np.uint8 and w.min() >= 1  # the narrow 8-bit grid [-127, 127] + 128
            assert inits[w_dq.input[2]].dtype == np.uint8 and (inits[w_dq.input[2]] == 128).all()
        axis = next(a.i for a in w_dq.attribute if a.name == "axis")
        assert axis == (0 if n.op_type == "Conv" else 1) and inits[w_dq.input[1]].shape == (w.shape[axis],)
        out = n.output[0]
        if n.op_type == "Conv" and len(n.input) > 2:
            b_dq = producer[n.input[2]]
        elif n.op_type == "MatMul" and consumers[out][0].op_type == "Add":
            add = consumers[out][0]
            b_dq, out = producer[add.input[1]], add.output[0]
        else:
            b_dq = None
        if b_dq is not None:
            assert inits[b_dq.input[0]].dtype == np.int32
            np.testing.assert_allclose(inits[b_dq.input[1]], inits[x_dq.input[1]] * inits[w_dq.input[1]], rtol=1e-6)
        assert [c.op_type for c in consumers[out]] == ["QuantizeLinear"], n.name
        assert inits[consumers[out][0].input[2]].dtype == np.uint8
        units += 1
    assert units == rep["ort_layers"] == len(list(quant_layers(model)))
    fused = ort_fused_nodes(rep["path"])
    assert sum(fused[op] for op in FUSED_OPS) == rep["ort_layers"] == rep["ort_fused_nodes"]["fused_total"]
    assert not any(i.data_type == onnx.TensorProto.INT4 for i in proto.graph.initializer)


@pytest.mark.parametrize("bits,min_psnr", [("w8a8", 35.0), ("w4a8", 30.0)])
def test_ort_format_fuses_every_layer_and_matches_fake_quant(ref_model_path, heldout_dir, tmp_path, bits, min_psnr):
    """Reference model, 128 px, MinMax calibrated on the bundled faces: ORT's optimised graph holds one fused
    integer node per quantized conv/linear, and the ORT output on held-out faces is within the stated PSNR of
    the PyTorch fake-quant model (the gap is the 8-bit requantization of op outputs the ort format adds)."""
    from toolchain.calibration.dataset import CalibrationSet

    fp = load_model(ref_model_path)
    calib = default_calib_inputs(fp, "full", 3)
    model = _quantized(ref_model_path, bits, [c[0] for c in calib])
    rep = export_onnx(model, tmp_path / "q.onnx", qdq_format="ort", calib_inputs=calib)
    n_layers = len(list(quant_layers(model)))
    assert rep["ort_layers"] == n_layers and not rep["ort_fallback_layers"]
    assert rep["ort_fused_nodes"]["fused_total"] == n_layers
    xs = CalibrationSet.open(heldout_dir).batches(model.image_size, 1, limit=3)
    with torch.no_grad():
        ref = np.concatenate([model(b).numpy() for b in xs])
    sess = ort_session(rep["path"], threads=2)
    out = np.concatenate([sess.run(None, {"lq_image": b.numpy()})[0] for b in xs])
    assert compare(out, ref, True)["psnr_db"] >= min_psnr


def test_ort_format_errors(tiny_model_path, tmp_path, capfd):
    from toolchain.cli import main

    model = _quantized(tiny_model_path, "w4a4", tiny_batches(2))  # 4-bit inputs: no layer can form a QLinear unit
    with pytest.raises(ExportError, match="no layer can form a fusable QDQ node unit.*4-bit input activations"):
        export_onnx(model, tmp_path / "a.onnx", qdq_format="ort", calib_inputs=[(tiny_batches(1)[0][:1],)])
    with pytest.raises(ExportError, match="unknown QDQ format"):
        export_onnx(model, tmp_path / "b.onnx", qdq_format="qlinear")
    capfd.readouterr()
    assert main(["export", "--model", str(tiny_model_path), "--target", "onnx", "--qdq-format", "ort", "--out", str(tmp_path / "c.onnx")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "no layer can form" in err[-1]
    assert main(["export", "--model", str(tiny_model_path), "--target", "tflite", "--qdq-format", "ort", "--out", str(tmp_path / "d.tflite")]) == 2
    assert "--target onnx only" in capfd.readouterr().err
    assert not any(tmp_path.glob("*.onnx"))
