"""`toolchain model`: create, inspect and convert float models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The presets `model init` offers, kept here so that --help imports no torch; a test checks that they are
# toolchain.models.configs.PRESETS (in the same order).
PRESET_NAMES = ("osdface", "ref", "ref-l", "tiny", "osediff", "osediff-tiny")
PRESET_HELP = ("architecture preset: " + ", ".join(PRESET_NAMES) +
               " (osdface/ref/ref-l/tiny: face restoration at the input size; osediff/osediff-tiny: x4 super-resolution)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="create, inspect or convert float models",
                       description="Create a randomly initialised model from a preset, print a model's architecture summary, "
                                   "or convert between the single-file, directory and diffusers-folder formats.")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    init = msub.add_parser("init", help="write a randomly initialised model of a preset (for tests and timing)")
    init.add_argument("--preset", required=True, help=PRESET_HELP)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--format", choices=["file", "dir", "diffusers"], default="file")
    init.add_argument("--out", type=Path, required=True, help="new path, or an earlier model of the toolchain (else --overwrite)")
    init.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a toolchain model")
    info = msub.add_parser("info", help="print a model's config (input size, upscale factor, output size) and parameter counts")
    info.add_argument("path", type=Path)
    info.add_argument("--preset", default=None)
    conv = msub.add_parser("convert", help="convert a model to another on-disk format, or a pickle checkpoint to safetensors",
                           description="Convert a model between the file/dir/diffusers formats. Given a .ckpt/.pth/.pt/.bin pickle "
                                       "and no --preset, convert its tensors (the state_dict of a Lightning checkpoint) to one "
                                       ".safetensors file without running any code in the pickle.")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path, help="new path, or an earlier model of the toolchain (else --overwrite); never SRC")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing DST that is not a toolchain model")
    conv.add_argument("--preset", default=None)
    conv.add_argument("--format", choices=["file", "dir", "diffusers"], default="diffusers")
    conv.add_argument("--fp16", action="store_true", help="store weights as float16")
    imp = msub.add_parser("import", help="import an upstream release (its files as published) into one of our model folders",
                          description="Import a published checkpoint layout into a model directory (model_config.json + "
                                      "model.safetensors + import_report.json with the source files' SHA-256). Pickles are "
                                      "read without running any code in them.")
    isub = imp.add_subparsers(dest="import_kind", required=True)
    osd = isub.add_parser("osdface", help="OSDFace: SD-2.1-base folder + associate_2.ckpt + embedding_change_weights.pth + LoRA")
    _release_args(osd)
    osd.add_argument("--vre", type=Path, required=True, help="associate_2.ckpt (the VRE's Lightning checkpoint) or its safetensors")
    osd.add_argument("--proj", type=Path, required=True, help="embedding_change_weights.pth (the VRE's 1x1 projection)")
    osd.add_argument("--lora", type=Path, required=True, help="pytorch_lora_weights.safetensors (UNet LoRA, merged at import)")
    osd.add_argument("--lora-alpha", type=float, default=None,
                     help="LoRA alpha when the file has no alpha keys (default: the file's rank, i.e. scale 1.0 as released)")
    ose = isub.add_parser("osediff", help="OSEDiff: SD-2.1-base folder + osediff.pkl + a constant prompt embedding")
    _release_args(ose)
    ose.add_argument("--weights", type=Path, required=True, help="osediff.pkl (UNet/VAE-encoder LoRA + fine-tuned conv_in)")
    ose.add_argument("--prompt-embedding", type=Path, required=True,
                     help="one tensor (1, 77, cross_attention_dim) used as the constant prompt (.safetensors or .pt)")
    st = msub.add_parser("stats", help="per-layer statistics that make a model hard or easy to quantize",
                         description="For every quantizable layer: Pearson kurtosis of its weights (per tensor, normal = 3), the "
                                     "max/median ratio of its input channels' ranges on calibration images, and whether its input has "
                                     "outlier channels (channel |max| > 10x the median channel's); a summary, a markdown table and a "
                                     "distribution plot. Writes model_stats.json, model_stats.md and model_stats.png to --out.")
    st.add_argument("--model", type=Path, default=None, help="float model (default: the bundled reference model)")
    st.add_argument("--preset", default=None, help="architecture preset for model files without config")
    st.add_argument("--calib", type=Path, required=True, help="calibration set folder (from `toolchain calibrate`)")
    st.add_argument("--images", type=int, default=16, help="calibration images to run (default 16)")
    st.add_argument("--batch-size", type=int, default=4)
    st.add_argument("--out", type=Path, required=True, help="folder for model_stats.json / .md / .png (other files are left alone)")
    st.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def _run_stats(args: argparse.Namespace) -> int:
    """`toolchain model stats`: see toolchain.eval.model_stats."""
    import platform

    from toolchain.calibration.dataset import CalibrationSet
    from toolchain.commands.common import resolve_model_path
    from toolchain.defaults import device_from_arg
    from toolchain.errors import CheckpointError, OutputError, UsageError
    from toolchain.eval import model_stats as MS
    from toolchain.io.atomic import atomic_write_json, atomic_write_text
    from toolchain.models import load_model

    if args.images < 1 or args.batch_size < 1:
        raise UsageError("--images and --batch-size must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        raise OutputError(f"--out {args.out} is an existing file; model stats writes a folder")
    model_path = resolve_model_path(args.model)
    if not model_path.exists():
        raise CheckpointError(f"model {model_path} does not exist")
    data = CalibrationSet.open(args.calib)  # InputError (one line) when it is no calibration set
    model = load_model(model_path, args.preset).to(device_from_arg(args.device)).eval()
    size = model.image_size
    batches = data.batches(size, args.batch_size, limit=args.images)
    images = sum(int(b.shape[0]) for b in batches)
    records = MS.model_layer_statistics(model, batches)
    parts = {}
    for part in dict.fromkeys(r["part"] for r in records):
        ps = MS.summarize([r for r in records if r["part"] == part], top=0)
        parts[part] = {k: ps[k] for k in ("layers", "median_weight_kurtosis", "median_channel_range_ratio",
                                          "fraction_layers_with_outlier_channel_inputs")}
    command = ("toolchain model stats" + (f" --model {args.model}" if args.model is not None else "") + (f" --preset {args.preset}" if args.preset else "")
               + f" --calib {args.calib} --images {args.images} --batch-size {args.batch_size} --out {args.out} --device {args.device}")
    shown = model_path.resolve()
    doc = {"model": str(shown.relative_to(Path.cwd())) if shown.is_relative_to(Path.cwd()) else str(shown), "model_name": model.config.name, "calibration": str(args.calib), "images": images,
           "image_size": size, "command": command, "device": str(args.device), "machine": platform.processor() or platform.machine(),
           "definitions": {"weight_kurtosis": "Pearson kurtosis E[(w-mu)^4]/sigma^4 of all weights of the layer pooled (normal = 3; "
                                              "excess = this - 3), population moments (scipy.stats.kurtosis fisher=False bias=True)",
                           "channel_range_ratio": "max over input channels of (max - min) / median over input channels of (max - min), "
                                                  "on the calibration images (conv: axis 1; linear: last axis)",
                           "outlier_channels": f"input channels whose max(|min|, |max|) exceeds {MS.OUTLIER_FACTOR:g}x the median channel's"},
           "summary": MS.summarize(records), "by_part": parts, "layers": records}
    args.out.mkdir(parents=True, exist_ok=True)
    doc = MS.json_safe(doc)
    atomic_write_json(args.out / "model_stats.json", doc)
    atomic_write_text(args.out / "model_stats.md", MS.markdown(doc))
    MS.plot(doc, args.out / "model_stats.png")
    s = doc["summary"]
    fmt = lambda v, f=".2f": "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{s['layers']} quantizable layers, {images} images: median weight kurtosis {fmt(s['median_weight_kurtosis'])} (Pearson), "
          f"median channel range ratio {fmt(s['median_channel_range_ratio'])}, "
          f"outlier-channel inputs {fmt(s['fraction_layers_with_outlier_channel_inputs'], '.1%')}")
    print(f"report: {args.out / 'model_stats.md'}")
    return 0


def _release_args(parser: argparse.ArgumentParser) -> None:
    """The options every release importer takes."""
    parser.add_argument("--sd", type=Path, required=True, help="Stable Diffusion diffusers folder (unet/, vae/, scheduler/)")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write (new, or an earlier model of the toolchain)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a toolchain model")


def _pickle_suffixes() -> tuple[str, ...]:
    from toolchain.io.weights import PICKLE_SUFFIXES  # imports torch: not at module level (fast --help)

    return tuple(PICKLE_SUFFIXES)


def is_model_artifact(path: Path) -> bool:
    """True for a model the toolchain wrote: a model/diffusers folder, or a .safetensors file carrying its config."""
    if path.is_dir():
        return (path / "model_config.json").is_file() or (path / "toolchain_model.json").is_file()
    try:
        from toolchain.io.weights import read_safetensors_metadata
        from toolchain.models.storage import CONFIG_KEY

        return path.suffix == ".safetensors" and CONFIG_KEY in read_safetensors_metadata(path)
    except Exception:  # unreadable: not ours
        return False


def check_destination(dst: Path, fmt: str, inputs: list, overwrite: bool) -> None:
    """Refuse a destination that is the source or a foreign file/folder (before any work)."""
    from toolchain.io.outputs import check_output_dir, check_output_file

    if fmt == "file":
        check_output_file(dst, "model file", is_model_artifact, inputs=inputs, overwrite=overwrite)
    else:
        check_output_dir(dst, "model folder", is_model_artifact, inputs=inputs, overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
    import torch

    from toolchain.models import build_model, load_model, preset, save_model

    if args.model_cmd == "stats":
        return _run_stats(args)
    if args.model_cmd == "import":
        check_destination(args.out, "dir", [p for p in vars(args).values() if isinstance(p, Path) and p != args.out], args.overwrite)
    if args.model_cmd == "import" and args.import_kind == "osediff":
        from toolchain.models.release.osediff import import_osediff
        from toolchain.models.release.osediff import summary_lines as osediff_lines

        for line in osediff_lines(import_osediff(args.sd, args.weights, args.prompt_embedding, args.out)):
            print(line)
        print(f"osediff release -> {args.out}")
    elif args.model_cmd == "import":
        from toolchain.models.release.osdface import import_osdface, summary_lines

        report = import_osdface(args.sd, args.vre, args.proj, args.lora, args.out, lora_alpha=args.lora_alpha)
        for line in summary_lines(report):
            print(line)
        print(f"osdface release -> {args.out}")
    elif args.model_cmd == "init":
        check_destination(args.out, args.format, [], args.overwrite)
        model = build_model(preset(args.preset), seed=args.seed)
        save_model(model, args.out, args.format)
        print(f"random {args.preset} model (seed {args.seed}) -> {args.out}")
    elif args.model_cmd == "info":
        model = load_model(args.path, args.preset)
        parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
        upscale = int(getattr(model.config, "upscale", 1) or 1)
        print(json.dumps({"name": model.config.name, "kind": model.config.kind, "image_size": model.image_size,
                          "upscale": upscale, "output_size": model.image_size * upscale, "timestep": model.config.timestep,
                          "params_M": {k: round(v / 1e6, 3) for k, v in parts.items()}}, indent=2))
    elif args.src.suffix in _pickle_suffixes() and args.preset is None:
        from toolchain.io.convert import pickle_to_safetensors

        summary = pickle_to_safetensors(args.src, args.dst)
        print(f"{args.src} -> {args.dst} ({summary})")
    else:
        check_destination(args.dst, args.format, [args.src], args.overwrite)
        model = load_model(args.src, args.preset)
        save_model(model, args.dst, args.format, dtype=torch.float16 if args.fp16 else None)
        print(f"{args.src} -> {args.dst} ({args.format})")
    return 0
