"""The HTML report, rendered from the stages' JSON outputs."""


rule report:
    input:
        unpack(report_inputs),
    output:
        "results/reports/ablation.html",
    params:
        config_hash=experiment_hash(),
    threads: rule_threads("report")
    resources:
        **rule_resources("report"),
    log:
        log_path("report"),
    benchmark:
        benchmark_path("report")
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/report.py"
