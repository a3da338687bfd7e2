"""Triton kernels with their pure-torch paths and autograd wrappers, imported as `minti.kernels`.

Every op works without CUDA and without Triton installed: the torch path is always there,
and Triton is imported under a guard. Each op runs the path its caller names (backend="torch"
or "triton"); minti.models.ops routes the models' hot ops here and decides which path
(minti.models.backends).

    flash_attention.py   the attention op (custom op, autograd), over its two paths:
    attention_triton.py  its Triton kernels, autotuning and launchers
    attention_torch.py   its torch path and the float64-friendly reference
    group_norm_silu.py   GroupNorm + SiLU, fused: Triton kernels, torch path, autograd
    geglu.py             GEGLU: Triton kernels, torch path, autograd
    configs.py           per-GPU limits, block configs, the register budget and the pruning
    register_budget.json the measured register budget (bench/compile_targets.py --derive)
    launch.py            what every kernel file shares: paths, output buffers, launch fallback
"""
from minti.kernels.flash_attention import flash_attention
from minti.kernels.geglu import geglu
from minti.kernels.group_norm_silu import group_norm_silu

__all__ = ["flash_attention", "group_norm_silu", "geglu"]
