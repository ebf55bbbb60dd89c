#!/usr/bin/env bash
# Creates benchmarks/.venv-kron: a plain venv (git-ignored) with kronfluence 1.0.1 for the benchmarks only.
# kronfluence is never a runtime dependency of the service; only this venv has it.
# torch is pinned to 2.13.0 (the local CPU wheel); an unpinned torch would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=benchmarks/.venv-kron
python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install "torch==2.13.0" "kronfluence==1.0.1" "scikit-learn>=1.4" "scipy>=1.11" "numpy>=1.26" "safetensors>=0.4"
# benchmarks/hf_vs_kronfluence.py: Hugging Face models and LoRA adapters (the versions our package allows)
"$VENV/bin/pip" install "transformers>=5.0,<6" "peft>=0.17,<1"
# kronfluence declares torchvision but never imports it; the registry's torchvision wheel is built for the CUDA
# torch and fails to load with the CPU one ("operator torchvision::nms does not exist"), which breaks importing
# transformers (it imports torchvision when installed). So it is removed.
"$VENV/bin/pip" uninstall -y torchvision
# Our package itself, without its service dependencies: the engine (worker.attribution) needs only torch.
"$VENV/bin/pip" install -e . --no-deps
"$VENV/bin/python" - <<'PY'
import kronfluence, torch, sklearn, scipy, numpy, transformers, peft
import worker.attribution as wa
from importlib.metadata import version
print("ok: kronfluence", version("kronfluence"), "torch", torch.__version__, "sklearn", sklearn.__version__,
      "scipy", scipy.__version__, "numpy", numpy.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__)
PY
