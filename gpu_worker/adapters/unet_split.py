"""Nested two-stage split of a diffusers ``UNet2DConditionModel`` (docs/design.md section 7).

The UNet is a list of *units*: on the way down each unit produces one skip residual (conv_in,
each resnet[+attention] layer, each downsampler); on the way up each unit consumes one (each
resnet[+attention] layer, with its block's upsampler after the last one). With ``cut`` = the
number of residuals the outer ring produces, the outer ring is conv_in + the first ``cut - 1``
down units and the up units that consume those ``cut`` residuals, plus the output head; the
inner core is everything between, mid block included. Every skip connection then stays on its
own side, and only the core's input (the last outer residual) and its output cross.

The units call the UNet's own submodules in the order and with the arguments of
``UNet2DConditionModel.forward`` and its blocks, so outer(core(outer_pre)) equals a full
forward exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpu_worker.adapters.base import StageSplit, Topology


@dataclass
class UNetContext:
    """What every unit needs besides its input: time embedding, text states, upsampling rule."""

    emb: torch.Tensor
    encoder_hidden_states: torch.Tensor
    forward_upsample_size: bool


@dataclass
class _DownUnit:
    name: str
    run: Callable[[torch.Tensor, UNetContext], torch.Tensor]


@dataclass
class _UpUnit:
    name: str
    resnet: Any
    attn: Any | None
    upsamplers: Any | None  # set on the last layer of a block that upsamples
    is_final_block: bool


class NestedUNetSplit(StageSplit):
    """A UNet cut into an outer ring (conv_in, the first down blocks, the last up blocks, the
    head) and an inner core (the deeper blocks and the mid block), over the model's own modules."""

    topology = Topology.NESTED

    def __init__(self, unet: Any, cut: int) -> None:
        self.unet = unet
        self.down_units = self._down_units(unet)
        self.up_units = self._up_units(unet)
        # residuals: conv_in + one per down unit; the up path consumes them all, last first.
        self.num_residuals = 1 + len(self.down_units)
        if len(self.up_units) != self.num_residuals:
            raise ValueError("UNet up path does not consume exactly the residuals the down path produces")
        self.num_units = self.num_residuals
        if not 1 <= cut <= self.num_residuals:
            raise ValueError(f"cut must be in 1..{self.num_residuals}, got {cut}")
        self.cut = cut

    # --- structure ------------------------------------------------------------------
    @staticmethod
    def _down_units(unet: Any) -> list[_DownUnit]:
        units: list[_DownUnit] = []
        for b, block in enumerate(unet.down_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for j, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
                units.append(_DownUnit(f"down{b}.layer{j}", _layer(resnet, attn)))
            if block.downsamplers is not None:
                units.append(_DownUnit(f"down{b}.downsample", _downsample(block.downsamplers)))
        return units

    @staticmethod
    def _up_units(unet: Any) -> list[_UpUnit]:
        units: list[_UpUnit] = []
        last = len(unet.up_blocks) - 1
        for b, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            n = len(block.resnets)
            for j, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
                ups = block.upsamplers if j == n - 1 else None
                units.append(_UpUnit(f"up{b}.layer{j}", resnet, attn, ups, b == last))
        return units

    def unit_names(self) -> list[str]:
        return (
            ["conv_in"]
            + [u.name for u in self.down_units]
            + ["mid"]
            + [u.name for u in self.up_units]
            + ["head"]
        )

    def stage1_units(self) -> list[str]:
        """Units on the outer ring for this cut (the rest, mid included, is the core)."""
        down = ["conv_in"] + [u.name for u in self.down_units[: self.cut - 1]]
        up = [u.name for u in self.up_units[len(self.up_units) - self.cut :]]
        return down + up + ["head"]

    # --- context --------------------------------------------------------------------
    def context(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
    ) -> UNetContext:
        """The prologue of ``UNet2DConditionModel.forward``: time, class and added embeddings."""
        unet = self.unet
        forward_upsample_size = upsample_size_needed(unet, sample)
        t_emb = unet.get_time_embed(sample=sample, timestep=t)
        emb = unet.time_embedding(t_emb, None)
        class_emb = unet.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            emb = (
                torch.cat([emb, class_emb], dim=-1)
                if unet.config.class_embeddings_concat
                else emb + class_emb
            )
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        return UNetContext(emb, encoder_hidden_states, forward_upsample_size)

    # --- stages ---------------------------------------------------------------------
    def outer_pre(self, sample: torch.Tensor, ctx: UNetContext) -> list[torch.Tensor]:
        """conv_in and the outer down units; returns the outer residuals (the last is the core input)."""
        if self.unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        h = self.unet.conv_in(sample)
        residuals = [h]
        for unit in self.down_units[: self.cut - 1]:
            h = unit.run(h, ctx)
            residuals.append(h)
        return residuals

    def core(self, h: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
        """Inner down units, mid block and the up units that consume the inner residuals."""
        residuals = [h]
        for unit in self.down_units[self.cut - 1 :]:
            h = unit.run(h, ctx)
            residuals.append(h)
        h = self._mid(h, ctx)
        # residuals[0] is the outer ring's last residual: the core never consumes it, but the
        # upsampler of the core's last up unit needs its size (as in UNet2DConditionModel.forward).
        n_inner = len(residuals) - 1
        return self._up(h, residuals, n_inner, ctx)

    def outer_post(
        self, core_out: torch.Tensor, residuals: list[torch.Tensor], ctx: UNetContext
    ) -> torch.Tensor:
        """The up units that consume the outer residuals, then the output head."""
        h = self._up(core_out, residuals, len(residuals), ctx, start=len(self.up_units) - self.cut)
        unet = self.unet
        if unet.conv_norm_out:
            h = unet.conv_norm_out(h)
            h = unet.conv_act(h)
        return unet.conv_out(h)

    def full(self, sample: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
        residuals = self.outer_pre(sample, ctx)
        return self.outer_post(self.core(residuals[-1], ctx), residuals, ctx)

    # --- pieces ---------------------------------------------------------------------
    def _mid(self, h: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
        mid = self.unet.mid_block
        if mid is None:
            return h
        if getattr(mid, "has_cross_attention", False):
            return mid(
                h,
                ctx.emb,
                encoder_hidden_states=ctx.encoder_hidden_states,
                attention_mask=None,
                cross_attention_kwargs=None,
                encoder_attention_mask=None,
            )
        return mid(h, ctx.emb)

    def _up(
        self, h: torch.Tensor, residuals: list[torch.Tensor], n_consume: int, ctx: UNetContext, start: int = 0
    ) -> torch.Tensor:
        """Run up units ``start..start+n_consume`` consuming ``residuals`` from the end."""
        stack = list(residuals)
        for unit in self.up_units[start : start + n_consume]:
            res = stack.pop()
            h = _resnet_attention(unit.resnet, unit.attn, torch.cat([h, res], dim=1), ctx)
            if unit.upsamplers is not None:
                size = (
                    stack[-1].shape[2:] if (ctx.forward_upsample_size and not unit.is_final_block) else None
                )
                for upsampler in unit.upsamplers:
                    h = upsampler(h, size)
        return h


def upsample_size_needed(unet: Any, sample: torch.Tensor) -> bool:
    """Whether the upsamplers need the skip's size (a side not a multiple of the total upsampling),
    as ``UNet2DConditionModel.forward`` decides it."""
    up_factor = 2**unet.num_upsamplers
    return any(dim % up_factor != 0 for dim in sample.shape[-2:])


def _resnet_attention(resnet: Any, attn: Any | None, h: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
    """One layer of a UNet block, as its ``forward`` runs it: the resnet, then the cross-attention."""
    h = resnet(h, ctx.emb)
    if attn is not None:
        h = attn(
            h,
            encoder_hidden_states=ctx.encoder_hidden_states,
            cross_attention_kwargs=None,
            attention_mask=None,
            encoder_attention_mask=None,
            return_dict=False,
        )[0]
    return h


def _layer(resnet: Any, attn: Any | None) -> Callable[[torch.Tensor, UNetContext], torch.Tensor]:
    return lambda h, ctx: _resnet_attention(resnet, attn, h, ctx)


def _downsample(downsamplers: Any) -> Callable[[torch.Tensor, UNetContext], torch.Tensor]:
    def run(h: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
        for d in downsamplers:
            h = d(h)
        return h

    return run


def time_units(
    split: NestedUNetSplit, sample: torch.Tensor, ctx: UNetContext, clock: Callable[[], float]
) -> dict[str, float]:
    """Seconds of every unit in one forward executed unit by unit (for choosing the cut)."""
    unet = split.unet
    costs: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        start = clock()
        out = fn()
        costs[name] = clock() - start
        return out

    h = timed("conv_in", lambda: unet.conv_in(sample))
    residuals = [h]
    for unit in split.down_units:
        h = timed(unit.name, lambda: unit.run(h, ctx))
        residuals.append(h)
    h = timed("mid", lambda: split._mid(h, ctx))
    for i, unit in enumerate(split.up_units):
        h = timed(unit.name, lambda: split._up(h, residuals[: len(residuals) - i], 1, ctx, start=i))
    timed(
        "head",
        lambda: (
            unet.conv_out(unet.conv_act(unet.conv_norm_out(h))) if unet.conv_norm_out else unet.conv_out(h)
        ),
    )
    return costs
