# turnout: the two commands a user needs are `make demo` and `make test`.
# Both create .venv with the project and what the tests need; only python3 >= 3.11 and pip
# have to be on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit bench proto clean

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

# Regenerate the config channel's protobuf and gRPC modules (committed; a test fails when stale).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. turnout/v1/config.proto

# Micro-benchmarks of the routing decision (not part of `make test`: timing is not a test).
bench: $(STAMP)
	$(BIN)/pytest bench/micro -q --benchmark-only --benchmark-sort=name \
		--benchmark-columns=min,median,mean,ops,rounds

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
