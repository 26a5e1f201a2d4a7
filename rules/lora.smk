"""The LoRA grid: one adapter per arm and seed, its evaluation on the test split, the references, the tables."""


rule train_lora:
    input:
        unpack(arm_inputs),
        model="results/model/model.json",
        manifest="results/dataset/manifest.json",
    output:
        directory("results/lora/{objective}/{preset}/{init}/{strategy}/seed{seed}"),
    params:
        arm=arm_settings,
        state_dir="results/state/lora/{objective}/{preset}/{init}/{strategy}/seed{seed}",
        tensorboard_dir="results/tensorboard/lora/{objective}/{preset}/{init}/{strategy}/seed{seed}",
    threads: rule_threads("train_lora")
    resources:
        **rule_resources("train_lora"),
    log:
        log_path("train_lora/{objective}/{preset}/{init}/{strategy}/seed{seed}"),
    benchmark:
        benchmark_path("train_lora/{objective}/{preset}/{init}/{strategy}/seed{seed}")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/train_lora.py"


rule evaluate:
    input:
        unpack(arm_inputs),
        arm="results/lora/{objective}/{preset}/{init}/{strategy}/seed{seed}",
        model="results/model/model.json",
        manifest="results/dataset/manifest.json",
        teacher="results/teacher/model",
    output:
        "results/eval/{objective}/{preset}/{init}/{strategy}/seed{seed}/metrics.json",
    params:
        arm=arm_settings,
        target_loss=lambda wildcards: config["lora"]["target_loss"][wildcards.objective],
        batch_size=config["lora"]["eval_batch_size"],
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    log:
        log_path("evaluate/{objective}/{preset}/{init}/{strategy}/seed{seed}"),
    benchmark:
        benchmark_path("evaluate/{objective}/{preset}/{init}/{strategy}/seed{seed}")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/evaluate.py"


rule evaluate_reference:
    input:
        unpack(lambda wildcards: {"teacher": "results/teacher/model"} if wildcards.reference == "teacher" else {}),
        model="results/model/model.json",
        manifest="results/dataset/manifest.json",
    output:
        "results/eval/references/{reference}.json",
    params:
        arm=reference_settings(),
        batch_size=config["lora"]["eval_batch_size"],
    threads: rule_threads("evaluate_reference")
    resources:
        **rule_resources("evaluate_reference"),
    log:
        log_path("evaluate_reference", "_{reference}"),
    benchmark:
        benchmark_path("evaluate_reference", "_{reference}")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/evaluate_reference.py"


rule collect:
    input:
        evaluations=[f"results/eval/{arm_path(arm)}/metrics.json" for arm in ARMS],
        histories=[f"results/lora/{arm_path(arm)}" for arm in ARMS],
        references=expand("results/eval/references/{reference}.json", reference=REFERENCES),
    output:
        table="results/reports/ablation.csv",
        references="results/reports/references.csv",
        history="results/reports/ablation_history.csv",
    params:
        arms=ARMS,
        references=list(REFERENCES),
    threads: rule_threads("collect")
    resources:
        **rule_resources("collect"),
    log:
        log_path("collect"),
    benchmark:
        benchmark_path("collect")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/collect.py"
