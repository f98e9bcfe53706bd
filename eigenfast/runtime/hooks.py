"""Hooks on a model's modules for analysis code, all removed when the block ends.

Scoring, component means, ablation, discovery, the masked forward and the slow
references read or replace what modules see while an ordinary forward runs.
:class:`Hooks` registers those hooks on modules named by path, by adapter
:class:`~eigenfast.adapters.base.Site` or by the module itself, and removes
every handle on exit, also when the block raises. Its pattern methods cover what
those places share: read a module's input or output, replace it, read the
gradient reaching a module's output, stop the forward after a module.

For analysis only: what eigenfast writes into a model (eigenfast/rewrite/) and
what it serves run no hooks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..adapters.base import Site

Where = str | Site | nn.Module  # a module path, an adapter site, or the module


class StopForward(Exception):
    """Raised by :meth:`Hooks.stop_after`; the :class:`Hooks` block that raised it swallows it."""

    def __init__(self, owner: Hooks) -> None:
        super().__init__("the forward was stopped on purpose after a hooked module")
        self.owner = owner


class Hooks:
    """A context manager: hooks added on ``model``'s modules inside the block are removed on exit.

    Hooks on one module fire in the order they were added (``prepend=True`` puts one first).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> bool:
        self.remove()
        return isinstance(error, StopForward) and error.owner is self

    def remove(self) -> None:
        """Remove every hook added so far (the block's exit does this)."""
        while self._handles:
            self._handles.pop().remove()

    def module(self, where: Where) -> nn.Module:
        if isinstance(where, nn.Module):
            return where
        return self.model.get_submodule(where.path if isinstance(where, Site) else where)

    # --- plain registration: the hook signatures are torch's ----------------------------
    def pre(self, where: Where, hook: Callable, *, with_kwargs: bool = False, prepend: bool = False) -> Hooks:
        """A forward pre-hook: ``hook(module, args)`` (with ``kwargs`` too under ``with_kwargs``)."""
        self._handles.append(self.module(where).register_forward_pre_hook(hook, with_kwargs=with_kwargs, prepend=prepend))
        return self

    def post(self, where: Where, hook: Callable, *, prepend: bool = False) -> Hooks:
        """A forward hook: ``hook(module, args, output)``; what it returns replaces the output."""
        self._handles.append(self.module(where).register_forward_hook(hook, prepend=prepend))
        return self

    # --- the recurring patterns -------------------------------------------------------------
    def on_input(self, where: Where, read: Callable[[torch.Tensor], None]) -> Hooks:
        """``read(x)`` with the module's first positional input, before it runs."""
        return self.pre(where, lambda module, args: read(args[0]))

    def on_output(self, where: Where, read: Callable[[Any], None]) -> Hooks:
        """``read(output)`` after the module runs."""
        return self.post(where, lambda module, args, output: read(output))

    def replace_input(self, where: Where, replace: Callable[[tuple], tuple | None], *, prepend: bool = False) -> Hooks:
        """The module runs on ``replace(args)`` instead of ``args`` (unchanged where it returns None)."""
        return self.pre(where, lambda module, args: replace(args), prepend=prepend)

    def replace_output(self, where: Where, replace: Callable[[Any], Any]) -> Hooks:
        """The module's output becomes ``replace(output)`` (unchanged where it returns None)."""
        return self.post(where, lambda module, args, output: replace(output))

    def on_backward(self, where: Where, at_forward: Callable[[torch.Tensor], Callable[[torch.Tensor], None]]) -> Hooks:
        """``at_forward(x)`` runs in the forward with the module's input (detached) and returns what the
        backward calls with the gradient reaching the module's output (detached)."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            on_grad = at_forward(args[0].detach())
            output.register_hook(lambda g: on_grad(g.detach()))

        return self.post(where, hook)

    def stop_after(self, where: Where) -> Hooks:
        """End the forward once the module has run; the block swallows the :class:`StopForward`."""

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            raise StopForward(self)

        return self.post(where, hook)


def hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The residual stream a decoder layer (or attention block) was called with: first positional, else by keyword."""
    return args[0] if args else kwargs["hidden_states"]
