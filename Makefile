# lr-sweep: the README's two commands are `make sweep` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# Local, quiet Prefect; the temporary server needs more than 20 s to start on a 2-core machine.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
# Idle OpenMP threads sleep instead of spinning, so processes sharing cores do not slow each other.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install data sweep test test-slow clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST: Debian's package when apt is at hand (no internet needed), else torchvision's
# download at the first run.
data: install
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	$(BIN)/lr-sweep data

sweep: data
	$(BIN)/lr-sweep run

test: install
	$(BIN)/pytest

test-slow: install
	$(BIN)/pytest -m slow || [ $$? -eq 5 ]  # 5: no slow test selected

clean:
	rm -rf runs registry .prefect .pytest_cache
