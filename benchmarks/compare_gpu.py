"""Run a `toolchain compare` spec as parallel single-entry jobs on the GPUs of one host, within a deadline,
and carry the results home in pieces small enough for the device tool (≤ 15 MB each).

A one-step model at 128 px leaves an H200 mostly idle (each step is bound by kernel launches), so several
entries run at once: ``--jobs-per-gpu`` processes per GPU, each ``toolchain compare`` on one (method, bits) entry
with the shared ``--work`` cache. Entries start in priority order (``--bits-order``, then spec order); none starts
after ``--start-by`` seconds, and any still running at ``--kill-at`` is stopped and reported as unfinished.

``pack`` writes the work cache without checkpoint weights (rows, 8-bit PNG outputs, configs, allocation tables),
the evaluation set and the calibration manifest as a tar in 15 MB parts; ``collect`` moves up to N unsent parts
into $OUT. At home, ``unpack`` restores the tree, and ``toolchain compare`` with the same spec and model file
finds every entry cached and adds the metrics this machine can score (dlib's ``identity_deg``/``lmd``) from the PNGs.

    python benchmarks/compare_gpu.py run --spec S --model M --calib C --eval E --work W --gpus 0,1 --jobs-per-gpu 6 \\
        --start-by 600 --kill-at 900 --status W/status.json
    python benchmarks/compare_gpu.py pack --work W --calib C --eval E --to /tmp/pack/NAME
    python benchmarks/compare_gpu.py collect --from /tmp/pack --out $OUT --max-parts 4
    python benchmarks/compare_gpu.py unpack --parts DIR --name NAME --to benchmarks/.cache/gpu
    python benchmarks/compare_gpu.py table --spec S --model M --home benchmarks/.cache/gpu/NAME --out benchmarks/results/NAME --name NAME
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PART_BYTES = 15_000_000


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower()


def expand(spec: list[dict], bits_order: list[str]) -> list[dict]:
    """One job per (run, bits), ordered by the rank of its bits in ``bits_order`` then by spec position."""
    jobs = []
    for i, run in enumerate(spec):
        for bits in run["bits"]:
            rank = bits_order.index(bits) if bits in bits_order else len(bits_order)
            jobs.append({"rank": (rank, i), "slug": _slug(f"{run['label']}-{bits}"), "entry": {**run, "bits": [bits]}})
    return [j for j in sorted(jobs, key=lambda j: j["rank"])]


def run_jobs(a: argparse.Namespace) -> None:
    spec = json.loads(Path(a.spec).read_text())
    jobs = expand(spec, a.bits_order.split(","))
    work = Path(a.work)
    (work / "jobs").mkdir(parents=True, exist_ok=True)
    gpus = a.gpus.split(",")
    slots = [g for g in gpus for _ in range(a.jobs_per_gpu)]
    t0 = time.time()
    running: dict[str, tuple[subprocess.Popen, str, float]] = {}
    status: dict[str, dict] = {j["slug"]: {"state": "waiting"} for j in jobs}
    queue = list(jobs)

    def save() -> None:
        doc = {"spec": a.spec, "model": a.model, "gpus": a.gpus, "jobs_per_gpu": a.jobs_per_gpu, "start_by_s": a.start_by,
               "kill_at_s": a.kill_at, "elapsed_s": round(time.time() - t0, 1), "jobs": status}
        tmp = Path(a.status).with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(a.status)

    while queue or running:
        now = time.time() - t0
        for slug, (proc, gpu, started) in list(running.items()):
            if proc.poll() is not None:
                status[slug].update(state="done" if proc.returncode == 0 else "failed", rc=proc.returncode, seconds=round(time.time() - started, 1))
                slots.append(gpu)
                del running[slug]
            elif now > a.kill_at:
                proc.kill()
                proc.wait()
                status[slug].update(state="killed at the deadline", seconds=round(time.time() - started, 1))
                slots.append(gpu)
                del running[slug]
        while queue and slots and now <= min(a.start_by, a.kill_at):
            job = queue.pop(0)
            gpu = slots.pop(0)
            jdir = work / "jobs" / job["slug"]
            jdir.mkdir(parents=True, exist_ok=True)
            (jdir / "spec.json").write_text(json.dumps([job["entry"]]))
            cmd = [sys.executable, "-m", "toolchain", "compare", "--spec", str(jdir / "spec.json"), "--model", a.model, "--calib", a.calib,
                   "--eval", a.eval, "--out", str(jdir), "--work", str(work), "--name", "job", "--device", a.device]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "OMP_NUM_THREADS": "2"}
            log = open(jdir / "log.txt", "w")
            running[job["slug"]] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), gpu, time.time())
            status[job["slug"]].update(state="running", gpu=gpu, started_s=round(now, 1))
        if queue and now > min(a.start_by, a.kill_at):
            for job in queue:
                status[job["slug"]]["state"] = "not started (deadline)"
            queue = []
        save()
        time.sleep(2)
    save()
    print(json.dumps({k: v["state"] for k, v in status.items()}, indent=1))


def pack(a: argparse.Namespace) -> None:
    """Everything of the comparison except checkpoint weights and method work folders, as 15 MB tar parts."""
    work, to = Path(a.work), Path(a.to)
    to.mkdir(parents=True, exist_ok=True)
    tar_path = to.parent / f"{to.name}.tar"

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(p.startswith(".") and p.endswith(".work") for p in parts):
            return None  # method resume state
        if info.isfile() and info.name.endswith(".safetensors"):
            return None  # checkpoint weights (outputs travel as PNGs)
        return info

    with tarfile.open(tar_path, "w") as tar:
        tar.add(work, arcname="work", filter=keep)
        tar.add(a.eval, arcname="eval")
        tar.add(Path(a.calib) / "manifest.json", arcname="calib/manifest.json")
    data = tar_path.read_bytes()
    for i in range(0, len(data), PART_BYTES):
        (to / f"{to.name}.tar.part{i // PART_BYTES:02d}").write_bytes(data[i : i + PART_BYTES])
    tar_path.unlink()
    print(f"{to.name}: {len(data) / 1e6:.1f} MB in {(len(data) + PART_BYTES - 1) // PART_BYTES} parts")


def collect(a: argparse.Namespace) -> None:
    """Move up to --max-parts part files (oldest pack first) from --from into --out."""
    parts = sorted(Path(a.src).rglob("*.part*"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in parts[: a.max_parts]:
        shutil.move(str(p), out / p.name)
        print("collected", p.name)
    print(f"{max(0, len(parts) - a.max_parts)} parts left")


def unpack(a: argparse.Namespace) -> None:
    parts = sorted(Path(a.parts).glob(f"{a.name}.tar.part*"))
    if not parts:
        raise SystemExit(f"error: no {a.name}.tar.part* in {a.parts}")
    dest = Path(a.to) / a.name
    dest.mkdir(parents=True, exist_ok=True)
    tar_path = dest.parent / f"{a.name}.tar"
    with open(tar_path, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    print("unpacked into", dest)


def table(a: argparse.Namespace) -> None:
    """The comparison table at home: the finished entries of --spec from the unpacked cache (scored again only for
    the metrics the GPU host could not run), and the entries that did not finish, with their state, below it."""
    home = Path(a.home)
    spec = json.loads(Path(a.spec).read_text())
    states: dict[str, dict] = {}
    for f in sorted((home / "work").glob("status*.json"), key=lambda f: f.stat().st_mtime):  # later runs override earlier states
        for slug, st in json.loads(f.read_text())["jobs"].items():
            if st["state"] != "not started (deadline)" or slug not in states:
                states[slug] = st
    done, missing = [], []
    for job in expand(spec, a.bits_order.split(",")):
        entry, bits = job["entry"], job["entry"]["bits"][0]
        ck = home / "work" / (_slug(f"{entry['label']}-{bits}") + ("-mp" if entry.get("mp") else ""))
        if any(ck.glob("eval-*.json")):
            done.append(entry)
        else:
            st = states.get(job["slug"], {"state": "not run"})
            missing.append(f"{entry['label']} {bits.upper()}: {st['state']}" + (f" after {st['seconds']:.0f} s" if st.get("seconds") else ""))
    merged: dict[str, dict] = {}
    for e in done:
        merged.setdefault(e["label"], {**e, "bits": []})["bits"] += e["bits"]
    (home / "finished_spec.json").write_text(json.dumps(list(merged.values()), indent=1))
    from toolchain.cli import main as cli

    rc = cli(["compare", "--spec", str(home / "finished_spec.json"), "--model", a.model, "--calib", str(home / "calib"),
              "--eval", str(home / "eval"), "--work", str(home / "work"), "--out", a.out, "--name", a.name, "--device", "cpu"])
    if rc:
        raise SystemExit(rc)
    md = Path(a.out) / f"{a.name}.md"
    if a.note:
        md.write_text(md.read_text() + "\n" + a.note + "\n")
    if missing:
        md.write_text(md.read_text() + "\nNot in the table — did not finish within the GPU lease (jobs shared the GPUs; see status*.json): "
                      + "; ".join(missing) + ".\n")
    print(f"{len(done)} entries in the table, {len(missing)} unfinished")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    for k in ("spec", "model", "calib", "eval", "work", "status"):
        r.add_argument(f"--{k}", required=True)
    r.add_argument("--gpus", default="0")
    r.add_argument("--jobs-per-gpu", type=int, default=4)
    r.add_argument("--start-by", type=float, default=600.0, help="seconds after which no job starts")
    r.add_argument("--kill-at", type=float, default=900.0, help="seconds after which running jobs are stopped")
    r.add_argument("--bits-order", default="w4a4,w6a6,w4a6,w8a8")
    r.add_argument("--device", default="cuda", help="cpu: a smoke test of the runner on a machine without GPU")
    k = sub.add_parser("pack")
    for key in ("work", "calib", "eval", "to"):
        k.add_argument(f"--{key}", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--from", dest="src", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--max-parts", type=int, default=4)
    u = sub.add_parser("unpack")
    for key in ("parts", "name", "to"):
        u.add_argument(f"--{key}", required=True)
    t = sub.add_parser("table")
    for key in ("spec", "model", "home", "out", "name"):
        t.add_argument(f"--{key}", required=True)
    t.add_argument("--bits-order", default="w4a4,w6a6,w4a6,w8a8")
    t.add_argument("--note", default="", help="a line added under the table (e.g. how many jobs shared each GPU)")
    a = p.parse_args()
    {"run": run_jobs, "pack": pack, "collect": collect, "unpack": unpack, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
