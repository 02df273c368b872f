"""SD3-style adapter: ``StableDiffusion3Pipeline`` components, MMDiT transformer, flow matching."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from gpu_worker.adapters.base import (
    BranchInputs,
    Conditioning,
    ModelAdapter,
    RequestTimeline,
    SequentialSplit,
    repeat_to_batch,
)
from gpu_worker.adapters.dit_split import SequentialDiTSplit, time_units


class SD3Adapter(ModelAdapter):
    arch = "sd3"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def _encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance: bool,
        height: int,
        width: int,
        num_images: int,
    ) -> Conditioning:
        prompt_embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=guidance,
            device=self.device,
            num_images_per_prompt=num_images,
        )
        cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled} if guidance else None
        return Conditioning(cond=cond, uncond=uncond)

    def new_timeline(self, num_steps: int, seed: int, height: int, width: int) -> RequestTimeline:
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            p = self.pipe.transformer.config.patch_size
            seq_len = (height // self.vae_scale_factor // p) * (width // self.vae_scale_factor // p)
            cfg = scheduler.config
            kwargs["mu"] = calculate_shift(
                seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, **kwargs)
        return RequestTimeline(scheduler, timesteps, torch.Generator("cpu").manual_seed(seed))

    def model_input(self, timeline: RequestTimeline, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents  # flow matching: the pipeline feeds latents unscaled

    def forward(self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs) -> torch.Tensor:
        sample = repeat_to_batch(sample, inputs)
        return self.run_compiled(
            "forward",
            self._forward,
            sample,
            sample,
            t,
            inputs["encoder_hidden_states"],
            inputs["pooled_projections"],
        )

    def _forward(
        self, sample: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        return self.pipe.transformer(
            hidden_states=sample,
            timestep=t.expand(sample.shape[0]),
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled,
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]

    def make_split(self, cut: int | None = None) -> SD3Split:
        return SD3Split(self, cut)

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latents / cfg.scaling_factor + cfg.shift_factor


class SD3Split(SequentialDiTSplit, SequentialSplit):
    def __init__(self, adapter: SD3Adapter, cut: int | None) -> None:
        self.adapter = adapter
        n = len(adapter.pipe.transformer.transformer_blocks)
        super().__init__(adapter.pipe.transformer, cut if cut is not None else n // 2)

    def prepare(
        self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sample = repeat_to_batch(sample, inputs)
        return sample, self.temb(t.expand(sample.shape[0]), inputs["pooled_projections"])

    # The stages the engine calls (SequentialSplit); compiled per shape when compile is on.
    def stage1(self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs) -> dict[str, torch.Tensor]:
        sample = repeat_to_batch(sample, inputs)
        hidden, context = self._run(
            "stage1",
            self._stage1,
            sample,
            sample,
            t,
            inputs["encoder_hidden_states"],
            inputs["pooled_projections"],
        )
        return {"hidden_states": hidden, "encoder_hidden_states": context}

    def stage2(
        self, boundary: dict[str, torch.Tensor], sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs
    ) -> torch.Tensor:
        sample = repeat_to_batch(sample, inputs)
        return self._run(
            "stage2",
            self._stage2,
            sample,
            boundary["hidden_states"],
            boundary["encoder_hidden_states"],
            sample,
            t,
            inputs["pooled_projections"],
        )

    def _run(self, name: str, fn, like: torch.Tensor, *args):
        return self.adapter.run_compiled(f"{name}@cut{self.cut}", fn, like, *args)

    def _stage1(self, sample, t, encoder_hidden_states, pooled) -> tuple[torch.Tensor, torch.Tensor]:
        boundary = self.front(sample, encoder_hidden_states, self.temb(t.expand(sample.shape[0]), pooled))
        return boundary["hidden_states"], boundary["encoder_hidden_states"]

    def _stage2(self, hidden, context, sample, t, pooled) -> torch.Tensor:
        temb = self.temb(t.expand(sample.shape[0]), pooled)
        boundary = {"hidden_states": hidden, "encoder_hidden_states": context}
        return self.back(boundary, temb, sample.shape[-2], sample.shape[-1])

    def unit_costs(
        self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs, clock
    ) -> dict[str, float]:
        sample, temb = self.prepare(sample, t, inputs)
        return time_units(self, sample, inputs["encoder_hidden_states"], temb, clock)
