"""Sequential two-stage split of a diffusers ``SD3Transformer2DModel`` (docs/design.md section 7).

Stage 1 = patch/caption embedding + transformer blocks ``[0, cut)``; stage 2 = blocks
``[cut, n)`` + the output head (norm_out, proj_out, unpatchify). The boundary is exactly the
pair (hidden_states, encoder_hidden_states) *returned by block cut-1* and passed unchanged to
block ``cut`` — the reference implementation hands off one block late; this does not.
Both stages compute the (cheap) time/pooled-text embedding ``temb`` from their own timestep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gpu_worker.adapters.base import StageSplit, Topology


class SequentialDiTSplit(StageSplit):
    """A DiT's blocks cut in two: the front (embedding and blocks before the cut) and the back
    (the rest and the output head), over the model's own modules."""

    topology = Topology.SEQUENTIAL

    def __init__(self, transformer: Any, cut: int) -> None:
        self.transformer = transformer
        self.num_units = len(transformer.transformer_blocks)
        if not 1 <= cut < self.num_units:
            raise ValueError(f"cut must be in 1..{self.num_units - 1}, got {cut}")
        self.cut = cut

    def unit_names(self) -> list[str]:
        return ["embed"] + [f"block{i}" for i in range(self.num_units)] + ["head"]

    def stage1_units(self) -> list[str]:
        return ["embed"] + [f"block{i}" for i in range(self.cut)]

    def temb(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.transformer.time_text_embed(t, pooled)

    def embed(
        self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tr = self.transformer
        hidden = tr.pos_embed(sample).contiguous()
        return hidden, tr.context_embedder(encoder_hidden_states)

    def blocks(
        self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.transformer.transformer_blocks[start:stop]:
            context, hidden = block(
                hidden_states=hidden, encoder_hidden_states=context, temb=temb, joint_attention_kwargs=None
            )
        return hidden, context

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        tr = self.transformer
        hidden = tr.norm_out(hidden, temb)
        hidden = tr.proj_out(hidden)
        p = tr.config.patch_size
        h, w = height // p, width // p
        hidden = hidden.reshape(shape=(hidden.shape[0], h, w, p, p, tr.out_channels))
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(shape=(hidden.shape[0], tr.out_channels, h * p, w * p))

    def front(
        self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        hidden, context = self.embed(sample, encoder_hidden_states)
        hidden, context = self.blocks(hidden, context, temb, 0, self.cut)
        return {"hidden_states": hidden, "encoder_hidden_states": context}

    def back(
        self, boundary: dict[str, torch.Tensor], temb: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        hidden, _ = self.blocks(
            boundary["hidden_states"], boundary["encoder_hidden_states"], temb, self.cut, self.num_units
        )
        return self.head(hidden, temb, height, width)


def time_units(
    split: SequentialDiTSplit,
    sample: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    clock: Callable[[], float],
) -> dict[str, float]:
    costs: dict[str, float] = {}
    start = clock()
    hidden, context = split.embed(sample, encoder_hidden_states)
    costs["embed"] = clock() - start
    for i in range(split.num_units):
        start = clock()
        hidden, context = split.blocks(hidden, context, temb, i, i + 1)
        costs[f"block{i}"] = clock() - start
    start = clock()
    split.head(hidden, temb, sample.shape[-2], sample.shape[-1])
    costs["head"] = clock() - start
    return costs
