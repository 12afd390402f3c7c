"""Measure the training throughput of every registered method on the current device; write a Markdown table.

Each trainable method takes ``--warmup`` untimed and then ``--steps`` timed
training steps (Adam, learning rate 0.0002) on random batches of slices in
[0, 1] with full brain masks; the throughput is batch size times steps over the
timed seconds. Methods trained in several phases (f-AnoGAN) are timed in every
phase. Statistical methods (BM, Random) report the time of one fit on
``--fit-slices`` slices instead::

    python benchmarks/method_throughput.py --threads 2 --output throughput.md
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from sfae.io import atomic_output
from sfae.logs import configure_cli_logging
from sfae.models import METHODS, build_method

logger = logging.getLogger("benchmarks.method_throughput")

LEARNING_RATE = 0.0002
# Settings that make the benchmark independent of downloads: random extractor weights.
OFFLINE_SETTINGS = {"sfae": {"weights": "random"}, "dfr": {"weights": "random"}, "dfr_ssim": {"weights": "random"}}


def method_settings(name: str, overrides: dict[str, dict]) -> dict:
    """Return the benchmark settings of a method: the offline defaults updated by ``--settings``."""
    return {**OFFLINE_SETTINGS.get(name, {}), **overrides.get(name, {})}


def training_phases(name: str, size: int, overrides: dict[str, dict]) -> list[tuple[str, int]]:
    """Return ``(label, first step)`` of each training phase of a method.

    f-AnoGAN takes GAN steps first and encoder steps from ``gan_steps`` on.
    Every other method has one phase.
    """
    method = build_method(name, method_settings(name, overrides), seed=0, image_size=size)
    gan_steps = getattr(getattr(method, "config", None), "gan_steps", None)
    if gan_steps is None:
        return [("training", 0)]
    return [("GAN steps", 0), ("encoder steps", gan_steps)]


def time_steps(name: str, settings: dict, batch: torch.Tensor, masks: torch.Tensor, first_step: int, warmup: int, steps: int) -> float:
    """Return images per second of ``steps`` training steps starting at ``first_step``, after ``warmup`` steps."""
    torch.manual_seed(0)
    method = build_method(name, settings, seed=0, image_size=batch.shape[-1]).to(batch.device)
    method.train()
    optimizers = method.configure_optimizers(LEARNING_RATE)
    for step in range(first_step, first_step + warmup):
        method.training_step(batch, masks, step, optimizers)
    if batch.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(first_step + warmup, first_step + warmup + steps):
        method.training_step(batch, masks, step, optimizers)
    if batch.is_cuda:
        torch.cuda.synchronize()
    return batch.shape[0] * steps / (time.perf_counter() - start)


def time_fit(name: str, count: int, size: int, device: torch.device) -> float:
    """Return the seconds of one fit of a statistical method on ``count`` slices."""
    images = torch.rand(count, 1, size, size, device=device)
    masks = torch.ones_like(images, dtype=torch.bool)
    slice_index = torch.arange(count, device=device) % 80
    method = build_method(name, {}, seed=0, image_size=size).to(device)
    start = time.perf_counter()
    method.fit(images, masks, slice_index)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=sorted(METHODS), help="registry names (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="slices per step")
    parser.add_argument("--size", type=int, default=128, help="slice height and width in pixels")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fit-slices", type=int, default=5120, help="slices for the fit of statistical methods")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--settings", type=json.loads, default={}, help='method settings as JSON, for example \'{"fanogan": {"channels": [16, 32, 64, 64, 128, 128]}}\''
    )
    parser.add_argument("--output", type=Path, required=True, help="Markdown file to write")
    arguments = parser.parse_args()
    configure_cli_logging()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)

    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(arguments.batch_size, 1, arguments.size, arguments.size, generator=generator).to(device)
    masks = torch.ones_like(batch, dtype=torch.bool)
    rows = []
    for name in arguments.methods:
        if not METHODS[name].trainable:
            seconds = time_fit(name, arguments.fit_slices, arguments.size, device)
            rows.append(f"| {name} | fit | defaults | {arguments.fit_slices / seconds:.1f} (fit of {arguments.fit_slices} slices in {seconds:.2f} s) |")
            logger.info("%s: fit of %d slices in %.2f s", name, arguments.fit_slices, seconds)
            continue
        settings = method_settings(name, arguments.settings)
        for label, first_step in training_phases(name, arguments.size, arguments.settings):
            rate = time_steps(name, settings, batch, masks, first_step, arguments.warmup, arguments.steps)
            changed = json.dumps(arguments.settings[name]) if name in arguments.settings else "defaults"
            rows.append(f"| {name} | {label} | {changed} | {rate:.1f} |")
            logger.info("%s (%s): %.1f images/s", name, label, rate)

    lines = [
        f"Training throughput at batch {arguments.batch_size}, {arguments.size} x {arguments.size} slices, on "
        f"{device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); {arguments.steps} timed steps after {arguments.warmup} warm-up steps.",
        "",
        "| method | phase | settings | images/s |",
        "| --- | --- | --- | ---: |",
        *rows,
    ]
    with atomic_output(arguments.output) as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", arguments.output)


if __name__ == "__main__":
    main()
