# The two commands of the README: `make run` (the whole pipeline, live) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
KAFKA_JAR := .cache/kafka/libs/kafka_2.13-4.4.0.jar
S3PROXY_JAR := .cache/s3/s3proxy.jar

.PHONY: run test quick lint format fuzz chaos soak bench clean system-deps install jars

run: install jars
	$(BIN)/hifi up

test: install jars
	dev/test.sh -q -n 2 --dist loadgroup

# The inner loop: everything but the multi-process suites (make test runs those too).
quick: install jars
	dev/test.sh -q -n 2 --dist loadgroup -m "not slow and not chaos"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

system-deps:
	dev/system-deps.sh

install: system-deps $(VENV)/.installed

$(VENV)/.installed: pyproject.toml devtools/pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]" -e ./devtools
	touch $@

jars: $(KAFKA_JAR) $(S3PROXY_JAR)

# s3proxy: the archive's S3 API server in tests and `hifi up` (filesystem backend)
$(S3PROXY_JAR): dev/s3/pom.xml
	mvn -q -B -f dev/s3/pom.xml dependency:copy -DoutputDirectory=$(CURDIR)/.cache/s3
	touch $@

$(KAFKA_JAR): dev/kafka/pom.xml
	mvn -q -B -f dev/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/.cache/kafka/libs
	touch $@

fuzz: install
	HYPOTHESIS_PROFILE=fuzz timeout 600 $(BIN)/pytest -q tests/test_properties.py

QUIX_VENV := .cache/bench/quix-venv

bench: install jars $(QUIX_VENV)/bin/quix-ready
	$(BIN)/hifi bench --step --second-worker --system hifi --system raw --system quix --duration 60 --json docs/bench/latest.json --doc docs/BENCHMARKS.md

# The Quix Streams peer gets its own virtualenv: its pins conflict with Hifi's dependencies.
$(QUIX_VENV)/bin/quix-ready:
	python3 -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/pip install -q quixstreams==3.28.1 ua-parser msgpack
	touch $@

chaos: install jars
	$(BIN)/hifi chaos all --rate 200 --json docs/chaos/latest.json --doc docs/RELIABILITY.md

# 30 minutes at 1,000 events/s through a roll, a kill -9 and a broker kill (issue 15); SOAK_S=180 for a short one.
SOAK_S ?= 1800
soak: install jars
	$(BIN)/hifi chaos soak --duration $(SOAK_S) --json docs/chaos/soak.json

clean:
	-$(BIN)/hifi kafka stop
	rm -rf var .cache/kafka/data-* .cache/kafka/test-*
