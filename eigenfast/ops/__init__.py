"""eigenfast's custom operators (docs/MATH.md §5).

Importing this package registers them as ``torch.ops.eigenfast.*``, served by the
compiled extension ``eigenfast._C`` or, when it is not built, by a PyTorch fallback.
"""
from .token_bias import extension_available, token_bias_add, token_bias_linear

__all__ = ["extension_available", "token_bias_add", "token_bias_linear"]
