"""MgmProcessor: one PIL image + text -> the tensors MgmForConditionalGeneration reads, as MGM makes them.

- Images (MGM's train.py LazySupervisedDataset and eval/model_vqa_loader.py): the image is made
  square (`image_aspect_ratio` "pad": mm_utils.expand2square, filled with the CLIP mean colour;
  "square"/"crop": CLIPImageProcessor's shortest-side resize + centre crop), processed by
  CLIPImageProcessor at the high-res side `image_size_aux` (bicubic, rescale, normalise); the
  low-res view is a bilinear downsample (align_corners=False, no antialias) of that
  *normalised* high-res tensor.
- Text: MGM's gemma template (conversation.py `conv_gemma`), each round closed by `<eos>`::

      <bos><start_of_turn>user\\n<image>\\n{question}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n<eos>

  `<image>` goes to the front of the first human turn that holds it (train.py
  preprocess_multimodal) and is expanded to `num_image_tokens` copies of the image token id,
  which the model overwrites with image features.
- Labels (train.py preprocess_gemma): -100 on `<bos>` and on each round's instruction (up to
  and including `<start_of_turn>model\\n`); everything else is learned: the answer,
  `<end_of_turn>`, the newline and the round's `<eos>`.

Used by training (`encode_conversation`, then a collator that only pads/stacks),
evaluation and inference (`encode_prompt`, `pad`, `batch_decode`, `stop_token_ids`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vlmlab.batching import IGNORE_INDEX
from vlmlab.batching import pad as pad_rows

IMAGE_TOKEN = "<image>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 1 / 255  # CLIPImageProcessor's rescale_factor
CONFIG_NAME = "mgm_processor.json"
ROLES = {"human": "user", "user": "user", "gpt": "model", "assistant": "model", "model": "model"}
ASPECT_RATIOS = ("pad", "square", "crop")  # as MgmConfig.image_aspect_ratio


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """The image centred on a square canvas of its longer side, the rest `fill`
    (MGM's mm_utils.expand2square: the offset rounds down)."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h),) * 2, fill)
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def clip_normalise(pixels: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) with CLIPImageProcessor's arithmetic:
    x * (1/255) in float64, cast to float32, then (x - mean) / std in float32."""
    x = (pixels * RESCALE).astype(np.float32)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def low_res_view(high: torch.Tensor, side: int) -> torch.Tensor:
    """(..., 3, S', S') normalised high-res -> (..., 3, side, side): MGM's bilinear downsample."""
    batched = high if high.dim() == 4 else high[None]
    low = F.interpolate(batched, size=(side, side), mode="bilinear", align_corners=False)
    return low if high.dim() == 4 else low[0]


class MgmProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_size: int, image_size_aux: int,
                 num_image_tokens: int, image_mean=CLIP_MEAN, image_std=CLIP_STD, image_aspect_ratio: str = "pad"):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)            # low-res side (model.config.image_size)
        self.image_size_aux = int(image_size_aux)    # high-res side (model.config.image_size_aux)
        self.num_image_tokens = int(num_image_tokens)
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        if image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio {image_aspect_ratio!r}: use one of {ASPECT_RATIOS}")
        self.image_aspect_ratio = image_aspect_ratio
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            # Gemma's tokenizer has none: the placeholder gets id len(vocab), outside the LM's
            # vocabulary (MGM uses -200), and the model never embeds it
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if self.end_of_turn_id is None or self.end_of_turn_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {END_OF_TURN} token: it cannot speak the Gemma chat template")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no <bos>/<eos>: MGM's gemma template needs both")

    @classmethod
    def for_model(cls, tokenizer, config, **kwargs) -> "MgmProcessor":
        """A processor matching an MgmConfig's image sizes, token count and aspect-ratio mode."""
        kwargs.setdefault("image_aspect_ratio", config.image_aspect_ratio)
        return cls(tokenizer, config.image_size, config.image_size_aux, config.num_image_tokens, **kwargs)

    # -- images -----------------------------------------------------------------------------
    def _high_res(self, image: Image.Image) -> torch.Tensor:
        """(3, S', S') float32, as CLIPImageProcessor.preprocess (transformers 4.x, PIL path) makes it
        with size = crop_size = image_size_aux: shortest side -> S' (PIL bicubic, long side
        truncated), centre crop, x * (1/255) in float64 then float32, (x - mean) / std in float32."""
        side = self.image_size_aux
        if self.image_aspect_ratio == "pad":
            image = expand_to_square(image, tuple(int(m * 255) for m in self.image_mean))
        w, h = image.size
        short, long = min(w, h), max(w, h)
        size = (side, int(side * long / short)) if w <= h else (int(side * long / short), side)
        if image.size != size:
            image = image.resize(size, Image.BICUBIC)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        pixels = np.asarray(image)[top:top + side, left:left + side]                # (S', S', 3) uint8
        return clip_normalise(pixels, self.image_mean, self.image_std)              # (3, S', S')

    def images(self, image: Image.Image | str | os.PathLike) -> dict[str, torch.Tensor]:
        """Both views of one image: pixel_values (3, S, S), pixel_values_aux (3, S', S')."""
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            with Image.open(image) as f:
                image = f.convert("RGB")
        high = self._high_res(image)
        return {"pixel_values": low_res_view(high, self.image_size), "pixel_values_aux": high}

    # -- text -------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        """Token ids of template text (no <bos>); `<image>` becomes num_image_tokens image ids
        (MGM's tokenizer_image_token: the text between placeholders is tokenized piece by piece)."""
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids += [self.image_token_id] * self.num_image_tokens
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    @staticmethod
    def _instruction(question: str) -> str:
        return f"{START_OF_TURN}user\n{question}{END_OF_TURN}\n{START_OF_TURN}model\n"

    def _rounds(self, conversations: list[dict]) -> list[tuple[str, str]]:
        """(question, answer) pairs; turns must alternate human/gpt (a leading gpt turn is
        dropped, as MGM's preprocess does)."""
        roles = []
        for n, turn in enumerate(conversations):
            role = ROLES.get(turn.get("from", turn.get("role")))
            if role is None:
                raise ValueError(f"turn {n}: unknown speaker {turn.get('from')!r} (use human/gpt)")
            roles.append(role)
        if roles and roles[0] == "model":
            conversations, roles = conversations[1:], roles[1:]
        if not conversations or len(conversations) % 2 or roles != ["user", "model"] * (len(roles) // 2):
            raise ValueError(f"turns must alternate human, gpt and end with an answer: got {roles}")
        text = [str(t.get("value", t.get("content", ""))) for t in conversations]
        return list(zip(text[0::2], text[1::2]))

    def _encode_rounds(self, rounds: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """ids and labels of MGM's gemma template: <bos>, then per round its tokens and <eos>;
        labels mask <bos> and each instruction (its length counted on its own, as preprocess_gemma does)."""
        ids, labels = [self.tokenizer.bos_token_id], [IGNORE_INDEX]
        for question, answer in rounds:
            instruction = self._instruction(question)
            round_ids = self._ids(f"{instruction}{answer}{END_OF_TURN}\n") + [self.tokenizer.eos_token_id]
            n_masked = len(self._ids(instruction))
            ids += round_ids
            labels += [IGNORE_INDEX] * n_masked + round_ids[n_masked:]
        return ids, labels

    @staticmethod
    def _image_first(value: str) -> str:
        """MGM's preprocess_multimodal: the placeholder taken out and put first, then a newline."""
        return f"{IMAGE_TOKEN}\n{value.replace(IMAGE_TOKEN, '').strip()}".strip()

    def encode_conversation(self, conversations: list[dict], image=None) -> dict[str, torch.Tensor]:
        """A LLaVA conversation (`[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]`)
        -> input_ids (T,), labels (T,), pixel_values (3, S, S), pixel_values_aux (3, S', S').

        With no image, the text must not contain `<image>` and the pixel tensors are absent.
        """
        n_image = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in conversations)
        if n_image > 1 or (n_image and image is None):
            raise ValueError(f"conversation has {n_image} {IMAGE_TOKEN} tokens for {int(image is not None)} image")
        rounds = self._rounds(conversations)
        if image is not None:
            # the turn holding the placeholder gets it first; with none, the first question does
            # (LLaVA's convention; MGM would train such a sample without its image)
            at = next((i for i, (q, _) in enumerate(rounds) if IMAGE_TOKEN in q), 0)
            rounds[at] = (self._image_first(rounds[at][0]), rounds[at][1])
            if IMAGE_TOKEN in "".join(a for _, a in rounds):
                raise ValueError(f"{IMAGE_TOKEN} in an answer: it belongs to a question")
        ids, labels = self._encode_rounds(rounds)
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if image is not None:
            out.update(self.images(image))
        return out

    def prompt_ids(self, question: str, with_image: bool = False) -> torch.Tensor:
        """A generation prompt, `<bos>` + the instruction up to `<start_of_turn>model\\n` -> input_ids (T,)
        (MGM's model_vqa_loader); with_image puts `<image>\\n` before the question."""
        if with_image:
            question = self._image_first(question) if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"
        return torch.tensor([self.tokenizer.bos_token_id] + self._ids(self._instruction(question)))

    def encode_prompt(self, question: str, image=None) -> dict[str, torch.Tensor]:
        """prompt_ids + both views of `image`."""
        out = {"input_ids": self.prompt_ids(question, image is not None)}
        if image is not None:
            out.update(self.images(image))
        return out

    def pad(self, features: list[dict], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Stack encoded samples: ids padded with pad_token_id (left for generation, right for
        training), attention_mask (B, T), labels padded with -100, pixel tensors stacked."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch: dict[str, torch.Tensor] = {}
        batch["input_ids"], batch["attention_mask"] = pad_rows([f["input_ids"] for f in features], pad_id, padding_side)
        if "labels" in features[0]:
            batch["labels"], _ = pad_rows([f["labels"] for f in features], IGNORE_INDEX, padding_side)
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
                "image_token": IMAGE_TOKEN, "image_aspect_ratio": self.image_aspect_ratio,
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
        # the model's config decides the aspect-ratio mode where it sits beside the processor
        model_cfg = folder / "config.json"
        mode = cfg.get("image_aspect_ratio", "square")  # MGM: absent means resize + crop
        if model_cfg.is_file():
            mode = json.loads(model_cfg.read_text(encoding="utf-8")).get("image_aspect_ratio", mode)
        return cls(tokenizer, cfg["image_size"], cfg["image_size_aux"], cfg["num_image_tokens"],
                   cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD), mode)
