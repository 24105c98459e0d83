"""MgmProcessor: one PIL image + text -> the tensors MgmForConditionalGeneration reads.

- Images: both views from one image (low-res `image_size` for the ViT, high-res
  `image_size_aux` for the ConvNeXt): shortest side resized, centre crop, CLIP normalisation.
- Text: the Gemma chat template MGM-2B was trained with (MGM's `conv_gemma`)::

      <bos><start_of_turn>user\\n<image>\\n{question}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n

  `<image>` is expanded to `num_image_tokens` copies of the image token id, which the
  model overwrites with image features.
- Labels: -100 everywhere except answer tokens and the `<end_of_turn>` that closes them
  (the model learns to stop).

Used by training (`encode_conversation`, then a collator that only pads/stacks),
evaluation and inference (`encode_prompt`, `pad`, `batch_decode`, `stop_token_ids`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "mgm_processor.json"
ROLES = {"human": "user", "user": "user", "gpt": "model", "assistant": "model", "model": "model"}


class MgmProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_size: int, image_size_aux: int,
                 num_image_tokens: int, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)            # low-res side (model.config.image_size)
        self.image_size_aux = int(image_size_aux)    # high-res side (model.config.image_size_aux)
        self.num_image_tokens = int(num_image_tokens)
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            # e.g. Gemma's tokenizer: the placeholder id (len(vocab)) is never embedded by the model
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if self.end_of_turn_id is None or self.end_of_turn_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {END_OF_TURN} token: it cannot speak the Gemma chat template")

    @classmethod
    def for_model(cls, tokenizer, config, **kwargs) -> "MgmProcessor":
        """A processor matching an MgmConfig's image sizes and token count."""
        return cls(tokenizer, config.image_size, config.image_size_aux, config.num_image_tokens, **kwargs)

    # -- images -----------------------------------------------------------------------------
    def _view(self, image: Image.Image, side: int) -> torch.Tensor:
        """(3, side, side) float: shortest side -> `side` (bicubic), centre crop, normalise."""
        w, h = image.size
        scale = side / min(w, h)
        image = image.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(self.image_mean)[:, None, None]
        std = torch.tensor(self.image_std)[:, None, None]
        return (x - mean) / std

    def images(self, image: Image.Image | str | os.PathLike) -> dict[str, torch.Tensor]:
        """Both views of one image: pixel_values (3, S, S), pixel_values_aux (3, S', S')."""
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            with Image.open(image) as f:
                image = f.convert("RGB")
        return {"pixel_values": self._view(image, self.image_size),
                "pixel_values_aux": self._view(image, self.image_size_aux)}

    # -- text -------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        """Token ids of plain text; `<image>` becomes num_image_tokens image ids."""
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids += [self.image_token_id] * self.num_image_tokens
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def _turns(self, conversations: list[dict]) -> tuple[list[int], list[int]]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for n, turn in enumerate(conversations):
            role = ROLES.get(turn.get("from", turn.get("role")))
            if role is None:
                raise ValueError(f"turn {n}: unknown speaker {turn.get('from')!r} (use human/gpt)")
            head = self._ids(f"{START_OF_TURN}{role}\n")
            body = self._ids(str(turn.get("value", turn.get("content", ""))))
            end = [self.end_of_turn_id]
            nl = self._ids("\n")
            ids += head + body + end + nl
            if role == "model":  # answers and their closing <end_of_turn> are learned
                labels += [IGNORE_INDEX] * len(head) + body + end + [IGNORE_INDEX] * len(nl)
            else:
                labels += [IGNORE_INDEX] * (len(head) + len(body) + len(end) + len(nl))
        return ids, labels

    def encode_conversation(self, conversations: list[dict], image=None) -> dict[str, torch.Tensor]:
        """A LLaVA conversation (`[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]`)
        -> input_ids (T,), labels (T,), pixel_values (3, S, S), pixel_values_aux (3, S', S').

        With no image, the text must not contain `<image>` and the pixel tensors are absent.
        """
        n_image = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in conversations)
        if image is not None and n_image == 0:
            # LLaVA's convention: an image sample with no placeholder gets it before the first question
            conversations = [dict(conversations[0], value=f"{IMAGE_TOKEN}\n{conversations[0]['value']}")] + list(conversations[1:])
            n_image = 1
        if n_image != (1 if image is not None else 0):
            raise ValueError(f"conversation has {n_image} {IMAGE_TOKEN} tokens for {int(image is not None)} image")
        ids, labels = self._turns(conversations)
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if image is not None:
            out.update(self.images(image))
        return out

    def prompt_ids(self, question: str, with_image: bool = False) -> torch.Tensor:
        """A generation prompt (template up to `<start_of_turn>model\\n`) -> input_ids (T,);
        with_image puts `<image>` first unless the question places it."""
        value = f"{IMAGE_TOKEN}\n{question}" if with_image and IMAGE_TOKEN not in question else question
        ids, _ = self._turns([{"from": "human", "value": value}])
        return torch.tensor(ids + self._ids(f"{START_OF_TURN}model\n"))

    def encode_prompt(self, question: str, image=None) -> dict[str, torch.Tensor]:
        """prompt_ids + both views of `image`."""
        out = {"input_ids": self.prompt_ids(question, image is not None)}
        if image is not None:
            out.update(self.images(image))
        return out

    def pad(self, features: list[dict], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Stack encoded samples: ids padded with pad_token_id (left for generation, right for
        training), attention_mask (B, T), labels padded with -100, pixel tensors stacked."""
        T = max(len(f["input_ids"]) for f in features)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX)):
            if key not in features[0]:
                continue
            rows = []
            for f in features:
                x = f[key]
                gap = torch.full((T - len(x),), fill, dtype=x.dtype)
                rows.append(torch.cat([gap, x] if padding_side == "left" else [x, gap]))
            batch[key] = torch.stack(rows)
        mask = [torch.ones(len(f["input_ids"]), dtype=torch.long) for f in features]
        gaps = [torch.zeros(T - len(m), dtype=torch.long) for m in mask]
        batch["attention_mask"] = torch.stack([torch.cat([g, m] if padding_side == "left" else [m, g])
                                               for g, m in zip(gaps, mask)])
        for key in ("pixel_values", "pixel_values_aux"):
            if key in features[0]:
                batch[key] = torch.stack([f[key] for f in features])
        return batch

    # -- decoding ---------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """Generation ends at `<end_of_turn>` (or eos)."""
        return [i for i in (self.end_of_turn_id, self.tokenizer.eos_token_id) if i is not None]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if int(i) != self.image_token_id]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).strip()

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        """Decode generated ids (B, T_new) (pass only the new tokens: `out[:, prompt_len:]`)."""
        return [self.decode(s, skip_special_tokens) for s in sequences]

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"processor_class": "MgmProcessor", "image_size": self.image_size,
                "image_size_aux": self.image_size_aux, "num_image_tokens": self.num_image_tokens,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "max_length": None,  # kept in the file format; sequence limits live in training's dataset
                "image_token": IMAGE_TOKEN,
                "chat_template": "gemma"}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        (folder / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "MgmProcessor":
        folder = Path(folder)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no processor here (save one with MgmProcessor.save_pretrained)")
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(tokenizer, cfg["image_size"], cfg["image_size_aux"], cfg["num_image_tokens"],
                   cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD))
