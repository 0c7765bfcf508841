# Fresh machine: `make demo` or `make test`. Both run `setup` first; it is idempotent.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
FMNIST  := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: setup demo test lint clean

setup: .venv/.installed $(FMNIST)

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch/torchvision pinned for dev and CI: these come from the local wheel store.
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev]"
	touch $@

$(FMNIST):
	@if [ "$$(id -u)" = "0" ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (or pass --data-root DIR with the IDX .gz files)"; exit 1; \
	fi

demo: setup
	.venv/bin/layercrit demo --out runs/demo

test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
