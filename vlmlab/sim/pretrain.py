"""The tiny world's pretrained components, and their assembly into a base MGM.

Real MGM starts from pretrained parts (Gemma-2B, CLIP, ConvNeXt); the tiny world has none,
so the `zoo` stage makes them here, each on the task its real counterpart learnt from:
  - a word-level tokenizer on world text;
  - the LM on world text (next-token prediction), scored by held-out perplexity;
  - the ViT (low-res) and ConvNeXt (high-res) on scene labels (sign word, main object's
    shape/colour/size/column, object count, sign side), scored by held-out accuracy vs. chance.
Each tower is trained through exactly the features MGM reads from it (ViT: patch tokens of
the select layer; ConvNeXt: every stage), so what it learns is what the MGM uses.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from vlmlab.batching import IGNORE_INDEX, pad
from vlmlab.io import fail
from vlmlab.models import presets
from vlmlab.models.local import param_counts
from vlmlab.models.mgm import MgmConfig, MgmForConditionalGeneration, aten_gelu
from vlmlab.models.processor import MgmProcessor, clip_normalise, low_res_view
from vlmlab.sim import text, world
from vlmlab.sim.labels import labelled_scenes, tower_targets
from vlmlab.sim import loop as sim_loop
from vlmlab.sim.lm_tokenizer import train_world_tokenizer


@dataclass
class LoopConfig:
    steps: int = 300            # optimizer steps
    batch_size: int = 64
    lr: float = 3e-3            # AdamW peak; linear warmup (5%) then cosine to 10%
    weight_decay: float = 0.01
    seed: int = 0


def train_loop(module: nn.Module, loss_fn, n_items: int, loop: LoopConfig, desc: str) -> list[float]:
    """Minibatch AdamW over item indices [0, n_items); loss_fn(index tensor) -> scalar loss."""
    g = torch.Generator().manual_seed(loop.seed)
    module.train()
    losses = sim_loop.train([p for p in module.parameters() if p.requires_grad], loss_fn,
                            sim_loop.step_batches(n_items, loop.batch_size, loop.steps, g),
                            sim_loop.warmup_cosine_to_floor(loop.steps), loop.lr, desc, loop.steps, loop.weight_decay)
    module.eval()
    return losses


# -- language model ------------------------------------------------------------------------
def encode_texts(tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    """(n, max_len) ids: <bos> text <eos>, right-padded with pad (-> -100 in the labels)."""
    rows = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"][: max_len - 2]
            + [tokenizer.eos_token_id] for t in texts]
    return pad(rows, tokenizer.pad_token_id, length=max_len)[0]


def _lm_batch(ids: torch.Tensor, pad_id: int) -> dict:
    T = int((ids != pad_id).sum(1).max())  # trim the common padding
    ids = ids[:, :T]
    mask = (ids != pad_id).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def answer_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, T) bool: the tokens of each model turn (after `<start_of_turn>model\n`, through its `<end_of_turn>`)."""
    sot, model, nl, eot = tokenizer.convert_tokens_to_ids([text.START_OF_TURN, "model", "\n", text.END_OF_TURN])
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    opens = torch.zeros_like(ids, dtype=torch.bool)
    opens[:, 3:] = (ids[:, :-3] == sot) & (ids[:, 1:-2] == model) & (ids[:, 2:-1] == nl)
    closed = torch.zeros_like(ids, dtype=torch.bool)
    closed[:, 1:] = ids[:, :-1] == eot          # an <end_of_turn> ends its turn after itself
    last_open = torch.where(opens, pos, -1).cummax(1).values
    last_close = torch.where(closed, pos, -1).cummax(1).values
    return (last_open >= 0) & (last_open > last_close)


