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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

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


def template_strings(templates: Union[str, Sequence[Any]]) -> List[str]:
    """Resolve a template spec to a list of format strings with one ``{}``.

    ``templates`` is a single template (``"a photo of a {}."``), a list of them, or the name of an
    open_clip template set: ``openai_imagenet`` (80 templates) or ``simple_imagenet``.
    """
    from open_clip import zero_shot_metadata as zsm

    sets = {
        "openai_imagenet": zsm.OPENAI_IMAGENET_TEMPLATES,
        "simple_imagenet": zsm.SIMPLE_IMAGENET_TEMPLATES,
    }
    if isinstance(templates, str):
        if templates in sets:
            templates = sets[templates]
        else:
            templates = [templates]
    out: List[str] = []
    for t in templates:
        s = t("{}") if callable(t) else str(t)
        if s.count("{}") != 1:
            raise ConfigError(
                f"model.templates: each template needs exactly one '{{}}' for the class name, got {s!r}"
            )
        out.append(s)
    if not out:
        raise ConfigError("model.templates: empty template list")
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
    def encode_text(self, classnames: Sequence[str], templates: Union[str, Sequence[Any]]) -> torch.Tensor:
        """Prompt-ensembled class embeddings, (C, D) unit-norm float32 (on CPU)."""
        tmpl = template_strings(templates)
        with self._autocast():
            emb = self._encode_text(list(classnames), tmpl)
        return F.normalize(emb.float(), dim=-1).cpu()

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
        if mcfg.model_type not in ("clip", "siglip", "siglip2"):
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
            tok = self.tokenizer(texts, padding="max_length" if self.is_siglip else True,
                                 truncation=True, return_tensors="pt").to(self.device)
            emb = F.normalize(self._features(self.model.get_text_features(**tok)).float(), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(rows)

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
        }


def create_backend(cfg: TeacherConfig, device: Optional[torch.device] = None) -> VLMBackend:
    device = device or resolve_device(cfg.device)
    if cfg.backend == "open_clip":
        return OpenClipBackend(cfg, device)
    if cfg.backend == "hf":
        return HFBackend(cfg, device)
    raise ConfigError(f"model.backend: expected 'open_clip' or 'hf', got {cfg.backend!r}")
