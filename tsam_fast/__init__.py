"""tsam_fast: Tilted Sharpness-Aware Minimization for PyTorch, fused over flat parameter buffers.

    from tsam_fast import TSAM
    opt = TSAM(model.parameters(), torch.optim.SGD, tilt=1.0, num_samples=3, lr=0.1, momentum=0.9)
    tilted_loss = opt.step(closure)

``backend_info()`` says which backends (reference, cpp, triton) can run here and why not.
"""

from .backends import BackendStatus, BackendUnavailable, backend_info
from .batchnorm import BN_POLICIES, bn_running_stats, bn_update_once_per_step, bn_update_per_sample
from .metrics import Sharpness, sharpness
from .optimizer import TSAM, NonFiniteLossError
from .schedules import LinearTilt, linear_decay, linear_warmup

__version__ = "0.1.0"

__all__ = [
    "TSAM",
    "NonFiniteLossError",
    "BackendStatus",
    "BackendUnavailable",
    "backend_info",
    "bn_update_once_per_step",
    "bn_update_per_sample",
    "bn_running_stats",
    "BN_POLICIES",
    "Sharpness",
    "sharpness",
    "LinearTilt",
    "linear_warmup",
    "linear_decay",
    "__version__",
]
