"""How many bytes of autograd graph scoring's pass 1 may keep for pass 2 (docs/DESIGN.md, "Scoring")."""
from __future__ import annotations

import torch

# Pass 1 keeps the autograd graphs of its first batches, up to this many bytes of saved
# activations (CPU; a quarter of the free memory on CUDA), and pass 2 runs their backward
# without a second forward. Scoring "all" pairs then costs one forward less per kept
# batch, a third of its time on the CPU; memory stays bounded whatever the data size.
GRAPH_BYTES = 1 << 30


def graph_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return GRAPH_BYTES
