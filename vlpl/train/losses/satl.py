"""SATL, semantic-aware thresholds for partial labels: ``satl``. **Our formulation** (Decision 6).

SATL (Ruan, Xu, ..., Chen; arXiv 2507.23263) has no public code and no reachable method section
(ALGORITHMS.md §10): everything concrete below is vlpl's own choice, labelled as such here, in
``vlpl train --list`` and in docs/CSL_SATL.md. What the paper states and this keeps: per-class positive and
negative score distributions estimated from the known labels and updated during training, a class-specific
threshold derived from them that pseudo-labels the unknown entries, and a differential ranking loss that
pushes the two distributions apart.

**Class statistics** (ours). The model's logits ``s`` on the known positives and on the known negatives of
each class are summed over every training batch of an epoch (count, sum, sum of squares; over the global
batch under data parallelism); at the start of the next epoch (:meth:`SATLLoss.set_epoch`) each class with at
least ``min_count`` of both folds that epoch's mean, variance and known-positive rate
``pi_c = n+ / (n+ + n-)`` into running values, ``v <- momentum v + (1 - momentum) v_epoch`` (the first time:
``v = v_epoch``). They are loss buffers (``C x 5`` plus the epoch's ``C x 6`` sums), so a checkpoint holds
them and a resumed run continues with the same statistics. Epoch 1 has none: its unknown entries are ignored.

**Threshold and pseudo-labels** (ours). The class's two Gaussians ``N(mu+, s+^2)`` and ``N(mu-, s-^2)``
(standard deviations floored at ``min_std``), weighted ``pi_c`` and ``1 - pi_c``, give the posterior log-odds

    f(x) = log(pi / (1 - pi)) + log(s- / s+) - (x - mu+)^2 / (2 s+^2) + (x - mu-)^2 / (2 s-^2).

The class threshold ``tau_c`` (:meth:`SATLLoss.thresholds`) is the Bayes boundary ``f(x) = 0``: the root
between the two means (the one nearer their midpoint if both are), or the midpoint when there is none or the
class is degenerate (``mu+ <= mu-``). An unknown entry becomes a pseudo-positive when the posterior of
"positive" is at least ``gamma`` (``f >= logit(gamma)``) and a pseudo-negative when that of "negative" is
(``f <= -logit(gamma)``); else it is ignored. The score is clamped to ``[mu-, mu+]`` first, so that a score
beyond a class mean is never less confident than the mean itself (unequal variances would otherwise turn
the far tail of the wider Gaussian around). A class with ``mu+ <= mu-`` gives no pseudo-labels.

**Loss** (ours). Batch mean (ALGORITHMS.md §1) of ``l+(p)`` on known and ``pseudo_weight l+(p)`` on
pseudo-positives, ``l-(p)`` on known and ``pseudo_weight l-(p)`` on pseudo-negatives, plus ``lambda_rank`` times
the differential ranking loss, the mean over every (positive ``i``, negative ``j``) pair of the same class in
the batch (known or pseudo) of ``softplus(margin - (s_ic - s_jc))``. Under data parallelism the pairs are
those of each process's micro-batch.

**SPML** (one positive, no known negative): with a ``pseudo.rule`` the rule's labels on unknown entries count
as known (``rule_labels``: its negatives, e.g. DAMP with ``negatives: pseudo``, the VLM's confident negatives;
``both``: its positives too), for the statistics and the loss alike.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F

from vlpl.registry import LOSSES
from vlpl.train import loss_params as P
from vlpl.train.losses.base import LossBatch, SPMLLoss, neg_log_neg, neg_log_pos

log = logging.getLogger(__name__)

__all__ = ["SATLLoss", "bayes_boundary", "gaussian_log_odds", "ranking_loss"]


def gaussian_log_odds(x: torch.Tensor, mean_pos: torch.Tensor, std_pos: torch.Tensor, mean_neg: torch.Tensor,
                      std_neg: torch.Tensor, rate_pos: torch.Tensor) -> torch.Tensor:
    """``log [pi N(x; mu+, s+)] - log [(1 - pi) N(x; mu-, s-)]``, broadcast over the class dimension (last)."""
    return (torch.log(rate_pos) - torch.log1p(-rate_pos) + torch.log(std_neg) - torch.log(std_pos)
            - (x - mean_pos) ** 2 / (2 * std_pos ** 2) + (x - mean_neg) ** 2 / (2 * std_neg ** 2))


def bayes_boundary(mean_pos: torch.Tensor, std_pos: torch.Tensor, mean_neg: torch.Tensor, std_neg: torch.Tensor,
                   rate_pos: torch.Tensor) -> torch.Tensor:
    """Per class, the Bayes boundary between the weighted Gaussians (the root of the log-odds between the two
    means, the one nearer their midpoint if both are; the midpoint if there is none or ``mu+ <= mu-``)."""
    mp, sp, mn, sn, pi = (t.double() for t in (mean_pos, std_pos, mean_neg, std_neg, rate_pos))
    a = 1.0 / (2 * sn ** 2) - 1.0 / (2 * sp ** 2)
    b = mp / sp ** 2 - mn / sn ** 2
    c = mn ** 2 / (2 * sn ** 2) - mp ** 2 / (2 * sp ** 2) + torch.log(pi) - torch.log1p(-pi) + torch.log(sn / sp)
    mid = (mp + mn) / 2
    lo, hi = torch.minimum(mp, mn), torch.maximum(mp, mn)
    linear = a.abs() <= 1e-12 * (1.0 / sp ** 2 + 1.0 / sn ** 2)
    lin_root = torch.where(b != 0, -c / torch.where(b != 0, b, torch.ones_like(b)), mid)
    disc = b ** 2 - 4 * a * c
    sq = torch.sqrt(disc.clamp(min=0))
    safe_a = torch.where(linear, torch.ones_like(a), a)
    r1, r2 = (-b + sq) / (2 * safe_a), (-b - sq) / (2 * safe_a)

    def inside(r: torch.Tensor) -> torch.Tensor:
        return (r >= lo) & (r <= hi) & torch.isfinite(r)

    ok1, ok2 = inside(r1) & (disc >= 0), inside(r2) & (disc >= 0)
    both = ok1 & ok2
    nearer = torch.where((r1 - mid).abs() <= (r2 - mid).abs(), r1, r2)
    quad = torch.where(both, nearer, torch.where(ok1, r1, torch.where(ok2, r2, mid)))
    root = torch.where(linear, torch.where(inside(lin_root), lin_root, mid), quad)
    return torch.where(mp > mn, root, mid)


def ranking_loss(s: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The differential ranking loss (ours): the mean over the (positive ``i``, negative ``j``) pairs of each
    class in the batch of ``softplus(margin - (s_ic - s_jc))``; ``(loss, number of pairs)`` (0 without pairs).

    ``s``: ``(B, C)`` logits; ``positive`` / ``negative``: ``(B, C)`` bool. Memory ``C B^2``."""
    st = s.t()  # (C, B)
    diff = st.unsqueeze(2) - st.unsqueeze(1)  # (C, B_i, B_j) = s_ic - s_jc
    pairs = positive.t().unsqueeze(2) & negative.t().unsqueeze(1)
    count = pairs.sum()
    total = (F.softplus(margin - diff) * pairs.to(s.dtype)).sum()
    return total / count.clamp(min=1).to(s.dtype), count


