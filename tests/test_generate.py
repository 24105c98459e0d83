import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.evaluate.generate import GreedyDecoder, generate_answers, split_at_image
from vlmlab.models import presets
from vlmlab.models.mgm import MgmForConditionalGeneration
from vlmlab.models.processor import MgmProcessor
from vlmlab.sim.lm_tokenizer import train_world_tokenizer

WORDS = "what is the color of shape sign word red blue green cube sphere cone a an on left right small big".split()
MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only fight over the shared cores
    torch.manual_seed(0)
    tok = train_world_tokenizer([" ".join(WORDS)])
    # the processor appends <image> after the vocabulary (as to Gemma's): id len(tok), outside the LM
    cfg = presets.build_config("tiny", vocab_size=len(tok), image_token_id=len(tok),
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = MgmForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a random model with large weights: varied answers whose argmax depends on every input
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 1.5 / p.shape[-1] ** 0.5)
        # Gemma multiplies input embeddings by sqrt(hidden): at full size they swamp the residual
        # stream and the tied head repeats the last prompt token
        model.get_input_embeddings().weight.div_(cfg.text_config.hidden_size ** 0.5)
    rng = np.random.default_rng(0)
    items = [{"prompt": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))),
              "image": Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))} for _ in range(9)]
    yield model, MgmProcessor.for_model(tok, cfg), items
    torch.set_num_threads(threads)


def reference_answer(model, proc, item):
    """One prompt at a time through transformers' own `generate` (MGM's model_vqa_loader does this)."""
    e = proc.encode_prompt(item["prompt"], item["image"])
    ids = e["input_ids"][None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=e["pixel_values"][None],
                         pixel_values_aux=e["pixel_values_aux"][None], max_new_tokens=MAX_NEW, do_sample=False,
                         eos_token_id=proc.stop_token_ids, pad_token_id=proc.tokenizer.pad_token_id)
    return proc.decode(out[0, ids.shape[1]:])


def test_batched_equals_one_at_a_time(tiny):
    model, proc, items = tiny
    reference = [reference_answer(model, proc, it) for it in items]
    assert len(set(reference)) == len(reference)  # answers differ: the comparison can fail
    assert generate_answers(model, proc, items, batch_size=4, max_new_tokens=MAX_NEW) == reference
    assert generate_answers(model, proc, items, batch_size=4, max_new_tokens=MAX_NEW, cache="static",
                            prefix_batch=3) == reference
    assert generate_answers(model, proc, items[::-1], batch_size=9, max_new_tokens=MAX_NEW) == reference[::-1]


def test_token_ids_and_stopping(tiny):
    model, proc, items = tiny
    enc = [proc.encode_prompt(it["prompt"], it["image"]) for it in items]
    dec = GreedyDecoder(model, proc.stop_token_ids, proc.tokenizer.pad_token_id, MAX_NEW)

    def run(rows):  # one prefix per row: the decoder's own calls, no grouping
        cuts = [split_at_image(e["input_ids"], model.config.image_token_id) for e in rows]
        prefixes = dec.prefill([e["input_ids"][:c] for e, c in zip(rows, cuts)],
                               torch.stack([e["pixel_values"] for e in rows]),
                               torch.stack([e["pixel_values_aux"] for e in rows]))
        return dec.decode(prefixes, [e["input_ids"][c:] for e, c in zip(rows, cuts)])

    alone = [run([e])[0] for e in enc]
    assert run(enc) == alone
    assert any(len(a) < MAX_NEW for a in alone) and any(len(a) == MAX_NEW for a in alone)  # some rows stop early
    assert not any(set(a) & set(proc.stop_token_ids) for a in alone)


def test_bad_options_and_empty():
    with pytest.raises(ValueError, match="compile needs"):
        GreedyDecoder(torch.nn.Module(), [1], 0, 4, compile=True)
    with pytest.raises(ValueError, match="compile must be"):
        GreedyDecoder(torch.nn.Module(), [1], 0, 4, cache="static", compile="all", prefix_batch=2)
    assert generate_answers(None, None, [], 4, 4) == []


