"""The shapes judge: zero-shot attribute accuracy and CLIP score for images of the shapes domain.

Why: quality numbers of compressed variants need a referee that is independent of the model
under test. `builtin:shapes-judge` is a CLIP trained separately on the shapes domain. It
classifies an image *zero-shot*: the image is compared with the canonical caption of every one
of the 540 attribute combinations, and each attribute's prediction is the value with the
largest summed probability. CLIP score goes through torchmetrics' ``CLIPScore`` so the number
is the standard one (100 * max(cos, 0)), only with this judge instead of OpenAI's CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sdwb import shapes

SCORED_ATTRIBUTES = ("color", "shape", "position", "size", "background")


def _as_tensor(features):
    """transformers 5 returns output objects from get_*_features; the embedding is pooler_output."""
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


class TensorFeatureCLIP(torch.nn.Module):
    """Wrap a ``CLIPModel`` so ``get_image_features``/``get_text_features`` return tensors.

    torchmetrics' CLIPScore expects tensors; transformers 5 returns ``BaseModelOutputWithPooling``.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values=None, **kwargs):
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids=None, attention_mask=None, **kwargs):
        return _as_tensor(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        )


def to_uint8_chw(images) -> torch.Tensor:
    """PIL images, HWC uint8 arrays or an (N, H, W, 3) array -> (N, 3, H, W) uint8 tensor."""
    arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class AttributePredictions:
    """Per-image predicted attributes and whether each matches the expected one."""

    predicted: list[dict[str, str]]
    correct: dict[str, np.ndarray]  # attribute -> (N,) bool

    def accuracy(self) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in self.correct.items()}


class ShapesJudge:
    """Scores images against prompts with a CLIP model and processor (the shapes judge)."""

    def __init__(self, model, processor, name: str = "builtin:shapes-judge"):
        self.model = model.eval().float()
        self.processor = processor
        self.name = name
        self._combos = shapes.all_attribute_combinations()
        self._combo_embeddings: torch.Tensor | None = None

    @torch.no_grad()
    def image_embeddings(self, images, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings (N, D)."""
        out = []
        pixels = to_uint8_chw(images)
        for i in range(0, len(pixels), batch_size):
            inputs = self.processor(images=list(pixels[i : i + batch_size]), return_tensors="pt")
            feats = _as_tensor(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], batch_size: int = 512) -> torch.Tensor:
        """L2-normalised text embeddings (N, D)."""
        out = []
        for i in range(0, len(texts), batch_size):
            inputs = self.processor(text=texts[i : i + batch_size], return_tensors="pt", padding=True)
            feats = _as_tensor(
                self.model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            )
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    def _combination_embeddings(self) -> torch.Tensor:
        if self._combo_embeddings is None:
            captions = [shapes.caption_for(c, 0) for c in self._combos]
            self._combo_embeddings = self.text_embeddings(captions)
        return self._combo_embeddings

    @torch.no_grad()
    def classify(self, images, expected: list[dict[str, str]] | None = None) -> AttributePredictions:
        """Zero-shot attributes of each image; with ``expected``, which ones are right."""
        img = self.image_embeddings(images)
        scale = self.model.logit_scale.exp().float()
        probs = (scale * img @ self._combination_embeddings().T).softmax(dim=-1)
        predicted: list[dict[str, str]] = [{} for _ in range(len(img))]
        for name, values in shapes.ATTRIBUTE_VALUES.items():
            index = torch.tensor([values.index(c[name]) for c in self._combos])
            marginal = torch.zeros(len(img), len(values)).index_add_(1, index, probs)
            for i, k in enumerate(marginal.argmax(dim=-1).tolist()):
                predicted[i][name] = values[k]
        correct = {}
        if expected is not None:
            for name in SCORED_ATTRIBUTES:
                correct[name] = np.array([p[name] == e[name] for p, e in zip(predicted, expected)])
        return AttributePredictions(predicted=predicted, correct=correct)

    def clip_scores(self, images, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """Per-image CLIP score through torchmetrics (100 * max(cos, 0))."""
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        wrapped = TensorFeatureCLIP(self.model)
        pixels = to_uint8_chw(images)
        scores = []
        with torch.no_grad():
            for i in range(0, len(pixels), batch_size):
                s, _ = _clip_score_update(
                    list(pixels[i : i + batch_size]), prompts[i : i + batch_size], wrapped, self.processor
                )
                scores.append(s.clamp(min=0).cpu())
        return torch.cat(scores).numpy()

    def clip_score_metric(self):
        """A torchmetrics ``CLIPScore`` metric object that uses this judge."""
        from torchmetrics.multimodal.clip_score import CLIPScore

        return CLIPScore(model_name_or_path=lambda: (TensorFeatureCLIP(self.model), self.processor))


def bootstrap_interval(values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Mean and percentile-bootstrap interval of the mean of ``values`` (over prompts)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def load_judge(path: str = "builtin:shapes-judge") -> ShapesJudge:
    """Load the judge from a builtin name or a Hugging Face CLIP directory."""
    from sdwb.loading import load_judge as _load

    model, processor = _load(path)
    return ShapesJudge(model, processor, name=path)
