"""Data parallelism with torch.distributed (gloo, 2 CPU processes) against 1-process references.

The ranks are started with ``torch.multiprocessing.spawn`` and torchrun's environment variables
(``toolchain.distributed.init_from_env`` reads them as under torchrun); the command-line test goes
through ``--nproc-per-node 2``, i.e. ``torch.distributed.run`` itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

from conftest import REPO, tiny_batches
from toolchain import distributed as D

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    with D.session(torch.device("cpu")):
        fn(rank, *args)


def spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` on 2 gloo ranks (raises if a rank fails)."""
    tmp.spawn(_entry, args=(_free_port(), fn, args), nprocs=WORLD, join=True)


# -- the engine: an exactly batch-invariant toy problem --------------------------------------------

def _toy_data():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 4, generator=g) for _ in range(3)]  # 5 samples: shards of 3 and 2 rows
    ys = [x @ torch.tensor([0.5, -1.0, 2.0, 0.25]) + 0.1 * torch.randn(5, generator=g) for x in xs]
    return xs, ys


def _toy_fit(workdir: Path, steps: int = 6, stop_at: int | None = None) -> torch.Tensor:
    from toolchain.train.fit import fit

    xs, ys = _toy_data()
    theta = torch.nn.Parameter(torch.zeros(4))

    def loss_fn(step, batch):
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt
        x, y = batch
        err = (x * theta).sum(1) - y
        return err.pow(2).mean(), {"mae": float(err.detach().abs().mean())}

    fit({"theta": theta}, loss_fn, len(xs), steps, lr=0.05, seed=0, device=torch.device("cpu"), workdir=workdir, desc="toy",
        grad_clip=0.5, checkpoint_every=2, batches=lambda i: (xs[i], ys[i]))
    return theta.detach().clone()


def _toy_rank(rank: int, workdir: str, out: str, stop_at: int | None) -> None:
    # rank 1 gets a private, empty work folder: it can only resume from rank 0's broadcast checkpoint
    work = Path(workdir) if rank == 0 else Path(workdir + f"-rank{rank}")
    try:
        theta = _toy_fit(work, stop_at=stop_at)
    except KeyboardInterrupt:
        return
    torch.save({"theta": theta, "history": json.loads((Path(workdir) / "history.json").read_text()) if rank == 0 else None},
               f"{out}.{rank}.pt")


def test_shard_rows_cover_the_batch_in_order():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [D.shard_rows(n, r, world) for r in range(world)]
            assert list(range(n)) == [i for p in parts for i in range(p.start, p.stop)]
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_two_process_fit_equals_one_process_and_resumes(tmp_path):
    reference = _toy_fit(tmp_path / "one")
    ref_hist = json.loads((tmp_path / "one" / "history.json").read_text())
    spawn(_toy_rank, str(tmp_path / "two"), str(tmp_path / "two"), None)
    two = torch.load(tmp_path / "two.0.pt")
    assert torch.equal(two["theta"], torch.load(tmp_path / "two.1.pt")["theta"])  # the ranks agree
    # uneven shards (3 + 2 rows) weighted by their share: the global gradient, up to float rounding
    assert (two["theta"] - reference).abs().max() <= 1e-6
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in ref_hist], rel=1e-6, abs=1e-9)
    assert [h["mae"] for h in two["history"]] == pytest.approx([h["mae"] for h in ref_hist], rel=1e-6)  # logged means are global

    spawn(_toy_rank, str(tmp_path / "cut"), str(tmp_path / "cut"), 5)  # both ranks stop during step 6; checkpoint at step 4
    assert json.loads((tmp_path / "cut" / "history.json").read_text())[-1]["step"] == 4
    spawn(_toy_rank, str(tmp_path / "cut"), str(tmp_path / "cut"), None)
    resumed = torch.load(tmp_path / "cut.0.pt")
    assert torch.equal(resumed["theta"], two["theta"])  # resumed run == uninterrupted 2-process run, bit for bit
    assert torch.equal(torch.load(tmp_path / "cut.1.pt")["theta"], two["theta"])  # rank 1 continued from rank 0's checkpoint
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in two["history"]]


# -- QD-LoRA on the tiny preset --------------------------------------------------------------------

def _prepared_w4a4(model_path: Path):
    """The tiny model, W4A4, with SVD + LoRA branches (rank 2) and calibrated ranges: QD-LoRA's start."""
    from toolchain.lowrank.compensate import attach_branches
    from toolchain.models import load_model
    from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model
    from toolchain.quant.config import QuantConfig

    model = load_model(model_path)
    prepare_model(model, QuantConfig.for_bits("quantface", "w4a4"))
    attach_branches(model, 2, 2, seed=0)
    calibrate_weights(model)
    calibrate_activations(model, _qdlora_batches())
    return model


