# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= conf/movielens-100k.yaml
PYTEST_ARGS ?=

.PHONY: run test format bench-prepare bench-quality bench-train-speed bench-index check-java clean

check-java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "error: Java is not installed. adjoint-spark runs Spark, which needs Java 17:"; \
	  echo "       install it (Debian/Ubuntu: apt-get install openjdk-17-jre-headless) and retry."; \
	  exit 1; }

$(VENV)/.installed: setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { \
	  echo "error: Python 3.11 is required ($(PYTHON) is `$(PYTHON) --version 2>&1`);"; \
	  echo "       run with PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: check-java $(VENV)/.installed
	./spark-submit.sh pipeline --config $(CONFIG)

test: check-java $(VENV)/.test-installed
	$(PY) -m ruff format --check adjoint_spark jobs tests bench
	$(PY) -m ruff check adjoint_spark jobs tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

format: $(VENV)/.test-installed
	$(PY) -m ruff format adjoint_spark jobs tests bench
	$(PY) -m ruff check --fix adjoint_spark jobs tests bench

bench-prepare: check-java $(VENV)/.test-installed
	$(PY) bench/prepare.py

bench-quality: check-java $(VENV)/.test-installed
	$(PY) bench/quality.py

bench-train-speed: check-java $(VENV)/.test-installed
	$(PY) bench/train_speed.py

bench-index: check-java $(VENV)/.test-installed
	$(PY) bench/index.py

clean:
	rm -rf runs build bench/out .pytest_cache
