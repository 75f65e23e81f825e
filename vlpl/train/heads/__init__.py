"""Classifier heads: one family per module, each registered in ``vlpl.registry.HEADS`` by name.

A head is built as ``HEADS.create(name, in_features=F, context=ctx, **params)`` (``ctx``: a
:class:`~vlpl.train.model.ClassContext` with the class names and text embeddings) and maps the backbone's
:class:`~vlpl.train.model.ModelOutput` (pooled (B, F), tokens (B, N, F)) to logits (B, C) with
``C = len(ctx.names)``. Subclass :class:`Head`, or write any ``nn.Module`` with that constructor and
forward; set ``uses_tokens = False`` when the head reads only the pooled feature (the backbone then skips
computing the token map). A user's own head module is loaded with ``--plugin`` (never from a saved config
or checkpoint: :func:`vlpl.train.model_io.load_model` only looks names up in the registry).

The built-in heads' parameters are declared once, torch-free, in :mod:`vlpl.train.head_params`.

Auxiliary outputs: a head may expose tensors besides the logits as ``head.aux`` (a dict name -> tensor, set
by every forward; ``{}`` when it has none). ``sigrl`` with ``reconstruct_dim > 0`` puts
``aux["reconstruction"]`` (B, reconstruct_dim) there, for the reconstruction loss (ALGORITHMS.md Decision 5).

Built-in: ``linear`` (:mod:`vlpl.train.heads.linear`), ``sigrl`` (:mod:`vlpl.train.heads.sigrl`: GMC,
SVFR, local + global matching).
"""
from __future__ import annotations

from vlpl.train.heads import linear, sigrl  # noqa: F401  (importing registers "linear" and "sigrl")
from vlpl.train.heads.base import Head
from vlpl.train.heads.sigrl import SigRLHead

__all__ = ["Head", "SigRLHead", "linear", "sigrl"]
