# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates .venv, installs llmlab (torch pinned to 2.13.0) and fetches the default model on its own.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
MODEL := checkpoints/smollm2-135m-instruct
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint model bench clean browser sandbox

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# model.gguf: the import keeps the GGUF it was made from, which generate, chat, evaluate and serve run on by default
# (the fast path); a folder imported before that kept none, and is imported again
$(MODEL)/model.gguf: | $(STAMP)
	$(BIN)/llmlab download smollm2-135m-instruct --out $(MODEL)

model: $(MODEL)/model.gguf

demo: $(STAMP) $(MODEL)/model.gguf
	$(BIN)/python examples/demo.py --checkpoint $(MODEL)

# The chat-page test (tests/test_serve_page.py) drives Debian's chromium through playwright, never a downloaded
# browser; installed here when we are root, otherwise that test skips and says why.
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; } \
	      || echo "note: could not install chromium; tests/test_serve_page.py will skip"; \
	  else echo "note: chromium is not installed (needs root and apt); tests/test_serve_page.py will skip"; fi; fi

# Code tasks run generated programs under Debian's bubblewrap (src/llmlab/eval/sandbox.py); installed here when we
# are root. Without it the sandbox tests skip and say why, and code tasks stop with an error naming bubblewrap.
sandbox:
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; } \
	      || echo "note: could not install bubblewrap; code tasks will refuse to run"; \
	  else echo "note: bubblewrap is not installed (needs root and apt); code tasks will refuse to run"; fi; fi

test: $(STAMP) browser sandbox
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) browser sandbox
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP) $(MODEL)/model.gguf
	$(BIN)/python benchmarks/bench_decode.py --ckpt $(MODEL)

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .ruff_cache