def test_lora_adapter_answers_equal_merged(tiny):
    """generate_answers on a peft model (adapter active) == on the merged model: the decoder unwraps peft."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, proc, items = tiny
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        modules_to_save=["mm_projector"]))
    with torch.no_grad():  # the adapter's copy of the projector differs from the base's
        for p in peft_model.base_model.model.mm_projector.modules_to_save["default"].parameters():
            p.mul_(1.5)
    adapter = generate_answers(peft_model, proc, items, batch_size=4, max_new_tokens=MAX_NEW)
    merged = generate_answers(peft_model.merge_and_unload(), proc, items, batch_size=4, max_new_tokens=MAX_NEW)
    base = generate_answers(model, proc, items, batch_size=4, max_new_tokens=MAX_NEW)
    assert adapter == merged and adapter != base


def test_questions_sharing_an_image_share_its_prefix(tiny, tmp_path):
    """Several questions per image (as TextVQA asks): the same answers as one at a time, with the
    vision tower run once per distinct image in a batch, for PIL images and for paths."""
    model, proc, items = tiny
    paths = []
    for n, it in enumerate(items[:3]):
        paths.append(tmp_path / f"{n}.png")
        it["image"].save(paths[-1])
    questions = [it["prompt"] for it in items]
    shared = [{"prompt": q, "image": items[k % 3]["image"]} for k, q in enumerate(questions)]
    by_path = [{"prompt": q, "image": paths[k % 3]} for k, q in enumerate(questions)]
    reference = [reference_answer(model, proc, it) for it in shared]
    assert len(set(reference)) > 3  # answers depend on the question, not only on the image

    rows = []
    hook = model.vision_tower.register_forward_hook(lambda mod, args, out: rows.append(len(args[0])))
    try:
        assert generate_answers(model, proc, shared, batch_size=9, max_new_tokens=MAX_NEW) == reference
        assert rows == [3]  # 9 questions, 3 images, one tower call
        rows.clear()
        assert generate_answers(model, proc, by_path, batch_size=9, max_new_tokens=MAX_NEW, cache="static") == reference
        assert rows == [3]
    finally:
        hook.remove()
    # prefixes prefilled in chunks that batches share and straddle; a compiled decoder's padded last chunk
    assert generate_answers(model, proc, shared, batch_size=4, prefix_batch=2, max_new_tokens=MAX_NEW) == reference
    dec = GreedyDecoder(model, proc.stop_token_ids, proc.tokenizer.pad_token_id, MAX_NEW, prefix_batch=2)
    dec.pad_prefixes = True  # what compile=True sets (compiling itself is too slow for a CPU test)
    rows.clear()
    hook = model.vision_tower.register_forward_hook(lambda mod, args, out: rows.append(len(args[0])))
    try:
        assert generate_answers(model, proc, shared, batch_size=4, decoder=dec) == reference
    finally:
        hook.remove()
    assert rows == [2, 2]  # images 1-2, then image 3 twice: every tower call sees prefix_batch rows


def test_prompts_without_image_mix_with_image_prompts(tiny):
    model, proc, items = tiny
    mixed = [items[0], {"prompt": items[1]["prompt"]}, items[2], {"prompt": items[3]["prompt"]}]
    reference = []
    for it in mixed:
        if "image" in it:
            reference.append(reference_answer(model, proc, it))
        else:
            ids = proc.prompt_ids(it["prompt"])[None]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                 do_sample=False, eos_token_id=proc.stop_token_ids, pad_token_id=proc.tokenizer.pad_token_id)
            reference.append(proc.decode(out[0, ids.shape[1]:]))
    for prefix_batch in (1, 4):  # text-only prefixes alone in a chunk, and mixed into one
        assert generate_answers(model, proc, mixed, batch_size=4, prefix_batch=prefix_batch,
                                max_new_tokens=MAX_NEW) == reference
