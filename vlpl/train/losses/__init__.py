"""Single-positive / partial-label multi-label losses, one registry entry each, one family per module.

Every loss is an :class:`SPMLLoss` built as ``LOSSES.create(name, observed, **hparams)`` (or
:func:`create_loss`). Notation is that of ALGORITHMS.md §1: logits ``s``, ``p = sigmoid(s)``, observed
labels ``z`` in {-1, 0, +1}, pseudo-labels ``y~`` in {-1, 0, +1},
``l+(p) = -log(p + eps)``, ``l-(p) = -log(1 - p + eps)``. Unless a loss says otherwise, the objective is
the batch mean ``(1 / (B C)) sum_{n,c} L_nc`` (§1) plus a regulariser where the method has one.

Registered names (see each class for the formulas and its ALGORITHMS.md section; the modules are listed under "Layout"):

=========== ================================================================================
``bce``    full-label BCE over observed +1/-1 entries (the full-label upper bound, observed=full)
``an``     assume negative (§2e)
``an_ls``  assume negative with label smoothing 0.1 (§2e)
``wan``    weak assume negative, unknowns weighted 1/(C-1) (§2e)
``epr``    expected positive regulariser (§2e)
``role``   regularised online label estimation, free N x C estimator (§2e)
``iun``    ignore unobserved positives: observed positive + every true negative (Cole et al.; docs/LOSSES.md)
``iu``     ignore unobserved: BCE on observed +1 / -1 entries only (Cole et al.; docs/LOSSES.md)
``pr``     pairwise ranking hinge, exact closed form (Cole et al.; docs/LOSSES.md)
``em``     entropy maximisation on unknowns (§4a)
``em_apl`` EM + asymmetric (soft negative) pseudo-labelling after each epoch (§4a)
``ll_r``   Large Loss Matters, rejection (§3b)
``ll_ct``  Large Loss Matters, temporary correction (§3b)
``ll_cp``  Large Loss Matters, permanent correction (§3b)
``gr``     generalized robust loss with GR schedules (§5)
``vlpl``   VLPL's EM_PL loss on vision-language pseudo-labels (§6c)
``vlpl_asl`` VLPL's EM_PL_ASL variant (released code; docs/LOSSES.md)
``gpr``    AEVLP's generalized pseudo-label robust loss (§7d)
``csl``    CSL's selective loss: prior + likelihood rules, P-ASL, model EMA (§9; docs/CSL_SATL.md)
``satl``   SATL, our formulation (Decision 6): class score Gaussians, Bayes thresholds, ranking loss (§10)
=========== ================================================================================

**Observed negatives.** The SPML papers never have observed ``-1`` entries. For the partial-label
setting every loss here treats an observed ``-1`` as a known (clean) negative with loss ``l-(p)`` and
weight 1 (``ll_*`` use the logits BCE toward 0, which is the same thing without ``eps``); each class
states where this enters its formula.

**Observed labels and state.** A loss is built on the training set's ``(N, C)`` observed labels, given as
a reader (``observed_at(positions)`` and ``observed_shape``: the trainer passes its
:class:`~vlpl.store.store.SplitReader`) or a matrix (numpy / torch; tests, plugins), wrapped in
:class:`~vlpl.train.losses.base.ObservedLabels` without a copy. At every step the trainer hands the batch's
rows as ``LossBatch.observed`` (``(B, C)`` int8, from ``SplitReader.observed_at``); loss code reads labels
only through ``self._prepare(batch)`` (``s, p, z, masks``; ``z`` int8), which falls back to reading the rows
from the labels the loss was built on when ``batch.observed`` is ``None``. A loss therefore holds no
``N x C`` tensor unless it keeps per-sample state, and then it says so with the class attribute
``stateful = True`` and registers that state as buffers / parameters in its ``__init__`` after
``super().__init__`` (``state_dict()`` holds it: checkpoint / resume stay exact), built chunk by chunk from
``self.observed_labels.chunks()`` (no full-size float temporaries):

* ``ll_cp``: the int8 ``N x C`` buffer ``label_state`` (observed labels + permanent ``+1`` corrections,
  :meth:`SPMLLoss.register_label_state`: ``_prepare`` then reads ``z`` from it; any loss that rewrites
  labels uses the same);
* ``em_apl``: the float32 ``N x C`` buffer ``apl_target`` (the stored ``p`` of each soft negative, NaN
  elsewhere; float32 because the targets are the model's float32 ``p``) and ``unknown_at_start`` (C,);
* ``role``: the float32 ``N x C`` estimator parameter ``estimator_logits`` (the method itself).

Every other registered loss is stateless (no tensor with ``N`` rows: :meth:`SPMLLoss.per_sample_state`).
``loss.state`` still gives the ``(N, C)`` float32 label state (observed labels, LL-Cp's corrections,
EM+APL's ``-p``), materialised on demand for inspection and tests; training never reads it. Losses that need
a pass over the training set after each epoch (``needs_train_pass``) get it streamed
(:meth:`SPMLLoss.end_epoch_stream`: EM+APL keeps memory bounded with a scratch file). Logits are computed on
in float32 whatever their dtype (AMP-safe).

**Several processes.** The papers train on one GPU. Under data parallelism each process holds a slice of
the global batch; after :meth:`SPMLLoss.set_distributed` the two batch-level statistics are computed over
the *global* batch, so that after DDP's gradient averaging a W-process step has the gradients of the
1-process step on the same global batch (BatchNorm aside): the expected-positive regulariser ``R`` (its
batch sum goes through an autograd all-reduce, whose backward sums the W identical upstream gradients,
and DDP divides by W again) and the Large-Loss top-``K`` threshold (over the gathered losses, ``K`` from the
global ``B C``). Per-sample state stays identical on every process: the trainer averages the gradients of
the loss's own parameters (ROLE) with :meth:`SPMLLoss.average_gradients`, and :meth:`SPMLLoss.sync_state`
merges LL-Cp's writes once per epoch (each row is seen by one process once per epoch); EM+APL's epoch-end
update reads the gathered predictions and is identical everywhere.

**Parameters.** Each loss's defaults, one-line meanings and validation live in one torch-free home,
:mod:`vlpl.train.loss_params` (``GPRParams``, ...): the constructors here take their defaults from those
schemas, and :func:`create_loss` / ``LOSSES.create`` validate the hyper-parameters through them (the
training config is checked with the same schemas before torch is imported).

**Layout.** One loss family per module, named after it (as timm and open_clip keep one model family per
file): :mod:`~vlpl.train.losses.base` (:class:`LossBatch`, :class:`SPMLLoss`, the per-entry building blocks
and the factory helpers), :mod:`~vlpl.train.losses.cole` (``bce``, ``an``, ``an_ls``, ``wan``, ``epr``,
``role``, ``iun``, ``iu``, ``pr``), :mod:`~vlpl.train.losses.em` (``em``, ``em_apl``), :mod:`~vlpl.train.losses.large_loss`
(``ll_r``, ``ll_ct``, ``ll_cp``), :mod:`~vlpl.train.losses.gr` (``gr``), :mod:`~vlpl.train.losses.gpr`
(``gpr``), :mod:`~vlpl.train.losses.vlpl` (``vlpl``, ``vlpl_asl``), :mod:`~vlpl.train.losses.csl` (``csl``),
:mod:`~vlpl.train.losses.satl` (``satl``); :mod:`~vlpl.train.losses.reconstruction` holds the
reconstruction term of Decision 5 (ours, off by default), which any loss can carry
(:meth:`SPMLLoss.set_reconstruction`; config ``loss.reconstruction``). Every public name is re-exported here.

Importing this package registers the entries in :data:`vlpl.registry.LOSSES`.
"""
from __future__ import annotations

