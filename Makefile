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

# The main job on the bundled default model and bundled public-domain faces (a few minutes on 2 cores):
# calibration set -> MinMax W8A8 and W4A4 checkpoints -> evaluation report + before/after grid.
demo: $(STAMP)
	$(TC) calibrate -n 12 --size 128 --seed 0 --out $(OUT)/calib
	$(TC) calibrate -n 6 --size 128 --seed 1 --out $(OUT)/eval
	$(TC) quantize --method minmax --bits w8a8 --calib $(OUT)/calib --out $(OUT)/minmax-w8a8 --device cpu
	$(TC) quantize --method minmax --bits w4a4 --calib $(OUT)/calib --out $(OUT)/minmax-w4a4 --device cpu
	$(TC) eval --data $(OUT)/eval --checkpoint $(OUT)/minmax-w8a8 --checkpoint $(OUT)/minmax-w4a4 --out $(OUT) --device cpu
	@echo "demo finished: $(OUT)/report.json and $(OUT)/grid.png"

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(OUT) .pytest_cache
