"""The trainable classifier (the *student*): a backbone chosen by name + a registered head.

The contract (docs: DESIGN.md "Contracts between the parts", issue 8 item 2):

* a **backbone** maps images (B, 3, H, W) to a :class:`ModelOutput`: the pooled feature (B, F) and the
  token map (B, N, F) in the same space as the pooled feature (after the final norm, and after the
  projection where the backbone has one). Backbones come from the libraries' own factories by name:
  ``timm.create_model(name, num_classes=0)`` (CNNs: the last feature map as H*W tokens; ViTs: the patch
  tokens, prefix tokens dropped) or an open_clip image tower (``open_clip.create_model``; its patch tokens
  after ``ln_post`` and ``@ proj``, which open_clip's own ``output_tokens=True`` leaves unprojected);
* a **class context** (:class:`ClassContext`: class names + class text embeddings) is built once per run,
  from the score store by default, or from the open_clip student's own text tower
  (``student.head.text_embeddings: student``);
* a **head** is a registry entry (``vlpl.registry.HEADS``, built-ins in :mod:`vlpl.train.heads`) built as
  ``HEADS.create(name, in_features=F, context=ctx, **params)``; it maps a :class:`ModelOutput` to logits
  (B, C) with C = ``len(ctx.names)``. Label-graph heads (SigRL's GMC / SVFR) read ``tokens`` and
  ``context.text_embeddings``; a head that does not read tokens says so (``uses_tokens = False``) and the
  backbone then skips computing them.

:func:`create_classifier` puts the parts together; :mod:`vlpl.train.model_io` saves a classifier and
rebuilds it from its files alone.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from vlpl.config import ConfigError, StudentConfig
from vlpl.registry import HEADS

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The prompt the open_clip student's own text tower embeds each class name with
#: (``student.head.text_embeddings: student``; AEVLP's and SigRL's prompt).
STUDENT_PROMPT = "a photo of a {}."

TEXT_EMBEDDING_SOURCES = ("store", "student")


# --------------------------------------------------------------------------------------------------
# What flows between the parts
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    """A backbone's output: ``pooled`` (B, F) and ``tokens`` (B, N, F) in the same feature space.

    ``tokens`` is None where the backbone has no token map, or where the caller asked for the pooled
    feature only (``with_tokens=False``).
    """

    pooled: torch.Tensor
    tokens: Optional[torch.Tensor] = None


@dataclass
class ClassContext:
    """What a head may know about the classes: their names and text embeddings (C, D) float32.

    ``text_embeddings`` is None only where no embeddings exist (e.g. a benchmark with synthetic classes);
    a head that needs them asks through :meth:`require_embeddings`, which then raises a clear error.
    """

    names: List[str]
    text_embeddings: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        if not self.names:
            raise ValueError("class context: no class names")
        if self.text_embeddings is not None:
            emb = np.asarray(self.text_embeddings)
            if emb.ndim != 2 or emb.shape[0] != len(self.names):
                raise ValueError(f"class context: text embeddings of shape {emb.shape}, expected "
                                 f"({len(self.names)}, D) for {len(self.names)} class names")
            if not np.issubdtype(emb.dtype, np.floating):
                raise ValueError(f"class context: text embeddings of dtype {emb.dtype}, expected floats")
            self.text_embeddings = np.ascontiguousarray(emb, dtype=np.float32)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def embedding_dim(self) -> Optional[int]:
        return None if self.text_embeddings is None else int(self.text_embeddings.shape[1])

    def require_embeddings(self, who: str) -> np.ndarray:
        """The (C, D) embeddings, or a clear error naming ``who`` needed them."""
        if self.text_embeddings is None:
            raise ConfigError(f"{who} needs class text embeddings, but this class context has none "
                              f"(build it with ClassContext.from_store(store))")
        return self.text_embeddings

    @classmethod
    def from_store(cls, store: Any) -> "ClassContext":
        """Names and prompt-ensembled text embeddings of a score store (``classes``, ``text_embeddings()``)."""
        return cls(list(store.classes), store.text_embeddings())

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "ClassContext":
        """A context without text embeddings (heads that do not read them, e.g. ``linear``)."""
        return cls(list(names), None)


# --------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """Images (B, 3, H, W) -> :class:`ModelOutput`; ``num_features`` = F; ``mean``/``std`` = the input
    normalisation the backbone was trained with (its own; the classifier may override it)."""

    num_features: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    #: the weights the backbone was built from ("resnet50.tv_in1k", "ViT-B-16/openai", "file:PATH sha256:HEX16");
    #: None: random initialisation (see :func:`timm_weights_tag`)
    pretrained_tag: Optional[str] = None

    def forward(self, x: torch.Tensor, with_tokens: bool = True) -> ModelOutput:  # pragma: no cover
        raise NotImplementedError


class TimmBackbone(Backbone):
    """A timm model created with ``num_classes=0``.

    pooled = ``forward_head(forward_features(x), pre_logits=True)`` (the model's own pooling and head
    norm). tokens: a CNN's last feature map (B, F, H, W) as (B, H*W, F) (NHWC maps likewise), passed
    through the head's norm / pre-logits layers where the model has them (ConvNeXt-style heads); a ViT's
    sequence without its ``num_prefix_tokens`` class/register tokens, through ``fc_norm`` where the model
    pools before its norm.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def _tokens(self, feats: torch.Tensor) -> Optional[torch.Tensor]:
        m = self.model
        if feats.ndim == 4:
            if getattr(m, "output_fmt", "NCHW") == "NHWC":
                return feats.flatten(1, 2)
            head = getattr(m, "head", None)
            norm = getattr(head, "norm", None)
            if isinstance(norm, nn.Module):  # NormMlpClassifierHead: pool -> norm -> pre_logits
                feats = norm(feats)
            tokens = feats.flatten(2).transpose(1, 2)
            pre = getattr(head, "pre_logits", None)
            if isinstance(pre, nn.Module):
                tokens = pre(tokens)
            return tokens
        if feats.ndim == 3:
            tokens = feats[:, int(getattr(m, "num_prefix_tokens", 0) or 0):]
            fc_norm = getattr(m, "fc_norm", None)
            if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
                tokens = fc_norm(tokens)
            return tokens
        return None

    def forward(self, x: torch.Tensor, with_tokens: bool = True) -> ModelOutput:
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        return ModelOutput(pooled, self._tokens(feats) if with_tokens else None)


