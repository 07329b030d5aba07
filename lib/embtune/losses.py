"""Contrastive losses for training: sentence-transformers' where they exist, the Qwen3 one where not.

sentence-transformers' MultipleNegativesRankingLoss already has the GTE-style extra directions
(query-query, document-document), but not the false-negative mask of the Qwen3-Embedding paper
(arXiv 2506.05176, eq. 1): an in-batch candidate whose similarity beats the positive's by more than a
margin, or that is the positive itself, is dropped from the denominator instead of being pushed away.
`Qwen3InfoNCELoss` adds that; `CachedQwen3InfoNCELoss` is the same loss with GradCache
(sentence-transformers' `CachedLossMixin`), so a small GPU gets a large effective batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import CachedLossMixin
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.util.distributed import all_gather, all_gather_with_grad, get_rank
from torch import Tensor, nn

LOSSES = ("qwen3", "cached_qwen3", "mnrl", "cached_mnrl", "triplet")


def text_keys(features: dict[str, Tensor]) -> Tensor:
    """One integer per row, equal for rows with the same tokens (how duplicates of a positive are found)."""
    ids, mask = features["input_ids"], features.get("attention_mask")
    rows = ids.tolist() if mask is None else [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
    return torch.tensor([hash(tuple(r)) for r in rows], dtype=torch.long, device=ids.device)


def qwen3_infonce(
    queries: Tensor,
    docs: list[Tensor],
    doc_keys: list[Tensor],
    temperature: float = 0.05,
    margin: float = 0.1,
    gather: bool = False,
) -> Tensor:
    """Improved InfoNCE of Qwen3-Embedding over one batch.

    queries (B, d); docs[0] the positives (B, d), docs[1:] hard-negative columns (B, d) each; doc_keys mark
    identical texts (one key tensor per docs column). The denominator of query i holds its positive, every
    document (q-d), every other query (q-q) and, for its positive, every other document (d-d); a term is masked
    when its similarity exceeds s(q_i, d_i+) + margin, or when the document is the positive itself (a likely
    false negative).
    """
    queries = F.normalize(queries, dim=-1)
    docs = [F.normalize(d, dim=-1) for d in docs]
    positives = docs[0]
    batch = len(queries)
    offset = 0
    all_queries, all_docs, all_doc_keys = queries, docs, doc_keys
    if gather:  # negatives from every device; gradients flow back to each device's own rows
        all_queries = all_gather_with_grad(queries)
        all_docs = [all_gather_with_grad(d) for d in docs]
        all_doc_keys = [all_gather(k) for k in doc_keys]
        offset = get_rank() * batch
    candidates = torch.cat(all_docs)  # positives of all rows first, then each negative column
    candidate_keys = torch.cat(all_doc_keys)
    own = torch.arange(offset, offset + batch, device=queries.device)
    rows = torch.arange(batch, device=queries.device)

    pos_score = (queries * positives).sum(-1)
    q_d = queries @ candidates.T
    q_q = queries @ all_queries.T
    d_d = positives @ candidates.T
    with torch.no_grad():
        limit = pos_score.unsqueeze(1) + margin
        same_as_positive = candidate_keys.unsqueeze(0) == doc_keys[0].unsqueeze(1)  # includes the positive
        drop_q_d = (q_d > limit) | same_as_positive
        drop_d_d = (d_d > limit) | same_as_positive
        drop_q_q = q_q > limit
        drop_q_q[rows, own] = True  # a query is not its own negative
    logits = (
        torch.cat(
            [
                pos_score.unsqueeze(1),
                q_d.masked_fill(drop_q_d, float("-inf")),
                q_q.masked_fill(drop_q_q, float("-inf")),
                d_d.masked_fill(drop_d_d, float("-inf")),
            ],
            dim=1,
        )
        / temperature
    )
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


class Qwen3InfoNCELoss(nn.Module):
    """Qwen3-Embedding's InfoNCE (see module docstring) on (anchor, positive, negative_1..n) inputs."""

    def __init__(self, model, temperature: float = 0.05, margin: float = 0.1, gather_across_devices: bool = False):
        super().__init__()
        self.model, self.temperature, self.margin = model, temperature, margin
        self.gather_across_devices = gather_across_devices

    def loss(self, reps: list[Tensor], keys: list[Tensor]) -> Tensor:
        """reps and keys per input column: the anchors first, then the positives and negatives."""
        return qwen3_infonce(reps[0], reps[1:], keys[1:], self.temperature, self.margin, self.gather_across_devices)

    def forward(self, sentence_features, labels=None) -> Tensor:
        sentence_features = list(sentence_features)
        reps = [self.model(f)["sentence_embedding"] for f in sentence_features]
        return self.loss(reps, [text_keys(f) for f in sentence_features])

    def get_config_dict(self):
        return {"temperature": self.temperature, "margin": self.margin,
                "gather_across_devices": self.gather_across_devices}  # fmt: skip


class CachedQwen3InfoNCELoss(CachedLossMixin, Qwen3InfoNCELoss):
    """The same loss with GradCache: embeds `mini_batch_size` rows at a time, so memory stays flat
    while the batch (and so the number of negatives) grows."""

    def __init__(
        self,
        model,
        temperature: float = 0.05,
        margin: float = 0.1,
        mini_batch_size: int = 16,
        gather_across_devices: bool = False,
    ):
        super().__init__(model, temperature, margin, gather_across_devices)
        self.mini_batch_size = mini_batch_size
        self._keys: list[Tensor] = []

    def calculate_loss(self, reps, labels=None, *, with_backward: bool = False) -> Tensor:
        loss = self.loss([torch.cat(r) for r in reps], self._keys)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features, labels=None) -> Tensor:
        sentence_features = list(sentence_features)
        self._keys = [text_keys(f) for f in sentence_features]
        return self.forward_cached(sentence_features, labels)

    def get_config_dict(self):
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}


def build_loss(
    name: str,
    model,
    temperature: float = 0.05,
    matryoshka_dims: list[int] | None = None,
    mini_batch_size: int = 16,
    triplet_margin: float = 0.1,
    gather_across_devices: bool = False,
):
    """The training loss by name, optionally wrapped in MatryoshkaLoss over `matryoshka_dims`."""
    scale = 1.0 / temperature  # sentence-transformers' scale is the inverse temperature
    if name == "qwen3":
        loss = Qwen3InfoNCELoss(model, temperature, gather_across_devices=gather_across_devices)
    elif name == "cached_qwen3":
        loss = CachedQwen3InfoNCELoss(
            model, temperature, mini_batch_size=mini_batch_size, gather_across_devices=gather_across_devices
        )
    elif name == "mnrl":
        loss = st_losses.MultipleNegativesRankingLoss(model, scale=scale, gather_across_devices=gather_across_devices)
    elif name == "cached_mnrl":
        loss = st_losses.CachedMultipleNegativesRankingLoss(
            model, scale=scale, mini_batch_size=mini_batch_size, gather_across_devices=gather_across_devices
        )
    elif name == "triplet":
        loss = st_losses.TripletLoss(
            model, distance_metric=st_losses.TripletDistanceMetric.COSINE, triplet_margin=triplet_margin
        )
    else:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {name!r}")
    if matryoshka_dims:
        loss = st_losses.MatryoshkaLoss(model, loss, matryoshka_dims=sorted(matryoshka_dims, reverse=True))
    return loss
