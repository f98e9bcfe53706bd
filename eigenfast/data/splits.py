"""Which examples a number is measured on, so no reported accuracy includes data the model trained on.

A model may record what it was trained on (the built-in models write ``training.json``:
task, train fraction and split seed; eigenfast saves carry the record of the model they
came from). For that task the examples split into

* ``train``: exactly the examples the model was trained on (used for scoring only),
* ``val``:   half of the model's held-out examples (chooses p),
* ``test``:  the other half (reported only, never used to choose anything),

and ``unseen`` is the whole held-out part. For any other task or model the data is
split 80/20 into train and test, and val is a seeded 20% of train; ``unseen`` is all of it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SavedModelError
from .task_data import TaskData

TRAINING_FILE = "training.json"
TRAINING_ATTRIBUTE = "eigenfast_training"  # on the model config, so saves made from the model keep the record


@dataclass(frozen=True)
class TrainingRecord:
    """The task a model was trained on and how that task's examples were split."""

    task: str
    train_fraction: float
    seed: int

    @classmethod
    def from_dict(cls, record: Any, source: str) -> "TrainingRecord":
        try:
            split = record["split"]
            return cls(str(record["task"]), float(split["train_fraction"]), int(split["seed"]))
        except (KeyError, TypeError, ValueError):
            raise SavedModelError(
                f"{source} does not say which task and split the model was trained on "
                '(it needs {"task": ..., "split": {"train_fraction": ..., "seed": ...}})'
            ) from None

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "split": {"train_fraction": self.train_fraction, "seed": self.seed}}


def read_training_record(folder: Path) -> TrainingRecord | None:
    path = folder / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SavedModelError(f"{path} is not valid JSON ({err}); restore it or remove it") from None
    return TrainingRecord.from_dict(record, str(path))


@dataclass
class Part:
    """Some examples of a task and a description of where they come from, printed beside every number."""

    name: str
    data: TaskData
    origin: str

    def describe(self) -> str:
        return f"{self.name:<6} {len(self.data):>5} examples: {self.origin}"


def task_parts(task: str, data: TaskData, training: TrainingRecord | None, seed: int) -> dict[str, Part]:
    """``train``, ``val``, ``test``, ``unseen`` and ``all`` parts of ``data`` (see the module docstring)."""
    if training is not None and training.task == task:
        trained, held_out = data.split(training.train_fraction, seed=training.seed)
        val, test = held_out.split(0.5, seed=seed)
        where = f"of the model's held-out {task} examples (never trained on)"
        return {
            "train": Part("train", trained, f"the {task} examples the model was trained on"),
            "val": Part("val", val, f"half {where}, seed {seed}"),
            "test": Part("test", test, f"the other half {where}"),
            "unseen": Part("unseen", held_out, f"all the model's held-out {task} examples (never trained on)"),
            "all": Part("all", data, f"every {task} example, training examples included"),
        }
    train, test = data.split(0.8, seed=seed)
    train, val = train.split(0.8, seed=seed)
    note = "the model records no training on this task"
    return {
        "train": Part("train", train, f"64% of {task} (seeded 80/20 split, seed {seed}, then 80% of that)"),
        "val": Part("val", val, f"16% of {task}: held out from train, chooses p"),
        "test": Part("test", test, f"20% of {task} (seeded 80/20 split), reported only"),
        "unseen": Part("unseen", data, f"every {task} example ({note})"),
        "all": Part("all", data, f"every {task} example ({note})"),
    }
