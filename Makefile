# turnout: the two commands a user needs are `make demo` and `make test`.
# Both create .venv with the project and what the tests need; only python3 >= 3.11 and pip
# have to be on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit bench proto compile clean-compiled clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/turnout demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# The per-request path, compiled with mypyc (C extensions next to the sources; Python
# imports them before the .py files). About twice as fast on the Python side of a request;
# `make clean-compiled` goes back to pure Python. A test fails when a compiled module is older than
# its source, so a stale build never hides an edit.
HOT_MODULES := dataplane/http1/scan.py dataplane/http1/semantics.py dataplane/http1/framing.py \
	dataplane/http1/codec.py dataplane/proxy.py dataplane/upstream.py dataplane/mirror.py dataplane/metrics.py \
	filters/baggage.py filters/keys.py filters/head.py filters/matchers.py filters/snapshot.py

compile: $(STAMP)
	$(BIN)/mypyc $(HOT_MODULES)

# Regenerate the config channel's protobuf and gRPC modules (committed; a test fails when stale).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. turnout/v1/config.proto

# Micro-benchmarks of the routing decision (not part of `make test`: timing is not a test).
bench: $(STAMP)
	$(BIN)/pytest bench/micro -q --benchmark-only --benchmark-sort=name \
		--benchmark-columns=min,median,mean,ops,rounds

clean-compiled:
	rm -rf build
	find . -name '*.so' -not -path './.venv/*' -delete

clean: clean-compiled
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
