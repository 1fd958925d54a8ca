"""Triton kernels and their launchers (installed as ``fastloss.kernels``).

Launchers take tensors, allocate their outputs and return them. Nothing here knows about autograd,
``ctx`` or reduction strings, and nothing here is imported by ``import fastloss``: the modules
are loaded the first time a Triton-backed loss runs.
"""
