"""minti.training.memtrace: the meta-device byte count the memory plans are built on."""
import torch

from minti.training.memtrace import MemoryTracer


def test_tracer_counts_a_tiny_step_as_by_hand():
    # Frozen fp32 Linear(256->1024) -> ReLU -> Linear(1024->256), batch 64, trainable input v.
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024, bias=False), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 256, bias=False)).requires_grad_(False)
        x = torch.empty(64, 256)
        v = torch.zeros(64, 256, requires_grad=True)
    with MemoryTracer([model], extra=[x, v]) as tracer:
        y = model(x + v)
        loss = y.pow(2).mean()
        loss.backward()
    weights = 2 * 256 * 1024 * 4
    inputs = 2 * 64 * 256 * 4
    # Peak is in backward, at lin1's input gradient: relu output (saved by relu), the
    # gradient into relu, relu's output gradient, and y (saved by pow), plus two scalars.
    hidden = 64 * 1024 * 4
    expected = weights + inputs + 3 * hidden + 64 * 256 * 4 + 2 * 4
    assert tracer.peak_bytes == expected, (tracer.peak_bytes, expected, tracer.peak_breakdown())
