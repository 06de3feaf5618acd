"""Metric-learning fine-tuning of the descriptor on a labelled folder (issue 9, in progress).

Built so far: :mod:`lookalike.train.losses` (pytorch-metric-learning's losses and miners by
preset, CurricularFace, GLR-2021 dynamic margins, P-K sampling),
:mod:`lookalike.train.model` (backbone, learned GeM or R-MAC, projection + batch norm, L2) and
:mod:`lookalike.train.data` (labels from parent folders or a CSV, stratified validation).
The loop, the model directory and ``lookalike train`` come next.
"""

# Nothing is imported here: ``lookalike.train.data`` stays free of torch and
# pytorch-metric-learning; import the submodules themselves.
