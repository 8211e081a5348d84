# Entry points for people and CI. The real build is CMake, in build/.
#   make          build ingestd
#   make run      build and start ingestd with config/ingestd.yaml
#   make test     build, then run the unit and integration tests
#   make test-asan  the same suite under AddressSanitizer and UBSan

BUILD ?= build
BUILD_ASAN ?= build-asan
CONFIG ?= config/ingestd.yaml
CMAKE_FLAGS ?=
JOBS ?= $(shell nproc)
PYTHON ?= /usr/bin/python3

.PHONY: all deps test-deps build run test unit integration test-asan clean

all: build

deps:
	scripts/install-deps.sh build

test-deps:
	scripts/install-deps.sh test

build: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

run: build
	$(BUILD)/ingestd serve -c $(CONFIG)

unit: test-deps
	cmake -S . -B $(BUILD) -DWITH_WERROR=ON $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)
	cd $(BUILD) && ctest --output-on-failure

integration: unit
	INGESTD_BIN=$(abspath $(BUILD))/ingestd $(PYTHON) -m pytest -q tests/integration

test: integration

# The fairness test asserts a documented latency bound for the normal
# build. The sanitizer build is several times slower, so that test runs
# in the normal pass only.
test-asan: test-deps
	cmake -S . -B $(BUILD_ASAN) -DWITH_WERROR=ON -DWITH_SANITIZERS=ON \
		-DCMAKE_BUILD_TYPE=Debug $(CMAKE_FLAGS)
	cmake --build $(BUILD_ASAN) -j $(JOBS)
	cd $(BUILD_ASAN) && ctest --output-on-failure
	INGESTD_BIN=$(abspath $(BUILD_ASAN))/ingestd \
		ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(PYTHON) -m pytest -q tests/integration \
		--deselect tests/integration/test_fairness.py

clean:
	rm -rf $(BUILD) $(BUILD_ASAN)
