# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates .venv, installs llmlab (torch pinned to 2.13.0) and fetches the default model on its own.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
MODEL := checkpoints/smollm2-135m-instruct
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint model bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/llmlab download smollm2-135m-instruct --out $(MODEL)

model: $(MODEL)/config.json

demo: $(STAMP) $(MODEL)/config.json
	$(BIN)/python examples/demo.py --checkpoint $(MODEL)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP) $(MODEL)/config.json
	$(BIN)/python benchmarks/bench_decode.py --ckpt $(MODEL)

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .ruff_cache
