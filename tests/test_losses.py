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


def reference_infonce(q, docs, texts, temperature=0.05, margin=0.1):
    """Qwen3-Embedding's improved InfoNCE (arXiv 2506.05176, eq. 1), written out term by term with loops, from the
    paper rather than from the library: for query i with positive d_i+ and similarity s (cosine),

        Z_i = e^{s(q_i, d_i+)/t} + sum_k m e^{s(q_i, d_k)/t} + sum_{j != i} m e^{s(q_i, q_j)/t}
              + sum_k m e^{s(d_i+, d_k)/t}

    over every document d_k of the batch other than d_i+ (positives of the other rows and all hard negatives),
    with the mask m = 0 when the term's similarity exceeds s(q_i, d_i+) + margin or d_k is d_i+'s text."""
    q = F.normalize(q, dim=-1)
    docs = [F.normalize(d, dim=-1) for d in docs]
    everything = [(docs[c][r], texts[c][r]) for c in range(len(docs)) for r in range(len(q))]
    losses = []
    for i in range(len(q)):
        positive, positive_text = docs[0][i], texts[0][i]
        s_pos = float(q[i] @ positive)
        terms = [s_pos]
        others = [(d, t) for d, t in everything if t != positive_text]
        terms += [float(q[i] @ d) for d, _ in others]  # query-document
        terms += [float(q[i] @ q[j]) for j in range(len(q)) if j != i]  # query-query
        terms += [float(positive @ d) for d, _ in others]  # document-document
        kept = [terms[0]] + [s for s in terms[1:] if s <= s_pos + margin]
        losses.append(-(kept[0] / temperature - torch.logsumexp(torch.tensor(kept) / temperature, 0).item()))
    return sum(losses) / len(losses)


def text_ids(texts):
    """The key tensors the loss takes: one integer per text, equal for equal texts."""
    ids = {t: i for i, t in enumerate(sorted({t for col in texts for t in col}))}
    return [torch.tensor([ids[t] for t in col]) for col in texts]


def test_loss_equals_the_paper_on_batches_where_every_mask_matters():
    """Random batches plus planted rows: a query whose positive is almost itself (so the query-query self term,
    s = 1, is not above s(q, d+) + margin and only the self-mask removes it), a document near another row's
    positive (so the document-document margin must mask it), a hard negative equal in text to a positive."""
    torch.manual_seed(0)
    for _ in range(5):
        q = torch.randn(6, 16)
        pos = torch.randn(6, 16)
        neg = torch.randn(6, 16)
        pos[0] = q[0] + 0.05 * torch.randn(16)  # s(q0, d0+) ~ 0.99: the self term survives the margin rule
        neg[1] = pos[2] + 0.01 * torch.randn(16)  # s(d2+, neg1) ~ 1: masked by the d-d margin only
        neg[3] = pos[3]  # the same text as the row's positive
        texts = [[f"p{i}" for i in range(6)], [f"n{i}" for i in range(6)]]
        texts[1][3] = "p3"
        ours = qwen3_infonce(q, [pos, neg], text_ids(texts), temperature=0.05)
        assert ours.item() == pytest.approx(reference_infonce(q, [pos, neg], texts), rel=1e-5)


def test_planted_false_negative_is_masked():
    query, positive = unit([1, 0, 0]), unit([0.8, 0.6, 0])  # s(q, d+) = 0.8
    planted = unit([1, 0.05, 0])  # s(q, planted) ~ 0.999 > 0.8 + 0.1: a likely false negative
    loss = qwen3_infonce(query, [positive, planted], [keys(1), keys(1, 10)], temperature=0.05)
    # Left in the denominator: the positive, and d-d between the positive and the planted document
    # (0.83 < 0.9). Masked: q-d with the planted document, the positive as its own negative, q with itself.
    s_pos, s_dd = (query @ positive.T).item(), (positive @ planted.T).item()
    expected = -torch.log_softmax(torch.tensor([s_pos, s_dd]) / 0.05, dim=0)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    unmasked = qwen3_infonce(query, [positive, planted], [keys(1), keys(1, 10)], margin=10.0)
    assert unmasked > loss + 1


def test_duplicate_of_the_positive_is_masked():
    queries = unit([1, 0, 0], [0, 1, 0])
    positives = unit([0.7, 0.7, 0], [0, 1, 0.2])
    negatives = unit([0.7, 0.7, 0], [0, 0, 1])  # row 0's negative is the same text as its positive
    as_duplicate = qwen3_infonce(queries, [positives, negatives], [keys(2), torch.tensor([0, 11])])
    as_other_text = qwen3_infonce(queries, [positives, negatives], [keys(2), torch.tensor([10, 11])])
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
def test_each_loss_teaches_the_model_its_batch(tiny_embedding, tiny_batch, name):
    """A few optimiser steps on one batch: each query ends up closer to its own document than to the documents it
    is contrasted with (every other document of the batch; for the triplet loss, its own negative), which the
    random model did not do before, and the loss falls by an order of magnitude on the way."""
    model = load_embedder(str(tiny_embedding), device="cpu")
    _, features = tiny_batch
    loss_fn = build_loss(name, model, matryoshka_dims=[64, 16] if name.startswith("cached") else None,
                         mini_batch_size=2)  # fmt: skip

    def ranks_its_own_document_first():
        with torch.no_grad():
            q, d, n = (model(dict(f))["sentence_embedding"] for f in features)
        if name == "triplet":
            return bool(((q * d).sum(1) > (q * n).sum(1)).all())
        return bool(((q @ torch.cat([d, n]).T).argmax(1) == torch.arange(len(q))).all())

    assert not ranks_its_own_document_first()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(copy.deepcopy(features), None)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert ranks_its_own_document_first()
    assert min(losses[-3:]) < losses[0] / 10, losses


def test_unknown_loss_names_the_choices(tiny_embedding):
    with pytest.raises(ValueError, match="qwen3, cached_qwen3, mnrl"):
        build_loss("infonce++", None)
