"""Meta-learning data attribution: task-IF and instance-IF for bi-level (MAML / iMAML) models.

Implements influence for meta-learning (Ren et al., ICLR 2026; docs/methods.md) in plain PyTorch with torch.func.
"""

from worker.attribution.meta.api import attribute_meta, edit_meta
from worker.attribution.meta.options import InnerOptions, MetaOptions

__all__ = ["InnerOptions", "MetaOptions", "attribute_meta", "edit_meta"]
