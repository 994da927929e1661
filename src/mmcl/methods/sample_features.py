"""Per-sample features for methods that route or select by what a sample looks like (HiDe-LLaVA's anchors,
ModalPrompt's prototypes, DISCO's task prototypes, SMoLoRA's instruction gate).

The papers use CLIP image and CLIP text features or a sentence encoder. A LLaVA-style backbone carries only
its vision tower, and nothing can be downloaded, so by default the features come from the backbone itself:

- **image**: the mean over every token of the vision encoder's last hidden state, before the projector
  (``get_image_features`` of LLaVA, Qwen2-VL and Idefics3 all return it). LoRA's default targets leave the
  vision encoder frozen, so the feature of a sample does not drift while tasks are learned. A sample
  without an image gets a zero vector.
- **text**: the mean of the backbone's input embeddings over the tokens of the instruction (the final
  user turn without image placeholders, tokenised without a chat template). Input embeddings are not a LoRA
  target, so this feature is fixed too.

``text_encoder: PATH`` (a local transformers checkpoint, e.g. a saved sentence encoder) replaces the text
feature by the mean of that model's last hidden state over the instruction's tokens, the exact kind of
feature the papers use. Features are computed one sample at a time, so a sample's feature never depends on
the batch it arrives in (padding, tiling of other images).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mmcl.backbones.backbone import Backbone, _hf_model
from mmcl.data.sample import IMAGE_PLACEHOLDER, Sample
from mmcl.errors import ConfigError

IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")


def instruction_text(sample: Sample) -> str:
    """The final user turn without ``<image>`` placeholders, whitespace collapsed."""
    return " ".join(sample.prompt.replace(IMAGE_PLACEHOLDER, " ").split())


def _image_model(backbone: Backbone) -> torch.nn.Module:
    """The transformers model whose ``get_image_features`` takes the processor's image tensors."""
    model = _hf_model(backbone.model)
    inner = getattr(model, "model", model)
    return inner if hasattr(inner, "get_image_features") else model


def vision_width(backbone: Backbone) -> int:
    """The width of :func:`image_features`: the vision encoder's hidden size."""
    model = _image_model(backbone)
    vision_config = getattr(model.config, "vision_config", None)
    # Qwen2-VL's ``hidden_size`` is its merger's output width; ``embed_dim`` is the encoder's own
    width = getattr(vision_config, "embed_dim", None) or getattr(vision_config, "hidden_size", None)
    if not isinstance(width, int):
        raise ConfigError(f"model {type(model).__name__}: its config names no vision hidden size")
    return width


@torch.no_grad()
def image_features(backbone: Backbone, samples: Sequence[Sample]) -> torch.Tensor:
    """``(len(samples), vision width)`` float32 on CPU: the mean of the vision encoder's last hidden state
    over all tokens of all of a sample's images (zeros for a sample without images)."""
    model = _image_model(backbone)
    width = vision_width(backbone)
    rows = []
    for sample in samples:
        if not sample.images:
            rows.append(torch.zeros(width))
            continue
        batch = backbone.prompt_batch([sample])
        inputs = {key: batch[key] for key in IMAGE_INPUT_KEYS if key in batch}
        output = model.get_image_features(**inputs)
        hidden = output.last_hidden_state
        rows.append(hidden.reshape(-1, hidden.shape[-1]).float().mean(dim=0).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, width)


class TextFeatures:
    """Instruction features: the backbone's mean input embedding, or a local encoder's mean last hidden
    state when ``encoder_path`` is given (loaded once, on the backbone's device)."""

    def __init__(self, encoder_path: str | None = None):
        """A missing ``encoder_path`` folder is refused here, when the method is built (before a run dir is
        touched), not when the first feature is needed."""
        self.encoder_path = encoder_path
        self._encoder: tuple[torch.nn.Module, object] | None = None
        if encoder_path and not Path(str(encoder_path)).expanduser().is_dir():
            raise ConfigError(f"method.options.text_encoder: {encoder_path} is not a directory holding a "
                              "transformers checkpoint")

    def _load_encoder(self, device: torch.device) -> tuple[torch.nn.Module, object]:
        if self._encoder is None:
            from transformers import AutoModel, AutoTokenizer

            path = Path(str(self.encoder_path)).expanduser()
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                encoder = AutoModel.from_pretrained(path).to(device).eval()
            except (OSError, ValueError) as error:
                raise ConfigError(f"method.options.text_encoder: cannot load {path}: {str(error).splitlines()[0]}") from None
            self._encoder = (encoder, tokenizer)
        return self._encoder

    @torch.no_grad()
    def __call__(self, backbone: Backbone, samples: Sequence[Sample]) -> torch.Tensor:
        """``(len(samples), width)`` float32 on CPU, one instruction at a time."""
        if self.encoder_path:
            encoder, tokenizer = self._load_encoder(backbone.device)
        else:
            encoder, tokenizer = None, backbone.tokenizer
        embeddings = _hf_model(backbone.model).get_input_embeddings()
        rows = []
        for sample in samples:
            ids = tokenizer(instruction_text(sample) or " ", add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids.to(backbone.device)
            if encoder is None:
                hidden = embeddings(ids)[0]
            else:
                hidden = encoder(input_ids=ids).last_hidden_state[0]
            rows.append(hidden.float().mean(dim=0).cpu())
        return torch.stack(rows)


def cosine_to(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` cosine similarities of each row of ``features`` to each row of ``prototypes``."""
    return torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(prototypes, dim=-1).T
