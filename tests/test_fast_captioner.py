"""fast_image_captioning_mapper (vlmlab/synth/ops/): the stock op's semantics and output, one decode per sub-batch."""
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.synth import recipe as R
from vlmlab.sim import teacher as T
from vlmlab.sim.text import world_words

TINY = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, qformer_hidden=32, qformer_layers=1,
            num_query_tokens=4, hidden=32, layers=1, heads=2, epochs=1, max_words=16, encoder_images=0)
OP_FILE = R.FAST_OP_FILE


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An untrained tiny teacher (random weights are enough to compare two samplers) and 7 images."""
    root = tmp_path_factory.mktemp("fastcap")
    torch.manual_seed(0)
    model, processor = T.build_teacher(T.TeacherConfig(**TINY), world_words())
    T.save_teacher(model, processor, root / "teacher")
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
    return root


def ops(folder, **kw):
    from data_juicer.config.config import load_custom_operators
    from data_juicer.ops.base_op import OPERATORS

    if "fast_image_captioning_mapper" not in OPERATORS.modules:
        load_custom_operators([str(OP_FILE)])
    args = dict(hf_img2seq=str(folder / "teacher"), trust_remote_code=True, caption_num=3, gpu_batch_size=3,
                accelerator="cpu", **kw)
    return OPERATORS.modules["image_captioning_mapper"](**args), OPERATORS.modules["fast_image_captioning_mapper"](**args)


def samples(folder):
    """Five samples: one image each, one with two images in two chunks, one without an image."""
    img = [str(folder / f"{i}.jpg") for i in range(7)]
    text = ["<__dj__image>\nold caption one <|__dj__eoc|>", "<__dj__image> a <|__dj__eoc|> <__dj__image> b <|__dj__eoc|>",
            "<__dj__image>\nthree <|__dj__eoc|>", "no image here <|__dj__eoc|>", "<__dj__image>\nfive <|__dj__eoc|>"]
    images = [[img[0]], [img[1], img[2]], [img[3]], [], [img[4]]]
    return {"text": text, "images": images, "id": ["a", "b", "c", "d", "e"]}


def set_generation(op, **kw):
    """Change the generation config of the model `op` loaded (Data-Juicer caches one model per op)."""
    from data_juicer.utils.model_utils import get_model

    model, _ = get_model(op.model_key, None, False)
    for k, v in kw.items():
        setattr(model.generation_config, k, v)


@pytest.mark.parametrize("mode,keep,prompt,candidates", [("all", False, None, False), ("random_any", True, None, False),
                                                        ("all", False, "a", False), ("all", False, "a", True)])
def test_same_output_as_the_stock_op_when_sampling_is_deterministic(folder, mode, keep, prompt, candidates, monkeypatch):
    """top_k=1 makes sampling an argmax: then both ops must write the very same samples (texts with the DJ
    special tokens, image lists, other fields, order, keep modes, a prompt's ids; with `candidates`, steps
    sampled among the highest logits, as on CUDA), so only the sampler's draws differ."""
    from vlmlab.synth.fast_captioner import FastCaptioner

    stock, fast = ops(folder, keep_candidate_mode=mode, keep_original_sample=keep, prompt=prompt)
    monkeypatch.setattr(FastCaptioner, "CANDIDATES", candidates)
    set_generation(stock, top_k=1)
    set_generation(fast, top_k=1)
    random.seed(0)
    want = stock.process_batched(samples(folder))
    random.seed(0)
    got = fast.process_batched(samples(folder))
    assert got == want
    n = 3 if mode == "all" else 1
    assert len(got["text"]) == (n + keep) * 4 + keep  # + the imageless sample, kept as it is when keep
    assert all(t.endswith("<|__dj__eoc|>") for t in got["text"])


