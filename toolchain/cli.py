"""The ``toolchain`` command: one verb per pipeline stage.

    calibrate → quantize → (allocate) → export → profile,   plus restore / eval / model / methods

Errors the user can fix (bad options, unusable inputs, an ``--out`` that would destroy foreign
files, a read-only or full disk) are printed as one ``error:`` line with exit status 2
(``--verbose`` adds the traceback); an interrupted run (Ctrl-C at any moment, imports included)
prints one line and exits with 130, and can be resumed by running the same command again.

Start-up is kept light: building the parser imports no torch/numpy, so ``--help`` is fast and
the heavy imports happen inside ``main``'s error handling.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import traceback

from toolchain import __version__
from toolchain.errors import ToolchainError

VERBS = ["run", "recipe", "calibrate", "quantize", "allocate", "export", "profile", "restore", "evaluate", "compare", "model", "methods",
         "train_reference"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
INTERRUPTED_LINE = "interrupted: nothing was left half-written; run the same command again to resume"

# OSErrors that describe the user's file system, not a bug: reported as one line.
USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR,
               errno.ENAMETOOLONG, errno.EFBIG, errno.EMFILE, errno.ELOOP}


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become one ``error:`` line (via UsageError) instead of usage + exit."""

    def error(self, message: str):  # noqa: D401  (argparse hook)
        from toolchain.errors import UsageError

        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


class _ExampleFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but keeps the ``example:`` epilog on one line (a shell command to copy)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return indent + text if text.startswith("example: ") else super()._fill_text(text, width, indent)


# One worked example per verb, shown at the end of its --help (tests/test_cli.py checks every parser has one).
EXAMPLES: dict[str, str] = {
    "run": "toolchain run benchmarks/recipes/demo.json --out demo_out",
    "recipe": "toolchain recipe validate benchmarks/recipes/demo.json",
    "recipe validate": "toolchain recipe validate benchmarks/recipes/demo.json",
    "calibrate": "toolchain calibrate --hq faces/ -n 64 --size 128 --seed 0 --out calib/",
    "quantize": "toolchain quantize --method quantface --bits w4a4 --param train_steps=200 --rule 'conv_in$=w8a8' --calib calib/ --out ckpt/",
    "allocate": "toolchain allocate all --checkpoint ckpt/ --calib calib/ --budget-bits 4 --out alloc/",
    "allocate sensitivity": "toolchain allocate sensitivity --checkpoint ckpt/ --calib calib/ --epsilon 0.02 --out alloc/",
    "allocate errors": "toolchain allocate errors --checkpoint ckpt/ --calib calib/ --bits 3,4,5,6 --out alloc/",
    "allocate solve": "toolchain allocate solve --out alloc/ --budget-bits 4 --pin 'conv_in$=8'",
    "allocate all": "toolchain allocate all --checkpoint ckpt/ --calib calib/ --budget-bits 4 --out alloc/",
    "export": "toolchain export --checkpoint ckpt/ --target tflite --calib calib/ --validate --out model.tflite",
    "profile": "toolchain profile model.tflite --threads 4 --runs 20 --out model.profile/",
    "restore": "toolchain restore photos/ --checkpoint ckpt/ --out restored/",
    "eval": "toolchain eval --data eval_set/ --checkpoint ckpt/ --out eval/",
    "compare": "toolchain compare --spec benchmarks/compare_ref.json --calib calib/ --eval eval_set/ --out compare/",
    "model": "toolchain model info toolchain/weights/ref.safetensors",
    "model init": "toolchain model init --preset tiny --out tiny.safetensors",
    "model info": "toolchain model info toolchain/weights/ref.safetensors",
    "model convert": "toolchain model convert ref.safetensors ref_dir/ --format dir",
    "model import": "toolchain model import osdface --sd sd21/ --vre associate_2.ckpt --proj embedding_change_weights.pth "
                    "--lora pytorch_lora_weights.safetensors --out osdface_model/",
    "model import osdface": "toolchain model import osdface --sd sd21/ --vre associate_2.ckpt --proj embedding_change_weights.pth "
                            "--lora pytorch_lora_weights.safetensors --out osdface_model/",
    "model import osediff": "toolchain model import osediff --sd sd21/ --weights osediff.pkl --prompt-embedding prompt.safetensors "
                            "--out osediff_model/",
    "model stats": "toolchain model stats --calib calib/ --out stats/",
    "methods": "toolchain methods --json",
    "train-reference": "toolchain train-reference --faces faces/ --out ref.safetensors --workdir work/ --val-faces 64 "
                       "--eval-every 250 --patience 4",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="toolchain",
        description="QuantFace Toolchain: low-bit post-training quantization of one-step diffusion restoration models "
                    "(OSDFace-style face restoration at the input size, OSEDiff x4 super-resolution), with ONNX and TFLite "
                    "export and on-device profiling. `restore` and `calibrate` follow the model: same-size face restoration, "
                    "or x4 upscaling for an OSEDiff model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--verbose", action="store_true", help="print the full traceback with an error (also accepted after COMMAND)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for verb in VERBS:
        importlib.import_module(f"toolchain.commands.{verb}").register(sub)
    parser.epilog = f"example: {EXAMPLES['run']}   (then open demo_out/report.html)"
    parser.formatter_class = _ExampleFormatter
    for p in _all_subparsers(parser):
        example = EXAMPLES.get(p.prog.removeprefix("toolchain "))
        if example and not p.epilog:
            p.epilog = f"example: {example}"
            p.formatter_class = _ExampleFormatter
        if not any("--verbose" in a.option_strings for a in p._actions):
            p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="print the full traceback with an error")
    return parser


