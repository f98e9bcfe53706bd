"""Running models for analysis, shared by every feature: forwards and evaluation (``forward``),
output comparisons (``metrics``), true positions for hook-based references
(``position_tracker``), torch.distributed (``distributed``), progress bars, sizes and figures."""