def _qdlora_batches():
    return tiny_batches(2, batch=3)  # 3 images a batch: shards of 2 and 1


def _qdlora(model, workdir: Path):
    from toolchain.lowrank.compensate import _branch_params, train_branches

    res = train_branches(model, _qdlora_batches(), workdir, steps=1, lr=1e-3, seed=0, device=torch.device("cpu"))
    return res["history"], {k: p.grad.clone() for k, p in _branch_params(model).items() if p.grad is not None}


def _qdlora_rank(rank: int, model_file: str, workdir: str, out: str) -> None:
    model = torch.load(model_file, weights_only=False)  # the parent's model: one starting state for both runs
    history, grads = _qdlora(model, Path(workdir))
    torch.save({"history": history, "grads": grads}, f"{out}.{rank}.pt")


def test_two_process_qdlora_gradient_equals_one_process(tiny_model_path, tmp_path):
    """Step 1 of QD-LoRA (W4A4 tiny): the all-reduced branch gradient and the global loss of 2 ranks
    (2 + 1 images) equal the 1-process full-batch ones. Later steps are not compared bit-tight: half
    batches change float rounding (~1e-6), which a 4-bit fake-quant can turn into a rounding flip and
    Adam's normalised first step into a different sign for near-zero gradients."""
    import copy

    model = _prepared_w4a4(tiny_model_path)
    torch.save(model, tmp_path / "start.pt")
    ref_hist, ref_grads = _qdlora(copy.deepcopy(model), tmp_path / "one")
    spawn(_qdlora_rank, str(tmp_path / "start.pt"), str(tmp_path / "two"), str(tmp_path / "two"))
    two = torch.load(tmp_path / "two.0.pt")
    other = torch.load(tmp_path / "two.1.pt")
    assert set(two["grads"]) == set(ref_grads) and len(ref_grads) > 100
    assert all(torch.equal(two["grads"][k], other["grads"][k]) for k in ref_grads)  # identical on both ranks
    scale = max(g.abs().max() for g in ref_grads.values())
    diff = max((two["grads"][k] - ref_grads[k]).abs().max() for k in ref_grads)
    print(f"QD-LoRA 2 ranks vs 1: max |Δgrad| {float(diff):.3g}, max |grad| {float(scale):.3g}, "
          f"loss {two['history'][0]['loss']!r} vs {ref_hist[0]['loss']!r}")
    assert diff <= 1e-3 * scale, f"max |Δgrad| {diff:.3g} vs max |grad| {scale:.3g}"
    assert two["history"][0]["loss"] == pytest.approx(ref_hist[0]["loss"], rel=1e-4)
    assert (tmp_path / "two" / "trainer_state.pt").is_file() and (tmp_path / "two" / "loss_curve.png").is_file()


# -- PassionSR, Q-Diffusion, QArtSR on the tiny preset ---------------------------------------------

# tiny budgets: every fit call is cut to its first step at lr 0 (below), so these only decide which calls run
_METHOD_PARAMS = {
    "passionsr": {"epochs": 1},  # LET (whole batches on every rank) then LBQ (sharded), per stage
    "qdiffusion": {"steps_per_block": 1},  # one sharded fit per block
    "qartsr": {"steps_per_module": 1, "e2e_steps": 1, "timestep_offsets": [0], "sweep_batches": 1},  # per module, then end to end
}
# the fit calls that run (the others get 0 steps, to keep the test short): every PassionSR phase; blocks called
# with one tensor, with (tensor, None), with positional (tensor, temb) + keyword prompt, with keywords only and
# a tuple of skip tensors; QArtSR at both ends of its reversed order and end to end
_METHOD_FITS = ("PassionSR", "Q-Diffusion vae.encoder.conv_in", "Q-Diffusion vae.decoder.up_blocks.0", "Q-Diffusion unet.mid_block",
                "Q-Diffusion unet.up_blocks.1", "QArtSR RPQ vae.decoder.conv_out", "QArtSR RPQ unet.up_blocks.1",
                "QArtSR RPQ vae.encoder.conv_in", "QArtSR end-to-end")


