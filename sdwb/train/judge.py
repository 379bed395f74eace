"""Train `builtin:shapes-judge`: a transformers CLIPModel, contrastively, on the shapes domain.

Why: CLIP score and attribute accuracy need a referee independent of the model under test.
Two losses:
- in-batch contrastive with *soft* targets (captions in a batch often repeat an attribute
  combination, so every caption whose attributes match an image is a positive for it); this
  teaches all caption templates;
- cross-entropy of each image against the canonical captions of all 540 combinations, which is
  exactly the zero-shot classification the judge is used for. Without it, negatives that differ
  from an image in its shape alone are rare in a batch and shape accuracy stalls (first run:
  colour 100 %, position 100 %, shape 68 %).
Even with both, the vision tower never separated circles from squares (second run: shape 71 %;
a linear probe on its features read circle-vs-square at 55 %): the two differ only in their
corners, and a batch never isolates that difference. So a share of every batch is *minimal
pairs* (``minimal_pairs``): the same seed drawn once more with only the shape changed (same
jitter, colour, position, size and background), which makes shape the only thing that tells
the two images apart.
Images get light noise and blur so the judge also reads imperfect generations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdwb import shapes
from sdwb.tiny_arch import MAX_TOKENS, build_judge_processor, judge_config
from sdwb.tokenizer import save_tokenizer
from sdwb.train.common import Checkpointer, autocast, cosine_lr, run_loop, step_generator
from sdwb.train.config import BaselineTrainConfig

JUDGE_STREAM_OFFSET = 5_000_000  # the judge reads other train seeds than the diffusion model
JUDGE_EVAL_OFFSET = 500_000  # held-out judge images: eval-range seeds, not the eval prompts' ones


def images_to_judge_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]: what the judge's processor produces."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image random noise (std up to 0.1) and, for a third of the batch, a 3x3 blur."""
    b = pixels.shape[0]
    std = torch.rand(b, 1, 1, 1, generator=gen) * 0.1
    out = pixels + std * torch.randn(pixels.shape, generator=gen)
    blur = torch.rand(b, generator=gen) < 0.33
    if blur.any():
        out[blur] = F.avg_pool2d(out[blur], 3, stride=1, padding=1, count_include_pad=False)
    return out.clamp(-1, 1)


def attribute_keys(samples: list[shapes.ShapeSample]) -> torch.Tensor:
    """An integer id per attribute combination, to find the positives of each image."""
    combos = {tuple(c.values()): i for i, c in enumerate(shapes.all_attribute_combinations())}
    return torch.tensor([combos[tuple(s.attributes.values())] for s in samples])


def soft_contrastive_loss(logits_per_image: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where all captions with the image's attributes are positives."""
    positives = (keys[:, None] == keys[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i = -(targets * logits_per_image.float().log_softmax(dim=1)).sum(dim=1).mean()
    loss_t = -(targets * logits_per_image.float().T.log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def with_minimal_pairs(samples: list[shapes.ShapeSample], share: float) -> list[shapes.ShapeSample]:
    """Replace the last ``share`` of ``samples`` by shape-swapped twins of the first ones.

    Twin ``i`` copies sample ``i`` (seed included, so the render jitter is identical) with
    another shape, chosen from the seed: circle <-> square mostly, since those are the pair the
    judge confuses, and triangle otherwise.
    """
    from dataclasses import replace

    n = int(len(samples) * share / 2)
    out = list(samples)
    for i in range(n):
        s = samples[i]
        others = [x for x in shapes.SHAPES if x != s.shape]
        if s.shape != "triangle" and s.seed % 4:
            twin_shape = "square" if s.shape == "circle" else "circle"
        else:
            twin_shape = others[s.seed % len(others)]
        out[len(samples) - 1 - i] = replace(s, shape=twin_shape)
    return out


def _pad_to(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad token ids / masks to ``length`` columns with zeros (masked out; the text tower
    pools at the first end-of-text token, which stays in place)."""
    return F.pad(ids, (0, length - ids.shape[1]))


def train_judge(cfg: BaselineTrainConfig, out_dir: Path, work_dir: Path, accelerator, progress=True) -> dict:
    """Train the judge, save it in Hugging Face CLIP layout to ``out_dir``; returns its eval."""
    from transformers import CLIPConfig, CLIPModel

    jc = cfg.judge
    tokenizer = save_tokenizer(work_dir / "tokenizer", model_max_length=MAX_TOKENS)
    torch.manual_seed(cfg.seed + 1)
    model = CLIPModel(
        CLIPConfig(**judge_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=jc.lr, weight_decay=jc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    combos = shapes.all_attribute_combinations()
    canonical = tokenizer([shapes.caption_for(c, 0) for c in combos], padding=True, return_tensors="pt")
    canonical = canonical.to(accelerator.device)

    def step_fn(step: int) -> dict[str, float]:
        for g in optimizer.param_groups:
            g["lr"] = jc.lr * cosine_lr(step, jc.steps, jc.warmup)
        first = JUDGE_STREAM_OFFSET // jc.batch + step * world + rank
        base = shapes.TRAIN_SEED_BASE + first * jc.batch
        samples = [shapes.sample_from_seed(base + i) for i in range(jc.batch)]
        samples = with_minimal_pairs(samples, jc.minimal_pairs)  # the batch of shapes.train_batch(first)
        images = np.stack([s.render() for s in samples])
        captions = [s.caption for s in samples]
        gen = step_generator(cfg.seed, step, stream=rank)
        pixels = augment(images_to_judge_pixels(images), gen).to(accelerator.device)
        tokens = tokenizer(captions, padding=True, return_tensors="pt").to(accelerator.device)
        length = max(tokens.input_ids.shape[1], canonical.input_ids.shape[1])
        input_ids = torch.cat([_pad_to(tokens.input_ids, length), _pad_to(canonical.input_ids, length)])
        mask = torch.cat([_pad_to(tokens.attention_mask, length), _pad_to(canonical.attention_mask, length)])
        keys = attribute_keys(samples).to(accelerator.device)
        with autocast(accelerator.device, cfg.precision):
            out = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
        logits = out.logits_per_image.float()  # (B, B + 540): batch captions, then all combinations
        contrastive = soft_contrastive_loss(logits[:, : len(samples)], keys)
        classify = F.cross_entropy(logits[:, len(samples) :], keys)
        loss = contrastive + classify
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "classify": classify.item()}

    ckpt = Checkpointer(work_dir / "checkpoint", {"judge": accelerator.unwrap_model(model)}, optimizer)
    run_loop(
        name="judge",
        total_steps=jc.steps,
        step_fn=step_fn,
        checkpointer=ckpt,
        checkpoint_every=cfg.checkpoint_every,
        log_path=work_dir.parent / "train_log.jsonl",
        progress=progress,
    )
    model = accelerator.unwrap_model(model).cpu().float().eval()
    processor = build_judge_processor(tokenizer)
    result = evaluate_judge(model, processor, jc.eval_images)
    if accelerator.is_main_process:
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
    return result


def evaluate_judge(model, processor, count: int) -> dict:
    """Zero-shot colour/shape/position accuracy on ``count`` held-out data-set images."""
    from sdwb.judge import ShapesJudge

    samples = [shapes.sample_from_seed(shapes.EVAL_SEED_BASE + JUDGE_EVAL_OFFSET + i) for i in range(count)]
    judge = ShapesJudge(model, processor)
    preds = judge.classify([s.render() for s in samples], [s.attributes for s in samples])
    return {"images": count, **{f"{k}_acc": round(v, 4) for k, v in preds.accuracy().items()}}
