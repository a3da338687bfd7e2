import os
from pathlib import Path

import pytest
import torch

TINY_MODEL = Path(__file__).resolve().parents[1] / "weights" / "minti-tiny.safetensors"

# The kernel tests run Triton in its CPU interpreter on CPU tensors (GPU speed and memory
# live in bench/). The switch is read when the kernels are decorated (first import of
# minti.kernels), so it is set for the whole session before any test can import them,
# whichever test file happens to run first.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_backend():
    """Run the models on their pure-torch paths (the Triton kernels have their own tests)."""
    from minti.models import ops

    ops.set_backend("torch")
    yield
    ops.set_backend("auto")


@pytest.fixture
def one_thread():
    """One torch thread: the machine is shared, and it keeps CPU runs comparable run to run."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_sd():
    """The shipped tiny model (64 px) in float32 on the CPU, one per test module: tests register
    their own placeholder tokens on it, so each uses tokens of its own."""
    import minti

    return minti.load(TINY_MODEL, dtype=torch.float32, device="cpu")


@pytest.fixture
def sdxl_conditioning_seen(monkeypatch):
    """watch(sd) -> (calls, variants): every (original_size, crop, target_size) an SDXL model's
    size conditioning receives while training, and the data variants the batches drew, in order."""
    from minti.training.data import TrainingData

    def watch(sd):
        calls, variants = [], []
        real_vector, real_batch = sd.sdxl_vector, TrainingData.batch

        def spy_vector(pooled, original_size, crop=(0, 0), target_size=None):
            calls.append((tuple(original_size), tuple(crop), tuple(target_size)))
            return real_vector(pooled, original_size, crop, target_size)

        def spy_batch(self, first, size):
            out = real_batch(self, first, size)
            variants.extend(out[3])
            return out

        monkeypatch.setattr(sd, "sdxl_vector", spy_vector)
        monkeypatch.setattr(TrainingData, "batch", spy_batch)
        return calls, variants

    return watch
