"""Triton kernels with their pure-torch references, imported as `minti.kernels`.

Every kernel file works without CUDA and without Triton installed: the torch path is
always there, and Triton is imported lazily.
"""
