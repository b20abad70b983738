"""The CLI end to end on the tiny preset, and its handling of bad input."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.cli import main


def run(*args) -> int:
    return main([str(a) for a in args])


def test_help_everywhere(capsys):
    from toolchain.cli import VERBS, build_parser

    parser = build_parser()
    for verb in parser._subparsers._group_actions[0].choices:
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0
    assert len(VERBS) >= 6


def test_quantize_restore_eval_pipeline(tiny_model_path, calib_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert run("quantize", "--model", tiny_model_path, "--method", "minmax", "--bits", "w4a4", "--calib", calib_dir, "--out", ck, "--device", "cpu") == 0
    assert (ck / "model.safetensors").is_file() and (ck / "quant_config.json").is_file()
    # odd formats: grey JPEG, RGBA PNG with odd size
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((np.random.rand(37, 53) * 255).astype(np.uint8), "L").save(src / "grey.jpg")
    rgba = np.random.rand(41, 29, 4)
    rgba[..., 3] = np.linspace(0, 1, 29)[None, :]
    Image.fromarray((rgba * 255).astype(np.uint8), "RGBA").save(src / "alpha.png")
    assert run("restore", src, "--checkpoint", ck, "--out", tmp_path / "out", "--device", "cpu") == 0
    grey = Image.open(tmp_path / "out" / "grey.png")
    alpha = Image.open(tmp_path / "out" / "alpha.png")
    assert grey.mode == "L" and grey.size == (53, 37)
    assert alpha.mode == "RGBA" and alpha.size == (29, 41)
    assert np.array_equal(np.asarray(alpha)[..., 3], np.asarray(Image.open(src / "alpha.png"))[..., 3])
    out = tmp_path / "eval"
    assert run("eval", "--data", calib_dir, "--model", tiny_model_path, "--checkpoint", ck, "--out", out, "--limit", "4",
               "--metrics", "psnr,ssim,lpips", "--device", "cpu") == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"LQ input", "FP", "minmax W4A4"}
    assert "lpips" in report["skipped_metrics"] and "alexnet-owt-7be5be79.pth" in report["skipped_metrics"]["lpips"]
    q = report["results"]["minmax W4A4"]
    assert q["vs_fp"]["psnr"] < 40 and q["accounting"]["paper"]["params_M"] < report["results"]["FP"]["accounting"]["paper"]["params_M"]
    assert Image.open(out / "grid.png").size[0] == 4 * 160


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [l for l in err if l.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_unreadable_and_non_image_inputs(tiny_model_path, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("this is not an image")
    assert run("restore", tmp_path / "notes.png", "--model", tiny_model_path, "--out", tmp_path / "out", "--device", "cpu") == 2
    assert "notes.png" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), "red").save(good)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:60])
    assert run("restore", good, truncated, "--model", tiny_model_path, "--out", tmp_path / "out2", "--device", "cpu") == 2
    assert "trunc.png" in _one_error_line(capsys)
    assert not (tmp_path / "out2").exists()  # nothing written although the first image was fine
    assert run("restore", tmp_path / "missing.png", "--model", tiny_model_path, "--out", tmp_path / "o", "--device", "cpu") == 2
    assert "not found" in _one_error_line(capsys)


def test_pickle_and_wrong_checkpoints_rejected(tmp_path, calib_dir, capsys):
    evil = tmp_path / "evil.ckpt"

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil.write_bytes(pickle.dumps({"state_dict": {"w": Exploit()}}))
    assert run("restore", calib_dir / "lq", "--model", evil, "--preset", "tiny", "--out", tmp_path / "o", "--device", "cpu") == 2
    assert "evil.ckpt" in _one_error_line(capsys)
    assert not (tmp_path / "pwned").exists()
    torch.save({"state_dict": {"unet.bogus": torch.zeros(2)}}, tmp_path / "wrong.pt")
    assert run("restore", calib_dir / "lq", "--model", tmp_path / "wrong.pt", "--preset", "tiny", "--out", tmp_path / "o", "--device", "cpu") == 2
    assert "does not match" in _one_error_line(capsys)
    (tmp_path / "fake_ckpt").mkdir()
    assert run("restore", calib_dir / "lq", "--checkpoint", tmp_path / "fake_ckpt", "--out", tmp_path / "o", "--device", "cpu") == 2
    assert "not a quantized checkpoint" in _one_error_line(capsys)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    assert run("restore", calib_dir / "lq", "--model", tmp_path / "corrupt.safetensors", "--out", tmp_path / "o", "--device", "cpu") == 2
    assert "corrupt.safetensors" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_bad_method_and_params(tiny_model_path, calib_dir, tmp_path, capsys):
    assert run("quantize", "--model", tiny_model_path, "--method", "nope", "--calib", calib_dir, "--out", tmp_path / "x") == 2
    assert "unknown method" in _one_error_line(capsys)
    assert run("quantize", "--model", tiny_model_path, "--param", "alpha=0.5", "--calib", calib_dir, "--out", tmp_path / "x") == 2
    assert "no parameter" in _one_error_line(capsys)
    assert run("quantize", "--model", tiny_model_path, "--bits", "w1a8", "--calib", calib_dir, "--out", tmp_path / "x") == 2
    assert "bits" in _one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_every_verb_help_shows_one_worked_example():
    from toolchain.cli import EXAMPLES, _all_subparsers, build_parser

    for p in _all_subparsers(build_parser()):
        text = p.format_help()
        verb = p.prog.removeprefix("toolchain ")
        assert f"example: {EXAMPLES[verb]}" in text, p.prog
        # the example runs this verb (or, for a group, one of its sub-verbs)
        assert EXAMPLES[verb].startswith(f"toolchain {verb}"), p.prog


def test_quantize_help_lists_the_registered_methods(capsys):
    from toolchain.commands.quantize import METHOD_NAMES
    from toolchain.quant.registry import registered_methods

    assert set(METHOD_NAMES) == set(registered_methods())
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in METHOD_NAMES)


def test_export_takes_the_checkpoint_as_every_verb_does(tmp_path, capsys):
    # --checkpoint like restore/eval/allocate; the older positional form means the same; two different ones are refused
    rc = main(["export", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "b"), "--target", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two checkpoints given" in err[0]
