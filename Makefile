# Fresh machine: `make demo` or `make test`. Both run `setup` first; it is idempotent.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
FMNIST  := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
APT     := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

.PHONY: setup demo test test-slow lint clean chromium

setup: .venv/.installed $(FMNIST)

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	# torch/torchvision pinned for dev and CI: these come from the local wheel store.
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev]"
	touch $@

$(FMNIST):
	@if [ "$$(id -u)" = "0" ]; then \
		($(APT) dataset-fashion-mnist || (apt-get update -qq && $(APT) dataset-fashion-mnist)); \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (or pass --data-root DIR with the IDX .gz files)"; exit 1; \
	fi

# Headless Chromium checks the HTML report in a test (the test is skipped, saying why, when it is absent).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = "0" ]; then ($(APT) chromium || (apt-get update -qq && $(APT) chromium)); \
		else echo "note: install chromium ('sudo apt-get install chromium') to run the HTML report test"; fi; \
	fi

demo: setup
	.venv/bin/layercrit demo --out runs/demo

# The fast tier (143-156 s on this 2-core VM, 167 s with nothing compiled yet): one test process per core, whole
# files to one process so that a file's shared fixtures are built once; `make test-slow` runs the rest (kills,
# Ray, Chromium, training, whole-zoo runs, every architecture and zoo member). CI (.ci/run) runs both.
# Bytecode is cached (__pycache__, ignored by git) even where the shell sets PYTHONDONTWRITEBYTECODE: each test
# process and each worker it starts would otherwise recompile the package and re-rewrite the tests' asserts
# (about 5 s per process on 2 cores).
test: setup chromium
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -m "not slow" -n auto --dist loadfile

test-slow: setup chromium
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -m slow

lint: setup
	.venv/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
