"""The paper-style eigenpruning table on held-out data, written into docs/.

Runs the fixed protocol over built-in models (or model directories) and tasks, and writes a Markdown table, a JSON record and a PNG of test accuracy
against p. The protocol (splits, candidates, settings) is fixed by the arguments
before anything is evaluated; test numbers choose nothing.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ..builtin import BUILTIN_MODELS
from ..data.task_data import TaskData
from ..data.tasks import TASKS, load_task
from ..eigenprune.options import DEFAULT_SIGNIFICANCE, SELECTIONS
from ..eigenprune.scoring import ESTIMATES
from ..eigenprune.table import Row, default_settings, markdown, plot, run_table
from ..runtime import distributed
from ..saving.loading import load_model
from ..saving.serialization import check_writable_directory
from .arguments import SELECT_HELP, SIGNIFICANCE_HELP, comma_list, component, fraction, positive_int, significance

TABLE_TASKS = tuple(TASKS)
# The default run's scope, narrowed so that every built-in, every rule, the fine-tuning rows and three seeds fit
# in 40 minutes on a 2-core CPU (docs/EIGENPRUNING_TABLE.md): v is the component on which the mean over pairs
# found conflict3_gpt2's planted interference, int_sum the task every built-in holds out and int_sum_gpt2,
# int_sum_llama and mix_gpt2 already do.
DEFAULT_TASKS = ("int_sum",)
DEFAULT_COMPONENTS = ("v",)
# The table chooses p (and the tuned fine-tune's lr) on both folds of a cross-fit over the score and val thirds:
# validation alone, about 670 examples, ranked candidates a point or two apart the other way round from test.
DEFAULT_SELECT = "crossfit"


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=_names, default=",".join(BUILTIN_MODELS),
                        help="comma-separated built-in names or model directories")
    parser.add_argument("--tasks", type=_names, default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated, from {', '.join(TABLE_TASKS)}")
    parser.add_argument("--seeds", type=_ints, default="0,1,2", help="seeds of the score/val/test split")
    parser.add_argument("--candidates", type=comma_list(fraction), default="0.01,0.05,0.1,0.3", help="p values")
    parser.add_argument("--components", type=comma_list(component), default=",".join(DEFAULT_COMPONENTS),
                        help="component types to table, e.g. k,mlp_in (every one: q,k,v,o,mlp_in,mlp_out)")
    parser.add_argument("--estimates", type=comma_list(_estimate), default=",".join(ESTIMATES),
                        help="estimates tabled with the mean over pairs (the paper's max is always tabled)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="also table the fine-tuning baselines (fine-tune alone, fine-tune then prune, low-rank)")
    parser.add_argument("--significance", type=significance, default=DEFAULT_SIGNIFICANCE, help=SIGNIFICANCE_HELP)
    parser.add_argument("--select", choices=SELECTIONS, default=DEFAULT_SELECT, help=SELECT_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=256, help="examples per forward pass")
    parser.add_argument("--out", type=Path, default=Path("docs/eigenpruning_table/table.md"),
                        help="Markdown file to write; the .json record and .png plot go beside it")


def _estimate(text: str) -> str:
    if text not in ESTIMATES:
        raise argparse.ArgumentTypeError(f"unknown estimate {text!r}; choose from {', '.join(ESTIMATES)}")
    return text


def heldout(name: str, task: str, tokenizer: Any) -> TaskData:
    """Built-in models get only their never-trained-on examples; other models get the whole task."""
    from ..builtin import BUILTIN_MODELS, heldout_task

    if name in BUILTIN_MODELS:
        return heldout_task(name, task, tokenizer)
    return load_task(task, tokenizer)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this table, every protocol choice spelled out."""
    parts = ["eigenfast", "table", "--models", ",".join(args.models), "--tasks", ",".join(args.tasks),
             "--seeds", ",".join(map(str, args.seeds)), "--candidates", ",".join(f"{p:g}" for p in args.candidates)]
    parts += ["--components", ",".join(args.components)]
    parts += ["--estimates", ",".join(args.estimates)] + ([] if args.baselines else ["--no-baselines"])
    parts += ["--significance", f"{args.significance:g}", "--select", args.select]
    return " ".join(shlex.quote(p) for p in [*parts, "--out", str(args.out)])


