"""Training and evaluation of every method for every seed, and each experiment's report."""


rule train_method:
    """Train one method by gradient steps with one seed on the training split of the experiment's training data set.

    Requests a GPU through the resource "gpu" (training.gpus), so the SLURM
    profile sends it to the GPU partition; locally it runs on whatever device
    is there. A checkpoint beside the outputs lets a rerun of a killed job
    resume with the same final weights.
    """
    input:
        split=get_training_split,
    output:
        model=f"{RUN}/model.pt",
        report=f"{RUN}/training.json",
        loss_csv=f"{RUN}/loss.csv",
        loss_png=f"{RUN}/loss.png",
    wildcard_constraints:
        method=TRAINED_METHOD_PATTERN,
    params:
        settings=get_method_settings,
        training=get_method_training,
        checkpoint=lambda wildcards, output: os.path.join(os.path.dirname(output.model), "checkpoint", "last.pt"),
    log:
        f"{LOGS}/experiments/{{experiment}}/{{method}}/seed{{seed}}/train_method.log",
    benchmark:
        f"{BENCHMARKS}/experiments/{{experiment}}/{{method}}/seed{{seed}}/train_method.tsv"
    threads: config["training"]["threads"]
    resources:
        gpu=config["training"]["gpus"],
        # The split is held in memory as one tensor, next to the file's arrays while converting.
        mem_mb=lambda wildcards, input: int(3 * input.size_mb) + 4000,
        runtime=720,
    conda:
        "../envs/methods.yaml"
    script:
        "../workflow/scripts/train_method.py"


# Statistical methods (BM, Random) are fitted in one pass over the slices: the
# same job as train_method, but without a GPU request, so that the SLURM
# profile keeps it on the CPU partition.
use rule train_method as fit_method with:
    wildcard_constraints:
        method=FITTED_METHOD_PATTERN,
    log:
        f"{LOGS}/experiments/{{experiment}}/{{method}}/seed{{seed}}/fit_method.log",
    benchmark:
        f"{BENCHMARKS}/experiments/{{experiment}}/{{method}}/seed{{seed}}/fit_method.tsv"
    resources:
        mem_mb=lambda wildcards, input: int(3 * input.size_mb) + 4000,
        runtime=60,


rule evaluate_method:
    """Compute anomaly maps on the validation and test splits and the metrics of one trained run."""
    input:
        unpack(get_evaluation_splits),
        model=rules.train_method.output.model,
    output:
        metrics=f"{RUN}/metrics.json",
        examples=f"{RUN}/examples.npz",
    params:
        evaluation=config["evaluation"],
        device=config["training"]["device"],
        data_note=get_data_note,
    log:
        f"{LOGS}/experiments/{{experiment}}/{{method}}/seed{{seed}}/evaluate_method.log",
    benchmark:
        f"{BENCHMARKS}/experiments/{{experiment}}/{{method}}/seed{{seed}}/evaluate_method.tsv"
    threads: config["training"]["threads"]
    resources:
        mem_mb=lambda wildcards, input: int(2 * input.size_mb) + 4000,
        runtime=120,
    conda:
        "../envs/methods.yaml"
    script:
        "../workflow/scripts/evaluate_method.py"


rule aggregate_experiment:
    """Tabulate every method over the seeds (mean and standard deviation), run the Welch t-tests, draw the figures."""
    input:
        unpack(get_experiment_runs),
    output:
        **{name.replace(".", "_"): f"{REPORT}/{name}" for name in REPORT_FILES},
    params:
        evaluation=config["evaluation"],
        methods=METHODS,
        output_dir=lambda wildcards, output: os.path.dirname(output.summary_md),
    log:
        f"{LOGS}/experiments/{{experiment}}/aggregate_experiment.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/methods.yaml"
    script:
        "../workflow/scripts/aggregate_experiment.py"
