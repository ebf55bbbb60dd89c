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
# The LoRA benchmarks (fact_tracing.py, lora_lds.py) build Hugging Face models: the project's own ranges.
"$VENV/bin/pip" install "transformers>=5.0,<6" "peft>=0.17,<1" "tokenizers>=0.22,<1"
# kronfluence pulls torchvision from the index, built for another torch than the local CPU wheel: its
# compiled operators fail to load, and transformers then fails to import. Nothing here needs it.
"$VENV/bin/pip" uninstall -y torchvision
# Our package itself, without its service dependencies: the engine (worker.attribution) needs only torch.
"$VENV/bin/pip" install -e . --no-deps
"$VENV/bin/python" - <<'PY'
import kronfluence, torch, sklearn, scipy, numpy
import worker.attribution as wa
from importlib.metadata import version
print("ok: kronfluence", version("kronfluence"), "torch", torch.__version__, "sklearn", sklearn.__version__,
      "scipy", scipy.__version__, "numpy", numpy.__version__)
PY
