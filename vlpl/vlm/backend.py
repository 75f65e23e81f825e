"""Frozen vision-language models behind one small interface.

Two backends:

* ``open_clip`` (default): any ``open_clip.create_model_and_transforms`` name with a pretrained tag
  (``ViT-B-16`` + ``openai``), an ``hf-hub:`` name, or a local checkpoint file as ``pretrained``.
  Text embeddings come from open_clip's own tokenizer and ``build_zero_shot_classifier`` (prompt
  ensembling), template sets from ``open_clip.zero_shot_metadata``.
* ``hf``: a Hugging Face transformers ``CLIPModel`` or ``SiglipModel`` from a local directory or a
  hub id, with its own tokenizer and image-processor statistics.

A bundled tiny config (``vlpl-tiny``, random initialisation with a fixed seed) runs the real code
paths offline; its scores mean nothing.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from vlpl.config import ConfigError, TeacherConfig
from vlpl.store.store import sha256_file
from vlpl.store.views import ScoreKind

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_MODEL = "vlpl-tiny"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_registered = False


def register_bundled_configs() -> None:
    """Make ``vlpl-tiny`` (and any JSON in ``vlm/model_configs``) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class Preprocess:
    """What the image tower expects: size (h, w), normalisation, interpolation."""

    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str = "bicubic"


def template_sets() -> Dict[str, Tuple[Any, ...]]:
    """open_clip's template sets by name: every ``<NAME>_TEMPLATES`` of ``open_clip.zero_shot_metadata``,
    lower-cased without the suffix (``openai_imagenet``: CLIP's 80 ImageNet prompts, ``simple_imagenet``: 18)."""
    from open_clip import zero_shot_metadata as zsm

    return {k[: -len("_TEMPLATES")].lower(): tuple(v) for k, v in vars(zsm).items()
            if k.endswith("_TEMPLATES") and isinstance(v, (tuple, list))}


def template_strings(templates: Union[str, Sequence[Any], None], allow_empty: bool = False) -> List[str]:
    """Resolve a template spec to a list of format strings with one ``{}``.

    ``templates`` is a single template (``"a photo of a {}."``), a list of them, or the name of an
    open_clip template set (:func:`template_sets`: ``openai_imagenet`` (80 templates), ``simple_imagenet``); a
    list may mix set names and templates. ``allow_empty``: an empty spec gives ``[]`` (class descriptions alone).
    """
    sets = template_sets()
    items: List[Any] = [] if templates is None else [templates] if isinstance(templates, str) else list(templates)
    out: List[str] = []
    for t in items:
        if isinstance(t, str) and t in sets:
            out += [x("{}") if callable(x) else str(x) for x in sets[t]]
            continue
        s = t("{}") if callable(t) else str(t)
        if s.count("{}") != 1:
            raise ConfigError(
                f"model.templates: each template needs exactly one '{{}}' for the class name, got {s!r} "
                f"(or an open_clip template set name: {', '.join(sorted(sets))})"
            )
        out.append(s)
    if not out and not allow_empty:
        raise ConfigError("model.templates: empty template list")
    return out


def load_descriptions(path: Union[str, Path], classes: Sequence[str]) -> Dict[str, List[str]]:
    """Class descriptions (RAM++ / CuPL style) from a JSON or YAML file: ``{class: [description, ...]}``.

    A description is used as written, or formatted with the class name when it holds one ``{}``. Every class
    of ``classes`` must be in the file with at least one non-empty string (the error names the class and the
    file); classes the file has beyond them are ignored (logged). Returns ``{class: [strings]}`` in class order.
    """
    import json

    import yaml

    p = Path(os.path.expanduser(str(path)))
    where = f"teacher.descriptions {p}"
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the file ({e.strerror or e})") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of class name -> list of descriptions, got "
                          f"{type(data).__name__}")
    out: Dict[str, List[str]] = {}
    for c in classes:
        if c not in data:
            raise ConfigError(f"{where}: class {c!r} has no descriptions (the file has {len(data)} classes; every "
                              f"class of the dataset needs at least one)")
        v = data[c]
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(d, str) for d in items):
            raise ConfigError(f"{where}: class {c!r}: expected a list of strings, got {v!r}")
        items = [d.strip() for d in items if d.strip()]
        if not items:
            raise ConfigError(f"{where}: class {c!r} has an empty list of descriptions")
        for d in items:
            if d.count("{}") > 1:
                raise ConfigError(f"{where}: class {c!r}: a description may hold at most one '{{}}' (the class "
                                  f"name), got {d!r}")
        out[c] = [d.format(c) if "{}" in d else d for d in items]
    extra = [k for k in data if k not in out]
    if extra:
        log.info("%s: %d classes not in the dataset are ignored (e.g. %r)", where, len(extra), extra[0])
    return out


