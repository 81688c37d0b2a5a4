"""Attention, chunking, SSM and conv kernels: plain-PyTorch references and fast CUDA paths."""
