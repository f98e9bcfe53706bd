"""The int_sum built-ins (GPT-2 and Llama) through eigenfast's tools: pruning, circuit extraction and
cached generation agree with their slow references on the trained weights, not only on random-init ones."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.adapters import get_adapter
from eigenfast.builtin import load_builtin
from eigenfast.builtin.train import int_sum_split
from eigenfast.circuit import ablated, component_means
from eigenfast.data.task_data import positions_from_mask

from hook_references import assert_equals_hook_based_frozen_forward, logits, pruned_paths

N = 32
# k and v are the grouped-query projections on the Llama (4 query heads share 2 KV heads); mlp_in is both models' MLP.
COMPONENTS = ("k", "v", "mlp_in")


@pytest.fixture(scope="module", params=["int_sum_gpt2", "int_sum_llama"])
def trained(request):
    """The model and a few of its train and test examples."""
    model, tokenizer = load_builtin(request.param)
    train, test = int_sum_split(tokenizer)
    return model, train.subset(range(N)), test.subset(range(N))


def test_prune_at_p_zero_changes_nothing_and_at_p_equals_the_hook_based_forward(trained):
    model, train, test = trained
    unchanged = eigenfast.prune(model, train, p=0.0, components=COMPONENTS, progress=False)
    assert pruned_paths(unchanged) == []
    torch.testing.assert_close(logits(unchanged.model, test), logits(model, test), rtol=0, atol=1e-5)
    result = eigenfast.prune(model, train, p=0.2, components=COMPONENTS, progress=False)
    assert pruned_paths(result), "p=0.2 should freeze something"
    assert_equals_hook_based_frozen_forward(model, result, train)  # the means it froze with come from train


def test_extracted_circuit_equals_the_hook_ablated_model(trained):
    model, train, test = trained
    circuit = eigenfast.extract_circuit(model, train, test, threshold=0.05, include_mlps=True, progress=False,
                                        latency_repeats=0)
    adapter = get_adapter(model)
    heads = [(layer, h) for layer in range(adapter.n_layers) for h in range(adapter.n_heads)]
    gone_heads = sorted(set(heads) - set(circuit.heads))
    gone_mlps = sorted(set(range(adapter.n_layers)) - set(circuit.mlps))
    assert gone_heads and circuit.heads, "the threshold should remove some heads and keep some"
    with ablated(model, gone_heads, gone_mlps, component_means(model, train), "mean", "mean"):
        reference = logits(model, test)
    torch.testing.assert_close(logits(circuit.model, test), reference, rtol=0, atol=1e-4)


def test_generate_with_kv_cache_matches_full_forwards(trained):
    model, _, test = trained
    prompt = test.input_ids[:2]
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding: positions, masks and the cache must all agree
    new = 6
    out = model.generate(
        prompt * mask, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
        eos_token_id=None, output_scores=True, return_dict_in_generate=True,
    )
    full_mask = torch.cat([mask, torch.ones(2, new - 1, dtype=torch.long)], dim=1)  # the last token is never read
    with torch.no_grad():  # no cache: the whole sequence in one forward, positions as generate() derives them
        full = model(
            out.sequences[:, :-1], attention_mask=full_mask, position_ids=positions_from_mask(full_mask), use_cache=False
        ).logits[:, prompt.shape[1] - 1:]
    torch.testing.assert_close(torch.stack(out.scores, dim=1), full, rtol=0, atol=1e-4)
    assert torch.equal(out.sequences[:, prompt.shape[1]:], full.argmax(-1))
