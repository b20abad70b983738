"""Restricted unpickling of torch checkpoints and the pickle → safetensors conversion."""

from __future__ import annotations

import pickle

import pytest
import torch

from release_files import RunsCommand, lightning_ckpt, malicious_pickle, touch_command
from toolchain.errors import CheckpointError
from toolchain.io.safe_pickle import load_restricted
from toolchain.io.weights import load_tensors


def _state():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return {"a.weight": base, "a.half": torch.randn(5, generator=g).half(), "a.bf16": torch.randn(3, 2, generator=g).bfloat16(),
            "a.view": base[1:4, ::2], "a.long": torch.arange(7), "a.flag": torch.tensor([True, False])}


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def test_unpickling_the_payload_really_would_run_the_command(tmp_path):
    # The generator's payload is live: plain pickle executes it (so the tests below are meaningful).
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCommand(touch_command(marker))))
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lightning_checkpoint_with_class_reference_loads_its_state_dict_only(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = lightning_ckpt(tmp_path / "assoc.ckpt", _state(), payload=RunsCommand(touch_command(marker)), legacy=legacy)
    with pytest.raises(pickle.UnpicklingError):  # what upstream's file does to weights_only=True
        torch.load(path, weights_only=True)
    got = load_restricted(path)
    assert not marker.exists()
    _assert_same(got.tensors, _state())
    assert got.lightning and "callbacks" in got.dropped_top_level and "optimizer_states" in got.dropped_top_level
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in got.quarantined
    assert any(q.endswith(".system") for q in got.quarantined)
    _assert_same(load_tensors(path), _state())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_never_runs_and_is_refused_naming_the_file(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = malicious_pickle(tmp_path / "evil.ckpt", marker, legacy=legacy)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*system.*not called"):
        load_restricted(path)
    assert not marker.exists()
    pth = malicious_pickle(tmp_path / "evil.pth", marker, legacy=legacy)  # .pth goes through weights_only=True
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        load_tensors(pth)
    assert not marker.exists()


def test_non_tensor_in_state_dict_and_garbage_are_refused(tmp_path):
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "oops": RunsCommand("true")}}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.ckpt.*'oops'.*posix\.system|bad\.ckpt.*'oops'"):
        load_restricted(bad)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.ckpt"):
        load_restricted(junk)


def test_cli_convert_pickle_to_safetensors(tmp_path, capsys):
    from toolchain.cli import main

    src = lightning_ckpt(tmp_path / "assoc.ckpt", _state())
    dst = tmp_path / "assoc.safetensors"
    assert main(["model", "convert", str(src), str(dst)]) == 0
    _assert_same(load_tensors(dst), {k: v.contiguous() for k, v in _state().items()})
    from toolchain.io.weights import read_safetensors_metadata
    from toolchain.io.hashing import sha256_file

    assert read_safetensors_metadata(dst)["source_sha256"] == sha256_file(src)
    marker = tmp_path / "ran"
    evil = malicious_pickle(tmp_path / "evil.ckpt", marker)
    capsys.readouterr()
    assert main(["model", "convert", str(evil), str(tmp_path / "evil.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "evil.ckpt" in err[0]
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
