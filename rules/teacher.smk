"""The teacher: a full fine-tune of the base model, and the SVD analysis of its weight delta."""


rule train_teacher:  # first when it can start: the ΔW export, the references and every arm wait for it
    priority: 20
    input:
        model="results/model/model.json",
        manifest="results/dataset/manifest.json",
    output:
        directory("results/teacher/model"),
    params:
        teacher=config_slice("teacher"),
        task=task_settings(training_only=True),
        state_dir="results/state/teacher",
        tensorboard_dir="results/tensorboard/teacher",
    threads: rule_threads("train_teacher")
    resources:
        **rule_resources("train_teacher"),
    log:
        log_path("train_teacher"),
    benchmark:
        benchmark_path("train_teacher")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/train_teacher.py"


rule export_delta:  # short, and soon: the svd arms and the references wait for it
    priority: 5
    input:
        base=model_checkpoint_input,
        teacher="results/teacher/model",
    output:
        directory("results/delta"),
    params:
        delta=config_slice("delta"),
        base_dir=model_dir(),
    threads: rule_threads("export_delta")
    resources:
        **rule_resources("export_delta"),
    log:
        log_path("export_delta"),
    benchmark:
        benchmark_path("export_delta")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/export_delta.py"
