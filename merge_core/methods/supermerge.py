"""SuperMerge (arXiv 2412.10416): per-model, per-tensor weights, tanh-bounded, trained with AdamW on a
small labelled validation set with each task's own loss, through the functional merged forward.

``theta_m(j) = theta_p(j) + sum_i tanh(w(i, j)) * tau(i, j)``; the engine is supermerge.merge_core.methods.learned.
Without tanh the paper loses about 5 points; ``SUPERMERGE_NO_TANH`` is that ablation.
"""

import dataclasses

from supermerge.merge_core.methods.learned import LearnedMergeConfig

PAPER = "https://arxiv.org/abs/2412.10416"

SUPERMERGE = LearnedMergeConfig(transform="tanh", objective="supervised", init=0.3, lr=5e-2)
SUPERMERGE_NO_TANH = LearnedMergeConfig(transform="identity", objective="supervised", init=0.3, lr=5e-2)

# Issue 14 part 2 (supermerge.merge_core.methods.basis): the same training over the TSV-M pieces, and started
# at the training-free merge (TA's lam or TSV-M's alpha) chosen on the validation data.
SUPERMERGE_TSV = dataclasses.replace(SUPERMERGE, basis="tsv")
SUPERMERGE_TSV_INIT = dataclasses.replace(SUPERMERGE, basis="tsv", init_from="training_free")
SUPERMERGE_TA_INIT = dataclasses.replace(SUPERMERGE, init_from="training_free")
# The same over Iso-CTS' pieces (the best training-free merge of the benchmark), started at Iso-CTS.
SUPERMERGE_ISO_CTS_INIT = dataclasses.replace(SUPERMERGE, basis="iso_cts", init_from="training_free")

# Issue 15 part 3 (supermerge.merge_core.compress): the same training over task vectors whose matrices are cut to
# their top singular components (TSV-M's floor(min(out, in) / k) per task): a flat merge in about the
# memory of one or two dense task vectors.
SUPERMERGE_COMPRESSED = dataclasses.replace(SUPERMERGE, basis="compressed")
