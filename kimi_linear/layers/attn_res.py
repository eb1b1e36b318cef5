"""Block Attention Residuals (arXiv 2603.15031, attnres.md): each sublayer reads a softmax mix over depth instead of
the running sum of everything before it.

Every attention and every feed-forward sublayer is one step of depth (54 for the 48B shape). The sources are

- ``b_0``, the token embedding (always a source of its own, never summed into a block);
- ``b_1 .. b_{n-1}``, the completed blocks: each the plain sum of its ``S`` sublayers' outputs;
- ``b_n^{i-1}``, the current block's partial sum, once the block has a sublayer behind it.

Sublayer l's input is ``h_l = Σ_j α_j v_j`` with ``α = softmax_j(w_l · RMSNorm_l(v_j))``: one learned pseudo-query
``w_l`` per sublayer (zero at initialisation, so training starts from the uniform average), keys RMS-normalised,
no temperature. The sublayer then applies its usual pre-norm to ``h_l``. A final read with its own query feeds the
model's final norm. ``S = 1`` is Full AttnRes; one block holding every sublayer is the standard residual with the
embedding kept apart.

Two evaluations of the same math:

- **direct** (training): each read scores its sources on its own — what keeps every query inside the decoder layer
  that owns it, so FSDP can shard layers as usual;
- **two-phase** (inference, no gradient): at a block's first read, the queries of all the block's sublayers score
  the completed blocks in one pass (phase 1, one read of the sources for S queries); each read then merges its
  phase-1 result with the partial sum by an online-softmax step (phase 2).

Checkpoint tensors (our names; the paper published none): per decoder layer ``model.layers.{i}.attn_res.{attn,ffn}``
``.query`` ``[D]`` and ``.norm.weight`` ``[D]``, and ``model.attn_res_final.{query, norm.weight}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from kimi_linear.layers.norm import RMSNorm


class DepthRead(nn.Module):
    """One read over depth: the pseudo-query and the keys' RMSNorm weight of one sublayer (or of the final read).

    The key norm's weight only ever multiplies the query (``w · (γ ⊙ v̂) = (w ⊙ γ) · v̂``), so scores are computed as
    ``(w ⊙ γ) · v̂`` in fp32 with ``v̂ = v / rms(v)``: the same arithmetic in the direct and the two-phase read."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden_size))
        self.norm = RMSNorm(hidden_size, eps)

    def effective_query(self) -> torch.Tensor:
        return self.query.float() * self.norm.weight.float()

    def normalize(self, v: torch.Tensor) -> torch.Tensor:
        """``v / rms(v)`` in fp32 over the last dim."""
        v = v.float()
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.norm.eps)

    def forward(self, state: DepthState) -> torch.Tensor:
        """This read's mix of the sources in ``state`` → ``[T, D]`` in the sources' dtype."""
        if state.phase1 is not None:
            top, total, acc = state.phase1[state.filled]
        else:
            logits = self.normalize(state.blocks) @ self.effective_query()  # [N, T]
            top = logits.amax(0)
            p = (logits - top).exp()
            total, acc = p.sum(0), torch.einsum("nt,ntd->td", p, state.blocks.float())
        return state.merge(self, top, total, acc)


@dataclass
class DepthState:
    """The residual stream of Block AttnRes over one step's tokens: the completed blocks ``[N, T, D]`` (the
    embedding first), the current block's partial sum and how many sublayers it holds, and (two-phase reads) the
    current block's phase-1 results. Never modified in place: a sublayer makes a new state, so activation
    checkpointing can replay a layer."""

    blocks: torch.Tensor
    block_size: int
    partial: torch.Tensor | None = None
    filled: int = 0
    block_reads: Callable[[int], list[DepthRead]] | None = None  # two-phase: the reads of block n, in order
    phase1: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, embedding: torch.Tensor, block_size: int,
              block_reads: Callable[[int], list[DepthRead]] | None = None) -> DepthState:
        state = cls(embedding[None], block_size, block_reads=block_reads)
        state.prepare()
        return state

    def add(self, out: torch.Tensor) -> DepthState:
        """A sublayer's output joins the partial sum; a full block becomes a source."""
        partial = out if self.partial is None else self.partial + out
        if self.filled + 1 < self.block_size:
            return DepthState(self.blocks, self.block_size, partial, self.filled + 1, self.block_reads, self.phase1)
        state = DepthState(torch.cat([self.blocks, partial[None]]), self.block_size, None, 0, self.block_reads)
        state.prepare()
        return state

    def prepare(self) -> None:
        """Phase 1 of the block that starts now, when two-phase reads are on: for each of the block's queries at
        once, the softmax statistics over the completed blocks — running max, sum of exponentials, weighted sum."""
        reads = self.block_reads(self.blocks.shape[0]) if self.block_reads is not None else []
        if not reads:
            return
        queries = torch.stack([r.effective_query() for r in reads])  # [S, D]
        logits = torch.einsum("ntd,sd->snt", reads[0].normalize(self.blocks), queries)
        top = logits.amax(1)  # [S, T]
        p = (logits - top[:, None]).exp()
        acc = torch.einsum("snt,ntd->std", p, self.blocks.float())
        self.phase1 = list(zip(top, p.sum(1), acc))

    def merge(self, read: DepthRead, top: torch.Tensor, total: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """Fold the partial sum (if the block has one) into a softmax over the completed blocks given by its running
        max ``top`` ``[T]``, sum of exponentials ``total`` ``[T]`` and weighted sum ``acc`` ``[T, D]`` (fp32): an
        online-softmax step. Returns the read ``[T, D]`` in the sources' dtype."""
        if self.partial is not None:
            logit = read.normalize(self.partial) @ read.effective_query()
            new_top = torch.maximum(top, logit)
            old, own = (top - new_top).exp(), (logit - new_top).exp()
            acc = acc * old[:, None] + self.partial.float() * own[:, None]
            total = total * old + own
        return (acc / total[:, None]).to(self.blocks.dtype)

    def read(self, reader: DepthRead) -> torch.Tensor:
        return reader(self)


@dataclass
class Residual:
    """The standard residual stream, with the interface of :class:`DepthState`: a read is the running sum.

    Both streams are dataclasses because a decoder layer takes and returns them: wrappers that look for the tensors
    in a module's inputs and outputs traverse dataclasses (FSDP2 hooks its pre-backward unshard on the output tensors
    and its mixed precision casts the input tensors)."""

    h: torch.Tensor

    def read(self, reader: DepthRead | None = None) -> torch.Tensor:
        return self.h

    def add(self, out: torch.Tensor) -> Residual:
        return Residual(self.h + out)


class SublayerReads(nn.Module):
    """The two reads of one decoder layer: before its attention and before its feed-forward."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.attn = DepthRead(hidden_size, eps)
        self.ffn = DepthRead(hidden_size, eps)