def class_prompts(classes: Sequence[str], templates: Sequence[str],
                  descriptions: Optional[Mapping[str, Sequence[str]]] = None) -> List[List[str]]:
    """The prompts of each class: every template formatted with the class name, then the class's descriptions
    (:func:`load_descriptions`). :meth:`VLMBackend.encode_prompts` averages their normalised embeddings."""
    out = []
    for c in classes:
        ps = [t.format(c) for t in templates] + list((descriptions or {}).get(c, ()))
        if not ps:
            raise ConfigError(f"class {c!r} has no prompt: give templates, or descriptions for it")
        out.append(ps)
    return out




def image_tokens(visual: torch.nn.Module, pixels: torch.Tensor, name: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
    """An open_clip image tower's pooled embedding and its patch tokens projected into the joint space, one pass.

    * open_clip ``VisionTransformer`` (CLIP, DFN, MetaCLIP): the pooled token as the tower computes it; each patch
      token through the same final LayerNorm and projection (``ln_post``, ``proj``) as the class token.
    * ``TimmModel`` (SigLIP 2, PE-Core, EVA02): the trunk's final tokens without its prefix tokens, through the
      same head as the pooled token (``fc_norm``, ``head``, open_clip's ``head``); where the trunk pools by
      attention (SigLIP's / PE's MAP head, ``AttentionPoolLatent``), each patch goes through that pool as if it
      were the only key (attention weight 1: its value projection, output projection and the pool's MLP), the
      value-path reading of attention pooling used by training-free dense CLIP methods (MaskCLIP).

    Other towers (ResNets, CoCa's attentional pooler) raise a ConfigError naming the model.
    """
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type in ("tok", "avg"):
        x = visual.transformer(visual._embeds(pixels))
        pooled, _ = visual._pool(x)
        tokens = visual.ln_post(x[:, 1:])  # LayerNorm is per token: the same as ln_post(x)[:, 1:]
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
        return pooled, tokens
    if isinstance(visual, TimmModel) and hasattr(visual.trunk, "forward_head") and hasattr(visual.trunk, "fc_norm"):
        trunk = visual.trunk
        feats = trunk.forward_features(pixels)
        if feats.ndim == 3:
            pooled = visual.head(trunk.forward_head(feats))
            x = feats[:, int(getattr(trunk, "num_prefix_tokens", 0)):]
            pool = getattr(trunk, "attn_pool", None)
            if pool is not None:
                x = _latent_pool_per_token(pool, x)
            elif getattr(trunk, "global_pool", None) not in ("token", "avg", "avgmax", "max"):
                x = None
            if x is not None:
                return pooled, visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(x))))
    raise ConfigError(f"views.dense: no patch-token projection for the image tower of {name or type(visual).__name__!r} "
                      f"({type(visual).__name__}); supported: open_clip ViTs and timm ViT/EVA towers")


