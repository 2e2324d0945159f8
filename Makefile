# Every target sets up .venv itself, so each works on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A pinned torch takes the local CPU build on the project's machines; an unpinned one would pull CUDA wheels.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python run_finetune.py --recipe recipes/demo.yaml --resume
	@echo "Demo outputs in runs/demo/: report.md, metrics.json, submission.csv, training_curves.png, model/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check scrolls_ssm tests benchmarks run_finetune.py

bench: $(STAMP)
	$(BIN)/python benchmarks/encoder_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info
