"""Time ROBEX brain extraction and atlas registration on the demo volumes; write a Markdown table.

Every path is relative to ``--demo-cache`` (an absolute path is used as given).
The defaults follow the cache layout of :mod:`sfae.demo_data` (``files/<key>.nii``).
With the files extracted by hand into /tmp/demo instead, the call is::

    python benchmarks/preprocessing_timings.py --demo-cache /tmp/demo \\
        --atlas t1_skullstripped_brats_space.nii \\
        --robex robex_reference=atlas.nii.gz \\
        --robex icbm152_2009c=mni_icbm152_t1_tal_nlin_sym_09c.nii,mni_icbm152_t1_tal_nlin_sym_09c_mask.nii \\
        --register icbm152_2009c=mni_icbm152_t1_tal_nlin_sym_09c.nii,mni_icbm152_t1_tal_nlin_sym_09c_mask.nii \\
        --register mni152_nlin6asym=tpl-MNI152NLin6Asym_res-01_T1w.nii.gz,tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz \\
        --register colin27=TT_N27.nii \\
        --register icbm152_2009a=mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz \\
        --register oasis_template=T_template0_BrainCerebellum.nii.gz \\
        --output benchmarks/preprocessing_timings.md

A volume is ``LABEL=IMAGE`` or ``LABEL=IMAGE,MASK``. For ``--robex``, the mask is
a reference brain mask for a Dice score. For ``--register``, the image is
multiplied by the mask first, and an image without a mask must already be
skull-stripped. Registration uses the config's ``preprocessing.registration``
settings with ``min_dice`` set to 0, so that every Dice score is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import yaml

from sfae.io import atomic_output, read_volume
from sfae.preprocessing.brain_extraction import extract_brain
from sfae.preprocessing.registration import RegistrationSettings, dice_overlap, register_volume

logger = logging.getLogger("benchmarks.preprocessing_timings")

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_ROBEX = [
    "robex_reference=files/robex_reference.nii.gz",
    "icbm152_2009c=files/icbm152_2009c.nii,files/icbm152_2009c_mask.nii",
]
DEFAULT_REGISTER = [
    "icbm152_2009c=files/icbm152_2009c.nii,files/icbm152_2009c_mask.nii",
    "mni152_nlin6asym=files/mni152_nlin6asym.nii.gz,files/mni152_nlin6asym_mask.nii.gz",
    "colin27=files/colin27.nii",
    "icbm152_2009a=files/icbm152_2009a.nii.gz",
]
# Brain volume limits for the benchmark: wide, because MNI templates are larger than real heads.
VOLUME_LIMITS_ML = (100.0, 3000.0)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-cache", type=Path, required=True, help="folder that the volume paths are relative to")
    parser.add_argument(
        "--atlas", default="files/sri24_t1_skullstripped.nii", help="skull-stripped registration atlas (default: %(default)s)"
    )
    parser.add_argument(
        "--robex", action="append", metavar="LABEL=IMAGE[,MASK]",
        help="scan with skull to run ROBEX on, with an optional reference brain mask; repeatable "
        f"(default: {' '.join(DEFAULT_ROBEX)})",
    )
    parser.add_argument(
        "--register", action="append", metavar="LABEL=IMAGE[,MASK]",
        help="1 mm volume to register to the atlas, masked by MASK when given; repeatable "
        f"(default: {' '.join(DEFAULT_REGISTER)})",
    )
    parser.add_argument(
        "--config", type=Path, default=REPOSITORY / "config" / "config.yaml",
        help="workflow config that sets preprocessing.skull_strip and preprocessing.registration (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="SimpleITK threads for registration (default: %(default)s)")
    parser.add_argument("--output", type=Path, required=True, help="Markdown file to write")
    return parser.parse_args(argv)


def parse_volume(argument: str, cache: Path) -> tuple[str, Path, Path | None]:
    """Split ``LABEL=IMAGE[,MASK]`` into the label and paths resolved against ``cache``.

    Raises:
        ValueError: If the argument has no ``=`` or a listed file does not exist.
    """
    label, separator, files = argument.partition("=")
    if not separator or not label or not files:
        raise ValueError(f"volume argument {argument!r} is invalid; expected LABEL=IMAGE or LABEL=IMAGE,MASK")
    paths = [cache / name for name in files.split(",")]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"file {path} of volume {label!r} not found; check --demo-cache and the file name")
    return label, paths[0], paths[1] if len(paths) > 1 else None


def read_reference_mask(path: Path, reference: sitk.Image) -> sitk.Image:
    """Read a reference brain mask (values near 0 and 1, any type) and put it on the grid of ``reference``."""
    mask = sitk.Cast(read_volume(path, kind="image") > 0.5, sitk.sitkUInt8)
    return sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def time_robex(label: str, image: Path, reference_mask: Path | None, folder: Path, settings: dict) -> dict:
    """Run ROBEX once and return a table row."""
    report = extract_brain(
        image, folder / f"{label}_brain.nii.gz", folder / f"{label}_mask.nii.gz", folder / f"{label}_brain.json",
        method="robex", seed=settings["seed"], min_volume_ml=VOLUME_LIMITS_ML[0], max_volume_ml=VOLUME_LIMITS_ML[1],
        timeout_s=settings["timeout_s"],
    )
    mask = read_volume(folder / f"{label}_mask.nii.gz", kind="mask")
    dice = None
    if reference_mask is not None:
        dice = dice_overlap(mask, read_reference_mask(reference_mask, mask))
    spacing = read_volume(image).GetSpacing()
    return {
        "step": "ROBEX", "volume": label, "spacing": spacing, "seconds": report["seconds"], "dice": dice,
        "note": f"mask {report['brain_volume_ml']:.0f} ml" + (", Dice with the reference mask" if dice is not None else ""),
    }


def time_registration(
    label: str, image: Path, mask: Path | None, atlas: Path, folder: Path, settings: RegistrationSettings, threads: int
) -> dict:
    """Skull-strip by the given mask (or take the non-zero voxels), register to the atlas and return a table row."""
    source = image
    if mask is not None:
        scan = read_volume(image)
        source = folder / f"{label}_masked.nii.gz"
        sitk.WriteImage(sitk.Mask(scan, read_reference_mask(mask, scan)), str(source))
    brain, brain_mask = folder / f"{label}_brain.nii.gz", folder / f"{label}_brain_mask.nii.gz"
    extract_brain(
        source, brain, brain_mask, folder / f"{label}_brain.json", method="nonzero", seed=0,
        min_volume_ml=VOLUME_LIMITS_ML[0], max_volume_ml=VOLUME_LIMITS_ML[1], timeout_s=1.0,
    )

    start = time.perf_counter()
    report = register_volume(
        brain, brain_mask, None, atlas,
        image_out=folder / f"{label}_registered.nii.gz", mask_out=folder / f"{label}_registered_mask.nii.gz",
        labels_out=folder / f"{label}_registered_labels.nii.gz", transform_out=folder / f"{label}.tfm",
        report_out=folder / f"{label}_registration.json", qc_out=folder / f"{label}_registration_qc.png",
        settings=settings, already_registered=False, threads=threads, subject=label,
    )
    seconds = time.perf_counter() - start
    iterations = "+".join(str(stage["iterations"]) for stage in report["stages"])
    return {
        "step": "registration", "volume": label, "spacing": read_volume(brain).GetSpacing(), "seconds": seconds,
        "dice": report["dice"], "note": f"Dice with the atlas mask; rigid+affine iterations {iterations}",
    }


def format_table(rows: list[dict], threads: int, load_before: tuple[float, ...]) -> str:
    """Return the Markdown page: machine, settings and one row per measurement."""
    lines = [
        "# Preprocessing timings",
        "",
        f"Measured {datetime.date.today().isoformat()} with `benchmarks/preprocessing_timings.py` on "
        f"{platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"SimpleITK {sitk.Version_VersionString()}, {threads} SimpleITK threads for registration.",
        f"Load average before the run: {', '.join(f'{value:.2f}' for value in load_before)} "
        "(other processes on the machine slow the timings).",
        "",
        "ROBEX seconds cover `extract_brain` up to writing its outputs: reading the scan, writing the copy for ROBEX,",
        "ROBEX itself and reading its mask back. Registration seconds are the whole `register_volume` call: reading,",
        "rigid and affine stages, resampling, writing and the QC image.",
        "",
        "| step | volume | voxel size (mm) | seconds | Dice | note |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        spacing = " x ".join(f"{value:.2f}" for value in row["spacing"])
        dice = f"{row['dice']:.3f}" if row["dice"] is not None else "-"
        lines.append(f"| {row['step']} | {row['volume']} | {spacing} | {row['seconds']:.1f} | {dice} | {row['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    config = yaml.safe_load(arguments.config.read_text())["preprocessing"]
    registration = {**config["registration"], "min_dice": 0.0}
    settings = RegistrationSettings(
        **{
            **registration,
            "shrink_factors": tuple(registration["shrink_factors"]),
            "smoothing_sigmas_mm": tuple(registration["smoothing_sigmas_mm"]),
        }
    )
    cache = arguments.demo_cache
    atlas = cache / arguments.atlas
    robex_volumes = [parse_volume(item, cache) for item in arguments.robex or DEFAULT_ROBEX]
    register_volumes = [parse_volume(item, cache) for item in arguments.register or DEFAULT_REGISTER]
    load_before = os.getloadavg()

    rows = []
    with tempfile.TemporaryDirectory(prefix="sfae-timings-") as folder:
        for label, image, reference_mask in robex_volumes:
            logger.info("ROBEX on %s (%s)", label, image)
            rows.append(time_robex(label, image, reference_mask, Path(folder), config["skull_strip"]))
        for label, image, mask in register_volumes:
            logger.info("registration of %s (%s) to %s", label, image, atlas)
            rows.append(time_registration(label, image, mask, atlas, Path(folder), settings, arguments.threads))

    for row in rows:
        logger.info("%s %s: %.1f s, Dice %s", row["step"], row["volume"], row["seconds"], row["dice"])
    with atomic_output(arguments.output) as temporary:
        temporary.write_text(format_table(rows, arguments.threads, load_before))
    logger.info("wrote %s", arguments.output)


if __name__ == "__main__":
    main()
