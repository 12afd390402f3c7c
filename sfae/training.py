"""Generic training loop of the anomaly localization methods, with checkpoints and exact resume.

:func:`train_method` trains any registered :class:`~sfae.models.AnomalyMethod`
on the slices of a train split and writes the model, a loss table, a loss plot
and a JSON report. Trainable methods take ``steps`` optimization steps on
batches drawn from the split, which is held in memory as one tensor.
Statistical methods (``trainable = False``) are fitted once on all slices.

Every ``checkpoint_every`` steps a checkpoint stores the weights, the optimizer
states, the step, the batch order and every random number generator state, so
a job that is killed and started again continues where it stopped. On the CPU
the resumed run ends with exactly the weights and losses of an uninterrupted
run. On a GPU, nondeterministic cuDNN kernels can make them differ in the last
bits. The checkpoint's fingerprint covers the method, its settings, the seed,
steps, batch size, learning rate, threads and the split file. A checkpoint
with another fingerprint is ignored with a warning, and so is an unreadable
one, because a checkpoint only saves time and training from step 0 is always
correct.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from tqdm import tqdm

import sfae
from sfae.io import InvalidInputError, atomic_output, read_arrays, write_json
from sfae.models import AnomalyMethod, build_method

logger = logging.getLogger(__name__)

# Training budget of SFAE and every baseline in Meissen et al. 2022
# ("Unsupervised Anomaly Localization with Structural Feature-Autoencoders"):
# Adam, learning rate 0.0002, batch size 64, 10,000 steps.
PAPER_STEPS = 10_000
PAPER_BATCH_SIZE = 64
PAPER_LEARNING_RATE = 2e-4

# Largest share of the free GPU memory that the training set may fill when it
# is copied to the GPU as a whole. The rest is left for the weights, the
# optimizer state and the activations of a step.
GPU_DATA_MEMORY_FRACTION = 0.5
# Steps between two throughput log lines (and images_per_s values in the loss table).
LOG_INTERVAL_STEPS = 100
# Bytes at the start of the split file whose SHA-256 enters the checkpoint fingerprint.
FINGERPRINT_HEAD_BYTES = 1 << 20
# Version of the checkpoint layout. A checkpoint of another version is ignored.
CHECKPOINT_FORMAT = 1
MODEL_KEYS = ("method", "settings", "seed", "image_size", "state_dict", "description", "steps", "sfae_version")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
PLOT_DPI = 120
# Errors that torch.load raises for a truncated, corrupt or foreign file.
LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)


@dataclass(frozen=True)
class TrainingSettings:
    """Settings of one training run.

    Attributes:
        steps: Optimization steps (``PAPER_STEPS`` in the paper). Ignored by non-trainable methods.
        batch_size: Slices per step (``PAPER_BATCH_SIZE`` in the paper).
        learning_rate: Learning rate passed to the method's optimizers (``PAPER_LEARNING_RATE``).
        checkpoint_every: Steps between two checkpoints.
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: CPU threads of torch during training, or None to keep torch's default.

    Raises:
        InvalidInputError: If a field has an invalid value; the message names the field.
    """

    steps: int
    batch_size: int
    learning_rate: float
    checkpoint_every: int
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            _require_positive_integer(name, getattr(self, name))
        if self.threads is not None:
            _require_positive_integer("threads", self.threads)
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise InvalidInputError(f"invalid training setting learning_rate={rate!r}: expected a positive finite number")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise InvalidInputError(f"invalid training setting device={self.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _require_positive_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"invalid training setting {name}={value!r}: expected a positive integer")


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a device setting (``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``).

    Raises:
        InvalidInputError: If a CUDA device is requested but CUDA is not available, or the index does not exist.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise InvalidInputError(f"invalid device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise InvalidInputError(
            f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "set the device to 'cpu' or 'auto', or run the job on a node with a GPU"
        )
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise InvalidInputError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices are visible; use an index below that")
    return torch.device("cuda", index)


def read_training_split(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """Read the slices and brain masks of a train split file as tensors on the CPU.

    Returns:
        ``(images, masks)``: float32 ``(n, 1, size, size)`` in [0, 1] and bool
        ``(n, 1, size, size)``. They share memory with the arrays read from the file.

    Raises:
        InvalidInputError: If the file is missing or unreadable, lacks ``images``
            or ``masks``, contains no slices, or the arrays have the wrong shape,
            dtype or value range. The message names the file.
    """
    path = Path(path)
    arrays = read_arrays(path)
    fix = "it must be a train split written by the workflow; delete it and rerun the workflow"
    missing = [key for key in ("images", "masks") if key not in arrays]
    if missing:
        raise InvalidInputError(f"split file {path} lacks the arrays {missing}; {fix}")
    images, masks = arrays["images"], arrays["masks"]
    if images.ndim != 3 or images.dtype != np.float32 or images.shape[1] != images.shape[2]:
        raise InvalidInputError(f"split file {path}: images are {images.dtype} of shape {images.shape}, expected float32 (n, size, size); {fix}")
    if images.shape[0] == 0:
        raise InvalidInputError(f"split file {path} contains no slices; check that the train split of this data set has subjects")
    if masks.shape != images.shape or masks.dtype != bool:
        raise InvalidInputError(f"split file {path}: masks are {masks.dtype} of shape {masks.shape}, expected bool of the images' shape {images.shape}; {fix}")
    lowest, highest = float(images.min()), float(images.max())
    if not (0.0 <= lowest and highest <= 1.0):  # also rejects NaN, for which both comparisons are False
        raise InvalidInputError(f"split file {path}: image values span [{lowest}, {highest}], expected values in [0, 1]; {fix}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(masks).unsqueeze(1)


class EpochBatchSampler:
    """Batch indices from a new random permutation of the slices in every epoch.

    An epoch is ``count // batch_size`` batches of exactly ``batch_size``
    slices. The ``count % batch_size`` slices at the end of each permutation
    are left out of that epoch, a different subset each time. The permutations
    come from a dedicated generator seeded with the training seed, so the
    batch order depends on nothing else.

    Raises:
        InvalidInputError: If there are fewer slices than ``batch_size``.
    """

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        if count < batch_size:
            raise InvalidInputError(f"the train split has {count} slices, fewer than the batch size {batch_size}; lower the batch size or add subjects")
        self.count = count
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: Tensor | None = None
        self.position = 0

    def next_batch(self) -> Tensor:
        """Return the int64 indices ``(batch_size,)`` of the next batch, starting a new epoch when needed."""
        if self.order is None or self.position + self.batch_size > self.count:
            self.order = torch.randperm(self.count, generator=self.generator)
            self.position = 0
        indices = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict[str, Any]:
        """Return the generator state, the current permutation and the position in it."""
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state returned by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
        self.order = state["order"]
        self.position = int(state["position"])


class _BatchSource:
    """The training slices in memory, returning batches on the training device.

    On a GPU the whole set is copied to the GPU once when it fits into
    ``GPU_DATA_MEMORY_FRACTION`` of the free memory. Otherwise it stays in CPU
    memory, and each batch is gathered into pinned buffers and copied from there.
    """

    # NOTE: the CUDA branches have not run yet; their tests are skipped on machines without CUDA.

    def __init__(self, images: Tensor, masks: Tensor, device: torch.device, batch_size: int) -> None:
        self.device = device
        self.on_device = device.type == "cpu"
        if device.type == "cuda":
            needed = images.nbytes + masks.nbytes
            free, _ = torch.cuda.mem_get_info(device)
            if needed <= GPU_DATA_MEMORY_FRACTION * free:
                images, masks = images.to(device), masks.to(device)
                self.on_device = True
                logger.info("training set (%.2f GiB) copied to %s, %.1f GiB were free", needed / 2**30, device, free / 2**30)
            else:
                logger.warning("training set (%.2f GiB) kept in CPU memory, %s has %.1f GiB free; each batch is copied", needed / 2**30, device, free / 2**30)
                self.staging_images = torch.empty((batch_size, *images.shape[1:]), dtype=images.dtype).pin_memory()
                self.staging_masks = torch.empty((batch_size, *masks.shape[1:]), dtype=masks.dtype).pin_memory()
        self.images = images
        self.masks = masks

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Return the images and masks at ``indices`` on the training device."""
        if self.on_device:
            indices = indices.to(self.images.device)
            return self.images.index_select(0, indices), self.masks.index_select(0, indices)
        torch.index_select(self.images, 0, indices, out=self.staging_images)
        torch.index_select(self.masks, 0, indices, out=self.staging_masks)
        # Blocking copies: the next step refills the staging buffers, which an
        # asynchronous copy might still be reading.
        return self.staging_images.to(self.device), self.staging_masks.to(self.device)


