"""Triton kernels of tsam_fast (installed as ``tsam_fast._kernels``).

* ``tsam_kernels``: the ``@triton.jit`` kernels, one per op of the contract (``tsam_fast/backends/contract.py``);
* ``launch``: host launchers (checks, noise-run tables, block sizes, grids);
* ``ops``: the launchers as the contract's ops, registered from its table as ``torch.ops.tsam_fast_triton.*``
  (for ``torch.compile``);
* ``compile_check``: compiles every kernel variant for a GPU architecture without a GPU.

This package imports nothing itself, so it imports cleanly without triton; the Triton backend
(``tsam_fast/backends/triton_backend.py``) imports its modules lazily from ``probe()``.
"""