class OpenClipBackbone(Backbone):
    """An open_clip image tower (``model.visual``).

    For open_clip's ``VisionTransformer`` the forward pass is open_clip's own, step by step
    (``_embeds`` -> ``transformer`` -> ``_pool`` -> ``@ proj``), so that the patch tokens come out of the
    same pass in the pooled feature's space: after ``ln_post`` (also where the tower norms only the
    pooled token, ``final_ln_after_pool``) and after ``proj``. Other towers (ModifiedResNet, timm trunks)
    give the pooled feature only (``tokens`` None).
    """

    def __init__(self, visual: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.visual = visual
        self.num_features = int(visual.output_dim)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        v = visual
        self._vit = all(hasattr(v, a) for a in ("_embeds", "transformer", "_pool", "ln_post", "proj")) \
            and getattr(v, "attn_pool", None) is None

    def project_tokens(self, tokens: torch.Tensor, normed: bool) -> torch.Tensor:
        """Tokens of the transformer's output into the pooled space: ``ln_post`` (unless already applied)
        then ``@ proj``. Applied to the class token of a CLS-pooled tower it gives the pooled feature."""
        v = self.visual
        if not normed:
            tokens = v.ln_post(tokens)
        return tokens @ v.proj if v.proj is not None else tokens

    def forward(self, x: torch.Tensor, with_tokens: bool = True) -> ModelOutput:
        v = self.visual
        if not self._vit:
            out = v(x)
            return ModelOutput(out[0] if isinstance(out, tuple) else out, None)
        h = v.transformer(v._embeds(x))
        pooled, tokens = v._pool(h)  # ln_post already applied to tokens unless final_ln_after_pool
        if v.proj is not None:
            pooled = pooled @ v.proj
        if not with_tokens:
            return ModelOutput(pooled, None)
        return ModelOutput(pooled, self.project_tokens(tokens, normed=not v.final_ln_after_pool))


def _close(name: str, names: Sequence[str]) -> str:
    m = difflib.get_close_matches(name, list(names), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(m)}" if m else ""


CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _checkpoint_path(value: Any, key: str) -> Optional[str]:
    """``value`` as a local checkpoint file path when it names one (a string with a path separator or a
    checkpoint suffix), else None. A named file that does not exist is a :class:`ConfigError` naming ``key``."""
    if not isinstance(value, str) or not (os.path.sep in value or value.endswith(CHECKPOINT_SUFFIXES)):
        return None
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: checkpoint file {path} does not exist (expected a .safetensors, .pth or .bin "
                          f"state dict, or true for the named pretrained weights)")
    return path


def _file_tag(path: str) -> str:
    """The recorded tag of a local checkpoint: its path and the first 16 hex digits of its sha256."""
    from vlpl.store.store import sha256_file

    return f"file:{path} sha256:{sha256_file(path)[:16]}"


def timm_weights_tag(cfg: StudentConfig) -> Optional[str]:
    """The weights ``cfg`` (``kind=timm``) asks for, resolved without loading or downloading anything.

    * ``pretrained: false`` -> None (random initialisation);
    * ``pretrained: PATH`` -> ``"file:PATH"`` (the checkpoint file, resolved to an absolute path);
    * ``pretrained: true`` -> ``"<arch>.<tag>"``: the tag in the name (``resnet50.tv_in1k``: torchvision's
      V1 ImageNet weights, the papers' ResNet-50), else timm's default tag for the architecture
      (``timm.models.get_pretrained_cfg(arch).tag``; for ``resnet50`` that is ``a1_in1k``, timm's own BCE
      recipe, *not* the papers' weights); an ``hf-hub:`` / ``local-dir:`` name is its own tag; None where
      timm knows no pretrained weights for the architecture.
    """
    if not cfg.pretrained:
        return None
    path = _checkpoint_path(cfg.pretrained, "student.pretrained")
    if path is not None:
        return f"file:{path}"
    if isinstance(cfg.pretrained, str):
        raise ConfigError(f"student.pretrained: expected true, false or a checkpoint file path, got "
                          f"{cfg.pretrained!r} (a weights tag goes in the name: student.name=resnet50.tv_in1k)")
    import timm.models

    source, _ = timm.models.parse_model_name(cfg.name)
    if source is not None:  # hf-hub:org/repo, local-dir:PATH
        return cfg.name
    arch, tag = timm.models.split_model_name_tag(cfg.name)
    if not tag:
        pc = timm.models.get_pretrained_cfg(arch)
        tag = getattr(pc, "tag", None) if pc is not None else None
        if not tag:
            return None
    return f"{arch}.{tag}"


def _timm_backbone(cfg: StudentConfig) -> TimmBackbone:
    """A timm backbone with the weights of :func:`timm_weights_tag`; the tag actually loaded (None for random
    initialisation) is the backbone's ``pretrained_tag``."""
    import timm

    if not timm.is_model(cfg.name) and not cfg.name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ConfigError(f"student.name: {cfg.name!r} is not a timm model (see timm.list_models())"
                          + _close(cfg.name, timm.list_models()))
    want = timm_weights_tag(cfg)
    model, loaded = None, None
    if want is not None and want.startswith("file:"):
        path = want[len("file:"):]
        try:  # timm's own loader: the file's classifier is dropped for num_classes=0, as for hub weights
            model = timm.create_model(cfg.name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": path})
        except Exception as e:  # noqa: BLE001 - a file that is not a state dict of this architecture
            raise ConfigError(f"student.pretrained: cannot load {path} into timm {cfg.name!r} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
        loaded = _file_tag(path)
    elif want is not None:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            log.warning("HF_HUB_OFFLINE=1: no ImageNet weights for %s (%s); using random initialisation",
                        cfg.name, want)
        else:
            try:
                model = timm.create_model(want, pretrained=True, num_classes=0)
                loaded = want
            except Exception as e:  # noqa: BLE001 - offline, no cache, or no such weights
                log.warning("could not load the ImageNet weights %s for %s (%s: %s); using random initialisation",
                            want, cfg.name, type(e).__name__, str(e).splitlines()[0][:200])
    elif cfg.pretrained:
        log.warning("timm knows no pretrained weights for %s; using random initialisation", cfg.name)
    if model is None:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0)
    pc = getattr(model, "pretrained_cfg", {}) or {}
    backbone = TimmBackbone(model, pc.get("mean", IMAGENET_MEAN), pc.get("std", IMAGENET_STD))
    backbone.pretrained_tag = loaded
    if loaded is not None:
        log.info("student weights: %s", loaded)
    return backbone


def _open_clip_model(cfg: StudentConfig, pretrained: Optional[str]) -> nn.Module:
    import open_clip

    from vlpl.vlm.backend import register_bundled_configs

    register_bundled_configs()
    if not cfg.name.startswith(("hf-hub:", "local-dir:")) and cfg.name not in open_clip.list_models():
        raise ConfigError(f"student.name: {cfg.name!r} is not an open_clip model (see open_clip.list_models())"
                          + _close(cfg.name, open_clip.list_models()))
    try:
        return open_clip.create_model(cfg.name, pretrained=pretrained, weights_only=True)
    except RuntimeError as e:
        raise ConfigError(f"student: cannot create open_clip model {cfg.name!r} with "
                          f"open_clip_pretrained={pretrained!r}: {e}") from e


def student_text_embeddings(clip_model: nn.Module, model_name: str, names: Sequence[str]) -> np.ndarray:
    """Class embeddings (C, D) float32, unit norm, from an open_clip model's own text tower (prompt
    :data:`STUDENT_PROMPT`, open_clip's tokenizer and ``build_zero_shot_classifier``)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(model_name)
    was_training = clip_model.training
    clip_model.eval()
    try:
        with torch.no_grad():
            clf = open_clip.build_zero_shot_classifier(
                clip_model, tokenizer=tokenizer, classnames=list(names),
                templates=[lambda c: STUDENT_PROMPT.format(c)], num_classes_per_batch=256,
                device=next(clip_model.parameters()).device, use_tqdm=False)
    finally:
        clip_model.train(was_training)
    return clf.T.float().cpu().numpy()  # build_zero_shot_classifier gives (D, C), normalised


# --------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """backbone + head. ``forward(x)`` -> logits (B, C); ``features(x)`` -> :class:`ModelOutput`.

    ``mean``/``std``: the input normalisation to use (``student.normalization``); ``context``: the class
    context the head was built with (saved with the model by :func:`vlpl.train.model_io.save_model`).
    """

    def __init__(self, backbone: Backbone, head: nn.Module, context: ClassContext,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.context = context
        self.num_features = int(backbone.num_features)
        self.pretrained_tag: Optional[str] = backbone.pretrained_tag  # the weights it started from (None: random)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    @property
    def num_classes(self) -> int:
        return self.context.num_classes

    def features(self, x: torch.Tensor) -> ModelOutput:
        """The backbone's pooled feature and token map."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> Any:
        """logits (B, C); with ``with_aux``, ``(logits, aux)``: the head's auxiliary outputs (its ``aux`` dict,
        filled during its forward), where ``aux["reconstruction"]`` (B, F') is the feature the Decision-5
        reconstruction term reads - the backbone's pooled feature for a head that gives none."""
        wants = getattr(self.head, "uses_tokens", None)
        out = self.backbone(x, with_tokens=wants is not False)
        if wants is True and out.tokens is None:
            inner = getattr(self.backbone, "visual", getattr(self.backbone, "model", self.backbone))
            raise ValueError(f"head {type(self.head).__name__} reads the token map, but the backbone "
                             f"({type(inner).__name__}) gives none: use a ViT or CNN backbone")
        logits = self.head(out)
        if not with_aux:
            return logits
        aux = dict(getattr(self.head, "aux", None) or {})
        aux.setdefault("reconstruction", out.pooled)
        return logits, aux

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.head.parameters() if p.requires_grad)


def create_backbone(cfg: StudentConfig, pretrained: bool = True) -> Tuple[Backbone, Optional[nn.Module]]:
    """The student's backbone by name; with it, for ``kind=open_clip``, the whole open_clip model (its
    text tower can embed the class names), else None. ``pretrained=False`` never fetches weights."""
    if cfg.kind == "timm":
        if not pretrained and cfg.pretrained:
            cfg = dataclasses.replace(cfg, pretrained=False)
        return _timm_backbone(cfg), None
    if cfg.kind == "open_clip":
        import open_clip

        tag = cfg.open_clip_pretrained if pretrained else None
        path = _checkpoint_path(tag, "student.open_clip_pretrained")
        clip = _open_clip_model(cfg, path or tag)
        pp = open_clip.get_model_preprocess_cfg(clip)
        backbone = OpenClipBackbone(clip.visual, pp["mean"], pp["std"])
        backbone.pretrained_tag = _file_tag(path) if path else f"{cfg.name}/{tag}" if tag else None
        return backbone, clip
    raise ConfigError(f"student.kind: expected 'timm' or 'open_clip', got {cfg.kind!r}")


def _normalization(cfg: StudentConfig, backbone: Backbone) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    if cfg.normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if cfg.normalization == "model":
        return backbone.mean, backbone.std
    raise ConfigError(f"student.normalization: expected 'imagenet' or 'model', got {cfg.normalization!r}")


def create_classifier(cfg: StudentConfig, context: Union[ClassContext, int], *,
                      pretrained: bool = True, use_student_text: bool = True) -> Classifier:
    """Backbone by name, then the head ``HEADS.create(cfg.head.name, in_features=F, context=ctx,
    **cfg.head.params)`` (in this order: a seeded run initialises the same weights as before).

    ``context``: the class context (:meth:`ClassContext.from_store`); an int C (the form before class
    contexts) is read as C unnamed classes without text embeddings. With
    ``cfg.head.text_embeddings == "student"`` (open_clip students only) the context's embeddings are
    replaced by the student's own text-tower embeddings of the same names; ``use_student_text=False``
    keeps the given ones (used when rebuilding a saved model, whose saved embeddings are final).
    ``pretrained=False``: no pretrained weights are fetched (they are replaced by saved weights).
    """
    if isinstance(context, int):
        context = ClassContext.from_names([f"class_{i}" for i in range(context)])
    if cfg.head.text_embeddings not in TEXT_EMBEDDING_SOURCES:
        raise ConfigError(f"student.head.text_embeddings: expected one of {', '.join(TEXT_EMBEDDING_SOURCES)}, "
                          f"got {cfg.head.text_embeddings!r}")
    if cfg.head.text_embeddings == "student" and cfg.kind != "open_clip":
        raise ConfigError(f"student.head.text_embeddings: 'student' needs an open_clip student with a text "
                          f"tower, but student.kind is {cfg.kind!r}; use 'store' (the score store's embeddings)")
    HEADS.get(cfg.head.name)  # an unknown head fails before any model is built
    backbone, clip = create_backbone(cfg, pretrained=pretrained)
    mean, std = _normalization(cfg, backbone)
    if cfg.head.text_embeddings == "student" and use_student_text:
        assert clip is not None
        emb = student_text_embeddings(clip, cfg.name, context.names)
        log.info("class text embeddings from the student's own text tower (%s, %d x %d)",
                 cfg.name, *emb.shape)
        context = ClassContext(context.names, emb)
    del clip  # the text tower is not part of the classifier
    head = HEADS.create(cfg.head.name, in_features=backbone.num_features, context=context, **cfg.head.params)
    return Classifier(backbone, head, context, mean, std)