def _method_first_steps(model_path: Path) -> dict[str, list[dict]]:
    """Each method on the tiny model (W4A4, one batch of 3 images: shards of 2 and 1) with every ``fit`` call
    cut to one step at lr 0, so the parameters stay put and each call starts from the same state in a 1- and
    a 2-process run; per call: sharded or not, the first loss and the gradients of that step."""
    import importlib

    from toolchain.methods import MethodContext, get_method
    from toolchain.models import load_model
    from toolchain.quant.config import QuantConfig
    from toolchain.train.fit import fit

    batches = tiny_batches(1, batch=3)
    out: dict[str, list[dict]] = {}
    for method, params in _METHOD_PARAMS.items():
        module = importlib.import_module(f"toolchain.methods.{method}")
        calls: list[dict] = []

        def spy(params_, loss_fn, n, steps, lr, seed, device, workdir, desc, *args, calls=calls, **kwargs):
            run = desc.startswith("PassionSR") or desc in _METHOD_FITS
            res = fit(params_, loss_fn, n, min(steps, int(run)), 0.0, seed, device, workdir, desc, *args, **kwargs)
            if res["steps"]:
                calls.append({"desc": desc, "sharded": kwargs.get("batches") is not None, "loss": res["history"][0]["loss"],
                              "grads": {k: p.grad.clone() for k, p in params_.items() if p.grad is not None}})
            return res

        module.fit = spy
        try:
            get_method(method, params).apply(load_model(model_path), QuantConfig.for_bits(method, "w4a4", params=params),
                                             MethodContext(batches, seed=0, log=lambda _: None))
        finally:
            module.fit = fit
        out[method] = calls
    return out


def _methods_rank(rank: int, model_path: str, out: str) -> None:
    torch.save(_method_first_steps(Path(model_path)), f"{out}.{rank}.pt")


