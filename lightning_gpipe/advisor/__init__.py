"""The configuration advisor: a cost model built from measured profiles, and the choice it makes
(``GPipeStrategy(microbatches="auto")``, ``experiments/advise.py``)."""

from lightning_gpipe.advisor.choose import Advice, AdvisorError, advise, candidate_balance, microbatch_choices
from lightning_gpipe.advisor.costs import Candidate, Link, ModelProfile, Prediction, peak_activations, predict

__all__ = [
    "Advice", "AdvisorError", "Candidate", "Link", "ModelProfile", "Prediction", "advise", "candidate_balance",
    "microbatch_choices", "peak_activations", "predict",
]  # fmt: skip
