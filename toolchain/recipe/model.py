"""The recipe file: JSON schema check, then typed objects with everything resolved and validated.

A recipe is the one source of truth of ``toolchain run`` (as ai-edge-quantizer's recipe is for its
quantizer): the per-run ``QuantConfig`` is *derived* from it (``QuantRun.quant_config``), the
mixed-precision allocation comes back into it as per-layer rules, and the export/profile options are
read from it. Everything a stage would reject is rejected when the recipe is read: the schema
(``toolchain/schemas/recipe.schema.json``), method names and each method's typed parameters (through
the method registry), bits, regexes, and the references between sections.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "recipe.schema.json"
_EXPORT_OPTIONS = ("dynamic", "qdq_format", "precision", "float_weights", "weight_container")


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@dataclass(frozen=True)
class ImageSet:
    """An HQ/LQ set the run builds with ``toolchain calibrate``; source None = the bundled faces."""

    source: Path | None
    n: int
    size: int
    seed: int


@dataclass(frozen=True)
class Allocation:
    metric: str = "st_lpips"
    epsilon: float = 0.02
    candidate_bits: tuple[int, ...] = (3, 4, 5, 6)
    budget_bits: float = 4.0
    cost: str = "act_bits"
    images: int = 8
    pins: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class QuantRun:
    name: str
    method: str
    bits: str
    params: dict[str, Any]
    include: tuple[str, ...] | None
    exclude: tuple[str, ...]
    rules: tuple[dict[str, Any], ...]  # {"pattern", "w_bits", "a_bits", "skip"} in file order (last match wins)
    calib_limit: int | None
    allocate: Allocation | None

    def quant_config(self, extra_rules: list[dict[str, Any]] | None = None):
        """The ``QuantConfig`` this run quantizes with: method, default bits, scope, rules (then ``extra_rules``,
        e.g. an allocation's per-layer bits, which win over the recipe's), typed params."""
        from toolchain.quant.config import LayerRule, QuantConfig

        cfg = QuantConfig.for_bits(self.method, self.bits)
        if self.include is not None:
            cfg.include = list(self.include)
        cfg.exclude += list(self.exclude)
        cfg.rules = [LayerRule(**r) for r in (*self.rules, *(extra_rules or []))]
        cfg.params = dict(self.params)
        return cfg


@dataclass(frozen=True)
class ExportTarget:
    name: str
    source: str  # a QuantRun name or "fp"
    target: str
    part: str = "full"
    validate: bool = False
    images: int = 4
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.target}"


@dataclass(frozen=True)
class ProfileTarget:
    export: str
    threads: int = 4
    runs: int = 20
    warmup: int = 3
    xnnpack: bool = True
    adb: dict[str, Any] | None = None


@dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe. ``raw`` is the file's JSON as read (stored beside the run's artifacts)."""

    raw: dict[str, Any]
    base: Path
    name: str
    model_path: Path | None
    preset: str | None
    calibration: ImageSet
    evaluation: ImageSet | None
    metrics: tuple[str, ...]
    grid_rows: int
    quantize: tuple[QuantRun, ...]
    exports: tuple[ExportTarget, ...]
    profiles: tuple[ProfileTarget, ...]
    device: str
    seed: int
    batch_size: int

    def run(self, name: str) -> QuantRun:
        return next(r for r in self.quantize if r.name == name)

    def export(self, name: str) -> ExportTarget:
        return next(e for e in self.exports if e.name == name)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Raises ConfigError with one line naming the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid JSON: {exc}") from None
    return parse_recipe(data, path.resolve().parent, str(path))


def _bits(text: str) -> tuple[int, int]:
    from toolchain.quant.config import parse_bits

    return parse_bits(text)


def _regex(pattern: str, where: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where}: invalid regex '{pattern}': {exc}") from None
    return pattern


