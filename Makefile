# make demo  — create .venv, install, run the main job on the embedded default (one seed: indicative verdicts)
# make demo-full — the same over 3 seeds plus the PPO ablation of Xu et al. Table 3: verdicts from the spread over seeds
# make test  — same set-up, run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-full test test-all bench setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch first where there is no CUDA: a bare `torch` requirement
	# would pull a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q "torch>=2.4"; \
	else \
	  $(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo

# the ablation first, so that the main report's claims table has its rows
demo-full: $(STAMP)
	$(BIN)/posttrain demo --ablation --seeds 3 output_dir=runs/demo-full
	$(BIN)/posttrain demo --seeds 3 output_dir=runs/demo-full

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs
