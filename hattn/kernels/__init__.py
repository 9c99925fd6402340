"""Kernels of the split ops, one folder per algorithm, each with the plain-torch reference its tests compare
against (and that CPUs run): attention/ (kind "full"), gated_delta/ and conv1d/ (kind "linear"), kda/, lightning/,
mamba2/. Kernels read tensors and device metadata only: they never import the forward context, runtimes or models.
"""