def test_two_process_passionsr_qdiffusion_qartsr_gradients_equal_one_process(tiny_model_path, tmp_path):
    """PassionSR (LBQ), Q-Diffusion (every block) and QArtSR (every module, end to end) shard their batches:
    for each fit call the all-reduced gradient and the global loss of 2 ranks (2 + 1 images) equal the
    1-process ones. PassionSR's LET phase runs whole batches on every rank (dynamic min-max ranges couple the
    samples) and is compared too; sharding it was measured to give another gradient (max |Δgrad| 0.0031 vs
    max |grad| 0.0068 for the UNet stage). Measured here: max |Δgrad| / max |grad| of a call <= 1.4e-6 (float
    rounding of half batches) on an AVX-512 EPYC; on an AMX Xeon one call (PassionSR's VAE-encoder LBQ, max |grad|
    1.7e-4) read 2.6e-4: at 4 bits a one-ULP difference of the half-batch sums can flip one rounding of the
    fake-quant grid (the discontinuity every W4A4 parity test meets). So: every call <= 1e-2 (a sharding fault —
    unweighted shards, a missing all-reduce — is off by tens of percent), nine in ten <= 1e-4; the first losses
    agree to rel 1e-5."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same arithmetic before training (calibration at 4 bits)
    try:
        one = _method_first_steps(tiny_model_path)
    finally:
        torch.set_num_threads(threads)
    spawn(_methods_rank, str(tiny_model_path), str(tmp_path / "two"))
    two, other = torch.load(tmp_path / "two.0.pt"), torch.load(tmp_path / "two.1.pt")
    ratios: list[float] = []
    for method, ref in one.items():
        assert [c["desc"] for c in two[method]] == [c["desc"] for c in ref] and sum(c["sharded"] for c in ref) >= 3, method
        worst = 0.0
        for a, b, r in zip(two[method], other[method], ref):
            assert a["sharded"] == r["sharded"] and set(a["grads"]) == set(r["grads"]) and r["grads"], r["desc"]
            assert all(torch.equal(a["grads"][k], b["grads"][k]) for k in r["grads"])  # identical on both ranks
            scale = max(float(g.abs().max()) for g in r["grads"].values())
            diff = max(float((a["grads"][k] - r["grads"][k]).abs().max()) for k in r["grads"])
            assert scale > 0 and diff <= 1e-2 * scale, f"{r['desc']}: max |Δgrad| {diff:.3g} vs max |grad| {scale:.3g}"
            assert a["loss"] == pytest.approx(r["loss"], rel=1e-5), r["desc"]
            worst = max(worst, diff / scale)
            ratios.append(diff / scale)
        print(f"{method} 2 ranks vs 1: {len(ref)} fit calls ({sum(c['sharded'] for c in ref)} sharded), "
              f"worst max |Δgrad| / max |grad| {worst:.3g}")
    assert sum(x <= 1e-4 for x in ratios) >= 0.9 * len(ratios), sorted(ratios)[-5:]


def test_quantize_nproc_per_node_runs_two_ranks(tiny_model_path, calib_dir, tmp_path):
    """`toolchain quantize --nproc-per-node 2` re-launches through torch.distributed.run; rank 0 writes the checkpoint."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "toolchain", "quantize", "--model", str(tiny_model_path), "--method", "quantface", "--bits", "w4a4",
            "--calib", str(calib_dir), "--device", "cpu", "--batch-size", "3", "--param", "train_steps=2", "--param", "svd_rank=2",
            "--param", "lora_rank=2", "--nproc-per-node", "2"]
    out = tmp_path / "q"
    run = subprocess.run([*base, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "quant_config.json").read_text())
    assert "processes" in json.dumps(summary) and (out / "model.safetensors").is_file()
    assert not (tmp_path / ".q.work").exists() and not (tmp_path / ".q.lock").exists()
    bad = subprocess.run([*base, "--out", str(tmp_path / "r"), "--param", "no_such=1"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1  # one line, from the launcher, before any rank starts


# -- the sensitivity sweep -------------------------------------------------------------------------

def _sweep_rank(rank: int, ckpt: str, calib: str, out: str) -> None:
    from toolchain.alloc.sensitivity import SweepSettings, run_sensitivity

    res = run_sensitivity(Path(ckpt), Path(calib), Path(out), SweepSettings(metric="mse", epsilon=2e-4, images=2, max_bits=3))
    torch.save(res, f"{out}.{rank}.pt")


@pytest.fixture(scope="module")
def tiny_w4a4(tiny_model_path, calib_dir, tmp_path_factory):
    from toolchain.cli import main

    out = tmp_path_factory.mktemp("dist") / "ck"
    assert main(["quantize", "--model", str(tiny_model_path), "--method", "minmax", "--bits", "w4a4", "--calib", str(calib_dir),
                 "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_two_process_sensitivity_sweep_equals_one_process_and_resumes(tiny_w4a4, calib_dir, tmp_path):
    from toolchain.alloc.sensitivity import SweepSettings, run_sensitivity

    settings = SweepSettings(metric="mse", epsilon=2e-4, images=2, max_bits=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same arithmetic (at 3-4 bits a thread count's rounding can flip a step)
    try:
        one = run_sensitivity(tiny_w4a4, calib_dir, tmp_path / "one", settings)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "two"
    spawn(_sweep_rank, str(tiny_w4a4), str(calib_dir), str(out))
    two = torch.load(f"{out}.0.pt")
    assert two == torch.load(f"{out}.1.pt")  # every rank returns the gathered result
    assert list(two) == list(one)
    worst = 0.0
    for name in one:
        assert two[name]["B"] == one[name]["B"]
        assert two[name]["trials"].keys() == one[name]["trials"].keys()
        worst = max(worst, max(abs(two[name]["trials"][b] - v) / max(v, 1e-12) for b, v in one[name]["trials"].items()))
    print(f"sweep 2 ranks vs 1: worst relative difference of a trial {worst:.3g}")
    assert worst <= 1e-6
    assert json.loads((out / "sensitivity.json").read_text())["layers"] == two
    # resume: the cache is shared, a rerun recomputes only the deleted layers
    victims = sorted(two)[:3]
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "sensitivity").glob("*.json") if not p.name.startswith("_")}
    for name in victims:
        (out / "sensitivity" / f"{name}.json").unlink()
    spawn(_sweep_rank, str(tiny_w4a4), str(calib_dir), str(out))
    again = torch.load(f"{out}.0.pt")
    assert {n: r["B"] for n, r in again.items()} == {n: r["B"] for n, r in two.items()}
    untouched = [p for p in (out / "sensitivity").glob("*.json") if not p.name.startswith("_") and p.stem not in victims]
    assert untouched and all(p.stat().st_mtime_ns == stamp[p.name] for p in untouched)


def test_ctrl_c_during_nproc_per_node_training_is_one_line_130_and_resumes(tiny_model_path, calib_dir, tmp_path):
    """Ctrl-C in a terminal reaches the launcher and both ranks (the process group): one ``interrupted:``
    line (the launcher's; the ranks stay quiet), no torchrun traceback, exit 130; the same command resumes."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "toolchain", "quantize", "--model", str(tiny_model_path), "--method", "quantface", "--bits", "w4a4",
           "--calib", str(calib_dir), "--device", "cpu", "--batch-size", "3", "--param", "train_steps=30", "--param", "svd_rank=2",
           "--param", "lora_rank=2", "--param", "checkpoint_every=2", "--nproc-per-node", "2", "--out", str(tmp_path / "q")]
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True)
    try:
        seen = b""
        while b"QD-LoRA" not in seen:  # training has started (rank 0's progress bar)
            chunk = p.stderr.read1(4096)
            assert chunk, seen.decode(errors="replace")[-2000:]
            seen += chunk
        time.sleep(1.5)
        os.killpg(p.pid, signal.SIGINT)
        rest = p.stderr.read().decode(errors="replace")
        assert p.wait(timeout=120) == 130, rest[-2000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    lines = [l for l in rest.replace("\r", "\n").splitlines() if l.strip() and "QD-LoRA" not in l]
    assert lines == [lines[0]] and lines[0].startswith("interrupted:"), rest[-2000:]
    assert "Traceback" not in rest and "SignalException" not in rest
    assert not (tmp_path / "q" / "model.safetensors").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_user_error_in_the_ranks_is_one_line_and_2(tiny_model_path, calib_dir, tmp_path):
    """A check that fails inside every rank (a --rule that matches no layer of the loaded model): one ``error:``
    line, no torchrun log lines (``Sending process … SIGTERM``, ``failed (exitcode: 2)``), exit 2, nothing written.
    A calibration set of the wrong task (SR pairs for a same-size face model) is refused by the launcher itself."""
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import build_calibration_set

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "toolchain", "quantize", "--model", str(tiny_model_path), "--method", "minmax", "--bits", "w4a4",
            "--device", "cpu", "--nproc-per-node", "2", "--out", str(tmp_path / "q")]
    run = subprocess.run([*base, "--calib", str(calib_dir), "--rule", "no_such_layer=w8a8"], env=env, capture_output=True, text=True,
                         timeout=300)
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "no_such_layer" in lines[0], run.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.work").exists()
    sr = build_calibration_set([BUNDLED_FACES], tmp_path / "sr", n=2, size=32, seed=0, progress=False, scale=4)
    run = subprocess.run([*base, "--calib", str(sr)], env=env, capture_output=True, text=True, timeout=300)
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "SR pairs" in lines[0], run.stderr
    assert not (tmp_path / "q").exists()


def test_a_bug_in_the_ranks_exits_1_with_one_traceback(tiny_model_path, calib_dir, tmp_path):
    """A genuine bug stays visible under --nproc-per-node: exit 1 and rank 0's traceback, printed once."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK'):\n"
        "    import toolchain.commands.quantize as q\n"
        "    def boom(*a, **k):\n"
        "        raise RuntimeError('simulated bug in rank ' + os.environ['RANK'])\n"
        "    q._run_locked = boom\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'hook'}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "toolchain", "quantize", "--model", str(tiny_model_path), "--method", "minmax",
                          "--bits", "w4a4", "--calib", str(calib_dir), "--device", "cpu", "--nproc-per-node", "2", "--out", str(tmp_path / "q")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.count("Traceback") == 1 and "rank 0 crashed" in run.stderr and "simulated bug in rank 0" in run.stderr, run.stderr
    assert "error:" not in run.stderr and "interrupted:" not in run.stderr


def test_split_samples_round_trip_keeps_shared_leaves_whole():
    """split_samples cuts only tensors laid out by sample (first dim = batch) and rebuilds the same structure;
    to_device/to_cpu map every tensor leaf and leave the containers' shape and the other leaves alone."""
    from toolchain.quant.units import split_samples, to_cpu, to_device

    x, temb, prompt = torch.randn(4, 3, 8, 8), torch.randn(4, 16), torch.randn(1, 7, 32)
    obj = ((x, None, 399), {"temb": temb, "prompt": prompt, "scales": [1.0, torch.tensor(2.0)]})
    rows, rebuild = split_samples(obj, 4)
    assert [r.data_ptr() for r in rows] == [x.data_ptr(), temb.data_ptr()]  # per-sample tensors only, in order
    half = rebuild([r[:2] for r in rows])
    assert torch.equal(half[0][0], x[:2]) and half[0][1:] == (None, 399) and torch.equal(half[1]["temb"], temb[:2])
    assert half[1]["prompt"] is prompt and half[1]["scales"][0] == 1.0  # shared leaves whole, by identity
    with pytest.raises(ValueError, match="expected 2 per-sample tensors"):
        rebuild([x])
    moved = to_cpu(to_device(obj, torch.device("cpu")))
    assert type(moved[0]) is tuple and type(moved[1]["scales"]) is list and torch.equal(moved[1]["prompt"], prompt)
