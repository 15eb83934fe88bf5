"""AdaMerging, layer-wise (Yang et al. 2024, arXiv 2310.02575): one coefficient per task per tensor,
kept in [0, 1], initialised at 0.3, trained by minimising the entropy of the merged model's
predictions on UNLABELLED validation inputs (Adam, lr 1e-3 in the paper)."""

from supermerge.merge_core.methods.learned import LearnedMergeConfig

PAPER = "https://arxiv.org/abs/2310.02575"

ADAMERGING = LearnedMergeConfig(transform="clamp01", objective="entropy", init=0.3, lr=1e-3)
