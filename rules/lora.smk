"""The LoRA grid: one job per arm trains an adapter for every seed and evaluates each on the test split; the
references; the tables. An arm's seeds and their evaluation share a job because starting one costs seconds of
imports: a rerun (a new seed, a new teacher to measure against) resumes finished seeds from their last checkpoint
instead of training them again."""


rule train_lora:
    priority: arm_priority
    input:
        unpack(arm_inputs),
        model="results/model/model.json",
        manifest="results/dataset/manifest.json",
        teacher="results/teacher/model",
    output:
        arms=[directory(f"results/lora/{ARM}/seed{seed}") for seed in SEEDS],
        evaluations=[f"results/eval/{ARM}/seed{seed}/metrics.json" for seed in SEEDS],
        **({"predictions": [f"results/eval/{ARM}/seed{seed}/predictions.csv" for seed in SEEDS]}
           if MODALITY.predictions else {}),
    params:
        arm=arm_settings,
        seeds=SEEDS,
        state_dirs=[f"results/state/lora/{ARM}/seed{seed}" for seed in SEEDS],
        tensorboard_dirs=[f"results/tensorboard/lora/{ARM}/seed{seed}" for seed in SEEDS],
        target_loss=lambda wildcards: config["lora"]["target_loss"][wildcards.objective],
        batch_size=config["lora"]["eval_batch_size"],
    threads: rule_threads("train_lora")
    resources:
        **rule_resources("train_lora"),
    log:
        log_path(f"train_lora/{ARM}"),
    benchmark:
        benchmark_path(f"train_lora/{ARM}")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/train_lora.py"


rule evaluate_references:
    input:
        **general_text_input(),
        model="results/model/model.json",
        manifest="results/dataset/manifest.json",
        teacher="results/teacher/model",
        delta="results/delta",
    output:
        evaluations=[f"results/eval/references/{reference}.json" for reference in REFERENCES],
        **({"predictions": [f"results/eval/references/{reference}_predictions.csv" for reference in REFERENCES]}
           if MODALITY.predictions else {}),
    params:
        arm=reference_settings(),
        references=list(REFERENCES),
        batch_size=config["lora"]["eval_batch_size"],
    threads: rule_threads("evaluate_references")
    resources:
        **rule_resources("evaluate_references"),
    log:
        log_path("evaluate_references"),
    benchmark:
        benchmark_path("evaluate_references")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/evaluate_references.py"


rule collect:
    input:
        evaluations=[f"results/eval/{arm_path(arm)}/metrics.json" for arm in ARMS],
        histories=[f"results/lora/{arm_path(arm)}" for arm in ARMS],
        references=[f"results/eval/references/{reference}.json" for reference in REFERENCES],
    output:
        table="results/reports/ablation.csv",
        references="results/reports/references.csv",
        history="results/reports/ablation_history.csv",
        module_distance="results/reports/module_distance.csv",
    params:
        arms=ARMS,
        references=list(REFERENCES),
        modality=config["model"]["modality"],
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
