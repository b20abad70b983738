"""Recipes (`toolchain recipe validate`) and `toolchain run`: stages, skipping, resume, report page."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from toolchain.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "benchmarks" / "recipes").glob("*.json"))


# recipes that run here as they are (the others are templates naming the user's own model file)
RUNNABLE = {"demo", "quantface_w4a4_mp_tflite"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_bundled_recipes_validate(path, capsys):
    from toolchain.recipe import load_recipe

    recipe = load_recipe(path)  # schema, methods, params, bits, regexes, references
    assert recipe.quantize and recipe.exports
    rc = main(["recipe", "validate", str(path)])
    if path.stem in RUNNABLE:
        assert rc == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["valid"] and doc["stages"][0] == "calibrate" and doc["stages"][-1] == "report" and doc["model"]["layers"] > 100
    else:  # a template: the one thing missing is the user's model, named in one error line
        assert rc == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model.path" in err[0] and "does not exist" in err[0]


BASE = {"version": 1, "quantize": [{"name": "q", "method": "minmax", "bits": "w8a8"}],
        "export": [{"name": "e", "from": "q", "target": "onnx"}]}


def _with(**patch):
    doc = json.loads(json.dumps(BASE))
    for path, value in patch.items():
        node = doc
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return doc


@pytest.mark.parametrize("doc, fragment", [
    ({**BASE, "colour": 1}, "Additional properties are not allowed ('colour'"),
    (_with(quantize__0__method="brecq"), "unknown method 'brecq'"),
    (_with(quantize__0__method="quantface", quantize__0__params={"train_steps": "many"}), "params.train_steps"),
    (_with(quantize__0__params={"alpha": 0.5}), "method 'minmax' has no parameter(s) alpha"),
    (_with(quantize__0__bits="w4"), "quantize/0/bits"),
    (_with(quantize__0__rules=[{"match": "conv_in(", "bits": "w8a8"}]), "invalid regex 'conv_in('"),
    (_with(quantize__0__rules=[{"match": "conv_in$"}]), "a rule needs bits, w_bits, a_bits or skip"),
    (_with(export__0__from="nope"), "from 'nope' is neither 'fp' nor a quantize run"),
    ({**BASE, "profile": [{"export": "nope"}]}, "profile[0]: export 'nope' is not an export"),
    ({**BASE, "profile": [{"export": "e"}, {"export": "e", "threads": 1}]}, "profile[1]: export 'e' is profiled twice"),
    (_with(export__0__target="tflite", export__0__dynamic=True), "dynamic shapes are an ONNX export option"),
    ({**BASE, "evaluation": {"seed": 0}}, "evaluation uses the calibration images"),
    ({**BASE, "quantize": BASE["quantize"] * 2}, "used twice"),
])
def test_bad_recipes_are_one_error_line(doc, fragment, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert main(["recipe", "validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err


@pytest.mark.parametrize("patch, fragment", [
    ({"quantize": [{"name": "q", "method": "minmax", "bits": "w8a8", "rules": [{"match": "^nosuchlayer$", "bits": "w4a4"}]}]},
     "recipe quantize 'q': rule '^nosuchlayer$' matches no quantizable layer"),
    ({"evaluation": {"seed": 1, "metrics": ["psnr", "nosuch"]}}, "evaluation.metrics: unknown metric 'nosuch'"),
    ({"quantize": [{"name": "q", "method": "minmax", "bits": "w4a4"}],
      "export": [{"name": "e", "from": "q", "target": "onnx", "qdq_format": "ort"}]}, "fuses 8-bit activations only"),
    ({"model": {"path": "missing.safetensors"}}, "model.path"),
    ({"calibration": {"source": "no_such_folder"}}, "calibration.source"),
])
def test_recipe_problems_found_before_any_stage_runs(patch, fragment, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**BASE, **patch}))
    assert main(["recipe", "validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2  # the run refuses it before writing anything
    assert not (tmp_path / "o").exists()


def test_param_type_error_names_the_run_once(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_with(quantize__0__method="quantface", quantize__0__params={"train_steps": "many"})))
    assert main(["recipe", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("quantize[0] (q)") == 1 and "params.train_steps: expected an integer" in err


def test_unreadable_recipe_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text("{not json")
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- running a tiny recipe ------------------------------------------------------------------------

def _tiny_recipe(folder: Path, runs: int = 3) -> Path:
    model = folder / "tiny.safetensors"
    if not model.exists():
        assert main(["model", "init", "--preset", "tiny", "--out", str(model)]) == 0
    doc = {"version": 1, "name": "tiny", "model": {"path": "tiny.safetensors"},
           "calibration": {"n": 3, "size": 32, "seed": 0},
           "evaluation": {"n": 2, "size": 32, "seed": 1, "metrics": ["psnr", "ssim"], "grid_rows": 2},
           "quantize": [{"name": "w8a8", "method": "minmax", "bits": "w8a8", "rules": [{"match": "conv_in$", "bits": "w8a8"}]}],
           "export": [{"name": "w8a8-onnx", "from": "w8a8", "target": "onnx", "part": "unet"}],
           "profile": [{"export": "w8a8-onnx", "threads": 1, "runs": runs, "warmup": 0}],
           "device": "cpu", "batch_size": 2}
    path = folder / "recipe.json"
    path.write_text(json.dumps(doc))
    return path


def _artifacts(out: Path) -> dict[str, bytes]:
    """What an interrupted-and-resumed run must reproduce byte for byte (timings excluded)."""
    files = [*(out / "quantize" / "w8a8").glob("*.safetensors"), out / "export" / "w8a8-onnx.onnx", out / "calib" / "manifest.json"]
    got = {str(f.relative_to(out)): f.read_bytes() for f in files}
    report = json.loads((out / "eval" / "report.json").read_text())
    got["metrics"] = json.dumps({k: r["vs_hq"] for k, r in report["results"].items()}, sort_keys=True).encode()
    return got


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run_ref")
    recipe = _tiny_recipe(folder)
    assert main(["run", str(recipe), "--out", str(folder / "out")]) == 0
    return recipe, folder / "out"


def test_run_writes_every_stage_and_a_second_run_is_a_no_op(reference_run, capsys):
    recipe, out = reference_run
    state = json.loads((out / "run_state.json").read_text())
    assert list(state["stages"]) == ["calibrate", "eval-set", "quantize:w8a8", "eval", "export:w8a8-onnx", "profile:w8a8-onnx", "report"]
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ran"] == [] and len(summary["skipped"]) == 7
    # the checkpoint's quant config is the recipe's: method, bits and the rule
    cfg = json.loads((out / "quantize" / "w8a8.config.json").read_text())
    assert cfg["method"] == "minmax" and cfg["rules"] == [{"pattern": "conv_in$", "w_bits": 8, "a_bits": 8, "skip": False}]


def test_a_changed_stage_reruns_it_and_what_follows_only(reference_run, tmp_path, capsys):
    recipe, out = reference_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    doc = json.loads(recipe.read_text())
    doc["profile"][0]["runs"] = 2
    changed = tmp_path / "recipe.json"
    changed.write_text(json.dumps(doc))
    shutil.copy(recipe.parent / "tiny.safetensors", tmp_path / "tiny.safetensors")
    capsys.readouterr()
    assert main(["run", str(changed), "--out", str(copy), "--dry-run"]) == 0  # says so first, runs nothing
    plan = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert [p[2].rstrip(":") for p in plan if p[0] == "would"] == ["profile:w8a8-onnx", "report"]
    assert main(["run", str(changed), "--out", str(copy)]) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == ["profile:w8a8-onnx", "report"]


def test_nproc_per_node_runs_the_quantize_stage_data_parallel_outside_the_key(reference_run, tmp_path, capfd):
    recipe, out = reference_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "quantize" / "w8a8")  # the quantize stage must run again, now as 2 gloo processes
    capfd.readouterr()
    assert main(["run", str(recipe), "--out", str(copy), "--nproc-per-node", "2"]) == 0
    stdout = capfd.readouterr().out  # the ranks' own prints included (file descriptor 1): only run's JSON summary
    assert len(stdout.strip().splitlines()) == 1, stdout
    summary = json.loads(stdout)
    assert summary["ran"][0] == "quantize:w8a8"
    meta = json.loads((copy / "quantize" / "w8a8" / "quant_config.json").read_text())
    assert meta["summary"]["processes"] == 2
    # the 1-process checkpoint to float noise (each rank calibrates on all batches, at its own thread count) ...
    from toolchain.io.weights import load_tensors

    one, two = (load_tensors(d / "quantize" / "w8a8" / "model.safetensors") for d in (out, copy))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k].float(), two[k].float(), rtol=1e-4, atol=1e-6), k
    # ... and the process count is not part of the stage's key: a plain rerun finds everything current
    assert main(["run", str(recipe), "--out", str(copy)]) == 0
    assert json.loads(capfd.readouterr().out)["ran"] == []


@pytest.mark.parametrize("stage_verb", ["quantize", "export", "report"])
def test_interrupted_run_resumes_to_the_same_artifacts(stage_verb, reference_run, tmp_path, monkeypatch):
    import toolchain.cli as cli
    import toolchain.eval.html_report as html_report

    recipe, ref_out = reference_run
    shutil.copy(recipe, tmp_path / "recipe.json")
    shutil.copy(recipe.parent / "tiny.safetensors", tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    real_main, real_report = cli.main, html_report.write_run_report

    def interrupting_main(argv=None):
        if argv and argv[0] == stage_verb:
            raise KeyboardInterrupt
        return real_main(argv)

    def interrupting_report(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupting_main)
    monkeypatch.setattr(html_report, "write_run_report", interrupting_report)
    assert real_main(["run", str(tmp_path / "recipe.json"), "--out", str(out)]) == 130
    state = json.loads((out / "run_state.json").read_text())
    assert not any(name.startswith(stage_verb) for name in state["stages"])
    monkeypatch.setattr(cli, "main", real_main)
    monkeypatch.setattr(html_report, "write_run_report", real_report)
    assert real_main(["run", str(tmp_path / "recipe.json"), "--out", str(out)]) == 0
    assert _artifacts(out) == _artifacts(ref_out)


def test_run_refuses_a_foreign_folder(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(BASE))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "thesis.tex").write_text("keep")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "no `toolchain run` wrote" in capsys.readouterr().err
    assert (tmp_path / "o" / "thesis.tex").read_text() == "keep"


def test_report_page_renders_its_images_and_tables_in_headless_chromium(reference_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("needs Chromium (apt-get install chromium; .ci/run installs it)")
    _, out = reference_run
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=10000", "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-loaded="2"' in dom and 'data-images-total="2"' in dom  # the grid and the latency chart
    assert 'id="metrics-table"' in dom and "minmax W8A8" in dom and 'id="recipe-json"' in dom
    report = json.loads((out / "report.json").read_text())
    assert report["exports"][0]["latency_ms"]["median"] > 0
