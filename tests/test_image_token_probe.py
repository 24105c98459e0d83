"""bench/image_token_probe.py's probe: it finds a label the features carry and not one they don't."""
import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("image_token_probe", Path(__file__).parents[1] / "bench/image_token_probe.py")
probe = importlib.util.module_from_spec(spec)
_threads = torch.get_num_threads()
spec.loader.exec_module(probe)      # its pin() sets 2 threads: give the rest of the session back its own
torch.set_num_threads(_threads)


def test_the_probe_reads_a_carried_label_and_not_an_absent_one():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (600,), generator=g)
    noise = torch.randn(600, 32, generator=g)
    carried = noise.clone()
    carried[:, :4] += 3.0 * torch.nn.functional.one_hot(y, 4)    # the label, linearly, in 4 of 32 features
    assert probe.probe_accuracy(carried, y, n_fit=400) > 0.95
    assert probe.probe_accuracy(noise, y, n_fit=400) < 0.40        # chance is 0.25
