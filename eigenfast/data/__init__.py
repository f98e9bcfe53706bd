"""Task data (``task_data``: int_sum, int_mult, JSONL, left-padded tensors), further tasks
(``tasks``: induction) and which examples each number is measured on (``splits``)."""
from .task_data import TaskData, as_task_data, from_jsonl, from_pairs, int_mult, int_sum
from .tasks import induction, load_task

__all__ = ["TaskData", "as_task_data", "from_jsonl", "from_pairs", "induction", "int_mult", "int_sum", "load_task"]
