"""The conda environments under envs/ agree with the dependencies in pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPOSITORY = Path(__file__).resolve().parents[1]
ENVIRONMENTS = sorted((REPOSITORY / "envs").glob("*.yaml"))
# conda-forge names that differ from the PyPI names in pyproject.toml.
CONDA_TO_PYPI = {"pytorch": "torch"}
NOT_PYTHON_PACKAGES = {"python", "pip"}


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def environment_requirements(path: Path) -> list[Requirement]:
    environment = yaml.safe_load(path.read_text())
    requirements = []
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            requirements += [Requirement(line) for line in entry["pip"]]
            continue
        name, specifier = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", entry).groups()
        if name in NOT_PYTHON_PACKAGES:
            continue
        requirements.append(Requirement(CONDA_TO_PYPI.get(name, name) + specifier))
    return requirements


def test_packaging_environments_exist():
    assert [path.name for path in ENVIRONMENTS] != []


@pytest.mark.parametrize("environment", ENVIRONMENTS, ids=lambda path: path.name)
def test_packaging_environment_matches_pyproject(environment):
    declared = pyproject_requirements()
    for requirement in environment_requirements(environment):
        name = canonicalize_name(requirement.name)
        assert name in declared, f"{environment.name} installs {requirement.name}, which pyproject.toml does not declare"
        assert requirement.specifier == declared[name].specifier, (
            f"{environment.name} pins {requirement}, pyproject.toml {declared[name]}"
        )


def test_packaging_rules_use_existing_environments():
    referenced = set()
    for snakefile in [REPOSITORY / "Snakefile", *(REPOSITORY / "rules").glob("*.smk")]:
        referenced.update(re.findall(r'conda:\s*\n\s*"\.\./envs/([\w.-]+)"', snakefile.read_text()))
    assert referenced, "every rule should name its conda environment"
    assert referenced <= {path.name for path in ENVIRONMENTS}