def _all_subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):
                yield p
                yield from _all_subparsers(p)


class _InterruptWatch:
    """SIGINT handler that remembers the interrupt, so one swallowed by a library (an ``except``
    in a callback, a garbage-collection hook) still ends the run with 130."""

    def __init__(self) -> None:
        self.fired = False
        self.previous = None

    def __enter__(self) -> "_InterruptWatch":
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (embedded use): keep Python's default handler
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.fired and _rank_role() != "single":
            return  # a rank: the launcher forwards the Ctrl-C it got as well; one KeyboardInterrupt is enough
        self.fired = True
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _rank_role() -> str:
    """"single" (no torchrun), "relaunched" (a rank started by ``--nproc-per-node``: the launcher prints the
    one line), "main" (rank 0 under a plain torchrun: prints) or "quiet" (another rank under plain torchrun).

    Read from the environment only (no torch import), so it also works before the heavy imports."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return "single"
    if world <= 1:
        return "single"
    if os.environ.get("TOOLCHAIN_RANK_REPORTS"):  # toolchain.distributed.REPORT_DIR_ENV
        return "relaunched"
    return "main" if rank == 0 else "quiet"


def _report(message: str, verbose: bool) -> None:
    role = _rank_role()
    if verbose and role in ("single", "main") or (verbose and role == "relaunched" and os.environ.get("RANK") == "0"):
        traceback.print_exc(file=sys.stderr)
    if role == "relaunched":  # leave the message to the launcher, which prints one line for all ranks
        folder = os.environ["TOOLCHAIN_RANK_REPORTS"]
        try:
            tmp = os.path.join(folder, f".rank{os.environ.get('RANK', '0')}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(message)
            os.replace(tmp, os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.txt"))
            return
        except OSError:
            pass  # the launcher's folder is gone: print it here rather than lose it
    elif role == "quiet":
        return
    print(f"error: {message}", file=sys.stderr)


def _leave_crash_to_launcher() -> bool:
    """In a rank started by ``--nproc-per-node``: write the traceback of a bug for the launcher, which prints
    rank 0's (else the lowest rank's) once; True if written. Elsewhere (or if it cannot be written) False."""
    if _rank_role() != "relaunched":
        return False
    rank = os.environ.get("RANK", "0")
    folder = os.environ["TOOLCHAIN_RANK_REPORTS"]
    try:
        tmp = os.path.join(folder, f".crash{rank}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        os.replace(tmp, os.path.join(folder, f"crash{rank}.txt"))
        return True
    except OSError:
        return False


def _print_interrupted() -> None:
    if _rank_role() in ("single", "main"):  # a rank started by --nproc-per-node: the launcher prints it
        print(INTERRUPTED_LINE, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 user error, 130 interrupted).

    Genuine bugs still raise (a traceback, exit 1): only errors the user can act on are shortened."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    with _InterruptWatch() as watch:
        try:
            args = build_parser().parse_args(argv)
            args.argv = argv  # the command line as given (``--nproc-per-node`` re-launches it through torchrun)
            verbose = verbose or bool(getattr(args, "verbose", False))
            status = int(args.func(args) or 0)
        except KeyboardInterrupt:
            _print_interrupted()
            return EXIT_INTERRUPTED
        except ToolchainError as exc:
            if watch.fired:  # the interrupt was swallowed and the run went on to fail: it was still interrupted
                return _interrupted(verbose)
            _report(str(exc), verbose)
            return EXIT_USER_ERROR
        except BrokenPipeError:  # `toolchain … | head`: the reader left; stop quietly, like a SIGPIPE'd tool
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
            return EXIT_BROKEN_PIPE
        except OSError as exc:
            if watch.fired:
                return _interrupted(verbose)
            if exc.errno not in USER_ERRNOS:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            _report(f"{exc.strerror or exc}{where} (nothing was left half-written)", verbose)
            return EXIT_USER_ERROR
        except Exception:
            if watch.fired:  # a library turned our KeyboardInterrupt into its own error
                return _interrupted(verbose)
            if _leave_crash_to_launcher():
                return 1
            raise
    if watch.fired:  # a Ctrl-C that some library caught and ignored
        return _interrupted(verbose)
    return status


def _interrupted(verbose: bool) -> int:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    _print_interrupted()
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
