"""What the trials' forkserver loads before it forks them: everything they use, and both models."""
import torch

torch.set_num_threads(1)  # a process forked from one that has started a thread pool may hang in it

import crash_writer  # noqa: E402  (after the thread setting, which must come first)

crash_writer.models()
