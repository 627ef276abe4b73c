# estkit: `make run` serves EST on the embedded default (SQLite, file keys);
# `make test` installs everything the suite needs and runs it with the gates.

PYTHON    ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
DATA_DIR  ?= var/estkit
# PORT / CRL_PORT: empty keeps what the config says (8443 and 8444 when it is created);
# set, they are written to DATA_DIR's config on every run (`server init --port`).
PORT      ?=
CRL_PORT  ?=
PORT_ARGS := $(if $(PORT),--port $(PORT)) $(if $(CRL_PORT),--crl-port $(CRL_PORT))
# Debian packages the tests use as independent peers and tools (postgresql: the tests
# start throwaway clusters of their own, tests/pgcluster.py; its system service is not used;
# softhsm2: PKCS#11 tokens per test, tests/softhsm.py; opensc: pkcs11-tool as an independent peer;
# chromium: the portal's browser tests drive Debian's build through Playwright, which downloads none).
TEST_DEBS := postgresql softhsm2 opensc strongswan-pki libstrongswan-standard-plugins libstrongswan-extra-plugins curl openssl mosquitto default-jdk-headless libbcprov-java libbcpkix-java libbcutil-java chromium

.PHONY: run test lint typecheck deps-test demo demo-fleet bench clean

# Debian/Ubuntu's system Python needs python3-venv for `-m venv` (installed here as root).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); scripts/install-test-debs.sh python3-venv \
		&& $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-server: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[server]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[server,test]"
	touch $@ $(VENV)/.installed-server

run: $(VENV)/.installed-server
	$(BIN)/estkit server init --data-dir $(DATA_DIR) $(PORT_ARGS)
	$(BIN)/estkit server info --data-dir $(DATA_DIR)
	@echo "Portal: $$($(BIN)/estkit server info --data-dir $(DATA_DIR) | sed -n 's|^EST URL: *\(https://[^/]*\)/.*|\1/ui/|p') (sign in with an API token: $(BIN)/estkit token create --data-dir $(DATA_DIR) --name ops --scope admin)"
	$(BIN)/estkit server run --data-dir $(DATA_DIR)

# A device at the "factory", the agent renewing short-lived certificates, telemetry
# reaching the IoT Hub stand-in (Mosquitto), then a decommission: a readable timeline.
demo: $(VENV)/.installed-test
	@scripts/install-test-debs.sh mosquitto
	$(BIN)/python scripts/demo.py

# A fleet in two regions: a throwaway PostgreSQL, a node in westeurope and one in eastus
# on it, an agent renewing through each, then a revocation made on one node that the
# other refuses at once and lists in its CRL within 2 s: a timeline of about a minute.
demo-fleet: $(VENV)/.installed-test
	@scripts/install-test-debs.sh postgresql
	$(BIN)/python scripts/demo_fleet.py

# Enrollment benchmark: a server, a multi-process load generator, a table, and
# bench/results/<time>.json (about 6 minutes; BENCH_ARGS="--scale 0" skips the 1M-row run).
# The agent runs from bench/.device-venv: estkit with its device dependencies only.
DEVICE_VENV := bench/.device-venv

$(DEVICE_VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install --quiet -e .
	touch $@

bench: $(VENV)/.installed-test $(DEVICE_VENV)/.installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

deps-test:
	@scripts/install-test-debs.sh $(TEST_DEBS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy src bench

test: deps-test lint typecheck
	$(BIN)/pytest -n 2 -W error -p no:cacheprovider

clean:
	rm -rf $(VENV) $(DEVICE_VENV) build *.egg-info src/*.egg-info
