"""Triton kernels of tsam_fast (installed as ``tsam_fast._kernels``). Not part of this release yet."""
