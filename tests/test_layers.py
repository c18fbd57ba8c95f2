"""The adapters' attention on F.scaled_dot_product_attention: nn.MultiheadAttention's weights and results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm_adapters.adapters.layers import MultiHeadAttention, QFormerLayer


def pair(dim=32, heads=4):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(dim, heads, batch_first=True)
    torch.manual_seed(0)
    return reference, MultiHeadAttention(dim, heads)


def test_same_parameters_and_init_as_multihead_attention():
    """A seed gives the same weights under the same names: adapters saved before the switch load as they were."""
    reference, fused = pair()
    ours, theirs = fused.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("keys,masked", [(None, False), (7, False), (7, True), (1, False)])
def test_same_output_as_multihead_attention(keys, masked):
    reference, fused = pair()
    for p in fused.parameters():  # away from the zero biases, so that every term counts
        nn.init.normal_(p)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, 32)
    context = x if keys is None else torch.randn(3, keys, 32)
    mask = None
    if masked:
        mask = torch.ones(3, keys, dtype=torch.bool)
        mask[0, 4:], mask[2, 1:] = False, False
    expected = reference(x, context, context, key_padding_mask=None if mask is None else ~mask, need_weights=False)[0]
    got = fused(x, None if keys is None else context, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_qformer_shares_one_self_attention_across_the_batch():
    """One row of queries is expanded after the self-attention: the same result as B copies of it."""
    torch.manual_seed(0)
    layer = QFormerLayer(dim=32, heads=4, mlp_ratio=2)
    latents, context = torch.randn(1, 6, 32), torch.randn(3, 4, 32)
    torch.testing.assert_close(layer(latents, context), layer(latents.expand(3, -1, -1), context))


def test_one_key_shortcut_only_in_inference():
    """Training takes the full path: the query's weights get a (zero) gradient, as with nn.MultiheadAttention."""
    _, fused = pair()
    x = torch.randn(2, 5, 32, requires_grad=True)
    fused(x, torch.randn(2, 1, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().max() < 1e-5  # the query cannot change a one-key softmax
