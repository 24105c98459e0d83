"""One-off check (not CI): the official MGM code on transformers 4.38.0 vs vlmlab, on the same
tiny MGM-Gemma in the official checkpoint layout that tests/test_fidelity.py builds.

    # 1. vlmlab's environment: the official-layout folder, a 300x200 image, vlmlab's outputs
    python tests/official_reference.py ours /tmp/mgmcmp
    # 2. a scratch venv with transformers==4.38.0, torch (CPU), timm, open_clip_torch, and a
    #    checkout of dvlab-research/MGM: the official loader, dataset and generate on the same folder
    /tmp/mgmref/bin/python tests/official_reference.py official /tmp/mgmcmp /path/to/MGM
    # 3. either environment: pixels, prompt ids, max |logit diff|, greedy tokens
    python tests/official_reference.py compare /tmp/mgmcmp

Step 2 follows mgm/model/builder.py and mgm/eval/model_vqa_loader.py: MGMGemmaForCausalLM
.from_pretrained, the CLIP tower loaded from its folder, the ConvNeXt trunk (a timm ConvNeXt of
the tiny shapes standing in for OpenCLIP's convnext_large_d_320, which OpenCLIPVisionTower
.load_model picks by name), initialize_uni_modules(for_eval=True), CustomDataset for pixels and
ids, model(...) for logits and model.generate(...) for greedy tokens; fp32, eval mode.
"""
import json
import sys
import types
from pathlib import Path

QUESTION = "what does the sign say ?"
STEPS = 6


