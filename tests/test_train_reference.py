"""`toolchain train-reference`: the split, validation-based stopping, the model card, and the ref-l preset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from toolchain.cli import main

UTK = Path(__file__).resolve().parents[2] / "shared" / "assets" / "faces" / "utkface"


def test_ref_l_preset_size_and_hadamard_families():
    from toolchain.balance.hadamard import is_available
    from toolchain.models.configs import preset
    from toolchain.models.osdface import build_model

    model = build_model(preset("ref-l"))
    n = sum(p.numel() for p in model.parameters())
    assert 25e6 < n <= 30e6  # the bound: at most 30 M parameters
    widths = {m.in_features for m in model.unet.modules() if hasattr(m, "in_features")}
    assert {320, 640} <= widths  # SD-2.1's first-level width and a 640 (feed-forward) inside the UNet
    convs = {m.in_channels for m in model.modules() if hasattr(m, "in_channels") and hasattr(m, "kernel_size")}
    assert all(is_available(c) for c in convs | widths if c >= 64)  # every wide layer has a Hadamard of its width


@pytest.mark.skipif(not UTK.is_dir(), reason="needs ../shared/assets/faces/utkface")
def test_train_reference_stops_on_validation_plateau_and_keeps_the_best(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for f in sorted(UTK.iterdir())[:30]:
        shutil.copy(f, faces / f.name)
    out, work = tmp_path / "m.safetensors", tmp_path / "w"
    args = ["train-reference", "--faces", str(faces), "--out", str(out), "--workdir", str(work), "--preset", "tiny",
            "--steps", "12", "--batch-size", "2", "--lr", "1e-3", "--val-faces", "4", "--eval-every", "2", "--patience", "2",
            "--min-delta", "100", "--eval-images", "2", "--checkpoint-every", "100", "--device", "cpu",
            "--model-card", str(tmp_path / "card.md")]
    assert main(args) == 0
    split = json.loads((work / "split.json").read_text())
    assert len(split["validation"]) == 4 and len(split["heldout"]) == 3
    assert not set(split["validation"]) & set(split["train"]) and not set(split["heldout"]) & set(split["train"])
    info = json.loads((work / "training_info.json").read_text())
    v = info["validation"]
    # a 100 dB gain never happens: the first score is the best, two more without gain → stop at step 6
    assert [h["step"] for h in v["history"]] == [2, 4, 6] and v["best_step"] == 2 and v["stopped_on_plateau"]
    assert info["steps_done"] == 6
    # the saved model is the step-2 model: its validation PSNR is the recorded best score
    import torch

    from toolchain.models.storage import load_model
    from toolchain.models.configs import preset
    from toolchain.eval.metrics import psnr
    from toolchain.train.reference import degraded_pairs, restore_batched

    model = load_model(out).float()
    lq, hq = degraded_pairs([faces / n for n in split["validation"]], preset("tiny").image_size, 20_000)
    score = float(psnr(restore_batched(model, lq, torch.device("cpu")), hq).mean())
    assert score == pytest.approx(v["history"][0]["score"], abs=0.05)  # float16 storage of the weights
    assert "stopped on the plateau" in (tmp_path / "card.md").read_text()
    # a second run of the same command trains no further (the plateau is recorded)
    assert main(args) == 0
    assert json.loads((work / "training_info.json").read_text())["steps_done"] == 6


def test_eval_every_without_val_faces_is_one_error_line(tmp_path, capsys):
    rc = main(["train-reference", "--faces", str(tmp_path), "--out", str(tmp_path / "m.safetensors"), "--workdir",
               str(tmp_path / "w"), "--eval-every", "5"])
    assert rc == 2
    assert "error: --eval-every needs --val-faces" in capsys.readouterr().err
