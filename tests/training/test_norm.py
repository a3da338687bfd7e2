"""Norm control of the trained vectors (--norm preserve, --max-norm), on plain tensors."""
import pytest
import torch

from minti.errors import UserError
from minti.training.norm import NormControl, median_norm


def tables():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1000, 8, generator=gen) * 0.1, torch.randn(1000, 16, generator=gen) * 2.0]


def test_preserve_rescales_every_vector_to_its_own_encoders_median_norm():
    control = NormControl.from_config("preserve", None, tables())
    params = [torch.randn(3, 8) * 5, torch.randn(3, 16) * 0.01]
    control.apply(params)
    for p, table in zip(params, tables()):
        torch.testing.assert_close(p.norm(dim=1), torch.full((3,), median_norm(table)))
    assert control.targets[0] < 0.5 < 5 < control.targets[1]  # per encoder, not one number for both


def test_max_norm_clips_only_the_vectors_above_it_and_keeps_directions():
    control = NormControl.from_config("off", 1.0, tables())
    p = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    control.apply([p])
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def test_preserve_then_max_norm_and_off_does_nothing():
    both = NormControl.from_config("preserve", 0.05, tables())
    p = [torch.randn(2, 8), torch.randn(2, 16)]
    both.apply(p)
    assert torch.allclose(p[0].norm(dim=1), torch.full((2,), 0.05)) and torch.allclose(p[1].norm(dim=1), torch.full((2,), 0.05))
    off = NormControl.from_config("off", None, tables())
    q = torch.randn(2, 8) * 9
    before = q.clone()
    off.apply([q])
    assert not off.active and torch.equal(q, before)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match="unknown --norm 'keep'"):
        NormControl.from_config("keep", None, tables())
    with pytest.raises(UserError, match="--max-norm must be > 0"):
        NormControl.from_config("off", 0.0, tables())