def _latent_pool_per_token(pool: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` applied to each token alone (one key: attention weight 1 for every query):
    ``out = proj(v(x + pos))``, then ``out + mlp(norm(out))``; (B, N, C) -> (B, N, C)."""
    if getattr(pool, "pos_embed", None) is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    c = x.shape[-1]
    v = pool.kv(x)[..., c:]  # kv: Linear(C, 2C), keys then values, heads contiguous
    out = pool.proj_drop(pool.proj(v))
    if getattr(pool, "mlp", None) is not None:
        out = out + pool.mlp(pool.norm(out))
    return out


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` (None = run in fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in table:
        raise ConfigError(f"model.precision: expected auto, bf16, fp16 or fp32, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("model.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return table[precision]


class VLMBackend:
    """A frozen image tower + text tower producing L2-normalised embeddings."""

    backend: str
    preprocess: Preprocess
    embed_dim: int
    logit_scale: float
    #: a sigmoid-trained teacher's logit bias (SigLIP: ``logit = scale * cos + bias``); None for a softmax CLIP
    logit_bias: Optional[float] = None
    #: the text tower's context length (tokens; longer prompts are truncated by the tokenizer)
    context_length: Optional[int] = None
    #: how the model's own eval transform resizes (open_clip: squash | shortest); ``views.resize_mode: model``
    resize_mode: str = "squash"
    device: torch.device

    def __init__(self, cfg: TeacherConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.amp_dtype = autocast_dtype(cfg.precision, device)

    # -- to implement -------------------------------------------------------------------------------
    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_text(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def identity(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) strings -> (N, D) text features (not normalised)."""
        raise NotImplementedError

    def _encode_image_tokens(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled (N, D), patch tokens (N, P, D)), both in the joint space, not normalised."""
        raise ConfigError(f"views.dense: the {self.backend!r} teacher backend gives no patch tokens; the dense "
                          f"view needs an open_clip teacher")

    # -- shared -------------------------------------------------------------------------------------
    def score_kind(self) -> ScoreKind:
        """How this teacher's cosines become probabilities: ``siglip`` (per-class sigmoid of
        ``scale * cos + bias``) when the model has a logit bias, else ``cosine`` (softmax over classes)."""
        scale = round(float(self.logit_scale), 6)
        if self.logit_bias is None:
            return ScoreKind("cosine", scale)
        return ScoreKind("siglip", scale, round(float(self.logit_bias), 6))

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels on ``device`` -> (N, D) unit-norm float32 embeddings."""
        with self._autocast():
            feats = self._encode_image(pixels)
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_image_tokens(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised pixels -> ``(pooled (N, D), tokens (N, P, D))``, unit-norm float32: the image
        embedding (as :meth:`encode_image`) and every patch token projected into the joint space the way the
        tower projects its pooled token (the dense view, docs/TEACHERS.md)."""
        with self._autocast():
            pooled, tokens = self._encode_image_tokens(pixels)
        return F.normalize(pooled.float(), dim=-1), F.normalize(tokens.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, classnames: Sequence[str], templates: Union[str, Sequence[Any]]) -> torch.Tensor:
        """Prompt-ensembled class embeddings, (C, D) unit-norm float32 (on CPU)."""
        tmpl = template_strings(templates)
        with self._autocast():
            emb = self._encode_text(list(classnames), tmpl)
        emb = F.normalize(emb.float(), dim=-1).cpu()
        if self._relation_gcn() is not None:  # AEVLP's relation-GCN residual (7b; off by default, Decision 2)
            emb = self._relation_residual(list(classnames), tmpl, emb)
        return emb

    def _relation_gcn(self) -> Any:
        """The seeded relation-GCN residual of ``teacher.relation_gcn`` (:mod:`vlpl.vlm.relation_gcn`), or None."""
        rel = getattr(self.cfg, "relation_gcn", None)
        if rel is None or not rel.enabled:
            return None
        from vlpl.vlm.relation_gcn import RelationGCN

        return RelationGCN.from_config(rel)

    @torch.no_grad()
    def _relation_residual(self, classnames: List[str], templates: List[str], emb: torch.Tensor) -> torch.Tensor:
        """``normalize(T + G(T))`` on the text encoder's output before normalisation (as AEVLP's released code;
        several templates: their mean), with the ``text`` relation from the normalised embeddings ``emb``."""
        with self._autocast():
            raw = torch.stack([torch.cat([self._encode_texts([t.format(c) for c in classnames[k:k + 256]]).float()
                                          for k in range(0, len(classnames), 256)]) for t in templates])
        return self._relation_gcn()(raw.mean(0).cpu(), emb)

    def _relation_identity(self) -> Dict[str, Any]:
        """The manifest's ``model.relation_gcn`` (settings and seed) when the residual is on; else nothing, so
        stores built without it keep their identity."""
        gcn = self._relation_gcn()
        return {"relation_gcn": gcn.identity()} if gcn is not None else {}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[Sequence[str]], batch_size: int = 256) -> torch.Tensor:
        """Class embeddings from a list of prompts per class (:func:`class_prompts`: templates and descriptions,
        any number per class): each prompt's embedding L2-normalised, averaged per class, re-normalised (the
        prompt ensembling of ``open_clip.build_zero_shot_classifier``, for ragged lists). (C, D) float32, CPU."""
        if not prompts or any(not ps for ps in prompts):
            raise ValueError("encode_prompts: every class needs at least one prompt")
        if self._relation_gcn() is not None:
            raise ConfigError("teacher.relation_gcn: AEVLP's residual applies to template prompts; it is not "
                              "combined with teacher.descriptions (turn one of them off)")
        flat = [p for ps in prompts for p in ps]
        owner = torch.tensor([c for c, ps in enumerate(prompts) for _ in ps], device=self.device)
        parts = []
        with self._autocast():
            for k in range(0, len(flat), batch_size):
                parts.append(F.normalize(self._encode_texts(flat[k : k + batch_size]).float(), dim=-1))
        emb = torch.cat(parts)
        sums = torch.zeros(len(prompts), emb.shape[1], device=emb.device).index_add_(0, owner, emb)
        return F.normalize(sums / torch.bincount(owner, minlength=len(prompts))[:, None].float(), dim=-1).cpu()

    def normalization(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """(mean, std) fed to the image tower: the model's own unless ``normalization=imagenet``."""
        if self.cfg.normalization == "model":
            return self.preprocess.mean, self.preprocess.std
        if self.cfg.normalization == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        raise ConfigError(
            f"model.normalization: expected 'model' or 'imagenet', got {self.cfg.normalization!r}"
        )


class OpenClipBackend(VLMBackend):
    backend = "open_clip"

    def __init__(self, cfg: TeacherConfig, device: torch.device, seed: int = 0) -> None:
        super().__init__(cfg, device)
        import open_clip

        register_bundled_configs()
        self.checkpoint_sha256: Optional[str] = None
        pretrained = cfg.pretrained
        if pretrained and (os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
            path = Path(os.path.expanduser(pretrained))
            if not path.is_file():
                raise ConfigError(f"model.pretrained: checkpoint file {path} does not exist")
            self.checkpoint_sha256 = sha256_file(path)
            pretrained = str(path)
        # Random-initialised weights (tiny model, or no pretrained tag) must be identical in every
        # process and every run, so that stores are reproducible: seed the init, then restore the RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model, _, _ = open_clip.create_model_and_transforms(
                    cfg.name, pretrained=pretrained or None, device=device, weights_only=True
                )
            except RuntimeError as e:
                raise ConfigError(f"model: cannot create open_clip model {cfg.name!r} "
                                  f"with pretrained={cfg.pretrained!r}: {e}") from e
        model.eval().requires_grad_(False)
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(cfg.name)  # the model's own tokenizer and context length
        self.context_length = int(getattr(self.tokenizer, "context_length", 0) or 0) or None
        self._warned_truncation = False
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", model.visual.image_size)
        if isinstance(size, int):
            size = (size, size)
        self.preprocess = Preprocess(
            image_size=tuple(int(s) for s in size),
            mean=tuple(float(x) for x in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(float(x) for x in pp.get("std", open_clip.OPENAI_DATASET_STD)),
            interpolation=str(pp.get("interpolation", "bicubic")),
        )
        self.resize_mode = str(pp.get("resize_mode", "shortest"))  # open_clip's PreprocessCfg default
        self.logit_scale = float(model.logit_scale.exp().item())
        # SigLIP-type models (init_logit_bias in their config) score with sigmoid(scale * cos + bias)
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.item())
        self.embed_dim = int(self.encode_text(["x"], ["{}"]).shape[1])

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _encode_text(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        import open_clip

        fns: List[Callable[[str], str]] = [(lambda c, t=t: t.format(c)) for t in templates]
        clf = open_clip.build_zero_shot_classifier(
            self.model, tokenizer=self.tokenizer, classnames=classnames, templates=fns,
            num_classes_per_batch=max(1, 512 // len(fns)), device=self.device, use_tqdm=False,
        )
        return clf.T  # (C, D)

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts))
        from open_clip.tokenizer import SimpleTokenizer

        if isinstance(self.tokenizer, SimpleTokenizer) and not self._warned_truncation:
            full = (ids[:, -1] != 0).nonzero().flatten().tolist()  # no padding left: at or over the context length
            if full:
                self._warned_truncation = True
                log.warning("%d prompt(s) fill the text tower's context length (%d tokens) and may be truncated, "
                            "e.g. %r: shorten long descriptions", len(full), ids.shape[1], texts[full[0]][:120])
        return self.model.encode_text(ids.to(self.device))

    def _encode_image_tokens(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return image_tokens(self.model.visual, pixels, self.cfg.name)

    def identity(self) -> Dict[str, Any]:
        import open_clip

        return {
            "backend": self.backend,
            "name": self.cfg.name,
            "pretrained": None if self.checkpoint_sha256 else self.cfg.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "open_clip_version": open_clip.__version__,
            "preprocess": asdict(self.preprocess),
            "normalization": self.cfg.normalization,
            **self._relation_identity(),
        }


class HFBackend(VLMBackend):
    """transformers CLIPModel / SiglipModel (local directory or hub id)."""

    backend = "hf"

    def __init__(self, cfg: TeacherConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        try:
            mcfg = AutoConfig.from_pretrained(cfg.name)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.name: cannot load a transformers config from {cfg.name!r}: {e}") from e
        if mcfg.model_type == "siglip2":
            # NaFlex: variable-resolution patch sequences, not the fixed square crops the views are made at
            raise ConfigError(
                f"model.name: {cfg.name!r} is a transformers Siglip2Model (NaFlex, variable resolution), which "
                f"the hf backend does not run; use the open_clip backend (e.g. configs/models/siglip2_*.yaml) or a "
                f"fixed-resolution SigLIP 2 checkpoint (model_type 'siglip')"
            )
        if mcfg.model_type not in ("clip", "siglip"):
            raise ConfigError(
                f"model.name: {cfg.name!r} is a {mcfg.model_type!r} model; the hf backend takes CLIP or SigLIP"
            )
        self.model = AutoModel.from_pretrained(cfg.name).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.name)
        self.context_length = int(getattr(mcfg.text_config, "max_position_embeddings", 0) or 0) or None
        self.is_siglip = mcfg.model_type.startswith("siglip")
        size = mcfg.vision_config.image_size
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        try:
            proc = transformers.AutoImageProcessor.from_pretrained(cfg.name)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError):
            log.warning("no image processor config in %s; using CLIP's default statistics", cfg.name)
            from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

            mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        self.preprocess = Preprocess((int(size), int(size)), tuple(map(float, mean)), tuple(map(float, std)))
        self.resize_mode = "squash" if self.is_siglip else "shortest"  # CLIPImageProcessor: shortest edge + crop
        self.logit_scale = float(self.model.logit_scale.exp().item())
        bias = getattr(self.model, "logit_bias", None) if self.is_siglip else None
        self.logit_bias = None if bias is None else float(bias.item())
        self.embed_dim = int(getattr(mcfg, "projection_dim", None) or mcfg.text_config.hidden_size)
        self.checkpoint_sha256 = None
        weights = sorted(Path(cfg.name).glob("*.safetensors")) + sorted(Path(cfg.name).glob("*.bin")) \
            if Path(cfg.name).is_dir() else []
        if weights:
            h = hashlib.sha256()
            for w in weights:
                h.update(sha256_file(w).encode())
            self.checkpoint_sha256 = h.hexdigest()

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers < 5 returns a tensor, >= 5 a ModelOutput whose pooler_output is projected
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._features(self.model.get_image_features(pixel_values=pixels))

    def _encode_text(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        rows = []
        for c in classnames:
            texts = [t.format(c) for t in templates]
            tok = self._tokenize(texts)
            emb = F.normalize(self._features(self.model.get_text_features(**tok)).float(), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(rows)

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self._features(self.model.get_text_features(**self._tokenize(texts)))

    def _tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The text tower's inputs. SigLIP was trained on texts padded to its full context length, attending to
        the padding (no attention mask) and pooling the last token, as open_clip and the original code run it:
        pad to the model's ``max_position_embeddings`` (not the tokenizer's possibly unset ``model_max_length``)
        and pass the ids alone."""
        if self.is_siglip:
            tok = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                                 return_tensors="pt")
            return {"input_ids": tok["input_ids"].to(self.device)}
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device))

    def identity(self) -> Dict[str, Any]:
        import transformers

        return {
            "backend": self.backend,
            "name": self.cfg.name,
            "pretrained": None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "transformers_version": transformers.__version__,
            "preprocess": asdict(self.preprocess),
            "normalization": self.cfg.normalization,
            **self._relation_identity(),
        }


def create_backend(cfg: TeacherConfig, device: Optional[torch.device] = None) -> VLMBackend:
    device = device or resolve_device(cfg.device)
    if cfg.backend == "open_clip":
        return OpenClipBackend(cfg, device)
    if cfg.backend == "hf":
        return HFBackend(cfg, device)
    raise ConfigError(f"model.backend: expected 'open_clip' or 'hf', got {cfg.backend!r}")
