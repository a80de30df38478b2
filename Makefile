# One entry point for people and CI. Every target sets up what it needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LIB := tpu_embed_adam/_tpu_embed_adam_ops.so
CC_SRCS := $(shell find tpu_embed_adam/cc -name '*.cc' | sort)
CC_HDRS := $(shell find tpu_embed_adam/cc -name '*.h' | sort)
OBJS := $(patsubst tpu_embed_adam/cc/%.cc,build/obj/%.o,$(CC_SRCS))
# TF's graph.h derives from std::iterator, deprecated in C++17.
CXXFLAGS_EXTRA ?= -Wall -Wno-sign-compare -Wno-unused-function -Wno-deprecated-declarations
TF_FLAGS := build/tf_flags.mk

.PHONY: venv lib demo demo-graph demo-tf2 demo-tf2-embedding test test-all lint bench bazel-test clean proto fuzz

venv: $(STAMP)

$(STAMP): setup.py requirements.txt requirements-extras.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-extras.txt
	TPU_EMBED_ADAM_SKIP_BUILD=1 $(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

# Compiler flags: the installed TensorFlow's (tf.sysconfig) and the project's
# (tools/build_flags.py, shared with setup.py), cached in build/.
$(TF_FLAGS): tools/build_flags.py tools/tf_flags.py | $(STAMP)
	mkdir -p build
	$(PY) tools/tf_flags.py > $@

-include $(TF_FLAGS)

build/obj/%.o: tpu_embed_adam/cc/%.cc $(CC_HDRS) $(TF_FLAGS)
	@mkdir -p $(dir $@)
	g++ $(TF_CFLAGS) $(CXXFLAGS_EXTRA) -I. -c $< -o $@

$(LIB): $(OBJS)
	g++ -shared $(OBJS) -o $@ $(TF_LFLAGS)

# flock: several shells building at once must not interleave writes of the .so.
lib: $(STAMP)
	flock build.lock $(MAKE) -j2 --no-print-directory $(LIB)

# TPUEstimator on CPU: a recommender whose tables train with TPU Adam.
demo: lib
	$(PY) examples/recommender_estimator.py

# TF's v1 TPUEmbedding graph, unchanged, on the software engine.
demo-graph: lib
	$(PY) examples/train_tpu_embedding.py

# A TF2 custom loop: apply_adam on IndexedSlices gradients, Keras for the rest.
demo-tf2: lib
	$(PY) examples/custom_loop_tf2.py

# TF2's TPUEmbedding docstring loop on CPU, a checkpoint, a serving SavedModel.
demo-tf2-embedding: lib
	$(PY) examples/tf2_tpu_embedding.py

test: lib
	$(PY) -m pytest -q -m "not slow" tests

test-all: lib
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check tpu_embed_adam tpu_embed_adam_cli.py tests examples benchmarks tools setup.py
	$(PY) -m mypy tpu_embed_adam tpu_embed_adam_cli.py

# FUZZ_COUNT inputs per target (tools/fuzz.py): atheris (coverage-guided) for the
# in-process AdamParameters readers and the structure-aware random engine for the
# engine's ConfigureTPUEmbedding (one long-lived child process), FUZZ_OP_COUNT
# for apply_adam (every input builds variables and runs the update).
FUZZ_COUNT ?= 1000000
FUZZ_OP_COUNT ?= 20000
fuzz: lib
	$(PY) -m pip install -q atheris || echo "atheris unavailable: using the random engine"
	mkdir -p build/fuzz
	set -e; for t in from_proto from_tf_proto from_json from_dict; do \
	  $(PY) tools/fuzz.py --target=$$t --count=$(FUZZ_COUNT) --artifact_dir=build/fuzz; done
	$(PY) tools/fuzz.py --target=apply_adam --count=$(FUZZ_OP_COUNT) --engine=random
	$(PY) tools/fuzz.py --target=engine_config --count=$(FUZZ_COUNT) --engine=random

bench: lib
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) benchmarks/bench_update.py

bazel-test: venv
	tools/bazel_test.sh

clean:
	-tools/bazel_test.sh --clean
	rm -rf build $(LIB) .bazel-root

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=tpu_embed_adam protos/optimization_parameters.proto
