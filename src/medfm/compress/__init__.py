"""Making classifier runs fast and small: structured pruning (Torch-Pruning) and knowledge distillation.

Both read a "classifier" run and a prepared store and write a new, ordinary "classifier" run
(``load_classifier`` / ``medfm export`` / ``medfm predict`` work on it unchanged).
"""

from medfm.compress.distill import distill
from medfm.compress.prune import prune_classifier

__all__ = ["distill", "prune_classifier"]