def _weighted_lm_loss(model, batch: dict, weight: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with a weight per target token (weight (B, T) of the batch's ids)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE_INDEX, reduction="none")
    w = weight[:, 1:] * (tgt != IGNORE_INDEX)
    return (ce * w).sum() / w.sum()


def pretrain_lm(text_config, tokenizer, train_texts: list[str], val_texts: list[str], loop: LoopConfig,
                max_len: int = 128, answer_weight: float = 1.0):
    """A causal LM trained from scratch on world text. Returns (model, metrics).

    answer_weight: loss weight of the model turns' tokens (the answers; the rest weigh 1), so that
    the few tokens read from the context are not drowned by the many description tokens no context
    predicts (final_train_loss is this weighted loss; heldout_ppl is unweighted)."""
    torch.manual_seed(loop.seed)
    model = aten_gelu(AutoModelForCausalLM.from_config(text_config))
    pad = tokenizer.pad_token_id
    train, val = encode_texts(tokenizer, train_texts, max_len), encode_texts(tokenizer, val_texts, max_len)
    weight = 1.0 + (answer_weight - 1.0) * answer_mask(train, tokenizer).float()

    def loss_fn(idx):
        batch = _lm_batch(train[idx], pad)
        return _weighted_lm_loss(model, batch, weight[idx][:, :batch["input_ids"].shape[1]])
    losses = train_loop(model, loss_fn, len(train), loop, "zoo: LM")
    # held-out perplexity (token-weighted) vs. the unigram model of the training text
    nll, n_tok = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), 256):
            b = _lm_batch(val[i:i + 256], pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            tgt = b["labels"][:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum"))
            n_tok += int((tgt != IGNORE_INDEX).sum())
    counts = torch.bincount(train[:, 1:][train[:, 1:] != pad], minlength=len(tokenizer)).float() + 1.0
    logp = np.log(counts.double().numpy() / float(counts.sum()))  # numpy, not torch.log (MKL VML: vlmlab/determinism.py)
    val_tgt = val[:, 1:][val[:, 1:] != pad].numpy()
    return model, {
        "heldout_ppl": round(math.exp(nll / n_tok), 3),
        **context_answer_accuracy(model, tokenizer, val_texts),
        "unigram_ppl": round(math.exp(-float(logp[val_tgt].mean())), 3),
        "final_train_loss": round(float(np.mean(losses[-20:])), 4),
        "train_texts": len(train_texts), "heldout_texts": len(val_texts),
        "params": sum(p.numel() for p in model.parameters()),
    }


def context_answer_accuracy(model, tokenizer, texts: list[str]) -> dict[str, float]:
    """Share of the held-out short-answer chat rounds (a scene described in the question) whose answer
    word is the LM's greedy next token after `<start_of_turn>model\\n`: what an instruction-tuned LM
    brings to a VLM, reading its answer from context (stage 1 teaches the image tokens to be that context).
    `question_only_acc` asks the same rounds without the scene's description: the language prior,
    what a VLM that does not read its image tokens scores."""
    user, turn = f"{text.START_OF_TURN}user\n", f"{text.START_OF_TURN}model\n"
    rounds = [t.split(turn) for t in texts if t.startswith(text.START_OF_TURN) and text.SHORT_ANSWER in t]
    if not rounds:
        return {"context_answer_acc": float("nan"), "question_only_acc": float("nan")}
    hits = {"context_answer_acc": 0, "question_only_acc": 0}
    with torch.no_grad():
        for q, a in rounds:
            answer = tokenizer(a.split(text.END_OF_TURN)[0], add_special_tokens=False)["input_ids"][0]
            blind = user + q.removeprefix(user).split("\n", 1)[1]  # the description is the question's first line
            for key, prompt in (("context_answer_acc", q), ("question_only_acc", blind)):
                ids = [tokenizer.bos_token_id] + tokenizer(prompt + turn, add_special_tokens=False)["input_ids"]
                hits[key] += int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == answer
    return {k: round(v / len(rounds), 4) for k, v in hits.items()}


# -- vision towers -------------------------------------------------------------------------
def normalise(images: np.ndarray, side: int | None = None, chunk: int = 512) -> torch.Tensor:
    """uint8 (n, S', S', 3) -> float (n, 3, side, side) as MgmProcessor makes a square image's views:
    CLIP-normalised, then (side < S': the low-res view) bilinearly downsampled from the normalised image."""
    parts = []
    for i in range(0, len(images), chunk):  # chunks: the full-size float copy of 8k images is ~1 GB
        x = clip_normalise(images[i:i + chunk])
        parts.append(x if side is None or side == x.shape[-1] else low_res_view(x, side))
    return torch.cat(parts)


class TowerClassifier(nn.Module):
    """A tower plus one linear head per scene label, read from the features MGM uses."""

    def __init__(self, tower_config, num_classes: dict[str, int], mgm: MgmConfig):
        super().__init__()
        self.kind = tower_config.model_type
        self.tower = AutoModel.from_config(tower_config)
        self.select_layer = mgm.mm_vision_select_layer
        if self.kind == "convnext":
            self.tower.layernorm = nn.Identity()  # as in the MGM (see mgm.py)
            side = mgm.aux_grid // 2 ** (len(tower_config.hidden_sizes) - 1)
            d = tower_config.hidden_sizes[-1] * side * side + mgm.mm_hidden_size_aux
        else:
            d = mgm.num_image_tokens * tower_config.hidden_size
        self.norm = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({k: nn.Linear(d, n) for k, n in num_classes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "convnext":
            h = self.tower.embeddings(x)
            maps = []
            for stage in self.tower.encoder.stages:
                h = stage(h)
                maps.append(h)
            # the deepest map keeps where things are; the mean of every stage (MGM concatenates
            # them all) makes each stage's output carry label information too
            pooled = torch.cat([m.mean((-2, -1)) for m in maps], dim=1)   # (B, C_aux)
            return torch.cat([maps[-1].flatten(1), pooled], dim=1)
        hs = self.tower(x, output_hidden_states=True).hidden_states[self.select_layer]  # (B, 1+N, C)
        return hs[:, 1:].flatten(1)                                                   # (B, N*C)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.norm(self.features(x))
        return {k: head(f) for k, head in self.heads.items()}


def pretrain_tower(tower_config, mgm: MgmConfig, num_classes: dict[str, int], train: tuple, val: tuple,
                   loop: LoopConfig, desc: str, weights: dict[str, float] | None = None):
    """train/val: (uint8 images (n, S, S, 3), {label: int64 (n,)}); the tower sees them at its own
    side (tower_config.image_size), made as MgmProcessor makes its view. weights: loss weight per
    target (default 1). Returns (tower, metrics)."""
    weights = weights or {}
    torch.manual_seed(loop.seed)
    clf = TowerClassifier(tower_config, num_classes, mgm)
    side = int(tower_config.image_size)
    x_tr, y_tr = normalise(train[0], side), {k: torch.from_numpy(v) for k, v in train[1].items()}

    def loss_fn(idx):
        out = clf(x_tr[idx])
        return sum(weights.get(k, 1.0) * F.cross_entropy(out[k], y_tr[k][idx]) for k in out)

    train_loop(clf, loss_fn, len(x_tr), loop, desc)
    x_va = normalise(val[0], side)
    with torch.no_grad():
        preds = {k: [] for k in num_classes}
        for i in range(0, len(x_va), 256):
            for k, v in clf(x_va[i:i + 256]).items():
                preds[k].append(v.argmax(-1))
    metrics: dict = {"train_images": len(x_tr), "heldout_images": len(x_va),
                     "params": sum(p.numel() for p in clf.tower.parameters())}
    for k, n in num_classes.items():
        y = val[1][k]
        metrics[f"acc_{k}"] = round(float((torch.cat(preds[k]).numpy() == y).mean()), 4)
        # chance = always answering the most frequent training class
        metrics[f"chance_{k}"] = round(float((y == np.bincount(train[1][k], minlength=n).argmax()).mean()), 4)
    return clf.tower, metrics


# -- assembly ------------------------------------------------------------------------------
def assemble(config: MgmConfig, lm: nn.Module, vit: nn.Module, convnext: nn.Module) -> MgmForConditionalGeneration:
    """A base MGM whose towers and LM are the pretrained ones; projector + mining stay freshly
    initialised (MGM's stage 1 trains them)."""
    model = MgmForConditionalGeneration(config)
    for name, part in (("language_model", lm), ("vision_tower", vit), ("vision_tower_aux", convnext)):
        missing, unexpected = getattr(model, name).load_state_dict(part.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{name}: pretrained weights do not fit the MGM: missing {missing}, unexpected {unexpected}")
    return model


# -- the two recipes the zoo stage runs ------------------------------------------------------
def build_tiny(p: dict, preset: str, attn_implementation: str, seed: int, high_res: int | None = None):
    """Tiny world: tokenizer, LM, ViT, ConvNeXt pretrained here. Returns (model, the LM's tokenizer as
    trained, without the <image> the processor adds, metrics): what an MGM checkpoint holds
    (sim.mgm_checkpoint writes it, models.convert reads it).

    high_res: the world's stored image side (world.image_size), which the ConvNeXt sees."""
    corpus = {"chats": world.world_chat_corpus, "mixed": world.world_text_corpus}[p["lm_corpus"]]
    texts = corpus(int(p["lm_texts"]), seed)
    heldout = corpus(int(p["lm_heldout_texts"]), seed + 1)
    tokenizer = train_world_tokenizer(texts, text.world_words())
    lm_tokenizer = copy.deepcopy(tokenizer)   # MgmProcessor adds <image> to the one it is given
    spec = presets.PRESETS[preset]
    high_res = int(high_res or spec["image_size_aux"])
    n_tokens = (spec["vision_config"]["image_size"] // spec["vision_config"]["patch_size"]) ** 2
    processor = MgmProcessor(tokenizer, spec["vision_config"]["image_size"], high_res, n_tokens,
                             image_aspect_ratio=spec["image_aspect_ratio"])
    config = presets.build_config(preset, vocab_size=presets.lm_vocab_size(processor),
                                  image_token_id=processor.image_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=processor.stop_token_ids, image_size_aux=high_res,
                                  vision_aux_config=dict(spec["vision_aux_config"], image_size=high_res))
    side = int(n_tokens ** 0.5)
    if high_res % config.vision_aux_config.patch_size or config.aux_grid % side:
        raise fail(f"world.image_size {high_res} px gives a {high_res / config.vision_aux_config.patch_size:g}-cell "
                   f"ConvNeXt grid, not a multiple of the {side}x{side} low-res token grid: patch mining needs "
                   f"equal patches (use a multiple of {side * config.vision_aux_config.patch_size} px)")

    def loop(kind: str, offset: int) -> LoopConfig:
        bs = p["lm_batch_size"] if kind == "lm" else p["tower_batch_size"]
        return LoopConfig(steps=int(p[f"{kind}_steps"]), batch_size=int(bs), lr=float(p[f"{kind}_lr"]), seed=seed + offset)

    # the attention the LM and ViT use while pretraining here (training sets its own, train.attn_implementation)
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = attn_implementation
    # the LM's init scale; the checkpoint's config keeps it (it says how the weights began)
    config.text_config.initializer_range = float(p["lm_init_std"])
    lm_args = (config.text_config, tokenizer, texts, heldout, loop("lm", 1), float(p["lm_answer_weight"]))
    with _Beside(lm_args) if p["parallel"] else contextlib.nullcontext() as lm_job:
        if lm_job is None:
            lm, lm_metrics = pretrain_lm(*lm_args[:5], answer_weight=lm_args[5])
        # scenes are drawn at the stored (high-res) size; each tower sees them as MgmProcessor's view
        # for it (the ViT: the bilinear downsample of the normalised high-res image)
        targets, render = tower_targets(), config.image_size_aux
        heldout_scenes = labelled_scenes(int(p["heldout_images"]), seed + 1, render, render)
        vit, vit_metrics = pretrain_tower(
            config.vision_config, config, targets, labelled_scenes(int(p["vit_images"]), seed, render, render),
            heldout_scenes, loop("vit", 2), "zoo: ViT (low-res)")
        cnx, cnx_metrics = pretrain_tower(
            config.vision_aux_config, config, targets,
            labelled_scenes(int(p["convnext_images"]), seed + 2, render, render),
            heldout_scenes, loop("convnext", 3), "zoo: ConvNeXt (high-res)",
            weights={"word": float(p["convnext_word_weight"])})
        if lm_job is not None:
            lm, lm_metrics = lm_job.result()
    model = assemble(config, lm, vit, cnx)
    metrics = {"tokenizer": {"vocab_size": config.text_config.vocab_size}, "lm": lm_metrics, "vit": vit_metrics,
               "convnext": cnx_metrics, "params": param_counts(model)}
    return model, lm_tokenizer, metrics


class _Beside:
    """pretrain_lm in a second process while this one trains the towers (zoo.parallel): each part seeds
    its own generators (torch.manual_seed(loop.seed)) and both processes run the same pinned kernels at
    this process's thread count, so the LM comes out bit for bit as in one process, in less wall time
    on two cores. Started by spawn (a fresh interpreter: no forked OpenMP state); the LM comes back
    pickled through a temporary file, never constructed here (that would draw from this process's
    generator, which the assembly after the towers still uses). Leaving the block stops the process."""

    def __init__(self, args: tuple):
        import multiprocessing
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="vlmlab-zoo-lm.")
        self.path = f"{self.tmp.name}/lm.pt"
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_pretrain_lm_job, args=(torch.get_num_threads(), args, self.path), daemon=True)
        self.proc.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.is_alive():  # the towers failed (or were interrupted) first
            self.proc.terminate()
        self.proc.join()
        self.tmp.cleanup()

    def result(self):
        self.proc.join()
        if self.proc.exitcode != 0:
            raise fail(f"zoo: the LM's pretraining process failed (exit code {self.proc.exitcode}; its error is above)")
        out = torch.load(self.path, weights_only=False)
        return out["lm"], out["metrics"]


def _pretrain_lm_job(threads: int, args: tuple, path: str) -> str:
    """The spawned process's work: the same pins as the stage (its environment is inherited), then the LM."""
    from vlmlab.determinism import pin

    pin(threads)
    lm, metrics = pretrain_lm(*args[:5], answer_weight=args[5])
    torch.save({"lm": lm, "metrics": metrics}, path)
    return path


def build_random(p: dict, preset: str, attn_implementation: str, seed: int):
    """Preset `preset` at random init with the world's tokenizer: mgm-2b's real shapes for GPU speed and
    memory runs of the train stage on the tiny world's data, nothing pretrained or downloaded. The LM keeps
    the preset's vocabulary (mgm-2b: 256000 rows, the world's few hundred tokens take the first), so its
    head and embedding cost what the real ones do. Returns (model, processor, metrics)."""
    tokenizer = train_world_tokenizer(world.world_text_corpus(int(p["lm_texts"]), seed), text.world_words())
    torch.manual_seed(seed)
    model, processor = presets.build(preset, tokenizer, attn_implementation)
    return model, processor, {"tokenizer": {"vocab_size": model.config.text_config.vocab_size,
                                            "tokens": len(processor.tokenizer)}, "params": param_counts(model)}
