"""Data-Juicer operator `fast_image_captioning_mapper`: `image_captioning_mapper`, fast.

A custom operator (Data-Juicer's `custom_operator_paths`): name it in a recipe with
`custom_operator_paths: [vlmlab/synth/ops/fast_image_captioning_mapper.py]`, or
`dj-process --config recipe.yaml --custom-operator-paths vlmlab/synth/ops/fast_image_captioning_mapper.py`.

It is the stock op with one method replaced: same arguments, the same model loading (Data-Juicer's
model cache), the same prompts, caption_num candidates per image, keep_candidate_mode, keep_original_sample,
DJ special tokens and output layout (the stock op's own `_distribute_captions`), and the same sampling
distribution (the captioner's generation_config, as transformers' generate resolves it). What changes is
how the candidates are generated (vlmlab.synth.fast_captioner): all caption_num candidates of a sub-batch
in one decode over a static KV cache, the prompt prefilled once per image, attention over the filled slots
only (on CUDA a Triton decode kernel, every step one CUDA graph replay), bf16 on CUDA, stopping once every
row has emitted EOS; images are decoded and preprocessed in worker threads ahead of the model. Measured
with blip2-opt-2.7b shapes: bench/results/synth.json (README "Benchmarks").
The stock op's captions come from `torch`'s global generator in another order, so the two ops draw
different (equally distributed) captions for the same seed; each is the same from run to run.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Data-Juicer loads this file by path (`dj-process --custom-operator-paths`), where vlmlab may not be
# importable: the op uses the checkout it lies in, as the stage scripts do
_CHECKOUT = str(Path(__file__).resolve().parents[3])
if _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

from data_juicer.ops.base_op import OPERATORS
from data_juicer.ops.mapper.image_captioning_mapper import ImageCaptioningMapper
from data_juicer.utils.mm_utils import SpecialTokens, load_image
from data_juicer.utils.model_utils import get_model
import torch

OP_NAME = "fast_image_captioning_mapper"

# built once per process and model: compiled graphs and static caches are neither picklable nor cheap
_CAPTIONERS: dict = {}


@OPERATORS.register_module(OP_NAME, force=True)  # force: a recipe run may load this file after an import
class FastImageCaptioningMapper(ImageCaptioningMapper):
    """Generates image captions like `image_captioning_mapper` (same arguments and outputs), with every
    candidate of a sub-batch sampled in one compiled decode.

    :param max_new_tokens: most tokens per caption (the stock op's fixed value: 128)
    :param compile: "auto": on CUDA with Triton, the Triton decode attention over the filled cache slots and
        one CUDA graph per step shape (elsewhere as false); false: eager steps, SDPA over the filled slots;
        true: torch.compile "reduce-overhead" of a masked whole-cache step (slower on an H200: kept to compare)
    :param bf16: run the captioner in bfloat16 on CUDA
    :param preprocess_threads: threads that decode and preprocess images ahead of the model
    Other arguments: see `image_captioning_mapper`.
    """

    def __init__(self, *args, max_new_tokens: int = 128, compile: bool | str = "auto", bf16: bool = True,
                 preprocess_threads: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        if compile not in ("auto", True, False):
            raise ValueError(f"{OP_NAME}: compile must be auto, true or false, not {compile!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.compile = compile
        self.bf16 = bool(bf16)
        self.preprocess_threads = max(1, int(preprocess_threads))

    def _captioner(self, model, processor):
        from vlmlab.synth.fast_captioner import FastCaptioner

        key = (id(model), self.caption_num, self.max_new_tokens, self.compile, self.bf16, self.gpu_batch_size)
        if key not in _CAPTIONERS:
            _CAPTIONERS[key] = FastCaptioner(model, processor, self.caption_num, self.max_new_tokens,
                                             compile=self.compile, bf16=self.bf16, pad_rows=self.gpu_batch_size)
        return _CAPTIONERS[key]

    def _batched_generate(self, images, prompts, model, processor):
        """images: paths (or PIL images) -> [num_images][caption_num] captions; sub-batches of gpu_batch_size
        images are loaded and preprocessed by threads while the model captions the previous one."""
        if not images:
            return []
        captioner = self._captioner(model, processor)
        pin = captioner.device.type == "cuda"
        starts = range(0, len(images), self.gpu_batch_size)

        def prepare(start):
            chunk = slice(start, start + self.gpu_batch_size)
            return self._prepare(images[chunk], None if prompts is None else prompts[chunk], processor, loaders, pin,
                                 slices=self.preprocess_threads if start == 0 else 1)

        out = []
        with ThreadPoolExecutor(self.preprocess_threads) as loaders, ThreadPoolExecutor(1) as feeder:
            pending = [feeder.submit(prepare, s) for s in list(starts)[:2]]  # two sub-batches ahead
            for k in range(len(starts)):
                inputs = pending.pop(0).result()
                if k + 2 < len(starts):
                    pending.append(feeder.submit(prepare, starts[k + 2]))
                out += captioner.captions(inputs)
        return out

    def _prepare(self, images, texts, processor, pool, pin: bool, slices: int = 1) -> dict:
        """One sub-batch's processor outputs, in (pinned, on CUDA) host memory; images decoded by `pool`.
        The first sub-batch of an op call is prepared while the GPU waits (the op sees one Data-Juicer batch
        at a time): it is processed in `slices`, one per thread (PIL and torch release the GIL). The later
        ones are prepared while the GPU decodes, where one processor call is better (images prepared one by
        one in threads were slower end to end there, bench/results/synth_host_h100.json; suspected: the
        threads take the GIL from the decoding thread). Each
        image is processed alone either way: the same bits. Prompts are tokenised per slice and joined (as in
        the stock op, a sub-batch's prompts must be of one length)."""
        if texts is not None and all(p is None for p in texts):
            texts = None  # as the stock op: no prompt unless one image of the sub-batch has one
        loaded = list(pool.map(lambda x: x if hasattr(x, "convert") else load_image(x), images))
        step = -(-len(images) // slices)

        def process(a):
            return processor(images=loaded[a:a + step], text=None if texts is None else texts[a:a + step],
                             return_tensors="pt")

        parts = list(pool.map(process, range(0, len(images), step)))
        joined = {}
        for key in parts[0]:
            pieces = [part[key] for part in parts]
            shape = (sum(len(x) for x in pieces), *pieces[0].shape[1:])
            joined[key] = torch.cat(pieces, out=torch.empty(shape, dtype=pieces[0].dtype, pin_memory=pin))
        return joined

    def process_batched(self, samples, rank=None):
        """The stock op's process_batched with image paths in place of loaded images (loaded in threads)."""
        n = len(samples[self.text_key])
        rows = [{key: samples[key][i] for key in samples} for i in range(n)]
        paths, prompts, where = [], [], []  # where[g] = (sample, chunk, image in chunk) of image g
        for s, sample in enumerate(rows):
            keys = sample.get(self.image_key) or []
            if not keys:
                continue
            if self.prompt_key and isinstance(sample.get(self.prompt_key), str):
                prompt = sample[self.prompt_key]
            elif self.prompt and isinstance(self.prompt, str):
                prompt = self.prompt
            else:
                prompt = None
            offset = 0
            for c, chunk in enumerate(sample[self.text_key].split(SpecialTokens.eoc)):
                if not chunk.strip():
                    continue
                count = chunk.count(SpecialTokens.image)
                for j in range(count):
                    paths.append(keys[offset + j])
                    prompts.append(prompt)
                    where.append((s, c, j))
                offset += count
        if not paths:
            return samples if self.keep_original_sample else {key: [] for key in samples}
        model, processor = get_model(self.model_key, rank, self.use_cuda())
        model.config.image_token_index = 50265  # as the stock op does on every call
        captions = self._batched_generate(paths, prompts if any(p is not None for p in prompts) else None,
                                          model, processor)
        out = self._distribute_captions(captions, where, rows)
        if not out:
            return {key: [] for key in samples}
        return {key: [r[key] for r in out] for key in out[0]}
