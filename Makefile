# Two entry points: `make demo` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is installed first and pinned: on the project's machines this takes a local CPU wheel;
# an unpinned torch would pull a multi-GB CUDA build. Override with `make TORCH_SPEC=torch ...`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint format clean

setup: $(STAMP)

# The install reruns when pyproject.toml (dependencies, extras) changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python >= 3.11 or run make PYTHON=python3.12"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo study on the shipped tiny CLIP (full FT vs LoRA r=8 x 2 learning rates x 3 seeds on
# shapes-objects, two local workers with one torch thread each), its report, and full FT vs
# LoRA side by side, and which tracked signal predicted forgetting best. Completed runs are
# skipped when it is run again.
DEMO := runs/demo
demo: $(STAMP)
	$(BIN)/attndrift study run configs/studies/demo.yaml --store $(DEMO) --workers 2
	$(BIN)/attndrift report $(DEMO) --out $(DEMO)/report
	$(BIN)/attndrift compare $(DEMO)/runs/lr-method=full_ft-lr=0.001-seed=0-* \
		$(DEMO)/runs/lr-method=lora-lr=0.001-seed=0-*
	@echo "which signal predicts forgetting (Spearman rho with final zero-shot retention):"
	@$(BIN)/python -c "import sys; from attndrift.analysis import load_store; \
		from attndrift.analysis.predictors import ranking_lines; \
		print(*ranking_lines(load_store(sys.argv[1])), sep='\n')" $(DEMO)
	@echo "report: $(DEMO)/report/report.html (tables as CSV in $(DEMO)/report/tables/)"

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache
