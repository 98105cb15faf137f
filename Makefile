# Two commands on a fresh machine:  `make demo` (install + tiny two-stage run + export)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
RUN    ?= runs/tiny-asagi

.PHONY: install demo test clean

$(BIN)/kakehashi: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU build, so resolving the project does not pull a multi-GB CUDA build
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(BIN)/kakehashi

demo: install
	DS_ACCELERATOR=cpu $(BIN)/kakehashi train recipes/tiny/asagi-2stage.yaml --output $(RUN)
	$(BIN)/kakehashi shapes-eval $(RUN)/export --samples 100

test: install
	DS_ACCELERATOR=cpu WANDB_MODE=disabled $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs data