def ours(out: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from test_fidelity import make_official_mgm

    from vlmlab.models import local

    torch.set_num_threads(1)
    make_official_mgm(out / "MGM-tiny")
    Image.fromarray((np.random.default_rng(3).random((200, 300, 3)) * 255).astype(np.uint8)).save(out / "image.png")
    model, processor, _ = local.build_local({"local_mgm": str(out / "MGM-tiny")}, "eager")
    enc = processor.encode_prompt(QUESTION, Image.open(out / "image.png"))
    batch = processor.pad([enc])
    with torch.no_grad():
        logits = model.eval()(**batch).logits[0]
        new = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    torch.save({"input_ids": enc["input_ids"], "image_token_id": processor.image_token_id,
                "pixel_values": enc["pixel_values"], "pixel_values_aux": enc["pixel_values_aux"],
                "logits": logits, "greedy": new[0, batch["input_ids"].shape[1]:]}, out / "ours.pt")


def _stub_packages(*names: str) -> None:
    """Importable stand-ins for packages whose code this run never calls: deepspeed (mgm_arch imports
    it), and torchvision and open_clip where the scratch venv's torchvision wheel does not load
    (timm and MGM's openclip_encoder import names from them at import time only)."""
    import importlib.abc
    import importlib.machinery

    class Stub(type):  # a class whose every attribute is another such class
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Stub(name, (), {"__init__": lambda self, *a, **k: None})

    class Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Stub(name, (), {"__init__": lambda self, *a, **k: None})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in names:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Anything(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    for name in names:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, Finder())


def official(out: Path, mgm_repo: Path) -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # e.g. a CUDA torchvision wheel beside the CPU torch
        _stub_packages("torchvision", "open_clip")
    _stub_packages("deepspeed")
    import timm
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    sys.path.insert(0, str(mgm_repo))
    import mgm.eval.model_vqa_loader as vqa
    from mgm.constants import IMAGE_TOKEN_INDEX
    from mgm.model.language_model.mgm_gemma import MGMGemmaForCausalLM

    src = out / "MGM-tiny"
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    # the tower folders the config names (MGM's builders choose the tower class by folder name)
    clip_dir, aux_dir, mgm_dir = out / "openai-clip-tiny", out / "openclip-convnext-tiny", out / "mgm-official"
    clip = CLIPVisionModel(CLIPVisionConfig(**cfg["reference_clip"], hidden_act="quick_gelu", layer_norm_eps=1e-5))
    prefix = "model.vision_tower.vision_tower."
    clip.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                          if k.startswith(prefix) and not k.endswith("position_ids")})
    clip.save_pretrained(clip_dir)
    side = cfg["reference_clip"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=mean,
                       image_std=std, resample=3).save_pretrained(clip_dir)
    aux_dir.mkdir(exist_ok=True)
    (aux_dir / "open_clip_config.json").write_text("{}")
    mgm_dir.mkdir(exist_ok=True)
    for f in ("model.safetensors", "model.safetensors.index.json"):
        if not (mgm_dir / f).exists():
            (mgm_dir / f).symlink_to(src / f)
    (mgm_dir / "config.json").write_text(json.dumps(dict(cfg, mm_vision_tower=str(clip_dir),
                                                         mm_vision_tower_aux=str(aux_dir))))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")

    # mgm/model/builder.py load_pretrained_model, fp32 on CPU
    model = MGMGemmaForCausalLM.from_pretrained(str(mgm_dir), torch_dtype=torch.float32)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    aux = model.get_vision_tower_aux()
    rc = cfg["reference_convnext"]
    n = len(rc["depths"])
    trunk = timm.models.convnext.ConvNeXt(depths=list(rc["depths"]) + [1] * (4 - n),
                                          dims=list(rc["dims"]) + [rc["dims"][-1] * 2] * (4 - n),
                                          patch_size=rc["patch_size"], ls_init_value=1e-6, num_classes=0)
    trunk.stages = trunk.stages[:n]
    p = "model.vision_tower_aux.vision_"
    missing = trunk.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)}, strict=False)
    assert not [k for k in missing.missing_keys if k.startswith(("stem", "stages"))], missing
    aux.vision_stem, aux.vision_stages, aux.model_channel, aux.is_loaded = trunk.stem, trunk.stages, rc["dims"], True
    model.config.model_path = str(mgm_dir)
    model.get_model().initialize_uni_modules(model.config, for_eval=True)
    model.eval()  # MGM's own scripts leave the new ConvNeXt trunk in train mode (drop path); eval here

    # mgm/eval/model_vqa_loader.py CustomDataset + the generate call
    vqa.args = types.SimpleNamespace(conv_mode="gemma")
    data = vqa.CustomDataset([{"image": "image.png", "text": QUESTION}], str(out), tokenizer,
                             tower.image_processor, model.config)
    input_ids, image, image_aux = data[0]
    with torch.inference_mode():
        logits = model(input_ids[None], images=image[None], images_aux=image_aux[None]).logits[0]
        new = model.generate(input_ids[None], images=image[None], images_aux=image_aux[None], do_sample=False,
                             num_beams=1, max_new_tokens=STEPS, min_new_tokens=STEPS,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True)
    assert int((input_ids == IMAGE_TOKEN_INDEX).sum()) == 1
    torch.save({"input_ids": input_ids, "pixel_values": image, "pixel_values_aux": image_aux,
                "logits": logits, "greedy": new[0, -STEPS:]}, out / "official.pt")


def compare(out: Path) -> dict:
    import torch

    a, b = torch.load(out / "ours.pt"), torch.load(out / "official.pt")
    ids = []
    for t in b["input_ids"].tolist():
        ids += [a["image_token_id"]] * (len(a["logits"]) - len(b["input_ids"]) + 1) if t == -200 else [t]
    result = {
        "prompt_ids_equal": a["input_ids"].tolist() == ids,
        "pixel_values_max_diff": (a["pixel_values"] - b["pixel_values"]).abs().max().item(),
        "pixel_values_aux_max_diff": (a["pixel_values_aux"] - b["pixel_values_aux"]).abs().max().item(),
        "logits_max_diff": (a["logits"] - b["logits"]).abs().max().item(),
        "logit_scale": b["logits"].abs().max().item(),
        "greedy_ours": a["greedy"].tolist(), "greedy_official": b["greedy"].tolist(),
    }
    result["greedy_agree"] = sum(x == y for x, y in zip(result["greedy_ours"], result["greedy_official"]))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    cmd, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    {"ours": lambda: ours(folder), "official": lambda: official(folder, Path(sys.argv[3])),
     "compare": lambda: compare(folder)}[cmd]()