@dataclass
class _Run:
    """The state of a training run that a checkpoint stores."""

    method: AnomalyMethod
    optimizers: dict[str, torch.optim.Optimizer]
    sampler: EpochBatchSampler | None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # losses of step i + 1 at index i
    throughput: dict[int, float] = field(default_factory=dict)  # images/s of the log interval ending at a step


def _start_run(method_name: str, method_settings: Mapping[str, Any], seed: int, image_size: int, settings: TrainingSettings, device: torch.device, count: int) -> _Run:
    """Seed every random number generator, build the method on ``device`` and its optimizers."""
    torch.manual_seed(seed)  # the CPU generator and every CUDA generator
    random.seed(seed)
    np.random.seed(seed)
    method = build_method(method_name, method_settings, seed=seed, image_size=image_size).to(device)
    method.train()
    if not method.trainable:
        return _Run(method=method, optimizers={}, sampler=None)
    optimizers = method.configure_optimizers(settings.learning_rate)
    return _Run(method=method, optimizers=dict(optimizers), sampler=EpochBatchSampler(count, settings.batch_size, seed))


def _fingerprint(split_path: Path, method_name: str, method_settings: Mapping[str, Any], seed: int, settings: TrainingSettings, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """Return what must match for a checkpoint to continue this run: everything but the device and the checkpoint interval."""
    with open(split_path, "rb") as stream:
        head = stream.read(FINGERPRINT_HEAD_BYTES)
    return {
        "method": method_name,
        "settings": json.dumps(method_settings, sort_keys=True, default=str),
        "seed": seed,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "threads": settings.threads,
        "split_bytes": split_path.stat().st_size,
        "split_head_sha256": hashlib.sha256(head).hexdigest(),
        "image_shape": list(image_shape),
    }


def _capture_rng_states(device: torch.device) -> dict[str, Any]:
    state, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # The NumPy key array is stored as a tensor, because torch.load with
        # weights_only=True rejects NumPy arrays.
        "numpy": (state, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    state, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((state, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    # A checkpoint written on the CPU has no CUDA state. The CUDA generator then
    # keeps its seed, so such a resume is reproducible but not exact.
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _write_checkpoint(path: Path, run: _Run, fingerprint: dict[str, Any], device: torch.device) -> None:
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "step": run.step,
        "method": run.method.state_dict(),
        "optimizers": {name: optimizer.state_dict() for name, optimizer in run.optimizers.items()},
        "sampler": run.sampler.state_dict(),
        "rng": _capture_rng_states(device),
        "history": run.history,
        "throughput": run.throughput,
    }
    with atomic_output(path) as temporary:
        torch.save(checkpoint, temporary)
    logger.info("checkpoint at step %d written to %s", run.step, path)


def _read_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Return the checkpoint at ``path`` if it exists, is readable and belongs to this run; else None, with a warning."""
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as error:
        logger.warning("checkpoint %s is unreadable (%s: %s); ignoring it and training from step 0", path, type(error).__name__, error)
        return None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        logger.warning("checkpoint %s is not a format-%d sfae checkpoint; ignoring it and training from step 0", path, CHECKPOINT_FORMAT)
        return None
    stored = checkpoint.get("fingerprint", {})
    differences = sorted(key for key in fingerprint if stored.get(key) != fingerprint[key])
    if differences:
        logger.warning("checkpoint %s belongs to another run (differs in %s); ignoring it and training from step 0", path, ", ".join(differences))
        return None
    return checkpoint


def _resume(run: _Run, checkpoint: Mapping[str, Any], device: torch.device) -> None:
    """Load a checkpoint into a freshly started run; the random number generator states go last."""
    run.method.load_state_dict(checkpoint["method"])
    if set(checkpoint["optimizers"]) != set(run.optimizers):
        raise KeyError(f"optimizers {sorted(checkpoint['optimizers'])} in the checkpoint, {sorted(run.optimizers)} in the method")
    for name, optimizer in run.optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    run.sampler.load_state_dict(checkpoint["sampler"])
    run.step = int(checkpoint["step"])
    run.history = list(checkpoint["history"])
    run.throughput = dict(checkpoint["throughput"])
    _restore_rng_states(checkpoint["rng"], device)


def train_method(
    split_path: str | os.PathLike[str],
    *,
    method_name: str,
    method_settings: Mapping[str, Any],
    seed: int,
    settings: TrainingSettings,
    model_out: str | os.PathLike[str],
    report_out: str | os.PathLike[str],
    loss_csv_out: str | os.PathLike[str],
    loss_png_out: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
) -> dict[str, Any]:
    """Train a registered method on a train split and write the model, loss table, loss plot and report.

    Trainable methods take ``settings.steps`` calls of ``training_step`` on
    batches from :class:`EpochBatchSampler`. Non-trainable methods are fitted
    once on all slices, which are on the training device when they fit into
    its memory (see :class:`_BatchSource`) and on the CPU otherwise. A matching
    checkpoint at ``checkpoint_path`` is resumed, a new one is written every
    ``settings.checkpoint_every`` steps (not at the last step), and it is
    deleted once every output is written.

    Args:
        split_path: Train split ``.npz`` file with ``images`` float32 ``(n, size, size)`` in [0, 1]
            and ``masks`` bool of the same shape.
        method_name: Registered method name.
        method_settings: The method's settings from the config.
        seed: Training seed: weight initialization, batch order, dropout.
        settings: Steps, batch size, learning rate, checkpoint interval, device and threads.
        model_out: Model file (``torch.save`` of a dict with the keys ``MODEL_KEYS``), for :func:`load_trained_method`.
        report_out: JSON report of the run.
        loss_csv_out: Loss table: ``step`` (steps done, from 1), one column per logged loss and
            ``images_per_s`` over the log interval ending at that step (empty between log steps).
            Only the header for non-trainable methods.
        loss_png_out: Plot of the losses against the step.
        checkpoint_path: Checkpoint file, read when it exists and written during training.

    Returns:
        The report written to ``report_out``. Its ``seconds`` and ``images_per_s``
        cover this call only, so after a resume they exclude the steps done before.

    Raises:
        InvalidInputError: If the split file is invalid (the message names it), the method is
            unknown or its settings are invalid, or the device is unavailable.
        FloatingPointError: If a loss becomes NaN or infinite; the last checkpoint is kept.
    """
    started = time.perf_counter()
    split_path, checkpoint_path = Path(split_path), Path(checkpoint_path)
    previous_threads = torch.get_num_threads()
    try:
        # 1. Read the split, choose the device and set the threads.
        images, masks = read_training_split(split_path)
        device = resolve_device(settings.device)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        image_size = images.shape[-1]
        logger.info("training %s (seed %d) on %d slices of %dx%d from %s on %s", method_name, seed, images.shape[0], image_size, image_size, split_path, device)

        # 2. Build the method with seeded generators, then resume from a matching checkpoint.
        run = _start_run(method_name, method_settings, seed, image_size, settings, device, images.shape[0])
        resumed_from = None
        fingerprint: dict[str, Any] = {}
        if run.method.trainable:
            fingerprint = _fingerprint(split_path, method_name, method_settings, seed, settings, tuple(images.shape))
            checkpoint = _read_checkpoint(checkpoint_path, fingerprint)
            if checkpoint is not None:
                try:
                    _resume(run, checkpoint, device)
                    resumed_from = run.step
                    logger.info("resumed from checkpoint %s at step %d of %d", checkpoint_path, run.step, settings.steps)
                except (KeyError, TypeError, ValueError, RuntimeError) as error:
                    logger.warning("checkpoint %s does not fit the method (%s: %s); ignoring it and training from step 0", checkpoint_path, type(error).__name__, error)
                    run = _start_run(method_name, method_settings, seed, image_size, settings, device, images.shape[0])
        source = _BatchSource(images, masks, device, settings.batch_size)

        # 3. Train by gradient steps, or fit once.
        loop_started = time.perf_counter()
        if run.method.trainable:
            _run_steps(run, source, settings, checkpoint_path, fingerprint, device)
        else:
            logger.info("%s is not trainable; fitting it once on all %d slices", method_name, images.shape[0])
            slice_index = torch.from_numpy(read_arrays(split_path)["slice_index"].astype(np.int64))
            run.method.fit(source.images, source.masks, slice_index.to(source.images.device))
        loop_seconds = time.perf_counter() - loop_started

        # 4. Write the outputs, then remove the checkpoint they make unnecessary.
        steps_here = run.step - (resumed_from or 0)
        report = {
            "method": method_name,
            "seed": seed,
            "device": str(device),
            "steps": run.step,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "seconds": round(time.perf_counter() - started, 3),
            "images_per_s": round(steps_here * settings.batch_size / loop_seconds, 2) if steps_here else None,
            "resumed_from_step": resumed_from,
            "training_slices": int(images.shape[0]),
            "training_set_on_device": source.on_device,
            "final_losses": run.history[-1] if run.history else None,
            "description": run.method.describe(),
        }
        _write_model(run, method_name, method_settings, seed, image_size, model_out)
        _write_loss_table(run, loss_csv_out)
        _write_loss_plot(run, method_name, seed, loss_png_out)
        write_json(report, report_out)
        checkpoint_path.unlink(missing_ok=True)
        logger.info("trained %s (seed %d): %d steps in %.1f s, model written to %s", method_name, seed, run.step, report["seconds"], model_out)
        return report
    finally:
        torch.set_num_threads(previous_threads)


def _run_steps(run: _Run, source: _BatchSource, settings: TrainingSettings, checkpoint_path: Path, fingerprint: dict[str, Any], device: torch.device) -> None:
    """Take the remaining optimization steps, logging throughput and writing checkpoints."""
    progress = tqdm(total=settings.steps, initial=run.step, desc=f"training {run.method.name}", unit="step", disable=None)
    interval_started, interval_steps = time.perf_counter(), 0
    with progress:
        for step in range(run.step, settings.steps):
            images, masks = source.batch(run.sampler.next_batch())
            losses = {key: float(value) for key, value in run.method.training_step(images, masks, step, run.optimizers).items()}
            not_finite = {key: value for key, value in losses.items() if not math.isfinite(value)}
            if not_finite:
                raise FloatingPointError(f"training of {run.method.name} diverged at step {step + 1}: losses {not_finite}; lower the learning rate")
            run.history.append(losses)
            run.step = step + 1
            progress.set_postfix(losses, refresh=False)
            progress.update(1)

            interval_steps += 1
            if run.step % LOG_INTERVAL_STEPS == 0 or run.step == settings.steps:
                rate = interval_steps * settings.batch_size / (time.perf_counter() - interval_started)
                run.throughput[run.step] = rate
                loss_summary = ", ".join(f"{key} {value:.5g}" for key, value in losses.items())
                logger.info("step %d/%d: %s, %.1f images/s", run.step, settings.steps, loss_summary, rate)
                interval_started, interval_steps = time.perf_counter(), 0

            if run.step % settings.checkpoint_every == 0 and run.step < settings.steps:
                writing_started = time.perf_counter()
                _write_checkpoint(checkpoint_path, run, fingerprint, device)
                interval_started += time.perf_counter() - writing_started  # keep checkpoint writing out of the throughput


def _write_model(run: _Run, method_name: str, method_settings: Mapping[str, Any], seed: int, image_size: int, path: str | os.PathLike[str]) -> None:
    record = {
        "method": method_name,
        "settings": dict(method_settings),
        "seed": seed,
        "image_size": image_size,
        "state_dict": {key: value.detach().cpu() for key, value in run.method.state_dict().items()},
        "description": run.method.describe(),
        "steps": run.step,
        "sfae_version": sfae.__version__,
    }
    with atomic_output(path) as temporary:
        torch.save(record, temporary)


def _loss_keys(history: list[dict[str, float]]) -> list[str]:
    """Return every loss key in the order of first appearance (methods with phases log different keys per step)."""
    return list(dict.fromkeys(key for losses in history for key in losses))


def _write_loss_table(run: _Run, path: str | os.PathLike[str]) -> None:
    keys = _loss_keys(run.history)
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["step", *keys, "images_per_s"])
        for index, losses in enumerate(run.history):
            step = index + 1
            rate = run.throughput.get(step)
            writer.writerow([step, *(repr(losses[key]) if key in losses else "" for key in keys), "" if rate is None else f"{rate:.2f}"])


def _write_loss_plot(run: _Run, method_name: str, seed: int, path: str | os.PathLike[str]) -> None:
    figure = Figure(figsize=(6.4, 4.0), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(f"{method_name}, seed {seed}")
    if not run.history:
        axes.text(0.5, 0.5, "fitted without gradient steps", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
    else:
        positive = True
        for key in _loss_keys(run.history):
            steps = [index + 1 for index, losses in enumerate(run.history) if key in losses]
            values = [losses[key] for losses in run.history if key in losses]
            positive = positive and min(values) > 0
            axes.plot(steps, values, label=key, linewidth=0.8)
        if positive:
            axes.set_yscale("log")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.legend()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=PLOT_DPI)


def load_trained_method(model_path: str | os.PathLike[str], device: str = "auto") -> AnomalyMethod:
    """Rebuild a method from a model file written by :func:`train_method`, in eval mode on ``device``.

    The method is built again from its saved name, settings, seed and slice
    size before the weights are loaded. An SFAE extractor set to ``imagenet``
    or to a weights file therefore needs those weights again.

    Raises:
        InvalidInputError: If the file is missing, unreadable or incomplete, names an unknown
            method, or its weights do not fit the method. The message names the file.
    """
    path = Path(model_path)
    if not path.is_file():
        raise InvalidInputError(f"model file not found: {path}; run the training rule that writes it")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as error:
        raise InvalidInputError(f"cannot read model file {path} ({type(error).__name__}: {error}); delete it and train again") from error
    missing = [key for key in MODEL_KEYS if key not in record] if isinstance(record, dict) else list(MODEL_KEYS)
    if missing:
        raise InvalidInputError(f"model file {path} lacks {missing}; it was not written by sfae training, so delete it and train again")

    try:
        method = build_method(record["method"], record["settings"], seed=record["seed"], image_size=record["image_size"])
    except InvalidInputError as error:
        raise InvalidInputError(f"cannot rebuild the method of model file {path}: {error}") from error
    try:
        method.load_state_dict(record["state_dict"])
    except RuntimeError as error:
        raise InvalidInputError(f"the weights in model file {path} do not fit method {record['method']!r} ({error}); train it again") from error
    return method.to(resolve_device(device)).eval()
