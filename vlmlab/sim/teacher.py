"""The teacher captioner: a tiny BLIP-2 (transformers' own `Blip2ForConditionalGeneration`) for the tiny world.

It stands in for Salesforce/blip2-opt-2.7b and is saved as the same kind of folder (model + `Blip2Processor`),
so Data-Juicer's `image_captioning_mapper` loads it unchanged. Two constraints come from that op:
- it generates with `max_new_tokens=128, do_sample=True` and a batch runs until its longest sample
  stops, so the teacher must be small, fast and reliably emit EOS (`</s>`), and the LM needs
  `num_query_tokens + 1 + 128` positions;
- it forces `image_token_index = 50265`, so the vocabulary keeps OPT's layout (see tokenizer.py).
The cost that dominates is OPT's 50272-row LM head, not the towers: keep `hidden` small.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    GenerationConfig,
    OPTConfig,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from vlmlab.batching import IGNORE_INDEX, pad
from vlmlab.sim import loop as sim_loop
from vlmlab.sim import labels
from vlmlab.sim.teacher_tokenizer import IMAGE_TOKEN_ID, LM_VOCAB_SIZE, build_tokenizer, first_filler_id
from vlmlab.synth import teacher_generate
from vlmlab.synth.captioner import MAX_NEW_TOKENS


ENCODER_HELDOUT = 500  # labelled scenes the encoders' accuracies are measured on


@dataclass(kw_only=True)
class TeacherConfig:
    image_size: int = 96  # px; the world's stored size, so the sign word stays legible
    patch_size: int = 16  # 96/16 -> 36 patches
    vision_hidden: int = 96  # ViT width
    vision_layers: int = 2
    qformer_hidden: int = 64
    qformer_layers: int = 1
    num_query_tokens: int = 8  # image slots in the LM prompt (blip2-opt-2.7b: 32)
    hidden: int = 64  # OPT width; the 50272 x hidden LM head dominates generation time
    layers: int = 2  # OPT decoder layers
    heads: int = 2
    # encoder pretraining (pretrain_encoders): labelled scenes, steps of batch 64 per part, AdamW peak lr
    encoder_images: int  # params.yaml; 0: no pretraining, everything learns from captions
    encoder_steps: int = 400
    encoder_lr: float = 3e-3
    # caption training
    epochs: int  # params.yaml teacher.epochs (defaults live in params.yaml only)
    batch_size: int = 16
    lr: float = 2e-3
    warmup_frac: float = 0.05
    max_words: int  # captions longer than this (in tokens) are cut for training (teacher.max_words)
    # generation defaults saved into generation_config.json (Data-Juicer only forces do_sample/max_new_tokens)
    temperature: float = 0.7  # < 1: sampled captions stay close to the mode, still differ
    top_k: int = 20

    @property
    def max_positions(self) -> int:
        return self.num_query_tokens + 1 + MAX_NEW_TOKENS  # image slots + BOS + what DJ may generate


def build_teacher(cfg: TeacherConfig, words: list[str]) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A randomly initialised tiny BLIP-2 and its processor over `words`."""
    tokenizer = build_tokenizer(words)
    image_processor = BlipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=cfg.num_query_tokens)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID, "Blip2Processor must add <image> at 50265"

    vision = Blip2VisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        initializer_range=0.02,  # the 2.7b default (1e-10) is for loading weights, not training from scratch
    )
    qformer = Blip2QFormerConfig(
        hidden_size=cfg.qformer_hidden, intermediate_size=4 * cfg.qformer_hidden, num_hidden_layers=cfg.qformer_layers,
        num_attention_heads=cfg.heads, cross_attention_frequency=1, encoder_hidden_size=cfg.vision_hidden,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    text = OPTConfig(
        vocab_size=LM_VOCAB_SIZE, hidden_size=cfg.hidden, word_embed_proj_dim=cfg.hidden, ffn_dim=4 * cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=cfg.num_query_tokens, image_token_index=IMAGE_TOKEN_ID,
    )
    model = Blip2ForConditionalGeneration(config)
    # transformers zero-inits the queries (they are meant to be loaded); identical queries get identical
    # gradients and never split, so the LM would see one image token Q times. LAVIS inits them N(0, 0.02).
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    for part in (model.vision_model, model.qformer, model.language_projection, model.language_model.model.decoder.layers):
        _lecun_init(part)
    emb = model.vision_model.embeddings  # positions on the scale of the patch features, or "left" is invisible
    torch.nn.init.normal_(emb.position_embedding, std=1.0)
    torch.nn.init.normal_(emb.class_embedding, std=1.0)
    model.generation_config = GenerationConfig(
        do_sample=True, bos_token_id=2, eos_token_id=2, pad_token_id=1, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=1.0, max_new_tokens=MAX_NEW_TOKENS,
        # never generated: <s>, <pad>, <unk>, the fillers, <image> and OPT's unused rows. Listing them lets
        # teacher_generate.py skip those LM-head rows and still sample what transformers' generate samples.
        suppress_tokens=[0, 1, 3] + list(range(first_filler_id(tokenizer), LM_VOCAB_SIZE)),
    )
    return model, processor


def encoder_parameters(model) -> list[torch.nn.Parameter]:
    """The image side before the LM: vision tower, Q-Former and its queries (BLIP-2's frozen + stage-1 parts)."""
    return [*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens]


def query_output(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The Q-Former's output (B, Q, qformer_hidden): what `language_projection` maps into the LM."""
    return model.get_image_features(pixel_values, return_dict=True).qformer_outputs.last_hidden_state


def qformer_output(model, image_embeds: torch.Tensor) -> torch.Tensor:
    """`query_output` from the vision tower's output (its last_hidden_state), as get_image_features runs it:
    a frozen tower's output is computed once, not once per step (equal, tested)."""
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    return model.qformer(query_embeds=model.query_tokens.expand(image_embeds.shape[0], -1, -1),
                         encoder_hidden_states=image_embeds, encoder_attention_mask=mask).last_hidden_state


class _LabelHeads(torch.nn.Module):
    """One linear head per scene label on flattened features (B, N, C): the tiny world's stand-in for the
    image-text objectives the real encoders learnt from."""

    def __init__(self, width: int, targets: dict[str, int]):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in targets.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.norm(features.flatten(1))
        return {k: head(f) for k, head in self.heads.items()}


def pretrain_encoders(model, processor, cfg: TeacherConfig, seed: int, render_size: int) -> dict:
    """Pretrain the image side on labelled scenes, then freeze it; returns held-out accuracies and time.

    blip2-opt-2.7b captions through encoders that learnt before its language side did and stay frozen
    while it does: EVA-CLIP's ViT-g, then the Q-Former's stage 1 (image-text objectives against the frozen
    ViT). The tiny teacher does the same on the scene labels the zoo's towers learn from (word, count,
    sign side, each column's shape / colour / size): first the vision tower through all its output tokens,
    then, with the tower frozen, the Q-Former through its query outputs. Its caption training then moves
    only the projection and OPT. Measured in throwaway runs not kept in bench/ (issue #10, one seed each unless
    said; greedy captions of the 200 caption-eval scenes; the stage's own figures: metrics/teacher.json): with
    everything trained on captions the teacher names the sign's true word at chance (0.04); with a
    pretrained frozen tower and a Q-Former trained on captions, 0.03-0.09 (two seeds): caption training
    never made the Q-Former carry the word (a linear probe on its output: 0.34-0.53), and one pretrained on
    the labels forgot it again (0.03). Frozen after its own pretraining it carries the word (probe
    0.97-0.98) and the captions name it: 0.925-0.99 on seeds 0-2. Training the Q-Former and the tower
    together on the labels from scratch failed (word at chance): the tower learns through its own tokens first.
    """
    t0 = time.perf_counter()
    targets = labels.tower_targets()
    n = cfg.encoder_images
    images, y = labels.labelled_scenes(n + ENCODER_HELDOUT, seed, cfg.image_size, render_size)
    x = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    y = {k: torch.from_numpy(v) for k, v in y.items()}
    vision = model.vision_model

    def fit(encode, module: torch.nn.Module, width: int, offset: int, desc: str) -> dict[str, float]:
        head = _LabelHeads(width, targets)
        parts = torch.nn.ModuleDict({"encoder": module, "head": head})
        loss = lambda idx: sum(F.cross_entropy(out, y[k][idx]) for k, out in head(encode(idx)).items())  # noqa: E731
        g = torch.Generator().manual_seed(seed + offset)
        parts.train()
        sim_loop.train([p for p in parts.parameters() if p.requires_grad], loss, sim_loop.step_batches(n, 64, cfg.encoder_steps, g),
                       sim_loop.warmup_cosine_to_floor(cfg.encoder_steps), cfg.encoder_lr, "teacher: " + desc, cfg.encoder_steps)
        parts.eval()
        module.requires_grad_(False)
        with torch.no_grad():
            held = head(encode(torch.arange(n, len(x))))
        return {k: round(float((out.argmax(-1) == y[k][n:]).float().mean()), 4) for k, out in held.items()}

    vision_acc = fit(lambda idx: vision(pixel_values=x[idx]).last_hidden_state, vision,
                     vision.config.hidden_size * (vision.embeddings.num_patches + 1), 0, "vision tower")
    with torch.no_grad():  # frozen from here: its output once per scene
        embeds = torch.cat([vision(pixel_values=x[i:i + 256]).last_hidden_state for i in range(0, len(x), 256)])
    qformer = torch.nn.ModuleDict({"qformer": model.qformer, "queries": torch.nn.ParameterList([model.query_tokens])})
    qformer_acc = fit(lambda idx: qformer_output(model, embeds[idx]), qformer, cfg.qformer_hidden * cfg.num_query_tokens, 1, "Q-Former")
    return {"vision": vision_acc, "qformer": qformer_acc, "images": n, "heldout_images": ENCODER_HELDOUT,
            "pretrain_s": round(time.perf_counter() - t0, 1)}


def _lecun_init(module: torch.nn.Module) -> None:
    """N(0, 1/fan_in) weights for the towers trained from scratch.

    transformers' N(0, 0.02) suits 768+-wide layers (0.02 ~ 1/sqrt(2500)); at width 32-96 each layer
    shrinks its input ~5x: the Q-Former's cross-attention (the only way pixels reach the LM) ends up
    ~1000x smaller than the query residual, and the LM's attention stays uniform, so it learns the
    caption prior and never looks at the image tokens (measured: held-out loss equal with shuffled images).
    """
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = m.weight[0].numel()
            torch.nn.init.normal_(m.weight, std=fan_in ** -0.5)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def encode_captions(processor: Blip2Processor, captions: list[str], max_words: int) -> dict:
    """Text half of a training batch: `<image>` x Q, `</s>`, caption, `</s>`; loss only on caption + EOS."""
    tok = processor.tokenizer
    ids = [tok(c, add_special_tokens=False)["input_ids"][:max_words] for c in captions]
    q = processor.num_query_tokens
    seqs = [[IMAGE_TOKEN_ID] * q + [tok.bos_token_id] + s + [tok.eos_token_id] for s in ids]
    input_ids, attention_mask = pad(seqs, tok.pad_token_id)  # (B, T)
    labels = input_ids.clone()
    labels[:, : q + 1] = IGNORE_INDEX  # image slots and BOS are given, not predicted
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def allowed_token_ids(model) -> torch.Tensor:
    """Ids the teacher may emit: every id not in `generation_config.suppress_tokens` (words, `</s>`)."""
    allowed = torch.ones(model.config.text_config.vocab_size, dtype=torch.bool)
    allowed[torch.tensor(model.generation_config.suppress_tokens or [], dtype=torch.long)] = False
    return allowed.nonzero().squeeze(1)


def caption_loss(model, batch: dict, allowed_ids: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """`Blip2ForConditionalGeneration.forward(...).loss`, with the softmax over `allowed_ids` only.

    Why not just call forward: its logits span all 50272 OPT rows, ~50k of them suppressed fillers, and
    that softmax costs ~100x the rest of this tiny model. Over the allowed rows the loss is the
    cross-entropy of exactly the distribution generation samples from. `rows` (len(allowed_ids), H)
    stand in for those rows of the tied embedding / LM head during training, so the optimizer never
    touches the 50k filler rows. With `allowed_ids=None` it equals forward's loss (tested).
    """
    lm = model.language_model
    full = lm.get_input_embeddings().weight  # (V, H), tied with the LM head
    ids, labels = batch["input_ids"], batch["labels"]
    if allowed_ids is None:
        table = full
    else:
        remap = torch.full((full.shape[0],), IGNORE_INDEX, dtype=torch.long)
        remap[allowed_ids] = torch.arange(len(allowed_ids))
        table = rows if rows is not None else full[allowed_ids]  # (V', H)
        labels = torch.where(labels >= 0, remap[labels.clamp(min=0)], labels)
        ids = remap[ids].clamp(min=0)  # image slots and padding: overwritten below / masked out
    if "query_output" in batch:  # frozen encoders: their output, computed once per image (train_teacher)
        features = model.language_projection(batch["query_output"])
    else:
        features = model.get_image_features(batch["pixel_values"], return_dict=True).pooler_output  # (B, Q, H)
    embeds = torch.nn.functional.embedding(ids, table)  # (B, T, H)
    slots = (batch["input_ids"] == model.config.image_token_index).unsqueeze(-1)
    embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
    hidden = lm.model.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                              return_dict=True).last_hidden_state  # (B, T, H)
    logits = hidden[:, :-1] @ table.T  # (B, T-1, V'): position t predicts token t+1
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def train_teacher(model, processor, images: list[Image.Image], captions: list[str], cfg: TeacherConfig,
                  seed: int) -> dict:
    """AdamW with warmup + cosine decay over `cfg.epochs` passes; returns loss curve and timing."""
    g = torch.Generator().manual_seed(seed)
    pixel_cache = processor.image_processor(images, return_tensors="pt")["pixel_values"]  # (N, 3, H, W), once
    total = math.ceil(len(captions) / cfg.batch_size) * cfg.epochs
    allowed_ids = allowed_token_ids(model)
    full = model.language_model.get_input_embeddings().weight
    rows = torch.nn.Parameter(full.detach()[allowed_ids].clone())  # the only embedding rows worth updating
    params = [p for p in model.parameters() if p is not full and p.requires_grad] + [rows]
    query_cache = None
    if not any(p.requires_grad for p in encoder_parameters(model)):  # the same output every epoch: once per image
        with torch.no_grad():
            query_cache = torch.cat([query_output(model, pixel_cache[i:i + 256]) for i in range(0, len(pixel_cache), 256)])

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        batch = encode_captions(processor, [captions[i] for i in idx.tolist()], cfg.max_words)
        if query_cache is None:
            batch["pixel_values"] = pixel_cache[idx]
        else:
            batch["query_output"] = query_cache[idx]
        return caption_loss(model, batch, allowed_ids, rows)

    model.train()
    t0 = time.perf_counter()
    losses = sim_loop.train(params, loss_fn, sim_loop.epoch_batches(len(captions), cfg.batch_size, cfg.epochs, g),
                            sim_loop.warmup_times_cosine(total, cfg.warmup_frac), cfg.lr, "teacher", total)
    with torch.no_grad():
        full[allowed_ids] = rows  # back into the tied embedding / LM head
    model.eval()
    return {"steps": len(losses), "loss_first": losses[0], "loss_last": sum(losses[-20:]) / len(losses[-20:]),
            "train_s": round(time.perf_counter() - t0, 1), "losses": losses}


def save_teacher(model, processor, out: str | Path) -> None:
    """A normal HF folder (model, processor, generation config) plus `custom_generate/generate.py`."""
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "custom_generate").mkdir(exist_ok=True)
    (out / "custom_generate" / "generate.py").write_text(
        Path(teacher_generate.__file__).read_text(encoding="utf-8"), encoding="utf-8")