@LOSSES.register("satl")
class SATLLoss(SPMLLoss):
    """SATL, our formulation (Decision 6; module docstring): running class statistics, Bayes-boundary thresholds,
    posterior pseudo-labels and the differential ranking loss.

    Args:
        momentum: EMA momentum of the class statistics, one update per epoch (0.9).
        gamma: posterior confidence of a pseudo-label (0.95).
        margin: margin of the ranking loss (1).
        lambda_rank: weight of the ranking loss (1).
        pseudo_weight: weight of the BCE on threshold pseudo-labels (1).
        min_count: known positives and negatives a class needs in an epoch to update its statistics (2).
        min_std: floor of the standard deviations (1e-3).
        rule_labels: with pseudo-labels from a rule, which count as known (``negatives`` or ``both``).
        eps: inside ``l+`` / ``l-``.
    """

    def __init__(
        self,
        observed: Any,
        *,
        momentum: float = P.SATLParams.momentum,
        gamma: float = P.SATLParams.gamma,
        margin: float = P.SATLParams.margin,
        lambda_rank: float = P.SATLParams.lambda_rank,
        pseudo_weight: float = P.SATLParams.pseudo_weight,
        min_count: int = P.SATLParams.min_count,
        min_std: float = P.SATLParams.min_std,
        rule_labels: str = P.SATLParams.rule_labels,
        eps: float = P.SATLParams.eps,
    ) -> None:
        super().__init__(observed, eps)
        self.momentum, self.gamma, self.margin = float(momentum), float(gamma), float(margin)
        self.lambda_rank, self.pseudo_weight = float(lambda_rank), float(pseudo_weight)
        self.min_count, self.min_std, self.rule_labels = int(min_count), float(min_std), rule_labels
        C = self.num_classes
        for name in ("mean_pos", "var_pos", "mean_neg", "var_neg", "rate_pos"):
            self.register_buffer(name, torch.zeros(C, dtype=torch.float64))
        self.register_buffer("ready", torch.zeros(C, dtype=torch.bool))
        self.register_buffer("epoch_sums", torch.zeros(C, 6, dtype=torch.float64))  # n+, S+, Q+, n-, S-, Q-
        self.register_buffer("sums_epoch", torch.zeros((), dtype=torch.long))  # the epoch summed in epoch_sums

    mean_pos: torch.Tensor
    var_pos: torch.Tensor
    mean_neg: torch.Tensor
    var_neg: torch.Tensor
    rate_pos: torch.Tensor
    ready: torch.Tensor
    epoch_sums: torch.Tensor
    sums_epoch: torch.Tensor

    def extra_repr(self) -> str:
        return (f"N={self.num_examples}, C={self.num_classes}, momentum={self.momentum:g}, gamma={self.gamma:g}, "
                f"margin={self.margin:g}, lambda_rank={self.lambda_rank:g} (ours, Decision 6)")

    # -- class statistics ----------------------------------------------------------------------------------

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Enter ``epoch``: fold the previous epoch's sums into the running statistics (once: a run resumed
        inside ``epoch`` has already folded them)."""
        super().set_epoch(epoch, num_epochs)
        done = int(self.sums_epoch)
        if done == epoch:
            return
        if 0 < done < epoch:
            updated = self.fold_epoch()
            tau = self.thresholds()
            ready = ~torch.isnan(tau)
            log.info("satl: epoch %d's statistics folded in (%d classes updated); %d of %d classes have a threshold "
                     "(median %s on the logits), %d give pseudo-labels", done, updated, int(ready.sum()),
                     self.num_classes, f"{float(tau[ready].median()):.3f}" if bool(ready.any()) else "n/a",
                     int(self.valid().sum()))
        self.epoch_sums.zero_()
        self.sums_epoch.fill_(epoch)

    @torch.no_grad()
    def accumulate(self, s: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> None:
        """Add the scores ``s`` (B, C) of the known ``positive`` / ``negative`` entries to this epoch's sums."""
        s = s.detach().double()
        pos, neg = positive.double(), negative.double()
        sums = torch.stack([pos.sum(0), (pos * s).sum(0), (pos * s * s).sum(0),
                            neg.sum(0), (neg * s).sum(0), (neg * s * s).sum(0)], dim=1)
        self.epoch_sums += sums.to(self.epoch_sums.device)

    @torch.no_grad()
    def fold_epoch(self) -> int:
        """Fold this epoch's sums into the running statistics (module docstring); returns the classes updated."""
        n_p, s_p, q_p, n_n, s_n, q_n = self.epoch_sums.unbind(1)
        ok = (n_p >= self.min_count) & (n_n >= self.min_count)
        mp = s_p / n_p.clamp(min=1)
        mn = s_n / n_n.clamp(min=1)
        cur = {"mean_pos": mp, "var_pos": (q_p / n_p.clamp(min=1) - mp ** 2).clamp(min=0),
               "mean_neg": mn, "var_neg": (q_n / n_n.clamp(min=1) - mn ** 2).clamp(min=0),
               "rate_pos": n_p / (n_p + n_n).clamp(min=1)}
        first = ok & ~self.ready
        again = ok & self.ready
        m = self.momentum
        for name, value in cur.items():
            buf = getattr(self, name)
            buf.copy_(torch.where(first, value, torch.where(again, m * buf + (1 - m) * value, buf)))
        self.ready |= ok
        return int(ok.sum())

    def _stds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.var_pos.sqrt().clamp(min=self.min_std), self.var_neg.sqrt().clamp(min=self.min_std)

    def valid(self) -> torch.Tensor:
        """``(C,)`` bool: classes with statistics and ``mu+ > mu-`` (the ones that give pseudo-labels)."""
        return self.ready & (self.mean_pos > self.mean_neg)

    def thresholds(self) -> torch.Tensor:
        """``(C,)`` float64 class thresholds ``tau_c`` on the logits (the Bayes boundary; NaN where a class has no
        statistics yet)."""
        sp, sn = self._stds()
        tau = bayes_boundary(self.mean_pos, sp, self.mean_neg, sn, self.rate_pos)
        return torch.where(self.ready, tau, torch.full_like(tau, math.nan))

    def posterior_log_odds(self, s: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` float64 log-odds of "positive" for logits ``s`` (scores clamped to ``[mu-, mu+]``)."""
        sp, sn = self._stds()
        x = s.detach().double().to(self.mean_pos.device)
        lo, hi = torch.minimum(self.mean_pos, self.mean_neg), torch.maximum(self.mean_pos, self.mean_neg)
        x = torch.maximum(torch.minimum(x, hi), lo)
        rate = self.rate_pos.clamp(1e-12, 1 - 1e-12)
        return gaussian_log_odds(x, self.mean_pos, sp, self.mean_neg, sn, rate)

    # -- the loss ----------------------------------------------------------------------------------------

    def forward(self, batch: LossBatch) -> Dict[str, torch.Tensor]:
        s, p, _, m = self._prepare(batch)
        known_pos, known_neg, unk = m.pos, m.neg, m.unk
        if batch.pseudo is not None:
            rule_pos, rule_neg, _ = self._pseudo_masks(batch, s, m)
            known_neg = known_neg + rule_neg
            unk = unk - rule_neg
            if self.rule_labels == "both":
                known_pos = known_pos + rule_pos
                unk = unk - rule_pos
        with torch.no_grad():
            valid = self.valid().to(s.device)
            if bool(valid.any()):
                odds = self.posterior_log_odds(s).to(s.device)
                cut = math.log(self.gamma / (1 - self.gamma)) if self.gamma < 1 else math.inf
                usable = unk * valid.unsqueeze(0).to(unk.dtype)
                ps_pos = usable * (odds >= cut).to(unk.dtype)
                ps_neg = usable * (odds <= -cut).to(unk.dtype)
            else:
                ps_pos = ps_neg = torch.zeros_like(unk)
            if self.training:
                every = self._gather_rows(torch.stack([s.detach(), known_pos, known_neg], dim=1))
                self.accumulate(every[:, 0], every[:, 1] > 0, every[:, 2] > 0)
        terms = {
            "obs_pos": known_pos * neg_log_pos(p, self.eps),
            "obs_neg": known_neg * neg_log_neg(p, self.eps),
            "pseudo_pos": (self.pseudo_weight * ps_pos) * neg_log_pos(p, self.eps),
            "pseudo_neg": (self.pseudo_weight * ps_neg) * neg_log_neg(p, self.eps),
        }
        out = self._finish(terms)
        if self.lambda_rank > 0:
            rank, pairs = ranking_loss(s, (known_pos + ps_pos) > 0, (known_neg + ps_neg) > 0, self.margin)
        else:  # no ranking term: no C x B^2 pair matrix either
            rank, pairs = s.new_zeros(()), torch.zeros((), dtype=torch.long, device=s.device)
        out["loss"] = out["loss"] + self.lambda_rank * rank
        out["rank"] = (self.lambda_rank * rank).detach()
        out["num_pseudo_pos"] = ps_pos.sum().detach()
        out["num_pseudo_neg"] = ps_neg.sum().detach()
        out["num_pairs"] = pairs.detach().to(s.dtype)
        out["classes_ready"] = valid.sum().to(s.dtype)
        return out
