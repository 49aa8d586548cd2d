"""Quantization for kiln. reference.py holds the numpy twins (the definitions) of the native
repack and quantization kernels; kiln.repack is the fast API built on kiln._native."""
