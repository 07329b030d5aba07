import copy

import pytest
import torch
import torch.nn.functional as F

from embtune.losses import CachedQwen3InfoNCELoss, Qwen3InfoNCELoss, build_loss, qwen3_infonce
from embtune.models import load_embedder


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def keys(n, start=0):
    return torch.arange(start, start + n)


def test_planted_false_negative_is_masked():
    query, positive = unit([1, 0, 0]), unit([0.8, 0.6, 0])  # s(q, d+) = 0.8
    planted = unit([1, 0.05, 0])  # s(q, planted) ~ 0.999 > 0.8 + 0.1: a likely false negative
    loss = qwen3_infonce(query, [positive, planted], keys(1), [keys(1), keys(1, 10)], temperature=0.05)
    # Left in the denominator: the positive, and d-d between the positive and the planted document
    # (0.83 < 0.9). Masked: q-d with the planted document, the positive as its own negative, q with itself.
    s_pos, s_dd = (query @ positive.T).item(), (positive @ planted.T).item()
    expected = -torch.log_softmax(torch.tensor([s_pos, s_dd]) / 0.05, dim=0)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    unmasked = qwen3_infonce(query, [positive, planted], keys(1), [keys(1), keys(1, 10)], margin=10.0)
    assert unmasked > loss + 1


def test_duplicate_of_the_positive_is_masked():
    queries = unit([1, 0, 0], [0, 1, 0])
    positives = unit([0.7, 0.7, 0], [0, 1, 0.2])
    negatives = unit([0.7, 0.7, 0], [0, 0, 1])  # row 0's negative is the same text as its positive
    as_duplicate = qwen3_infonce(queries, [positives, negatives], keys(2), [keys(2), torch.tensor([0, 11])])
    as_other_text = qwen3_infonce(queries, [positives, negatives], keys(2), [keys(2), torch.tensor([10, 11])])
    assert as_duplicate < as_other_text


@pytest.fixture
def tiny_batch(tiny_embedding):
    model = load_embedder(str(tiny_embedding), device="cpu")
    texts = [
        ["find the manual page", "how to sort a list", "open a file", "parse json text"],
        [
            "man pages describe commands",
            "sorted returns a new list",
            "open returns a file object",
            "json.loads parses a string",
        ],
        ["tar archives", "list of numbers", "close a socket", "xml parsing"],
    ]
    return model, [model.preprocess(t) for t in texts]


def grads(model, loss_fn, features):
    model.zero_grad()
    loss = loss_fn(copy.deepcopy(features), None)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_gradients_equal_uncached(tiny_batch):
    model, features = tiny_batch
    model.train()
    plain_loss, plain = grads(model, Qwen3InfoNCELoss(model), features)
    cached_loss, cached = grads(model, CachedQwen3InfoNCELoss(model, mini_batch_size=2), features)
    assert cached_loss == pytest.approx(plain_loss, abs=1e-5)
    assert plain.keys() == cached.keys() and plain
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["qwen3", "cached_qwen3", "mnrl", "cached_mnrl", "triplet"])
def test_loss_falls_over_a_few_steps(tiny_embedding, tiny_batch, name):
    model = load_embedder(str(tiny_embedding), device="cpu")
    _, features = tiny_batch
    loss_fn = build_loss(
        name, model, matryoshka_dims=[64, 16] if name.startswith("cached") else None, mini_batch_size=2
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(copy.deepcopy(features), None)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_unknown_loss_names_the_choices(tiny_embedding):
    with pytest.raises(ValueError, match="qwen3, cached_qwen3, mnrl"):
        build_loss("infonce++", None)
