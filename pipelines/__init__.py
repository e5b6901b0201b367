"""Temper: from an LLM prototype on a frontier API to a tuned, measured, gated, served model.

The folder is `pipelines/`; the package imports as `temper`. The tree is the architecture:

    cli/          the `temper` command: a thin table of commands over the entry functions
    stages/       offline: one module per DVC stage (`dvc repro`), one typed entry `run`
                  base_model, prepare, distil, train, evaluate, register
    release/      around the registry: promote, rollback, pull, merge (CI and people run these)
    online/       what meets traffic: serving, routing, cache, monitoring (issues 14-16)
    -- shared floor, used by both wings, never importing them --
    evaluation/   generation, scoring, judge, gates, report, metrics (+ evaluate's config)
    training/     the LoRA/QLoRA trainer, its data, model and launcher (+ train's config)
    providers/    LLM APIs: clients, cache, limits and budget, privacy, retries
    teacher.py    asking a model for a schema-valid answer (validate, repair, reject)
    tracking/     MLflow: runs, datasets, logged models, registry, model card, UI
    -- ground floor --
    config.py io.py task.py results.py records/   typed params, atomic files and hashes,
                  the task (prompts, answer schema), each stage's typed result, records

Rules (tests/test_layout.py checks them): a stage never imports another stage (stages meet
through the files dvc.yaml lists); the online wing reads what the offline wing wrote (the
registry, reports, configs) and never imports a stage; the shared and ground floors import
neither wing.
"""
