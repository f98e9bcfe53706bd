"""Measures that compare two models' outputs."""
from __future__ import annotations

import torch


def kl_divergence(logp_f: torch.Tensor, logits_g: torch.Tensor, p_f: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example KL(f‖g) from f's log-probabilities ``(B, V)`` and g's logits ``(..., B, V)``.

    ``p_f`` (``logp_f.exp()``) may be passed when f is compared with many g's, to compute it once.
    """
    logp_g = torch.log_softmax(logits_g.float(), dim=-1)
    return ((logp_f.exp() if p_f is None else p_f) * (logp_f - logp_g)).sum(dim=-1)
