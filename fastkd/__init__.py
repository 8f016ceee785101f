"""fastkd: a fused knowledge-distillation loss for PyTorch (KL + cross-entropy, loss and gradient in
one pass over the logits), with a C++ kernel on the CPU and a CUDA kernel on the GPU."""
import torch  # noqa: F401  (loads libtorch before the extension)

from fastkd import _C, reference  # noqa: F401  (_C registers torch.ops.fastkd)
from fastkd import ops as _ops  # noqa: F401  (fake impls and autograd for the ops)
from fastkd.functional import distill_loss, has_kernel
from fastkd.fused_linear import FusedLinearDistillLoss, fused_linear_distill_loss
from fastkd.loss import DistillLoss
from fastkd.sharding import inside_forward
from fastkd.sparse import SparseTeacher
from fastkd.terms import DistillTerms
from fastkd.trainer import Distiller  # tqdm / matplotlib / sklearn load only when used

__version__ = "0.1.0"
__all__ = ["DistillLoss", "FusedLinearDistillLoss", "fused_linear_distill_loss", "DistillTerms", "Distiller", "SparseTeacher", "build_info", "distill_loss", "has_kernel", "inside_forward", "reference"]


def build_info() -> dict:
    """How the compiled extension was built: fastkd and torch versions, CUDA kernels and archs, and
    the CPU capability the kernel runs with."""
    return dict(_C.build_info())
