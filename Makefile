# Two commands do all set-up on a fresh clone:
#   make demo   # creates .venv, installs searchkit, indexes sample photos, queries, classifies
#   make test   # creates .venv, installs searchkit + test deps, runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SK := $(BIN)/searchkit
PHOTOS := build/sample-photos

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,demo,ray]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python examples/sample_photos.py $(PHOTOS)
	$(SK) index $(PHOTOS) --index demo
	$(SK) query "a cat" --index demo -k 3
	$(SK) query "a person in a space suit" --index demo -k 3
	$(SK) classify $(PHOTOS) --index demo --labels "cat,astronaut,cup of coffee,rocket,motorcycle,galaxy,coins,brick wall,grass,moon"

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

.PHONY: install demo test
