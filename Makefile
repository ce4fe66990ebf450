# l4c: the two entry points of the README.
#   make run   installs what is missing, builds, runs the main job on the default model
#   make test  installs what is missing, builds, runs every test and prints a summary
#   make train-demo  builds, trains llama4-tiny on the GPL v3 (~2 minutes; docs/training.md)
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=Release -DLLVM_USE_LINKER=lld \
  -DMLIR_DIR=/usr/lib/llvm-22/lib/cmake/mlir \
  -DLLVM_EXTERNAL_LIT=/usr/lib/llvm-22/bin/lit

.PHONY: all setup configure build run test train-demo clean

all: build

setup:
	@bash scripts/setup.sh

configure: setup
	@[ -f $(BUILD)/build.ninja ] || cmake -S . -B $(BUILD) -G Ninja $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

run: build
	@bash scripts/run.sh $(BUILD)

test: build
	@bash scripts/test.sh $(BUILD)

train-demo: build
	@bash scripts/train-demo.sh $(BUILD)

clean:
	rm -rf $(BUILD)
