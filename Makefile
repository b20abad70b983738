# QuantFace Toolchain — `make demo` and `make test` work on a fresh clone (they create .venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TC     := $(VENV)/bin/toolchain
STAMP  := $(VENV)/.installed-stamp
OUT    ?= demo_out

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job, as one recipe (benchmarks/recipes/demo.json) on the bundled reference model and bundled public-domain
# faces: FP, MinMax W4A4 and QuantFace W4A4 side by side, the QuantFace checkpoint exported to TFLite (validated)
# and profiled on this host → demo_out/report.html (≈ 5 min on 2 cores; a second `make demo` is a no-op).
demo: $(STAMP)
	$(TC) run benchmarks/recipes/demo.json --out $(OUT)
	@echo "demo finished: $(OUT)/report.html (also report.json, eval/grid.png, export/, profile/)"

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(OUT) .pytest_cache
