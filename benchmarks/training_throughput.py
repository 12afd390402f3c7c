"""Measure SFAE training throughput: images per second and peak memory.

One training step is what the training loop does per batch: feature
extraction, autoencoder forward, SSIM loss, backward and an Adam step
(learning rate 2e-4, Meissen et al. 2022). Inputs are random slices in [0, 1],
because the time of a step does not depend on the intensities. The extractor
has random weights, which cost the same as ImageNet weights and need no
download.

After ``--warmup`` untimed steps, ``--steps`` steps are timed one by one. The
report gives the median and the best step time, and images per second from
the median step. Peak memory is the process's peak resident set (VmHWM) on a CPU and
``torch.cuda.max_memory_allocated`` on a GPU.

Usage::

    .venv/bin/python benchmarks/training_throughput.py --steps 10 --output /tmp/throughput.json
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# The script runs from a checkout where sfae need not be installed.
REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from machine import cpu_model, peak_rss_mib  # noqa: E402  (benchmarks/machine.py, beside this script)
from sfae.io import write_json  # noqa: E402
from sfae.models.feature_extractor import DEFAULT_LAYERS, LAYER_NAMES  # noqa: E402
from sfae.models.sfae import SFAE  # noqa: E402

logger = logging.getLogger("training_throughput")

# Training setup of Meissen et al. 2022: Adam, learning rate 0.0002, batch size
# 64, 128x128 slices.
LEARNING_RATE = 2e-4
BATCH_SIZE = 64
IMAGE_SIZE = 128


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"slices per step (default {BATCH_SIZE})")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"slice height and width in pixels (default {IMAGE_SIZE})")
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), choices=LAYER_NAMES, help="extractor layers (default layer0 layer1 layer2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice, usually the physical cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--channels-last", action="store_true", help="run the convolutions on channels-last tensors")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    parser.add_argument("--output", type=Path, default=None, help="write the results to this JSON file")
    arguments = parser.parse_args(argv)
    if arguments.steps < 1 or arguments.warmup < 0 or arguments.batch_size < 1:
        parser.error("--steps and --batch-size must be positive and --warmup must not be negative")
    return arguments


def peak_memory_mib(device: torch.device) -> float:
    """Return the peak GPU memory allocated by PyTorch, or the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def measure(arguments: argparse.Namespace) -> dict:
    """Run the warm-up and timed steps and return the measurements."""
    device = torch.device(arguments.device)
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    torch.manual_seed(arguments.seed)

    # 1. Model, optimizer and one fixed batch.
    model = SFAE(layers=arguments.layers, weights="random", seed=arguments.seed).to(device)
    images = torch.rand(arguments.batch_size, 1, arguments.image_size, arguments.image_size, device=device)
    if arguments.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.autoencoder.parameters(), lr=LEARNING_RATE)
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(images)
        loss.backward()
        optimizer.step()
        return loss.item()

    # 2. Warm-up, then timed steps.
    logger.info("device %s, %d threads, batch %d, %dx%d, layers %s", device, torch.get_num_threads(), arguments.batch_size, arguments.image_size, arguments.image_size, " ".join(arguments.layers))
    for _ in range(arguments.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for index in range(arguments.steps):
        start = time.perf_counter()
        start_cpu = time.process_time()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        durations.append(time.perf_counter() - start)
        # CPU seconds well below threads x wall seconds mean the process waited for
        # cores taken by other processes or for the kernel.
        logger.info("step %d: %.3f s wall, %.3f s CPU, loss %.5f", index + 1, durations[-1], time.process_time() - start_cpu, loss)

    # 3. Summary.
    median = statistics.median(durations)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} logical CPUs",
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "batch_size": arguments.batch_size,
        "image_size": arguments.image_size,
        "layers": list(arguments.layers),
        "channels_last": arguments.channels_last,
        "steps": arguments.steps,
        "step_seconds_median": median,
        "step_seconds_min": min(durations),
        "images_per_second": arguments.batch_size / median,
        "images_per_second_best": arguments.batch_size / min(durations),
        "peak_memory_mib": peak_memory_mib(device),
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    arguments = parse_arguments(argv)
    results = measure(arguments)
    logger.info(
        "%.1f images/s (median step %.3f s, best %.3f s), peak memory %.0f MiB",
        results["images_per_second"],
        results["step_seconds_median"],
        results["step_seconds_min"],
        results["peak_memory_mib"],
    )
    if arguments.output is not None:
        write_json(results, arguments.output)
        logger.info("wrote %s", arguments.output)


if __name__ == "__main__":
    main()
