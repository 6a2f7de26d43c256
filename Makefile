# turnout: the two commands a user needs are `make demo` and `make test`.
# Both create .venv with the project and what the tests need; only python3 >= 3.11, pip and
# apt have to be on the machine (tools/system-packages.sh installs Debian's python3-venv, and
# for the tests curl, openssl, iproute2 and kubectl, when they are missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-compiled system-packages lint typecheck unit fuzz bench proto compile clean-compiled clean

$(STAMP): pyproject.toml
	PYTHON=$(PYTHON) sh tools/system-packages.sh venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/turnout demo

test: system-packages lint typecheck unit

system-packages:
	sh tools/system-packages.sh test

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# Coverage-guided fuzzing (atheris) of every target in fuzz/targets/, FUZZ_SECONDS each;
# what it finds is saved under fuzz/.work/ (see fuzz/README.md). `make test` replays every
# target's seeds and saved corpus (tests/unit/test_fuzz_smoke.py).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -m fuzz.run --seconds $(FUZZ_SECONDS)

# The per-request path (setup.py's HOT_MODULES), compiled with mypyc: C extensions next to
# the sources, which Python imports before the .py files. About half the CPU per request on
# the Python side (bench/http1/harness); `make clean-compiled` goes back to pure Python. A
# test-session guard refuses a compiled module older than its source.
compile: $(STAMP)
	TURNOUT_MYPYC=1 $(BIN)/python setup.py -q build_ext --inplace --force

# The same suite against the compiled build (leaves the build in place: make clean-compiled).
test-compiled: system-packages compile
	$(BIN)/pytest

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
