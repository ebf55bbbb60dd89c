"""Meta-learning data attribution: task-IF and instance-IF for bi-level (MAML / iMAML) models.

Implements META.md (Ren et al., ICLR 2026) in plain PyTorch with torch.func.
"""

from worker.attribution.meta.api import attribute_meta, edit_meta
from worker.attribution.meta.options import InnerOptions, MetaOptions

__all__ = ["InnerOptions", "MetaOptions", "attribute_meta", "edit_meta"]
