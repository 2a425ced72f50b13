# Two commands on a fresh machine:
#   make demo   install, then run the study's four experiments (E1-E4) on the embedded demo cohort
#   make test   install, then run the test suite (what .ci/run calls)
# and make benchmark: the generator benchmark (four generators: table and value-of-synthetic-data
# curve) over make demo's run

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2
SNAKEMAKE := $(BIN)/snakemake

.PHONY: install demo benchmark value-curve demo-generic test test-fast dag clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned (a CPU build where the machine provides one), then the full
# lock without dependency resolution so nothing pulls a different torch.
$(VENV)/.installed: $(BIN)/python envs/requirements.lock pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-deps -r envs/requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, monai, ants, nnunetv2, snakemake; print('environment ok: torch', torch.__version__, 'monai', monai.__version__)"
	touch $@

install: $(VENV)/.installed

# The study's four experiments (E1-E4) at demo scale, one run sharing preprocessing and generators
EXPERIMENTS := --configfile config/experiments/brainspade_demo.yaml
demo: install
	$(SNAKEMAKE) --cores $(CORES) --printshellcmds --rerun-incomplete $(EXPERIMENTS)
	$(SNAKEMAKE) --report results/brainspade-demo/report.html $(EXPERIMENTS)
	@echo "demo finished: tables in results/brainspade-demo/tables/<experiment>/, figures in results/brainspade-demo/figures/<experiment>/, report results/brainspade-demo/report.html"

# The generator benchmark over the four experiments' run: brainspade, gmm, lesion_insertion and
# spade_diffusion arms against the real ones (table), and the value-of-synthetic-data curve of E1's
# tissue task per generator (54 arms; see value_curve_demo.yaml); after make demo only the new arms run
BENCHMARK := $(EXPERIMENTS) config/experiments/generator_benchmark_demo.yaml config/experiments/value_curve_demo.yaml
benchmark: install
	$(SNAKEMAKE) --cores $(CORES) --printshellcmds --rerun-incomplete $(BENCHMARK)
	@echo "benchmark finished: results/brainspade-demo/benchmark/generators.{csv,md,tex,png} and value_curve.{csv,md,tex,png}"

# The curve alone over the four experiments' run: E1's tissue task at synthetic:real ratios and real
# fractions, per generator, two nnU-Net seeds
CURVE := $(EXPERIMENTS) config/experiments/value_curve_demo.yaml
value-curve: install
	$(SNAKEMAKE) --cores $(CORES) --printshellcmds --rerun-incomplete $(CURVE)
	@echo "value curve finished: results/brainspade-demo/benchmark/value_curve.{csv,md,tex,png}"

# The default config alone (config/config.yaml): generic arms R, S, H, Hfar on the tumour and WMH tasks
demo-generic: install
	$(SNAKEMAKE) --cores $(CORES) --printshellcmds --rerun-incomplete
	$(SNAKEMAKE) --report results/demo/report.html
	@echo "generic demo finished: tables in results/demo/tables/, figures in results/demo/figures/, report results/demo/report.html"

# --durations: every CI log says which tests its time went to
test: install
	$(BIN)/python -m pytest -ra --durations=25

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow"

dag: install
	$(SNAKEMAKE) --rulegraph | dot -Tpng > resources/rulegraph.png

clean-demo:
	rm -rf results/demo logs/demo results/brainspade-demo logs/brainspade-demo .snakemake
