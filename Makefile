# The two set-up commands of the README. Both install what they need into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

demo: install
	$(BIN)/python -m dinokit demo

test: install
	$(BIN)/python -m pytest -q
