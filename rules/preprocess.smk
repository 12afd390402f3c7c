"""Per-volume preprocessing (brain extraction, registration, slicing), then per-data-set splits and anomalies."""


localrules:
    registration_qc,


rule extract_brain:
    """Skull-strip one scan with ROBEX (seeded), or take the non-zero voxels of an already skull-stripped scan.

    Fails when the brain mask is empty or its volume is implausible.
    """
    input:
        image=get_raw_image,
    output:
        brain=f"{VOLUME}/brain.nii.gz",
        mask=f"{VOLUME}/brain_mask.nii.gz",
        report=f"{VOLUME}/brain_extraction.json",
    params:
        method=get_brain_extraction_method,
        settings=config["preprocessing"]["skull_strip"],
    log:
        f"{LOGS}/{{dataset}}/{{subject}}/extract_brain.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/{{subject}}/extract_brain.tsv"
    # ROBEX 1.2 keeps two cores busy.
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow/scripts/extract_brain.py"


rule register:
    """Register one brain to the atlas (rigid, then affine; Mattes mutual information).

    Segmentations follow with nearest-neighbour interpolation. Writes the
    transform, the metric values, the Dice overlap with the atlas mask and a QC
    image; fails below preprocessing.registration.min_dice. Scans declared as
    registered are only checked against the atlas grid.
    """
    input:
        unpack(get_registration_inputs),
    output:
        image=f"{VOLUME}/registered_brain.nii.gz",
        mask=f"{VOLUME}/registered_mask.nii.gz",
        labels=f"{VOLUME}/registered_labels.nii.gz",
        transform=f"{VOLUME}/atlas_transform.tfm",
        report=f"{VOLUME}/registration.json",
        qc=f"{VOLUME}/registration_qc.png",
    params:
        registered=lambda wildcards: get_subject(wildcards).registered,
        settings=config["preprocessing"]["registration"],
    log:
        f"{LOGS}/{{dataset}}/{{subject}}/register.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/{{subject}}/register.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow/scripts/register.py"


rule extract_slices:
    """Equalize the histogram inside the brain, then keep the configured axial slices, resized."""
    input:
        image=rules.register.output.image,
        mask=rules.register.output.mask,
        labels=rules.register.output.labels,
    output:
        slices=f"{VOLUME}/slices.npz",
    params:
        settings=config["preprocessing"]["slices"],
    log:
        f"{LOGS}/{{dataset}}/{{subject}}/extract_slices.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/{{subject}}/extract_slices.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow/scripts/extract_slices.py"


rule make_split:
    """Concatenate the slices of the subjects assigned to one split (assigned by subject, seeded)."""
    input:
        slices=get_split_slices,
    output:
        split=SPLIT_FILE,
    log:
        f"{LOGS}/{{dataset}}/splits/{{split}}.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/splits/{{split}}.tsv"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=30,
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow/scripts/make_split.py"


rule add_anomalies:
    """Deform a fraction of a split's slices (sink or source deformation), reproducibly from the data set's seed."""
    input:
        split=SPLIT_FILE,
    output:
        anomalies=ANOMALY_FILE,
    params:
        settings=get_anomaly_settings,
        seed=get_dataset_seed,
    log:
        f"{LOGS}/{{dataset}}/splits/{{split}}_{{kind}}.log",
    benchmark:
        f"{BENCHMARKS}/{{dataset}}/splits/{{split}}_{{kind}}.tsv"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=30,
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow/scripts/add_anomalies.py"


rule registration_qc:
    """Collect the Dice overlap and metric value of every registered scan of a data set into one table."""
    input:
        reports=get_dataset_registration_reports,
    output:
        table=f"{RESULTS}/{{dataset}}/registration_qc.csv",
    log:
        f"{LOGS}/{{dataset}}/registration_qc.log",
    conda:
        "../envs/preprocessing.yaml"
    script:
        "../workflow/scripts/registration_qc.py"
