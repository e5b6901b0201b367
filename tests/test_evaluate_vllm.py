"""`evaluate.engine: vllm`: the evaluation's answers through vLLM's CPU build (its own
virtualenv, `make vllm`) equal the built-in loop's on the real base model with a real LoRA
adapter, confidences included (vLLM in float32; label tokens rescored by the raw model). The
generator attaches to the session's vLLM (`evaluate.engine_url`), which another generator
started and stops (conftest.shared_vllm)."""

from __future__ import annotations

import pytest
from registry_fixtures import gentle_adapter
from test_serve import VLLM_PYTHON

from temper.engines import VllmConfig
from temper.engines.vllm_generate import VllmGenerator
from temper.evaluation.config import EvaluateConfig
from temper.evaluation.predict import model_predictions
from temper.io import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_vllm_answers_equal_the_builtin_loop(
    tmp_path, base_model_dir, prepared_dir, task, shared_vllm, monkeypatch
):
    # 4 clauses: each is compared token by token, and vLLM's CPU LoRA path is ~5x slower
    # than its base model's (as many rescoring requests as label tokens).
    records = read_jsonl(prepared_dir / "test.jsonl")[:4]
    prompts = [r["prompt"] for r in records]
    adapter = gentle_adapter(base_model_dir, tmp_path / "gentle")
    cfg = EvaluateConfig(progress=False, batch_size=8)  # threads: the worker's share (conftest)
    vcfg = VllmConfig(python=str(VLLM_PYTHON), dtype="float32", kv_cache_gib=2)
    # Attached (`evaluate.engine_url`) to the session's vLLM, which a `VllmGenerator` of its
    # own started (conftest.shared_vllm): both ways of getting an engine are exercised.
    monkeypatch.setenv("VLLM_API_KEY", shared_vllm.key)
    engine = VllmGenerator(vcfg, base_model_dir, tmp_path / "vllm.log", 8, url=shared_vllm.url)
    try:
        for name, ref in (("baseline", None), ("gentle", adapter)):
            want, _ = model_predictions(records, prompts, base_model_dir, ref, task, cfg, name)
            got, seconds = model_predictions(
                records, prompts, base_model_dir, ref, task, cfg, name, engine
            )
            assert seconds > 0
            assert [g["output"] for g in got] == [w["output"] for w in want], name
            # The built-in loop counts one padding EOS after an answer its batch outlived.
            for g, w in zip(got, want, strict=True):
                assert w["new_tokens"] - 1 <= g["new_tokens"] <= w["new_tokens"], name
            for g, w in zip(got, want, strict=True):
                assert g["valid"] == w["valid"] and g["answer"] == w["answer"]
                for field, value in w["confidence"].items():
                    if value is None:
                        assert g["confidence"][field] is None
                    else:
                        assert g["confidence"][field] == pytest.approx(value, rel=2e-3, abs=1e-6)
        assert len(engine.adapters) == 1  # the candidate loaded once, the base served as is
        assert engine.base_name == str(base_model_dir.resolve())  # as the server lists it
    finally:
        engine.close()
    assert engine.server is None and shared_vllm.proc.poll() is None  # attached: left running