@pytest.mark.parametrize("slices,prompt", [(3, None), (3, "a photo of"), (1, None), (16, "a photo of")])
def test_a_sub_batch_prepared_in_slices_is_the_one_processor_call(folder, slices, prompt):
    """Threads process slices of a sub-batch (7 images in slices of ceil(7 / slices)): the joined tensors
    must be those of one processor call on all of them, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    from data_juicer.utils.mm_utils import load_image
    from data_juicer.utils.model_utils import get_model

    _, fast = ops(folder)
    _, processor = get_model(fast.model_key, None, False)
    paths = [str(folder / f"{i}.jpg") for i in range(7)]
    texts = None if prompt is None else [prompt] * 7
    want = processor(images=[load_image(p) for p in paths], text=texts, return_tensors="pt")
    with ThreadPoolExecutor(4) as pool:
        got = fast._prepare(paths, texts, processor, pool, pin=False, slices=slices)
    assert sorted(got) == sorted(want) and ("input_ids" in got) == (prompt is not None)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def captioner(folder, **kw):
    """A FastCaptioner on the op's model (Data-Juicer's cached copy) and its processor."""
    from data_juicer.utils.model_utils import get_model

    from vlmlab.synth.fast_captioner import FastCaptioner

    stock, _ = ops(folder)
    model, processor = get_model(stock.model_key, None, False)
    model.config.image_token_index = 50265
    return FastCaptioner(model, processor, **kw), processor


@pytest.mark.parametrize("temperature,top_p", [(1.0, None), (0.7, 0.8)])
def test_candidates_give_the_whole_vocabulary_distribution_ties_included(folder, temperature, top_p, monkeypatch):
    """On CUDA a step samples among the top_k + TIE_MARGIN highest logits: the same probabilities as the whole
    vocabulary's (transformers keeps every token tied with the k-th); ties reaching the last candidate are flagged."""
    import torch.nn.functional as F

    from vlmlab.synth.fast_captioner import FastCaptioner

    monkeypatch.setattr(FastCaptioner, "CANDIDATES", True)
    cap, _ = captioner(folder)
    cap.gc.temperature, cap.gc.top_p = temperature, top_p
    cap.candidates = cap._candidate_count()
    assert cap.candidates == cap.gc.top_k + cap.TIE_MARGIN < len(cap.head)
    torch.manual_seed(0)
    hidden = torch.randn(6, cap.head.shape[1])
    order = F.linear(hidden[:1], cap.head, cap.bias)[0].argsort(descending=True)
    kth, below = order[cap.gc.top_k - 1], order[cap.gc.top_k + 20:cap.gc.top_k + 30]
    cap.head = cap.head.clone()
    if top_p is None:  # (top-p cutting through a tie keeps whichever tied tokens its sort puts last, here as in
        # transformers: the order of equal logits is not defined, so that case is left out)
        cap.head[below] = cap.head[kth].clone()  # ten tokens tie with row 0's k-th
        if cap.bias is not None:
            cap.bias = cap.bias.clone()
            cap.bias[below] = cap.bias[kth].clone()
    want = cap._warped(hidden).softmax(-1)
    probs, columns, overflow = cap._sample(hidden)
    torch.testing.assert_close(torch.zeros_like(want).scatter_(1, columns, probs), want)
    assert not overflow.any()
    if top_p is None:
        assert int((want[0] > 0).sum()) == cap.gc.top_k + 10
    cap.head[:] = cap.head[kth].clone()  # every token ties
    assert cap._sample(hidden)[2].all()


def test_a_sub_batch_whose_ties_pass_the_candidates_is_redone_on_the_whole_vocabulary(folder, monkeypatch):
    from vlmlab.synth.fast_captioner import FastCaptioner

    monkeypatch.setattr(FastCaptioner, "CANDIDATES", True)
    cap, processor = captioner(folder, caption_num=2, max_new_tokens=6)
    inputs = processor(images=[Image.open(folder / "0.jpg")], return_tensors="pt")
    cap.generate(**inputs)
    assert cap.overflowed == 0
    cap.head = torch.zeros_like(cap.head)  # every logit ties
    assert cap.generate(**inputs).shape[0] == 2 and cap.overflowed == 1


