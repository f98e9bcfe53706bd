"""The analysis hooks helper against plain PyTorch: what a hook sees and returns, and that none outlives its block."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from eigenfast.adapters import get_adapter
from eigenfast.runtime.forward import last_logits
from eigenfast.runtime.hooks import Hooks

from conftest import make_data, make_model


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_hook_removed_on_exception(family):
    model = make_model(family)
    adapter = get_adapter(model)
    with pytest.raises(KeyError, match="boom"):
        with Hooks(model) as hooks:
            for layer in range(adapter.n_layers):
                hooks.on_input(adapter.site(layer, "o"), lambda x: None)
                hooks.pre(adapter.layers()[layer], lambda m, a, k: None, with_kwargs=True)
                hooks.on_output(adapter.mlp(layer), lambda y: None)
                hooks.stop_after(adapter.layers()[layer])
            assert hook_count(model) == 4 * adapter.n_layers
            raise KeyError("boom")
    assert hook_count(model) == 0


def test_hooks_fire_in_order_of_the_forward_and_of_adding():
    model = make_model("llama")
    adapter = get_adapter(model)
    fired = []
    o = adapter.site(0, "o")
    with Hooks(model) as hooks:
        hooks.on_input(o, lambda x: fired.append("o in, first"))
        hooks.on_output(o, lambda y: fired.append("o out"))
        hooks.on_input(o, lambda x: fired.append("o in, second"))
        hooks.replace_input(o, lambda args: fired.append("o in, prepended"), prepend=True)
        hooks.on_output(adapter.mlp(0), lambda y: fired.append("mlp out"))
        last_logits(adapter, make_data(n=2))
    assert fired == ["o in, prepended", "o in, first", "o in, second", "o out", "mlp out"]


def test_on_every_family_reads_and_replaces_what_plain_torch_hooks_do(family):
    model = make_model(family)
    adapter = get_adapter(model)
    data = make_data(n=4, padded=True)
    path = adapter.site(1, "o").path
    seen = {}
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.__setitem__("torch", a[0].clone()))
    plain = last_logits(adapter, data)
    handle.remove()

    with Hooks(model) as hooks:
        hooks.on_input(path, lambda x: seen.__setitem__("ours", x.clone()))
        assert torch.equal(last_logits(adapter, data), plain)
    torch.testing.assert_close(seen["ours"], seen["torch"], rtol=0, atol=0)

    # Zeroing the MLP's output through replace_output == through a plain forward hook.
    mlp = adapter.mlp(0)
    handle = mlp.register_forward_hook(lambda m, a, y: torch.zeros_like(y))
    zeroed = last_logits(adapter, data)
    handle.remove()
    with Hooks(model) as hooks:
        hooks.replace_output(mlp, torch.zeros_like)
        torch.testing.assert_close(last_logits(adapter, data), zeroed, rtol=0, atol=0)
    assert not torch.allclose(zeroed, plain)
    assert hook_count(model) == 0


def test_stop_after_ends_the_forward_and_only_its_own_block_swallows_it(family):
    model = make_model(family)
    adapter = get_adapter(model)
    ran = []
    with Hooks(model) as outer:
        outer.on_input(adapter.site(1, "o"), lambda x: ran.append(1))
        with Hooks(model) as inner:
            inner.on_input(adapter.site(0, "o"), lambda x: ran.append(0))
            inner.stop_after(adapter.layers()[0])
            last_logits(adapter, make_data(n=2))
            raise AssertionError("the forward went on past the stopping layer")
    assert ran == [0]

    reached = []
    with Hooks(model) as outer:
        with Hooks(model) as inner:
            outer.stop_after(adapter.layers()[0])
            last_logits(adapter, make_data(n=2))
        reached.append("past the inner block")  # it must not swallow the outer block's stop
    assert reached == []
    assert hook_count(model) == 0


def test_on_backward_gives_the_input_and_the_output_gradient(family):
    model = make_model(family)
    adapter = get_adapter(model)
    data = make_data(n=3)
    site = adapter.site(1, "mlp_out")
    module = model.get_submodule(site.path)
    expected = {}

    def hook(m, args, out):
        expected["x"] = args[0].detach().clone()
        out.register_hook(lambda g: expected.__setitem__("g", g.clone()))

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(last_logits(adapter, data), data.labels)

    handle = module.register_forward_hook(hook)
    loss().backward()
    handle.remove()
    model.zero_grad(set_to_none=True)

    seen = {}

    def at_forward(x):
        seen["x"] = x.clone()
        return lambda g: seen.__setitem__("g", g.clone())

    with Hooks(model) as hooks:
        hooks.on_backward(site, at_forward)
        loss().backward()
    model.zero_grad(set_to_none=True)
    assert not seen["x"].requires_grad and not seen["g"].requires_grad
    torch.testing.assert_close(seen["x"], expected["x"], rtol=0, atol=0)
    torch.testing.assert_close(seen["g"], expected["g"], rtol=0, atol=0)
    assert hook_count(model) == 0