from vlpl.train.loss_params import EPS_COLE, EPS_GR
from vlpl.train.losses.base import (
    LossBatch,
    ObservedLabels,
    SPMLLoss,
    binary_entropy,
    create_loss,
    expected_positive_regularizer,
    loss_defaults,
    loss_description,
    neg_log_neg,
    neg_log_pos,
    soft_bce,
)
from vlpl.train.losses.cole import (
    AssumeNegativeLabelSmoothingLoss,
    AssumeNegativeLoss,
    ExpectedPositiveRegularizerLoss,
    FullLabelBCELoss,
    IgnoreUnobservedLoss,
    IgnoreUnobservedPositivesLoss,
    PairwiseRankingLoss,
    ROLELoss,
    WeakAssumeNegativeLoss,
)
from vlpl.train.losses.csl import CSLLoss
from vlpl.train.losses.em import EMAPLLoss, EntropyMaximizationLoss
from vlpl.train.losses.gpr import GPRLoss
from vlpl.train.losses.gr import GRLoss, gce_neg, gce_pos, gr_k, gr_v
from vlpl.train.losses.large_loss import (
    LargeLossPermanentCorrectionLoss,
    LargeLossRejectionLoss,
    LargeLossTemporaryCorrectionLoss,
)
from vlpl.train.losses.reconstruction import (
    AUX_RECONSTRUCTION,
    ReconstructionTerm,
    build_reconstruction,
    probe_reconstruction_feature,
)
from vlpl.train.losses.satl import SATLLoss
from vlpl.train.losses.vlpl import VLPLASLLoss, VLPLLoss

__all__ = [
    "EPS_COLE",
    "EPS_GR",
    "LossBatch",
    "ObservedLabels",
    "SPMLLoss",
    "create_loss",
    "loss_defaults",
    "loss_description",
    "neg_log_pos",
    "neg_log_neg",
    "soft_bce",
    "binary_entropy",
    "expected_positive_regularizer",
    "gce_pos",
    "gce_neg",
    "gr_k",
    "gr_v",
    "FullLabelBCELoss",
    "AssumeNegativeLoss",
    "AssumeNegativeLabelSmoothingLoss",
    "WeakAssumeNegativeLoss",
    "ExpectedPositiveRegularizerLoss",
    "ROLELoss",
    "IgnoreUnobservedPositivesLoss",
    "IgnoreUnobservedLoss",
    "PairwiseRankingLoss",
    "EntropyMaximizationLoss",
    "EMAPLLoss",
    "LargeLossRejectionLoss",
    "LargeLossTemporaryCorrectionLoss",
    "LargeLossPermanentCorrectionLoss",
    "GRLoss",
    "GPRLoss",
    "VLPLLoss",
    "VLPLASLLoss",
    "CSLLoss",
    "SATLLoss",
    "ReconstructionTerm",
    "AUX_RECONSTRUCTION",
    "build_reconstruction",
    "probe_reconstruction_feature",
]
