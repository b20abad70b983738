"""`toolchain run RECIPE --out DIR`: every stage of a recipe, each skipped when its artifact is current.

Stages (in order): ``calibrate`` and ``eval-set`` (HQ/LQ sets), per quantize run ``quantize:NAME`` (with an
allocation: ``quantize:NAME.base`` → ``allocate:NAME`` → ``quantize:NAME`` whose rules include the allocated
bits), ``eval`` (metrics + grid of FP and every run), ``export:NAME``, ``profile:EXPORT``, ``report``
(``report.json`` + ``report.html``). Each stage is the toolchain verb of the same name run in this process,
so each behaves exactly as on the command line (own resume, atomic outputs, one ``error:`` line).

A stage's key is the SHA-256 of its command line and of the content of its inputs (upstream artifacts,
model file, image sources, the derived quant config). ``DIR/run_state.json`` records each finished stage's
key and the fingerprint of its outputs; a stage is skipped when both still match, so a second run is a
no-op and a changed recipe reruns exactly the stages it touches and those downstream. An interrupted run
resumes: the unfinished stage reruns (verbs resume their own work folders) and finished ones are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from toolchain.commands.common import positive_int
from toolchain.io.hashing import sha256_tree

STATE = "run_state.json"
RECIPE_COPY = "recipe.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a whole recipe: calibrate → quantize (→ allocate) → eval → export → profile → report.html",
        description="Run every stage of a recipe file (see `toolchain recipe validate` and README 'Recipes'). Stages whose "
                    "artifacts in --out are current are skipped; an interrupted run resumes when rerun.")
    p.add_argument("recipe", type=Path, help="recipe JSON file")
    p.add_argument("--out", type=Path, required=True, help="run folder: new, empty, or an earlier run's folder")
    p.add_argument("--dry-run", action="store_true", help="print the stages and whether each would run, then stop")
    p.add_argument("--nproc-per-node", type=positive_int, default=None, metavar="N",
                   help="run the quantize and allocate stages as N data-parallel processes (one GPU each on CUDA, gloo on "
                        "the CPU; see README 'Several GPUs'); not part of the stages' keys, so a finished stage stays current")
    p.set_defaults(func=run)


# -- fingerprints ---------------------------------------------------------------------------------

def fingerprint(path: Path | None) -> str:
    """The content hash of a stage input or output (``toolchain.io.hashing.sha256_tree``); "none" / "absent"."""
    return "none" if path is None else (sha256_tree(path) or "absent")


@dataclass
class Stage:
    name: str
    argv: list[str]
    inputs: list[Path | None]
    outputs: list[Path]
    derived: tuple[Path, Callable[[], str]] | None = None  # an input the run writes itself (a quant config): path, text
    action: Callable[[], None] | None = None  # in-process work instead of a verb (the report)
    launch: list[str] = field(default_factory=list)  # how to run it (--nproc-per-node N): outside the key, same result

    @property
    def command(self) -> list[str]:
        return [*self.argv, *self.launch]

    def key(self, out: Path) -> str:
        """Independent of where the run folder and the inputs are: paths under ``out`` are written relative to it and
        input paths by position (their content is hashed below), so a moved or copied run folder stays current."""
        named = {str(p): f"<input {i}>" for i, p in enumerate(self.inputs) if p is not None}
        argv = [named.get(a, a.replace(str(out), "$OUT")) for a in self.argv]
        h = hashlib.sha256(json.dumps(argv).encode())
        for p in self.inputs:
            if self.derived is not None and p == self.derived[0]:  # what the run will write there, written or not
                h.update(b"\0" + hashlib.sha256(self.derived[1]().encode()).hexdigest().encode())
            else:
                h.update(b"\0" + fingerprint(p).encode())
        return h.hexdigest()

    def write_derived(self) -> None:
        if self.derived is not None:
            _write_if_changed(self.derived[0], self.derived[1]())

    def outputs_fingerprint(self) -> str:
        return hashlib.sha256("".join(fingerprint(p) for p in self.outputs).encode()).hexdigest()

    def is_current(self, done: dict[str, Any] | None, key: str) -> bool:
        """Whether the recorded run ``done`` of this stage (run_state.json) had this key and its outputs are untouched."""
        return (bool(done) and done.get("key") == key and all(p.exists() for p in self.outputs)
                and done.get("outputs") == self.outputs_fingerprint())


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what a stage prints to stderr: Python-level output and file descriptor 1, so that child
    processes (the torchrun ranks of ``--nproc-per-node``) do not write into run's JSON stdout either."""
    import os

    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable descriptor 1 (embedded use): the Python-level redirect still holds
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``path`` atomically unless it already holds ``text`` (so its content hash, not its mtime, is what changes)."""
    from toolchain.io.atomic import atomic_write_text

    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


# -- planning ---------------------------------------------------------------------------------------

def plan(recipe, out: Path, nproc_per_node: int | None = None) -> list[Stage]:
    """The stages of ``recipe`` writing under ``out``, in execution order; ``nproc_per_node`` (> 1) launches the
    data-parallel stages (quantize, allocate) as that many processes."""
    launch = ["--nproc-per-node", str(nproc_per_node)] if nproc_per_node and nproc_per_node > 1 else []
    from toolchain.defaults import resolve_model_path

    model = resolve_model_path(recipe.model_path)
    preset = ["--preset", recipe.preset] if recipe.preset else []
    dev = ["--device", recipe.device]
    stages: list[Stage] = []

    def image_set(name: str, folder: Path, s) -> Stage:
        argv = ["calibrate", "-n", str(s.n), "--size", str(s.size), "--seed", str(s.seed), "--model", str(model), *preset,
                "--out", str(folder)]
        if s.source is not None:
            argv[1:1] = ["--hq", str(s.source)]
        return Stage(name, argv, [model, s.source], [folder])

    calib = out / "calib"
    stages.append(image_set("calibrate", calib, recipe.calibration))
    eval_set = out / "eval_set"
    if recipe.evaluation is not None:
        stages.append(image_set("eval-set", eval_set, recipe.evaluation))

    checkpoints: dict[str, Path] = {}
    for r in recipe.quantize:
        qdir = out / "quantize"

        def quantize_stage(name: str, ckpt: Path, cfg_path: Path, extra_rules: Path | None, run=r) -> Stage:
            def config_text() -> str:
                allocated = json.loads(extra_rules.read_text()) if extra_rules is not None and extra_rules.is_file() else []
                rules = [{"pattern": r["match"], "w_bits": r.get("w_bits"), "a_bits": r.get("a_bits"), "skip": r.get("skip", False)}
                         for r in allocated]  # (recipe-format rules from the allocation)
                return run.quant_config(rules).to_json()

            argv = ["quantize", "--config", str(cfg_path), "--model", str(model), *preset, "--calib", str(calib),
                    "--seed", str(recipe.seed), "--batch-size", str(recipe.batch_size), *dev, "--out", str(ckpt)]
            if run.calib_limit:
                argv[1:1] = ["--calib-limit", str(run.calib_limit)]
            return Stage(name, argv, [model, calib, cfg_path, extra_rules], [ckpt], derived=(cfg_path, config_text), launch=launch)

        if r.allocate is not None:
            base = qdir / f"{r.name}.base"
            stages.append(quantize_stage(f"quantize:{r.name}.base", base, qdir / f"{r.name}.base.config.json", None))
            adir = out / "allocate" / r.name
            a = r.allocate
            argv = ["allocate", "all", "--checkpoint", str(base), "--calib", str(calib), "--out", str(adir), "--images", str(a.images),
                    "--metric", a.metric, "--epsilon", str(a.epsilon), "--bits", ",".join(map(str, a.candidate_bits)),
                    "--budget-bits", str(a.budget_bits), "--cost", a.cost, "--device", recipe.device,
                    *[x for m, b in a.pins for x in ("--pin", f"{m}={b}")]]
            stages.append(Stage(f"allocate:{r.name}", argv, [base, calib], [adir / "mp_table.json", adir / "recipe_rules.json"],
                                launch=launch))
            rules_file = adir / "recipe_rules.json"
        else:
            rules_file = None
        ckpt = qdir / r.name
        stages.append(quantize_stage(f"quantize:{r.name}", ckpt, qdir / f"{r.name}.config.json", rules_file))
        checkpoints[r.name] = ckpt

    ev = out / "eval" if recipe.evaluation is not None else None
    if ev is not None:
        argv = ["eval", "--data", str(eval_set), "--model", str(model), *preset, "--metrics", ",".join(recipe.metrics),
                "--grid-rows", str(recipe.grid_rows), "--batch-size", str(recipe.batch_size), *dev, "--out", str(ev)]
        for r in recipe.quantize:
            argv += ["--checkpoint", str(checkpoints[r.name])]
        stages.append(Stage("eval", argv, [model, eval_set, *checkpoints.values()], [ev / "report.json", ev / "grid.png"]))

    exports: dict[str, Path] = {}
    for e in recipe.exports:
        path = out / "export" / e.filename
        src = ["--model", str(model), *preset] if e.source == "fp" else ["--checkpoint", str(checkpoints[e.source])]
        argv = ["export", *src, "--target", e.target, "--part", e.part, "--calib", str(calib), "--out", str(path)]
        if e.validate:
            argv += ["--validate", "--images", str(e.images)]
        for k, v in e.options.items():
            flag = "--" + k.replace("_", "-")
            argv += [flag] if v is True else ([] if v is False else [flag, str(v)])
        stages.append(Stage(f"export:{e.name}", argv, [model if e.source == "fp" else checkpoints[e.source], calib],
                            [path, Path(str(path) + ".json")]))
        exports[e.name] = path

    profiles: dict[str, Path] = {}
    for p in recipe.profiles:
        pdir = profiles[p.export] = out / "profile" / p.export
        argv = ["profile", str(exports[p.export]), "--out", str(pdir), "--threads", str(p.threads), "--runs", str(p.runs),
                "--warmup", str(p.warmup)]
        if not p.xnnpack:
            argv.append("--no-xnnpack")
        if p.adb:
            argv += ["--adb", "--delegate", p.adb.get("delegate", "xnnpack")]
            for k in ("serial", "adb_path", "device_dir"):
                if k in p.adb:
                    argv += ["--" + k.replace("_", "-"), str(p.adb[k])]
        stages.append(Stage(f"profile:{p.export}", argv, [exports[p.export]], [pdir / "profile.json"]))

    def write_report() -> None:
        from toolchain.eval.html_report import write_run_report

        write_run_report(out, recipe.raw, [s.name for s in stages if s.name != "report"], eval_dir=ev, checkpoints=checkpoints,
                         exports=[{"name": e.name, "target": e.target, "source": e.source, "path": exports[e.name],
                                   "profile": profiles.get(e.name)} for e in recipe.exports])

    upstream = [q for s in stages for q in s.outputs]
    stages.append(Stage("report", ["report"], [out / RECIPE_COPY, *upstream], [out / "report.json", out / "report.html"],
                        action=write_report))
    return stages


# -- running ----------------------------------------------------------------------------------------

def _load_state(out: Path) -> dict[str, Any]:
    path = out / STATE
    if not path.is_file():
        return {"stages": {}}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
            raise ValueError("not a run state")
        return state
    except (ValueError, UnicodeDecodeError):
        from toolchain.io.atomic import atomic_write_json

        atomic_write_json(path, {"stages": {}})  # unreadable bookkeeping only means every stage is checked again
        return {"stages": {}}


def _check_out(out: Path, recipe_path: Path) -> None:
    from toolchain.errors import OutputError
    from toolchain.io.outputs import check_not_input

    check_not_input(out, [recipe_path], replaced_whole=False)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is an existing file; `toolchain run` writes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE).is_file():
        raise OutputError(f"--out {out} is a non-empty folder that no `toolchain run` wrote; give a new or empty folder")


def run(args: argparse.Namespace) -> int:
    from toolchain.cli import main as cli_main
    from toolchain.io.atomic import atomic_write_json
    from toolchain.io.outputs import output_lock
    from toolchain.recipe import load_recipe
    from toolchain.recipe.model import check_against_machine
    from tqdm.auto import tqdm

    recipe = load_recipe(args.recipe)
    out = args.out
    _check_out(out, args.recipe)
    check_against_machine(recipe)  # files, device, metrics, rules vs the model's layers: before any stage runs
    if args.dry_run:
        stages = plan(recipe, out, args.nproc_per_node)
        state = _load_state(out) if out.is_dir() else {"stages": {}}
        changing: set[Path] = set()  # outputs of stages that would run (what follows them reruns too)
        for s in stages:
            current = not changing.intersection(s.inputs) and s.is_current(state["stages"].get(s.name), s.key(out))
            if not current:
                changing.update(s.outputs)
            what = "" if s.action is not None else f": toolchain {' '.join(s.command)}"
            print(f"{'up to date' if current else 'would run':>10}  {s.name}{what}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        _write_if_changed(out / RECIPE_COPY, json.dumps(recipe.raw, indent=2, sort_keys=True))
        stages = plan(recipe, out, args.nproc_per_node)
        state = _load_state(out)
        t_all = time.perf_counter()
        ran, skipped = [], []
        bar = tqdm(stages, desc="toolchain run", unit="stage", position=0, leave=True, file=sys.stderr)
        for s in bar:
            bar.set_postfix_str(s.name)
            s.write_derived()
            key = s.key(out)
            if s.is_current(state["stages"].get(s.name), key):
                skipped.append(s.name)
                continue
            state["stages"].pop(s.name, None)  # not current until it finishes again
            atomic_write_json(out / STATE, state)
            t0 = time.perf_counter()
            tqdm.write(f"run: {s.name}" + ("" if s.action else f": toolchain {' '.join(s.command)}"), file=sys.stderr)
            if s.action is not None:
                s.action()
            else:
                with _stdout_to_stderr():  # stdout carries run's own JSON summary only
                    rc = cli_main(s.command)
                if rc != 0:
                    bar.close()
                    print(f"note: stage {s.name} stopped (exit {rc}); rerun `toolchain run {args.recipe} --out {out}` to resume "
                          f"from it", file=sys.stderr)
                    return rc
            missing = [str(p) for p in s.outputs if not p.exists()]
            if missing:
                from toolchain.errors import ToolchainError

                raise ToolchainError(f"stage {s.name} finished without writing {', '.join(missing)}")
            state["stages"][s.name] = {"key": key, "outputs": s.outputs_fingerprint(), "seconds": round(time.perf_counter() - t0, 2),
                                       "argv": s.argv}
            atomic_write_json(out / STATE, state)
            ran.append(s.name)
        bar.close()
    summary = {"out": str(out), "ran": ran, "skipped": skipped, "seconds": round(time.perf_counter() - t_all, 2),
               "report": str(out / "report.html")}
    print(json.dumps(summary))
    return 0