def _path(text: str | None, base: Path) -> Path | None:
    if text is None:
        return None
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def parse_recipe(data: Any, base: Path, where: str = "recipe") -> Recipe:
    """Validate ``data`` (the recipe's JSON) against the schema and the toolchain, and type it.

    base: folder that relative paths are relative to. Raises ConfigError naming the first problem."""
    import jsonschema

    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ConfigError(f"{where} is invalid at {at}: {exc.message}") from None
    from toolchain.quant.registry import coerce_params, method_class

    runs: list[QuantRun] = []
    for i, r in enumerate(data["quantize"]):
        at = f"{where}: quantize[{i}] ({r['name']})"
        cls = method_class(r["method"])  # unknown method → ConfigError listing the registered ones
        params = r.get("params", {})
        labels = {k: f"params.{k}" for k in params}
        try:
            typed = coerce_params(cls, params, labels, {})
            cls(typed)  # the method's own checks (Params.__post_init__, named recipes)
        except ConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{at}: params: {exc}") from None
        _bits(r["bits"])
        rules = []
        for j, rule in enumerate(r.get("rules", [])):
            rat = f"{at}: rules[{j}]"
            w, a = _bits(rule["bits"]) if "bits" in rule else (None, None)
            if "bits" in rule and ("w_bits" in rule or "a_bits" in rule):
                raise ConfigError(f"{rat}: give bits or w_bits/a_bits, not both")
            w, a = rule.get("w_bits", w), rule.get("a_bits", a)
            if w is None and a is None and not rule.get("skip", False):
                raise ConfigError(f"{rat}: a rule needs bits, w_bits, a_bits or skip")
            rules.append({"pattern": _regex(rule["match"], rat), "w_bits": w, "a_bits": a, "skip": bool(rule.get("skip", False))})
        for j, rx in enumerate(r.get("include", []) + r.get("exclude", [])):
            _regex(rx, f"{at}: include/exclude[{j}]")
        alloc = None
        if "allocate" in r:
            al = r["allocate"]
            pins = tuple((_regex(p["match"], f"{at}: allocate.pins"), int(p["a_bits"])) for p in al.get("pins", []))
            alloc = Allocation(metric=al.get("metric", "st_lpips"), epsilon=float(al.get("epsilon", 0.02)),
                               candidate_bits=tuple(al.get("candidate_bits", (3, 4, 5, 6))), budget_bits=float(al.get("budget_bits", 4.0)),
                               cost=al.get("cost", "act_bits"), images=int(al.get("images", 8)), pins=pins)
        runs.append(QuantRun(r["name"], r["method"], r["bits"].lower(), typed, tuple(r["include"]) if "include" in r else None,
                             tuple(r.get("exclude", [])), tuple(rules), r.get("calib_limit"), alloc))
    names = [r.name for r in runs]
    if dup := sorted({n for n in names if names.count(n) > 1} | ({"fp"} & set(names))):
        raise ConfigError(f"{where}: quantize run name(s) {', '.join(dup)} used twice (or 'fp', which means the float model)")

    from toolchain.topology import TOPOLOGIES

    parts = sorted({p for t in TOPOLOGIES.values() for p in t.export_parts})  # (the model's own kind is checked at export)
    exports: list[ExportTarget] = []
    for i, e in enumerate(data.get("export", [])):
        at = f"{where}: export[{i}] ({e['name']})"
        if e["from"] != "fp" and e["from"] not in names:
            raise ConfigError(f"{at}: from '{e['from']}' is neither 'fp' nor a quantize run ({', '.join(names)})")
        part = e.get("part", "full")
        if part not in parts:
            raise ConfigError(f"{at}: part '{part}' is not one of {', '.join(parts)}")
        options = {k: e[k] for k in _EXPORT_OPTIONS if k in e}
        if e["target"] == "tflite" and options.get("dynamic"):
            raise ConfigError(f"{at}: dynamic shapes are an ONNX export option (TFLite exports have fixed sizes)")
        if e["target"] == "onnx" and options.get("precision") == "fp16":
            raise ConfigError(f"{at}: precision fp16 is the TFLite GPU target; for ONNX use float_weights fp16")
        exports.append(ExportTarget(e["name"], e["from"], e["target"], part, bool(e.get("validate", False)), int(e.get("images", 4)), options))
    enames = [e.name for e in exports]
    if dup := sorted({n for n in enames if enames.count(n) > 1}):
        raise ConfigError(f"{where}: export name(s) {', '.join(dup)} used twice")
    profiles = []
    for i, p in enumerate(data.get("profile", [])):
        if p["export"] not in enames:
            raise ConfigError(f"{where}: profile[{i}]: export '{p['export']}' is not an export of this recipe ({', '.join(enames) or 'none'})")
        if any(q.export == p["export"] for q in profiles):  # (one profile folder and stage per export)
            raise ConfigError(f"{where}: profile[{i}]: export '{p['export']}' is profiled twice; give each export one profile entry")
        profiles.append(ProfileTarget(p["export"], int(p.get("threads", 4)), int(p.get("runs", 20)), int(p.get("warmup", 3)),
                                      bool(p.get("xnnpack", True)), p.get("adb")))
    model = data.get("model", {})
    cal = data.get("calibration", {})
    ev = data.get("evaluation")
    calibration = ImageSet(_path(cal.get("source"), base), int(cal.get("n", 16)), int(cal.get("size", 128)), int(cal.get("seed", 0)))
    evaluation = None if ev is None else ImageSet(_path(ev.get("source"), base), int(ev.get("n", 8)), int(ev.get("size", calibration.size)),
                                                 int(ev.get("seed", calibration.seed + 1)))
    if evaluation is not None and evaluation.source == calibration.source and evaluation.seed == calibration.seed:
        raise ConfigError(f"{where}: evaluation uses the calibration images (same source and seed); give it another seed or source")
    return Recipe(raw=data, base=base, name=data.get("name", "recipe"), model_path=_path(model.get("path"), base), preset=model.get("preset"),
                  calibration=calibration, evaluation=evaluation,
                  metrics=tuple((ev or {}).get("metrics", ("psnr", "ssim", "st_lpips"))), grid_rows=int((ev or {}).get("grid_rows", 4)),
                  quantize=tuple(runs), exports=tuple(exports), profiles=tuple(profiles), device=data.get("device", "auto"),
                  seed=int(data.get("seed", 0)), batch_size=int(data.get("batch_size", 4)))


