"""`toolchain export`: quantized checkpoint (or float model) → ONNX or TFLite."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = ("onnx", "tflite")


# The names in export.parts.PARTS (kept here so building the parser imports no torch; a test checks they agree).
PARTS = ("full", "unet", "vae_encoder", "vae_decoder", "embedder")


def register(sub: argparse._SubParsersAction) -> None:
    from toolchain.commands.common import add_overwrite_arg, positive_int

    p = sub.add_parser("export", help="export a checkpoint or float model to ONNX (QDQ) or TFLite",
                       description="Fold offline transforms and merged low-rank branches into the weights and write a deployable "
                                   "graph. ONNX: QDQ-annotated (opset 21, INT4 weights where designed), online Hadamard transforms as "
                                   "quantface.* local functions. TFLite: see README (integer recipe with the checkpoint's own ranges).")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="quantized checkpoint dir, passed as in every other verb (omit and pass --model to export a float model)")
    # the checkpoint as a positional argument, as earlier versions took it (same meaning; not shown in --help)
    p.add_argument("checkpoint_positional", type=Path, nargs="?", default=None, metavar="CHECKPOINT", help=argparse.SUPPRESS)
    p.add_argument("--target", choices=TARGETS, required=True)
    p.add_argument("--model", type=Path, default=None, help="float model to export instead of a checkpoint")
    p.add_argument("--preset", default=None)
    p.add_argument("--out", type=Path, required=True,
                   help="output file (model.onnx / model.tflite); a JSON report is written beside it (<out>.json). All files of "
                        "the export (TFLite: also <stem>_float.tflite, <stem>.precision.json) are replaced together or not at all; "
                        "an existing file that no earlier export wrote needs --overwrite")
    add_overwrite_arg(p)
    p.add_argument("--part", choices=PARTS, default="full", help="whole LQ→restored pipeline (default: one file that also holds each stage — TFLite signatures restore, "
                        "vae_encoder, embedder, unet, vae_decoder; ONNX: the stage tensors as named outputs, stages cut out "
                        "with toolchain.export.pipeline.onnx_stage) or one stage")
    p.add_argument("--dynamic", action="store_true",
                   help="ONNX: dynamic batch and spatial size. The UNet's skip concatenations need height and width to be "
                        "multiples of the model's total downsampling (full: VAE factor x UNet factor, e.g. 4 for tiny, 16 for ref, "
                        "64 for osdface; unet: the UNet factor on the latent); the full and unet graphs replicate-pad any other "
                        "size up to that multiple and crop the result back. The multiple is written to the report "
                        "(spatial_multiple, pads_to_multiple) and the ONNX metadata (quantface_spatial_multiple, "
                        "quantface_pads_to_multiple); for the other parts `toolchain profile --shape` refuses non-multiples")
    p.add_argument("--validate", action="store_true", help="run the exported graph on calibration images and compare with PyTorch")
    p.add_argument("--calib", type=Path, default=None, help="calibration set: images for --validate, and (TFLite) for the ranges of op outputs")
    p.add_argument("--images", type=positive_int, default=4, help="images used by --validate")
    p.add_argument("--mp-table", type=Path, default=None, help="TFLite: mixed-precision table to annotate with executed containers")
    p.add_argument("--qdq-format", choices=("exact", "ort", "ort-s8"), default=None,
                   help="ONNX: exact (default) = the checkpoint's designed grids, exact in a default ONNX Runtime session; "
                        "ort = QDQ node units that ORT (and QDQ-consuming NPU EPs) fuse into QLinearConv/QLinearMatMul/QGemm: "
                        "≤7-bit weights int8 (zero point 0), 8-bit weights uint8+128 (int8 ones saturate in ORT's x86 kernels "
                        "without VNNI), int32 biases, and an 8-bit requantization of every fused op output "
                        "(ranges from --calib, else the bundled faces) that the fake-quant model does not have; layers without "
                        "an 8-bit input grid keep the exact form (report: ort_fallback_layers); ort-s8 = ort with 8-bit "
                        "weights in int8 too (for NPU EPs, ARM and VNNI CPUs: faster there, wrong on x86 CPUs without VNNI)")
    p.add_argument("--precision", choices=("int", "fp16"), default="int",
                   help="TFLite: int (default) = integer ops with the checkpoint's grids (float32 for a float model); fp16 = "
                        "float16 weights and float activations for LiteRT's GPU delegate (a checkpoint keeps its designed "
                        "weight grid, its activations are not quantized); the report gives the drift from float32 (fp16_vs_fp32)")
    p.add_argument("--float-weights", choices=("auto", "fp32", "fp16"), default="auto",
                   help="ONNX: storage of the conv/linear weights that stay float (the embedder of a QuantFace checkpoint): "
                        "auto (default) = float16 in a quantized export, float32 in a float model's export")
    p.add_argument("--weight-container", choices=("auto", "int8"), default="auto",
                   help="TFLite: auto = int4 storage for <=4-bit weights (smallest file); int8 = same integers in int8 "
                        "(runs on XNNPACK's fast int8 path; int4 convs fall back to slower kernels)")
    p.set_defaults(func=run)


def load_for_export(args: argparse.Namespace):
    """(model, checkpoint metadata or None) for the checkpoint or --model given."""
    from toolchain.commands.common import resolve_model_path
    from toolchain.errors import ConfigError
    from toolchain.models.storage import load_model
    from toolchain.quant.checkpoint import load_quantized

    if args.checkpoint is not None:
        model, meta = load_quantized(args.checkpoint)
        return model, meta
    if args.model is None:
        raise ConfigError("give a quantized checkpoint directory, or --model for a float model")
    return load_model(resolve_model_path(args.model), args.preset), None


def validation_inputs(model, part: str, calib: Path, images: int):
    from toolchain.calibration.dataset import CalibrationSet
    from toolchain.export.parts import part_inputs

    return part_inputs(model, part, CalibrationSet.open(calib).batches(model.image_size, 1, limit=images))


def is_export(path: Path) -> bool:
    """True if ``path`` has the JSON report an earlier `toolchain export` wrote beside it."""
    try:
        return "part" in json.loads(Path(str(path) + ".json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def group_names(out: Path) -> list[str]:
    """Every file name one export to ``out`` may write (replaced together)."""
    return [out.name, out.name + ".json", out.name + ".data", f"{out.stem}_float.tflite", f"{out.stem}.precision.json",
            f"{out.stem}.mp_table.json"]


def run(args: argparse.Namespace) -> int:
    from toolchain.errors import UsageError
    from toolchain.io.outputs import check_output_file, output_lock

    if args.checkpoint_positional is not None:
        if args.checkpoint is not None and args.checkpoint != args.checkpoint_positional:
            raise UsageError(f"two checkpoints given ({args.checkpoint_positional} and --checkpoint {args.checkpoint}); pass one")
        args.checkpoint = args.checkpoint_positional

    check_output_file(args.out, f"{args.target} export", is_export, inputs=[args.checkpoint, args.model, args.calib, args.mp_table],
                      overwrite=args.overwrite)
    with output_lock(args.out):
        return _run_locked(args)


def _run_locked(args: argparse.Namespace) -> int:
    import sys

    from toolchain.errors import ConfigError
    from toolchain.io.atomic import atomic_file_group, atomic_write_json
    from toolchain.io.streams import stdout_to_stderr

    if args.validate and args.calib is None:
        raise ConfigError("--validate needs --calib (a calibration set to run)")
    from toolchain.export.backend import ExportOptions, get_backend

    options = ExportOptions(part=args.part, dynamic=args.dynamic, qdq_format=args.qdq_format, weight_container=args.weight_container,
                            precision=args.precision, float_weights=args.float_weights, mp_table=args.mp_table)
    options.check(args.target)  # options the target does not take are refused before the model loads
    backend = get_backend(args.target)
    model, meta = load_for_export(args)
    if args.calib is not None:  # a set of the other task (SR pairs for a face model, or the reverse) is refused
        from toolchain.calibration.dataset import CalibrationSet

        CalibrationSet.open(args.calib).check_for(int(getattr(model.config, "upscale", 1) or 1))
    out: Path = args.out
    print(f"exporting {args.checkpoint or args.model} ({args.part}) to {args.target.upper()} -> {out} …", file=sys.stderr, flush=True)
    with atomic_file_group(out.parent, out.stem, stale=group_names(out)) as staging, stdout_to_stderr():
        staged = staging / out.name
        # input tuples of the part (a forward of the earlier parts per image): only for what uses them — TFLite's op
        # output ranges (int) or drift figure (fp16), the ONNX ort format's output grids, and --validate
        wanted = args.validate or args.target == "tflite" or (args.qdq_format or "exact").startswith("ort")
        samples = validation_inputs(model, args.part, args.calib, args.images) if args.calib is not None and wanted else None
        options.calib_inputs, options.meta = samples, meta  # op output ranges (TFLite, ONNX ort); else the bundled faces (ort)
        report = backend.export(model, staged, options)
        if args.validate:
            report["validation"] = backend.validate(staged, model, options, samples)
        report = _unstage(report, str(staging), str(out.parent))
        report["source"] = str(args.checkpoint or args.model)
        atomic_write_json(staging / (out.name + ".json"), report)
    summary = {k: report[k] for k in ("path", "bytes", "int4_weight_layers", "int8_weight_layers", "layers_quantized", "float_fallback_layers",
                                      "scale_mismatches", "weight_grid_mismatches", "spatial_multiple",
                                      "qdq_format", "ort_layers", "ort_fused_nodes", "precision", "fp16_vs_fp32", "float_weights",
                                      "float16_layers", "signature_mismatches") if k in report}
    if "signatures" in report:  # a one-file pipeline: its signatures (TFLite) or stages (ONNX) and their input shapes
        summary["signatures"] = {k: v["inputs"] for k, v in report["signatures"].items()}
    if "validation" in report:  # one JSON document on stdout, so it pipes into jq / json.tool
        summary["validation"] = {k: v for k, v in report["validation"].items() if k not in ("per_image", "signatures")}
        if "signatures" in report["validation"]:
            summary["validation"]["signatures"] = {k: {kk: vv for kk, vv in v.items() if kk != "per_image"}
                                                   for k, v in report["validation"]["signatures"].items()}
    print(json.dumps(summary))
    return 0


def _unstage(obj, staging: str, final: str):
    """The report with the staging folder's path replaced by the final folder in every string."""
    if isinstance(obj, str):
        return obj.replace(staging, final)
    if isinstance(obj, dict):
        return {k: _unstage(v, staging, final) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unstage(v, staging, final) for v in obj]
    return obj