def page(record: dict[str, Any], png_name: str) -> str:
    """The Markdown page of a table record (the .json the command writes)."""
    rows = [Row.from_dict(r) for r in record["rows"]]
    body = [
        f"Written by `{record['command']}`.", "",
        f"Tasks: {', '.join(record.get('tasks', []))}; components: {', '.join(record.get('components', []))}"
        f"{_scope_note(record)}; candidates p: {', '.join(f'{p:g}' for p in record['candidates'])} (and p = 0, "
        f"the unpruned model){_gate_note(record)}. The cells' wall times add up to "
        f"{sum(c.get('seconds', 0.0) for r in record['rows'] for c in r['cells']) / 60:.1f} min (at the machine's "
        "load then; work a seed's settings share counts in the first cell that needs it).", "",
        "Test accuracy (%) mean ± standard deviation over split seeds "
        f"{', '.join(map(str, record['seeds']))}; {_select_note(record)}; gain = chosen minus base "
        "(points, mean ± sd over seeds); works = a mean gain of at least one point and above twice its sd.",
        "", markdown(rows, record["candidates"]), "", f"![accuracy against p]({png_name})",
    ]
    return "\n".join(body) + "\n"


def _gate_note(record: dict[str, Any]) -> str:
    """How validation chose between p = 0 and a pruned p (records from before the gate have no level)."""
    level = record.get("significance")
    if not level:
        return "; the p most accurate on validation is kept"
    return (f"; a pruned p is kept only where it beats p = 0 on the validation examples beyond chance (exact one-sided "
            f"sign test, family-wise level {level:g} over the candidates)")


def _select_note(record: dict[str, Any]) -> str:
    """What chose p (records from before the cross-fit chose on validation alone)."""
    if record.get("select", "val") == "val":
        return "p chosen on validation only"
    return ("p chosen on both folds of a 2-fold cross-fit: each p's accuracy on val (scored on the score third) "
            "pooled with its accuracy on the score third when scored on the val third; the kept model is the one "
            "scored on the score third (pruning after a fine-tune, whose other fold would be its training data, "
            "chooses on val alone); `val_p` in the .json is the p val alone would have kept")


def _scope_note(record: dict[str, Any]) -> str:
    """Says so when the table is the default run's narrowed scope rather than every task and component."""
    if tuple(record.get("tasks", ())) == DEFAULT_TASKS and tuple(record.get("components", ())) == DEFAULT_COMPONENTS:
        return (" (the default run's scope, chosen to fit 40 minutes on a 2-core CPU: v is where the mean over pairs "
                "found conflict3_gpt2's planted interference; int_sum is held out by every built-in and already "
                "done by int_sum_gpt2, int_sum_llama and mix_gpt2; other tasks and components: --tasks, --components)")
    return ""


def run(args: argparse.Namespace) -> int:
    unknown = [t for t in args.tasks if t not in TABLE_TASKS]
    if unknown or not args.tasks:
        print(f"error: unknown task(s) {unknown}; choose from {', '.join(TABLE_TASKS)}", file=sys.stderr)
        return 2
    if not args.seeds or not args.candidates:
        print("error: give at least one seed and one candidate p", file=sys.stderr)
        return 2
    check_writable_directory(Path(args.out).parent)  # before the minutes of work, not after

    def settings(components):
        chosen = [c for c in components if c in args.components]
        return default_settings(chosen, args.estimates, args.baselines)

    def load(name: str) -> tuple:
        loaded = load_model(name)
        return loaded.model, loaded.tokenizer

    rows = run_table(args.models, args.tasks, load, heldout, args.seeds, args.candidates, settings,
                     args.batch_size, significance=args.significance or None, select=args.select)
    out, png = Path(args.out), Path(args.out).with_suffix(".png")
    distributed.on_main(lambda: write(out, png, rows, args))
    print(f"wrote {out}, {out.with_suffix('.json')} and {png}")
    return 0


def write(out: Path, png: Path, rows: list[Row], args: argparse.Namespace) -> None:
    """The Markdown table, its .json record and the .png plot (rank 0 only under torchrun)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.candidates, png)
    record = {"command": command_line(args), "tasks": list(args.tasks), "components": list(args.components),
              "seeds": list(args.seeds), "candidates": list(args.candidates), "significance": args.significance,
              "select": args.select, "rows": [r.as_dict() for r in rows]}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    out.write_text(page(record, png.name), encoding="utf-8")
