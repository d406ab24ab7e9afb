"""Sparse TopK-SAE kernels (Triton on CUDA, eager torch on CPU) behind one set of autograd ops.

Not built yet: the Triton kernels and their eager twins are the work of their own issue. Until then
the SAE runs on the eager torch code in `sae.model`, which will be the float64 reference for them.
"""
