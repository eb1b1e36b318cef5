"""How the tokens of a batch are grouped into sequences, derived once per forward and shared by all layers.

Three layouts reach the model:
- plain: each row of ``[B, T]`` is one sequence (the fast path: causal SDPA, batched KDA);
- packed: documents packed into rows, marked by ``position_ids`` restarting at 0, or by ``cu_seqlens`` over a
  single row; KDA and the conv see ``cu_seqlens`` over the flattened ``B * T`` tokens, MLA a block mask;
- padded: ``attention_mask`` marks real tokens (left padding for generation); pads are zeroed before KDA,
  which then leaves the recurrent and conv states exactly untouched, and masked as MLA keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceInfo:
    batch_size: int
    seq_len: int
    cu_seqlens: torch.Tensor | None = None  # [N+1] int32 over the flattened B*T tokens (packed layout only)
    doc_ids: torch.Tensor | None = None  # [B, T] document index of each token (packed layout only)
    attention_mask: torch.Tensor | None = None  # [B, T] bool, True for real tokens (padded layout only)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @classmethod
    def build(
        cls,
        input_shape: tuple[int, int],
        device: torch.device,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> SequenceInfo:
        B, T = input_shape
        given = [name for name, v in (("position_ids", position_ids), ("cu_seqlens", cu_seqlens),
                                      ("attention_mask", attention_mask)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass at most one of position_ids, cu_seqlens, attention_mask; got {given}")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}], got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=device, dtype=torch.bool)
            return cls(B, T, attention_mask=None if bool(mask.all()) else mask)
        if position_ids is not None:
            if tuple(position_ids.shape) != (B, T):
                raise ValueError(f"position_ids must be [B, T] = [{B}, {T}], got {tuple(position_ids.shape)}")
            starts = position_ids.to(device) == 0
            starts[:, 0] = True
            if bool(starts.sum() == B):
                return cls(B, T)
            flat = starts.reshape(-1)
            cu_seqlens = torch.cat([flat.nonzero().flatten(), torch.tensor([B * T], device=device)])
        elif cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens packs sequences into one row: batch size must be 1, got {B}")
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.long)
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != T or any(b <= a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"cu_seqlens must rise strictly from 0 to T = {T}, got {bounds}")
        else:
            return cls(B, T)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        doc_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths).view(B, T)
        return cls(B, T, cu_seqlens=cu_seqlens.to(torch.int32), doc_ids=doc_ids)

    def document_starts(self) -> torch.Tensor | None:
        """``[B, T]`` bool, True where a packed document begins (its first token has no in-document history)."""
        if self.doc_ids is None:
            return None
        starts = torch.zeros(self.batch_size * self.seq_len, dtype=torch.bool, device=self.doc_ids.device)
        starts[self.cu_seqlens[:-1].long()] = True
        return starts.view(self.batch_size, self.seq_len)
