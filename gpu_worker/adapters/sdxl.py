"""SDXL-style adapter: ``StableDiffusionXLPipeline`` components, UNet with text_time embeddings."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

from gpu_worker.adapters.base import (
    BranchInputs,
    Conditioning,
    ModelAdapter,
    NestedSplit,
    RequestTimeline,
    repeat_to_batch,
)
from gpu_worker.adapters.unet_split import NestedUNetSplit, UNetContext, time_units, upsample_size_needed


def conditioning(inputs: BranchInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet's conditioning tensors in the order the compiled functions take them."""
    return inputs["encoder_hidden_states"], inputs["text_embeds"], inputs["time_ids"]


class SDXLAdapter(ModelAdapter):
    arch = "sdxl"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def _encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance: bool,
        height: int,
        width: int,
        num_images: int,
    ) -> Conditioning:
        pipe = self.pipe
        prompt_embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=self.device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt,
        )
        projection_dim = (
            int(pooled.shape[-1])
            if pipe.text_encoder_2 is None
            else pipe.text_encoder_2.config.projection_dim
        )
        time_ids = (
            pipe._get_add_time_ids(
                (height, width),
                (0, 0),
                (height, width),
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=projection_dim,
            )
            .to(self.device)
            .repeat(num_images, 1)  # as the pipeline's add_time_ids.repeat(batch * num_images, 1)
        )
        cond = {"encoder_hidden_states": prompt_embeds, "text_embeds": pooled, "time_ids": time_ids}
        uncond = None
        if guidance:
            uncond = {"encoder_hidden_states": neg_embeds, "text_embeds": neg_pooled, "time_ids": time_ids}
        return Conditioning(cond=cond, uncond=uncond)

    def new_timeline(self, num_steps: int, seed: int, height: int, width: int) -> RequestTimeline:
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        generator = torch.Generator("cpu").manual_seed(seed)
        with self._pipe_lock:
            self.pipe.scheduler = scheduler
            extra = self.pipe.prepare_extra_step_kwargs(generator, 0.0)
        return RequestTimeline(scheduler, timesteps, generator, extra)

    def model_input(self, timeline: RequestTimeline, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return timeline.scheduler.scale_model_input(latents, t)

    def forward(self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs) -> torch.Tensor:
        sample = repeat_to_batch(sample, inputs)
        return self.run_compiled("forward", self._forward, sample, sample, t, *conditioning(inputs))

    def _forward(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        return self.pipe.unet(
            sample,
            t,
            encoder_hidden_states=encoder_hidden_states,
            timestep_cond=None,
            cross_attention_kwargs=None,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]

    def make_split(self, cut: int | None = None) -> SDXLSplit:
        return SDXLSplit(self, cut)

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return latents * std_t / cfg.scaling_factor + mean_t
        return latents / cfg.scaling_factor


class SDXLSplit(NestedUNetSplit, NestedSplit):
    """The nested split bound to an SDXL adapter: stage 1 = outer ring, stage 2 = inner core."""

    def __init__(self, adapter: SDXLAdapter, cut: int | None) -> None:
        self.adapter = adapter
        n = 1 + len(NestedUNetSplit._down_units(adapter.pipe.unet))
        super().__init__(adapter.pipe.unet, cut if cut is not None else max(1, n // 2))

    def prepare(self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs) -> Any:
        sample = repeat_to_batch(sample, inputs)
        ctx = self.context(
            sample,
            t,
            inputs["encoder_hidden_states"],
            {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
        )
        return sample, ctx

    # The stages the engine calls (NestedSplit): stage 1 = outer ring (pre, then post), stage 2 = core.
    # Each runs compiled per shape when compile is on; the compiled functions take tensors only.
    def stage1_pre(
        self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs
    ) -> tuple[dict[str, torch.Tensor], Any]:
        sample = repeat_to_batch(sample, inputs)
        *residuals, emb, states = self._run("stage1_pre", self._pre, sample, sample, t, *conditioning(inputs))
        ctx = UNetContext(emb, states, upsample_size_needed(self.unet, sample))
        return {"core_input": residuals[-1]}, (residuals, ctx)

    def stage2(
        self, core_in: dict[str, torch.Tensor], sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs
    ) -> dict[str, torch.Tensor]:
        sample = repeat_to_batch(sample, inputs)
        core_out = self._run(
            "stage2", self._core, sample, core_in["core_input"], sample, t, *conditioning(inputs)
        )
        return {"core_output": core_out}

    def stage1_post(self, core_out: dict[str, torch.Tensor], state: Any) -> torch.Tensor:
        residuals, ctx = state
        return self._run(
            "stage1_post",
            self._post,
            residuals[0],  # conv_in's output: the sample's batch and size
            core_out["core_output"],
            ctx.emb,
            ctx.encoder_hidden_states,
            *residuals,
        )

    def _run(self, name: str, fn, like: torch.Tensor, *args):
        return self.adapter.run_compiled(f"{name}@cut{self.cut}", fn, like, *args)

    def _pre(self, sample, t, encoder_hidden_states, text_embeds, time_ids) -> tuple[torch.Tensor, ...]:
        ctx = self.context(
            sample, t, encoder_hidden_states, {"text_embeds": text_embeds, "time_ids": time_ids}
        )
        return (*self.outer_pre(sample, ctx), ctx.emb, ctx.encoder_hidden_states)

    def _core(self, h, sample, t, encoder_hidden_states, text_embeds, time_ids) -> torch.Tensor:
        ctx = self.context(
            sample, t, encoder_hidden_states, {"text_embeds": text_embeds, "time_ids": time_ids}
        )
        return self.core(h, ctx)

    def _post(self, core_out, emb, encoder_hidden_states, *residuals) -> torch.Tensor:
        ctx = UNetContext(emb, encoder_hidden_states, upsample_size_needed(self.unet, residuals[0]))
        return self.outer_post(core_out, list(residuals), ctx)

    def unit_costs(
        self, sample: torch.Tensor, t: torch.Tensor, inputs: BranchInputs, clock
    ) -> dict[str, float]:
        sample, ctx = self.prepare(sample, t, inputs)
        return time_units(self, sample, ctx, clock)
