# Resultity developer commands. `make run` and `make test` work on a fresh
# machine with Python 3.11 and pip: both install into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PROTO_FILES := $(shell find proto -name '*.proto')

.PHONY: install generate check-generated lint test test-integration test-browser test-node fuzz run bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# Reinstall when the dependency list changes.
# xds-protos (dev only: Envoy's API types) bundles an old copy of OpenTelemetry's
# protos at opentelemetry-proto's paths; whichever pip installs last wins, so the
# real package is written again (the OTLP exporter needs its current messages).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[all,dev]'
	$(BIN)/pip install --no-deps --force-reinstall \
		"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $@

install: $(VENV)/.installed

generate: install
	rm -rf generated && mkdir -p generated
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto -Ithird_party/proto \
		--python_out=generated --mypy_out=generated \
		--grpc_python_out=generated --mypy_grpc_out=generated \
		$(PROTO_FILES)
	find generated/resultity -type d -exec touch {}/__init__.py \;
	touch generated/resultity/py.typed
	# The descriptor set Envoy's gRPC-JSON transcoder reads (gateway/envoy/).
	$(BIN)/python -m grpc_tools.protoc -Iproto -Ithird_party/proto --include_imports \
		--descriptor_set_out=generated/resultity.binpb $(sort $(PROTO_FILES))

check-generated: generate
	@git diff --exit-code --stat -- generated \
		&& test -z "$$(git status --porcelain -- generated)" \
		|| (echo "generated/ is stale: run 'make generate' and commit" && exit 1)

lint: install
	$(BIN)/ruff check core server agent gateway tests bench
	$(BIN)/ruff format --check core server agent gateway tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/buf lint

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

# Tests marked `integration` (tests/integration/ and the Redis runs of the contract
# tests) against the real services named by RESULTITY_DATABASE_URL, RESULTITY_REDIS_URL
# and RESULTITY_AMQP_URL (loopback defaults). A service that does not answer fails the
# run; so does collecting no test at all (pytest exits 5).
test-integration: install
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

# The web console in a real headless Chromium (Debian's `chromium`, driven by
# Playwright; tests/browser, marked browser). Screenshots land in
# $(SCREENSHOTS), which CI keeps.
SCREENSHOTS ?= .ci/artifacts/console
test-browser: install
	RESULTITY_SCREENSHOTS=$(SCREENSHOTS) $(BIN)/pytest -m browser tests/browser $(PYTEST_ARGS)

# A partner's Node.js client built from proto/ alone (examples/node; needs node and npm,
# installs its packages from npm into examples/node/node_modules on first run).
test-node: install
	$(BIN)/pytest -m node tests/node $(PYTEST_ARGS)

# Generated hostile requests against the gateway's OpenAPI document and the gRPC
# APIs (tests/fuzz, marked fuzz so that `make test` leaves them out).
fuzz: install
	$(BIN)/pytest -m fuzz tests/fuzz $(PYTEST_ARGS)

run: install
	$(BIN)/resultity up --data-dir ./.resultity --http-port 8080 $(ARGS)

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .resultity .pytest_cache .mypy_cache .ruff_cache