def check_against_machine(recipe: Recipe) -> dict[str, Any]:
    """The checks that need the files and this machine, run before any stage: the model and image sources
    exist, the device is here, every metric is known, every quantize run's include/exclude/rule matches a
    layer of the model (read from its config, built on the meta device: no weights are loaded), and an
    ORT-fusable ONNX export (``qdq_format`` ort/ort-s8) comes from a run with 8-bit activations somewhere.

    Returns {"model": path, "layers": count}. Raises ConfigError / InputError naming the recipe field."""
    import torch

    from toolchain.defaults import device_from_arg, resolve_model_path
    from toolchain.errors import InputError
    from toolchain.eval.metrics import PAIRED_METRICS, SET_METRICS
    from toolchain.models.osdface import build_model
    from toolchain.models.storage import model_config
    from toolchain.quant.config import quantizable_layers

    model_path = resolve_model_path(recipe.model_path)
    if not model_path.exists():
        raise InputError(f"recipe model.path: {model_path} does not exist (give a float model file or folder)")
    for label, s in (("calibration", recipe.calibration), ("evaluation", recipe.evaluation)):
        if s is not None and s.source is not None and not s.source.exists():
            raise InputError(f"recipe {label}.source: {s.source} does not exist (a folder of HQ images, or null for the bundled faces)")
    device_from_arg(recipe.device)  # ConfigError for a device this machine lacks
    if recipe.evaluation is not None:
        if bad := [m for m in recipe.metrics if m not in PAIRED_METRICS + SET_METRICS]:
            raise ConfigError(f"recipe evaluation.metrics: unknown metric '{bad[0]}' (known: {', '.join(PAIRED_METRICS + SET_METRICS)})")
    cfg = model_config(model_path, recipe.preset)
    with torch.device("meta"):
        model = build_model(cfg, seed=None)
    names = [n for n, _ in quantizable_layers(model)]
    for run in recipe.quantize:
        try:
            run.quant_config().check_matches(names)
        except ConfigError as exc:
            raise ConfigError(f"recipe quantize '{run.name}': {str(exc).replace('; nothing was written', '')}") from None
    for e in recipe.exports:
        if e.options.get("qdq_format") in ("ort", "ort-s8") and e.source != "fp":
            qc = recipe.run(e.source).quant_config()
            a_bits = {spec[1].bits for n in names if (spec := qc.layer_specs(n)) is not None}
            if a_bits and 8 not in a_bits:
                raise ConfigError(f"recipe export '{e.name}': qdq_format {e.options['qdq_format']} fuses 8-bit activations only, and run "
                                  f"'{e.source}' has {'/'.join(f'A{b}' for b in sorted(a_bits))}; use qdq_format exact (or give "
                                  "layers 8-bit activations with a rule)")
    return {"model": str(model_path), "layers": len(names)}
