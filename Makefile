# Two commands on a fresh machine:  `make demo` (install + tiny two-stage run + export + benchmark)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
# DeepSpeed JIT-builds its CPU ops (the shm all-reduce) into this directory: one per venv, so a venv never loads an
# op that another DeepSpeed version built (torch's default, ~/.cache/torch_extensions, is shared by every venv)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
RUN    ?= runs/tiny-asagi

.PHONY: install check-lock test-latest lock demo test test-fast lint check-vllm check-vllm-tiles clean gpu-wheels \
	gpu-check gpu-check-dry test-deepspeed-lowest

# The tested dependency set: every install here takes exactly these versions (pip constraints); pyproject.toml
# keeps ranges for people who install kakehashi into their own environment.
LOCK   := requirements/lock.txt
PIP     = pip install --quiet --disable-pip-version-check --constraint $(LOCK)

$(BIN)/kakehashi: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU build, so resolving the project does not pull a multi-GB CUDA build
	$(BIN)/$(PIP) $(TORCH)
	$(BIN)/$(PIP) -e '.[test]'
	$(BIN)/python .ci/lock.py check $(LOCK)
	touch $@

install: $(BIN)/kakehashi

check-lock: install  # the venv holds exactly the locked set (pip freeze against $(LOCK))
	$(BIN)/python .ci/lock.py check $(LOCK)

LATEST ?= .venv-latest
test-latest:  # the suite on the newest releases pyproject.toml admits, in its own venv; prints what moved
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --disable-pip-version-check $(TORCH)
	$(LATEST)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(LATEST)/bin/python .ci/lock.py diff $(LOCK)
	DS_ACCELERATOR=cpu WANDB_MODE=disabled $(LATEST)/bin/python -m pytest -q -p no:cacheprovider $(WORKERS)

lock:  # after test-latest passed: its versions become the tested set
	$(LATEST)/bin/python .ci/lock.py write $(LOCK)

demo: install
	DS_ACCELERATOR=cpu $(BIN)/kakehashi train recipes/tiny/asagi-2stage.yaml --output $(RUN)
	$(BIN)/kakehashi shapes-eval $(RUN)/export --samples 100
	# a JA-VG-VQA-500-shaped set of fresh shapes, scored as llm-jp-eval-mm scores the real one (train/benchmarks/)
	$(BIN)/kakehashi data synth-bench --task ja-vg-vqa-500 --out data/bench/ja-vg-vqa-500 --samples 50
	$(BIN)/kakehashi eval $(RUN)/export --task ja-vg-vqa-500 --data data/bench/ja-vg-vqa-500 \
		--predictions $(RUN)/ja-vg-vqa-500-predictions.jsonl

# Two pytest-xdist workers: much of the suite waits (on a stopped rank, a watchdog, Slurm, a forkserver), and those
# waits overlap with the other worker's trainings; worksteal evens out the slow tests at the end
WORKERS ?= -n 2 --dist worksteal

test: install lint check-lock
	DS_ACCELERATOR=cpu WANDB_MODE=disabled $(BIN)/python -m pytest -q $(WORKERS)

test-fast: install  # the edit loop: no whole trainings, no Slurm
	DS_ACCELERATOR=cpu WANDB_MODE=disabled $(BIN)/python -m pytest -q $(WORKERS) -m "not slow and not slurm and not gpu"

lint: install
	$(BIN)/ruff check train data_pipelines tests

check-vllm: install  # optional, outside `make test`: vLLM's CPU build (its own venv) serves the demo export
	test -f $(RUN)/export/config.json || $(MAKE) demo
	VENV=.venv-vllm PYTHON=$(PYTHON) bash tests/interop/install_vllm.sh
	.venv-vllm/bin/python tests/interop/check_vllm.py $(RUN)/export

TILES_RUN ?= runs/tiny-tiles
check-vllm-tiles: install  # optional, outside `make test`: vLLM's CPU build serves the tiled (LLaVA-OneVision) export
	test -f $(TILES_RUN)/export/config.json || \
		DS_ACCELERATOR=cpu $(BIN)/kakehashi train recipes/tiny/onevision-tiles.yaml --output $(TILES_RUN)
	VENV=.venv-vllm PYTHON=$(PYTHON) bash tests/interop/install_vllm.sh
	.venv-vllm/bin/python tests/interop/check_vllm.py $(TILES_RUN)/export

# Resume reads DeepSpeed's own checkpoint layouts (train/checkpoint.py): the checkpoint tests against the lowest
# DeepSpeed that pyproject.toml allows, in a venv of their own (outside `make test`); DS_LOWEST=deepspeed==X tries
# another candidate lower bound (results so far: pyproject.toml)
DS_LOWEST ?= deepspeed==0.19.8
DS_VENV   ?= .venv-ds-lowest
CHECKPOINT_TESTS ?= tests/train/test_failures.py tests/train/test_zero3_elastic.py

test-deepspeed-lowest:
	test -x $(DS_VENV)/bin/python || $(PYTHON) -m venv $(DS_VENV)
	$(DS_VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH)
	$(DS_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]' '$(DS_LOWEST)'
	DS_ACCELERATOR=cpu WANDB_MODE=disabled $(DS_VENV)/bin/python -m pytest -q $(CHECKPOINT_TESTS)

# The GPU tier (tests/gpu/check.py): wheels made here travel with the tree to a GPU machine without network.
GPU_PYTHON ?= python3
GPU_OUT    ?= $(or $(OUT),runs/gpu-check)

gpu-wheels: install  # here, with PyPI: wheels/ <- what the GPU image lacks (CPython 3.12, x86-64 Linux)
	$(BIN)/python tests/gpu/check.py wheels --dest wheels

gpu-check:  # on the GPU machine: no venv, no network; its python3 has torch, transformers, accelerate, peft
	$(GPU_PYTHON) tests/gpu/check.py run --wheels wheels --out $(GPU_OUT)

gpu-check-dry: install  # here, without a GPU: the same steps; GPU tests skip, cases run on CPU, tiny twins benched
	DS_ACCELERATOR=cpu $(BIN)/python tests/gpu/check.py run --dry-run --wheels wheels --out runs/gpu-check-dry

clean:
	rm -rf $(VENV) $(LATEST) runs data
