"""``hybridiff train-default-model`` and ``hybridiff adherence``: the default model's training and
evaluation, as tool commands (``hybridiff.tools`` entry points)."""

from __future__ import annotations

import argparse

from hybridiff_launch.model_dirs import default_model_dir
from hybridiff_tools.shapes.evaluate import study
from hybridiff_tools.shapes.train import TrainConfig, train_default_model


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hybridiff train-default-model",
        description="train the embedded default model (coloured shapes, SDXL architecture) on CPU",
    )
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the initial weights")
    p.add_argument("--steps", type=int, default=None, help="denoiser training steps (default 3600)")
    p.add_argument("--vae-steps", type=int, default=None, help="autoencoder training steps (default 2000)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument("--checkpoint-dir", default=None, help="also write EMA snapshots here every 1000 steps")
    args = p.parse_args(argv)
    overrides = {"unet_steps": args.steps, "vae_steps": args.vae_steps, "threads": args.threads}
    config = TrainConfig(seed=args.seed, **{k: v for k, v in overrides.items() if v is not None})
    record = train_default_model(
        args.out, config, progress=lambda line: print(line, flush=True), checkpoint_dir=args.checkpoint_dir
    )
    print(f"wrote the trained model to {args.out} in {record['seconds'] / 60:.1f} min")
    return 0


def adherence_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hybridiff adherence",
        description="the default model's prompt adherence on held-out prompts, and "
        "its rel-MAE curve (in-process)",
    )
    p.add_argument(
        "--model-dir", default=None, help="diffusers model directory (default: the embedded model)"
    )
    p.add_argument("--out-dir", default="docs/default_model", help="where the JSON and the plots go")
    p.add_argument("--steps", type=int, default=30, help="denoising steps of the adherence images")
    p.add_argument("--curve-steps", type=int, default=50, help="denoising steps of the rel-MAE curves")
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0, 1.0], help="guidance scales to compare")
    args = p.parse_args(argv)
    study(
        args.model_dir or default_model_dir(),
        args.out_dir,
        steps=args.steps,
        curve_steps=args.curve_steps,
        guidances=tuple(args.guidance),
        progress=lambda line: print(line, flush=True),
    )
    print(f"wrote {args.out_dir}/evaluation.json and its plots")
    return 0