def test_same_seed_same_captions_and_every_candidate_sampled(folder):
    _, fast = ops(folder, keep_candidate_mode="all", keep_original_sample=False)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(fast.process_batched(samples(folder))["text"])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    per_image = [runs[0][i:i + 3] for i in range(0, 9, 3)]  # caption_num rows of one sample are its candidates
    assert all(len(set(c)) == 3 for c in per_image)  # random weights, 20 tokens of sampling: never equal


def test_stops_when_every_row_has_emitted_eos(folder):
    from data_juicer.utils.model_utils import get_model

    from vlmlab.synth.fast_captioner import FastCaptioner

    stock, _ = ops(folder)
    model, processor = get_model(stock.model_key, None, False)
    model.config.image_token_index = 50265
    inputs = processor(images=[Image.open(folder / "0.jpg")], return_tensors="pt")
    greedy = FastCaptioner(model, processor, caption_num=2, max_new_tokens=12)
    greedy.gc.top_k = 1
    ids = greedy.generate(**inputs)
    prompt = ids.shape[1] - greedy.last_steps
    greedy.eos = torch.tensor([int(ids[0, prompt])])  # the argmax first token is now EOS: every row ends at step 1
    assert greedy.generate(**inputs).shape[1] == prompt + 1 and greedy.last_steps == 1


def test_a_lagged_stop_check_gives_what_a_per_step_check_gives(folder):
    """CUDA reads the all-rows-ended flag a few steps late: the steps past the end are cut off again."""
    from data_juicer.utils.model_utils import get_model

    from vlmlab.synth.fast_captioner import FastCaptioner

    stock, _ = ops(folder)
    model, processor = get_model(stock.model_key, None, False)
    model.config.image_token_index = 50265
    inputs = processor(images=[Image.open(folder / f"{i}.jpg") for i in range(3)], return_tensors="pt")
    captioner = FastCaptioner(model, processor, caption_num=3, max_new_tokens=40)
    captioner.eos = torch.arange(0, 400, 3)  # a third of the words end a caption: rows end at different steps
    got = {}
    for lag in (0, 1, 3):
        captioner.stop_lag = lag
        torch.manual_seed(0)
        got[lag] = (captioner.generate(**inputs), captioner.last_steps)
    assert 1 < got[0][1] < 40  # every row ended before max_new_tokens, not all at once
    for lag in (1, 3):
        assert got[lag][1] == got[0][1] and torch.equal(got[lag][0], got[0][0])


def test_options_the_sampler_does_not_implement_are_refused(folder):
    _, fast = ops(folder)
    set_generation(fast, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="repetition_penalty.*synth.captioner_op: stock"):
        fast.process_batched(samples(folder))


def test_dj_process_runs_the_op_from_custom_operator_paths(folder, tmp_path):
    """The command-line route: `dj-process --custom-operator-paths <op file>` with a recipe naming the op."""
    import yaml

    from vlmlab import io

    rows = [{"id": str(i), "text": f"<__dj__image>\nseed {i} <|__dj__eoc|>", "images": [str(folder / f"{i}.jpg")]}
            for i in range(4)]
    io.write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = {"project_name": "t", "dataset_path": str(tmp_path / "in.jsonl"), "export_path": str(tmp_path / "out.jsonl"),
              "work_dir": str(tmp_path / "w"), "np": 1, "use_cache": False,
              "process": [{"fast_image_captioning_mapper": {"hf_img2seq": str(folder / "teacher"), "caption_num": 2,
                                                            "keep_candidate_mode": "all", "keep_original_sample": False,
                                                            "gpu_batch_size": 4, "max_new_tokens": 8}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    dj = Path(sys.executable).parent / "dj-process"
    proc = subprocess.run([str(dj), "--config", str(tmp_path / "r.yaml"), "--custom-operator-paths", str(OP_FILE)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = io.read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == 8 and all(r["text"].startswith("<__dj__image>") for r in out)
