"""Where the fast captioning op's wall time goes beside its GPU time (blip2-opt-2.7b shapes, one GPU).

    python bench/synth_host.py --bs 256 --out OUT/synth_host.json

Times, on the same model and JPEGs: the op end to end on 2 sub-batches (after a warm-up), also with Python's
thread switch interval at 0.5 ms (the loader threads and the decode loop share the GIL), one sub-batch's
preparation alone (decode + processor, image by image in 8 threads or in one processor call) and one
sub-batch's decode alone (prepared inputs, nothing else running). bench/results/synth_host_h100.json is a run
of the version that also ran the op with image-by-image preparation (commit a87836f): 262.5 and 268.8 captions/s
vs 269.6 and 275.5 with one processor call, so the op kept the one call.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synth_captioner as S  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "bs": a.bs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        S.opt27b_shaped(folder, "cuda")
        paths = S.write_jpegs(S.images(2 * a.bs), Path(tmp))
        ops = S.load_ops()
        module = sys.modules[ops[S.FAST].__module__]
        for name, switch in (("op", None), ("op_switch_0.5ms", 0.0005)):
            old = sys.getswitchinterval()
            if switch:
                sys.setswitchinterval(switch)
            try:
                row = S.through_op(S.FAST, folder, paths, a.bs, 3)
            finally:
                sys.setswitchinterval(old)
            row["captions_per_s"] = round(row["captions"] / row["seconds"], 1)
            result[name] = row
            print(name, json.dumps(row), flush=True)
            if switch is None:
                S.free()  # each op instance loads its own model copy
        # the parts alone, with the op's own captioner (still loaded)
        captioner = next(iter(module._CAPTIONERS.values()))
        processor = captioner.processor
        from concurrent.futures import ThreadPoolExecutor

        from data_juicer.utils.mm_utils import load_image
        chunk = paths[:a.bs]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as ex:
            parts = list(ex.map(lambda p: processor(images=[load_image(p)], return_tensors="pt"), chunk))
        inputs = {"pixel_values": torch.cat([p["pixel_values"] for p in parts])}
        result["prep_per_image_8_threads_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as ex:
            loaded = list(ex.map(load_image, chunk))
        processor(images=loaded, return_tensors="pt")
        result["prep_one_call_s"] = round(time.perf_counter() - t0, 3)
        for k in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            captioner.captions(inputs)
            torch.cuda.synchronize()
            result[f"decode_alone_s_{k}"] = round(time.perf_counter() - t0, 3)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
