"""`toolchain train-reference`: train the small OSDFace-shaped reference model on real faces."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-reference", help="train the small OSDFace-shaped reference model on a folder of faces",
                       description="Train an OSDFace-shaped model from scratch on HQ faces degraded on the fly. Seeded and "
                                   "resumable (rerun the same command after an interruption); writes a loss curve, the split, "
                                   "held-out quality and a model card.")
    p.add_argument("--faces", type=Path, required=True, help="folder of HQ aligned faces (e.g. ../shared/assets/faces/utkface)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors (float16)")
    p.add_argument("--workdir", type=Path, required=True, help="folder for checkpoints, loss curve, split and info")
    p.add_argument("--preset", default="ref", help="architecture: ref (16.9 M, the bundled default) or ref-l (28.6 M, SD-2.1 channel families)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout-every", type=int, default=10, help="every Nth face (sorted by name) is held out")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--eval-images", type=int, default=64, help="held-out faces to score at the end")
    p.add_argument("--model-card", type=Path, default=None, help="write a model card markdown here")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training (checkpointed) after this much wall-clock time")
    p.add_argument("--val-faces", type=int, default=0,
                   help="validation faces taken from the training split (never trained on) for --eval-every")
    p.add_argument("--eval-every", type=int, default=0,
                   help="score the validation faces' PSNR every N steps and keep the best weights (0: off)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop when this many scores in a row gain no more than --min-delta dB (0: never stop on it)")
    p.add_argument("--min-delta", type=float, default=0.02, help="dB a validation score must gain to count as better")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.commands.model import is_model_artifact
    from toolchain.io.outputs import check_output_file, output_lock

    check_output_file(args.out, "model file", is_model_artifact, inputs=[args.faces, args.workdir])
    with output_lock(args.workdir):
        return _run_locked(args)


def _run_locked(args: argparse.Namespace) -> int:
    import json
    import sys

    from toolchain.defaults import device_from_arg
    from toolchain.train.reference import ReferenceTrainingArgs, train_reference, write_model_card

    info = train_reference(ReferenceTrainingArgs(
        faces=args.faces, out=args.out, workdir=args.workdir, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, holdout_every=args.holdout_every, workers=args.workers, checkpoint_every=args.checkpoint_every,
        device=str(device_from_arg(args.device)), eval_images=args.eval_images, max_minutes=args.max_minutes,
        val_faces=args.val_faces, eval_every=args.eval_every, patience=args.patience, min_delta=args.min_delta))
    info["holdout_every"] = args.holdout_every
    if args.model_card:
        write_model_card(info, args.model_card)
    print(json.dumps(info["heldout_quality"], indent=2))  # stdout: the JSON only
    print(f"model -> {args.out}", file=sys.stderr)
    return 0
