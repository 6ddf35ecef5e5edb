"""Baselines for Co-Reg under the same trainer interface and data contracts (``train.method``).

* ``zero_shot``: the annotators' plurality vote; no network (:mod:`coreg.baselines.zero_shot`).
* ``ce_majority``: one network, cross-entropy on the plurality top-1 (hard distillation).
* ``soft_distill``: one network, cross-entropy on the mean annotator probabilities.
* ``proden``: one network, PRODEN (progressive identification) on the candidate sets.
* ``dividemix``: DivideMix-style co-training on the plurality top-1, i.e. the Co-Reg trainer with
  one-hot sets and without the prototype/contrastive regularisers (:mod:`coreg.baselines.dividemix`).

Every trained baseline writes the same ``model.pt`` as Co-Reg (a :class:`coreg.train.network.CoRegEnsemble`),
so ``coreg evaluate`` and :func:`coreg.train.load_trained` work unchanged.
"""

from coreg.baselines.dividemix import fit_dividemix
from coreg.baselines.supervised import fit_proden, fit_soft_targets
from coreg.baselines.targets import majority_targets, one_hot, soft_targets
from coreg.baselines.zero_shot import ZERO_SHOT_FILE, run_zero_shot, zero_shot_votes

__all__ = ["ZERO_SHOT_FILE", "fit_dividemix", "fit_proden", "fit_soft_targets", "majority_targets", "one_hot",
           "run_zero_shot", "soft_targets", "zero_shot_votes"]
