"""Text conditioning of a UNet call for any supported family, from caption token ids.

Why one place: training code (distillation, pruning's recovery fine-tuning and Taylor
importance) draws captions from latent pools as token ids of the pipeline's first tokenizer and
must condition the UNet exactly as the pipeline does at inference, or the student learns a
different task. SD 1.x / 2.x: the text encoder's last hidden state. SDXL
(``StableDiffusionXLPipeline.encode_prompt``): both encoders' penultimate hidden states
concatenated, the second encoder's projected pooled embedding as ``text_embeds`` and six
micro-conditioning numbers ``time_ids`` (original size, crop top-left, target size) in
``added_cond_kwargs``; with ``force_zeros_for_empty_prompt`` the empty caption (the
unconditional branch of classifier-free guidance) is all zeros, as the pipeline makes it.

A conditioning is a dict of UNet keyword arguments (``unet(sample, t, **conditioning)``);
:func:`cat`, :func:`expand` and :func:`to` work on it as on a tensor.
"""

from __future__ import annotations

import torch

# {"encoder_hidden_states": T} (+ SDXL: "added_cond_kwargs": {"text_embeds": T, "time_ids": T})
Conditioning = dict


def as_conditioning(value) -> Conditioning:
    """A conditioning dict from itself or a bare ``encoder_hidden_states`` tensor."""
    return value if isinstance(value, dict) else {"encoder_hidden_states": value}


def _map(cond: Conditioning, fn) -> Conditioning:
    out = {}
    for key, value in cond.items():
        out[key] = _map(value, fn) if isinstance(value, dict) else fn(value)
    return out


def to(cond, device) -> Conditioning:
    """The conditioning on ``device``."""
    return _map(as_conditioning(cond), lambda t: t.to(device))


def expand(cond, batch: int) -> Conditioning:
    """A one-row conditioning repeated to ``batch`` rows (a view, as ``expand``)."""
    return _map(as_conditioning(cond), lambda t: t.expand(batch, *t.shape[1:]))


def cat(first, second) -> Conditioning:
    """Row-wise concatenation ``[first; second]`` (the classifier-free-guidance batch)."""
    first, second = as_conditioning(first), as_conditioning(second)

    def join(a: dict, b: dict) -> dict:
        return {k: join(a[k], b[k]) if isinstance(a[k], dict) else torch.cat([a[k], b[k]]) for k in a}

    return join(first, second)


class TextConditioner:
    """``conditioner(ids)`` -> the UNet's conditioning for caption token ids of ``pipe.tokenizer``.

    Holds the pipeline's text encoder(s) (frozen, used under ``no_grad``); ``height``/``width``
    (default: the model's own size) set SDXL's ``time_ids``.
    """

    def __init__(self, pipe, height: int | None = None, width: int | None = None):
        self.text_encoder = pipe.text_encoder
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.sdxl = self.text_encoder_2 is not None
        self.tokenizer = pipe.tokenizer
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        self.empty_ids = self._tokenize(self.tokenizer, [""])[0]
        if self.sdxl:
            factor = getattr(pipe, "vae_scale_factor", 8)
            size = pipe.unet.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            h, w = height or size[0] * factor, width or size[1] * factor
            self.time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
            self.zero_empty = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
            self.same_vocab = (self.tokenizer_2.get_vocab() == self.tokenizer.get_vocab()
                               and self.tokenizer_2.model_max_length == self.tokenizer.model_max_length)

    @staticmethod
    def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def ids_for_second(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` as the second tokenizer makes them: same vocabulary -> only the padding after the
        first end-of-text differs (OpenCLIP pads with ``!``); else decoded and re-tokenized."""
        if not self.same_vocab:
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            return self._tokenize(self.tokenizer_2, texts)
        eos = self.tokenizer.eos_token_id
        out = ids.clone()
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        first_eos = torch.where(ids == eos, positions, ids.shape[1]).min(dim=1, keepdim=True).values
        out[positions > first_eos] = self.tokenizer_2.pad_token_id
        return out

    def to(self, device) -> TextConditioner:
        self.text_encoder.to(device)
        if self.text_encoder_2 is not None:
            self.text_encoder_2.to(device)
        return self

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> Conditioning:
        """The conditioning (fp32, on the text encoder's device) of a batch of token ids."""
        device = next(self.text_encoder.parameters()).device
        if not self.sdxl:
            return {"encoder_hidden_states": self.text_encoder(ids.to(device))[0].float()}
        first = self.text_encoder(ids.to(device), output_hidden_states=True)
        second = self.text_encoder_2(self.ids_for_second(ids).to(device), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).float()
        pooled = second.text_embeds.float()
        if self.zero_empty:  # the pipeline's unconditional branch is zeros, not the encoding of ""
            empty = (ids == self.empty_ids.to(ids.device)).all(dim=1).to(device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = self.time_ids.to(device).expand(len(ids), -1)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
