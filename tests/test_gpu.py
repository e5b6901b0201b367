"""Device, dtype and loading choices, tested on a CPU-only machine.

- `evaluation.device.choose` (pure): every branch of auto/cpu/cuda x dtype, with the hardware
  facts as arguments; the shipped params resolve to cpu/float32 here.
- `model_source`: a local `model.base` is referenced (hashed), not copied; a change of the
  referenced files is an error; `attn_implementation` reaches `from_pretrained`.
- `chat`: a template without a system role gets the system prompt in the first user turn, in
  generation, training data and token counts alike.
- `train.target_modules: all-linear` adapts exactly the modules of the old explicit list.
- a QLoRA candidate is scored on the 4-bit base with the adapter unmerged (as served).
- `scripts/gpu_smoke.sh` parses, and its Python imports on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from temper.chat import fold_system
from temper.config import ConfigError, load_params
from temper.evaluation.config import EvaluateConfig
from temper.evaluation.device import Placement, choose, resolve
from temper.io import model_hash, read_jsonl, write_json
from temper.model_source import (
    QUANT_FILE,
    ModelSourceError,
    adapter_method,
    load_options,
    weights_dir,
)
from temper.params import TemperParams
from temper.stages.base_model import ModelConfig, run
from temper.training.config import TARGETS_ALL, TrainConfig
from temper.training.model import base_dtype

ROOT = Path(__file__).resolve().parents[1]

# A template with no system role, like Gemma's: it raises on a system message.
NO_SYSTEM = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- device and dtype (pure) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "device, dtype, cuda, bf16, want",
    [
        ("auto", "auto", False, False, Placement("cpu", "float32")),
        ("auto", "auto", True, True, Placement("cuda", "bfloat16")),
        ("auto", "auto", True, False, Placement("cuda", "float16")),
        ("cpu", "auto", True, True, Placement("cpu", "float32")),  # CPU keeps float32
        ("cuda", "auto", True, True, Placement("cuda", "bfloat16")),
        ("cuda", "float32", True, True, Placement("cuda", "float32")),
        ("auto", "bfloat16", False, False, Placement("cpu", "bfloat16")),
        ("auto", "float16", True, True, Placement("cuda", "float16")),
        ("cpu", "float32", False, False, Placement("cpu", "float32")),
    ],
)
def test_device_and_dtype_choice(device, dtype, cuda, bf16, want):
    assert choose(device, dtype, cuda, bf16) == want


@pytest.mark.parametrize(
    "device, dtype, cuda, bf16, match",
    [
        ("cuda", "auto", False, False, "no CUDA device"),
        ("cuda", "bfloat16", True, False, "no native bf16"),
        ("tpu", "auto", True, True, "evaluate.device"),
        ("auto", "int8", True, True, "evaluate.dtype"),
    ],
)
def test_impossible_device_choices_are_clear_errors(device, dtype, cuda, bf16, match):
    with pytest.raises(ConfigError, match=match):
        choose(device, dtype, cuda, bf16)


def test_shipped_params_resolve_to_cpu_float32_here():
    import torch

    cfg = TemperParams.of(load_params(ROOT / "params.yaml")).evaluate
    assert (cfg.device, cfg.dtype) == ("auto", "auto")
    if not torch.cuda.is_available():
        assert resolve(cfg.device, cfg.dtype) == Placement("cpu", "float32")
    assert cfg.batch_for("cpu") == cfg.batch_size == 16
    assert cfg.batch_for("cuda") == cfg.gpu_batch_size == 64
    assert EvaluateConfig(gpu_batch_size=None).batch_for("cuda") == 16


def test_lora_base_dtype_follows_the_gpu_precision_and_stays_fp32_on_the_cpu():
    assert base_dtype("lora", "bf16", "cuda") == "bfloat16"
    assert base_dtype("lora", "fp16", "cuda") == "float16"
    assert base_dtype("lora", "fp32", "cuda") == "float32"
    assert base_dtype("lora", "bf16", "cpu") == "float32"  # bf16 autocast over fp32 weights
    assert base_dtype("qlora", "bf16", "cuda") == "float32"  # the 4-bit config decides


# --- chat: system folding (pure) -------------------------------------------------------------


def test_fold_system_moves_the_system_prompt_into_the_first_user_turn():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "U2"},
    ]
    assert fold_system(msgs) == [
        {"role": "user", "content": "S\n\nU1"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "U2"},
    ]
    assert msgs[1]["content"] == "U1", "the caller's messages are not changed"
    assert fold_system(msgs[1:]) == msgs[1:]


# --- a local base model folder: referenced, hashed, checked ----------------------------------


def fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


def test_local_folder_is_referenced_not_copied_and_checked_at_load(tmp_path):
    src = fake_model(tmp_path / "mine")
    out = run(ModelConfig(base=str(src), dir=str(tmp_path / "base")))
    assert not list(out.glob("*.safetensors")), "weights must stay in the referenced folder"
    assert (out / "config.json").read_text() == (src / "config.json").read_text()
    source = json.loads((out / "temper_source.json").read_text())
    assert source["kind"] == "local" and source["reference"]["path"] == str(src.resolve())
    assert set(source["files"]) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert "attn_implementation" not in source and load_options(out) == {}
    assert weights_dir(out) == src.resolve()
    before = model_hash(out)

    os.utime(src / "model.safetensors")  # touched, same bytes: re-hashed and accepted
    st = (src / "model.safetensors").stat()
    os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights_dir(out) == src.resolve()

    (src / "model.safetensors").write_bytes(b"\1" * 4096)  # same size, other bytes
    with pytest.raises(ModelSourceError, match="SHA-256 differs"):
        weights_dir(out)
    (src / "model.safetensors").write_bytes(b"\1" * 10)
    with pytest.raises(ModelSourceError, match="changed size"):
        weights_dir(out)
    (src / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="missing"):
        weights_dir(out)

    # Referencing it anew after the change gives another identity.
    (src / "model.safetensors").write_bytes(b"\2" * 4096)
    again = run(ModelConfig(base=str(src), dir=str(tmp_path / "base")))
    assert model_hash(again) != before and weights_dir(again) == src.resolve()


def test_base_model_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="no such .jinja file"):
        ModelConfig(chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError):
        ModelConfig(attn_implementation="flash")
    src = fake_model(tmp_path / "m")
    with pytest.raises(ConfigError, match="is model.dir itself"):
        run(ModelConfig(base=str(src), dir=str(src)))
    assert (src / "model.safetensors").exists()


def test_attn_implementation_is_recorded(tmp_path):
    out = run(
        ModelConfig(
            base=str(fake_model(tmp_path / "m")),
            dir=str(tmp_path / "b"),
            attn_implementation="eager",
        )
    )
    assert load_options(out) == {"attn_implementation": "eager"}


def test_adapter_method_comes_from_the_marker_or_train_metrics(tmp_path):
    adapter = tmp_path / "cand" / "adapter"
    adapter.mkdir(parents=True)
    assert adapter_method(adapter) == "lora"
    write_json(tmp_path / "cand" / "train_metrics.json", {"config": {"method": "qlora"}})
    assert adapter_method(adapter) == "qlora"
    (tmp_path / "cand" / "train_metrics.json").unlink()
    write_json(adapter / QUANT_FILE, {"method": "qlora"})
    assert adapter_method(adapter) == "qlora"


def test_target_modules_default_is_all_linear():
    assert TrainConfig().target_modules == "all-linear"
    train = load_params(ROOT / "params.yaml")["train"]
    assert train["target_modules"] == "all-linear"
    assert TrainConfig(target_modules=["q_proj"]).target_modules == ["q_proj"]
    with pytest.raises(ValueError):
        TrainConfig(target_modules="all")


# --- scripts/gpu_smoke.sh --------------------------------------------------------------------


def test_gpu_smoke_script_parses_and_its_python_imports_on_the_cpu(tmp_path):
    script = ROOT / "scripts" / "gpu_smoke.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    blocks = re.findall(r"<<'PY'\n(.*?)\nPY\n", text, re.DOTALL)
    assert blocks, "the script's Python heredoc was not found"
    for i, code in enumerate(blocks):
        compile(code, f"gpu_smoke.sh:py{i}", "exec")
        # Run it up to the CUDA check: imports and helpers must load here; the script exits
        # with its own message because no GPU is visible.
        env = {**os.environ, "GPU_SMOKE_IMPORT_ONLY": "1"}
        done = subprocess.run(
            [sys.executable, "-c", code, "2"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "imports ok" in done.stdout


# --- the real model (slow) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def custom_base(tmp_path_factory, base_model_dir) -> Path:
    """The real model referenced as a local folder, with a template without a system role
    and eager attention."""
    out = tmp_path_factory.mktemp("custom") / "base"
    return run(
        ModelConfig(
            base=str(base_model_dir),
            dir=str(out),
            chat_template=NO_SYSTEM,
            attn_implementation="eager",
        )
    )


@pytest.mark.slow
def test_referenced_real_model_loads_with_its_options(custom_base, base_model_dir):
    import torch

    from temper.evaluation.generation import load_model
    from temper.training.model import load_base

    assert not list(custom_base.glob("*.safetensors"))
    source = json.loads((custom_base / "temper_source.json").read_text())
    original = json.loads((base_model_dir / "temper_source.json").read_text())["files"]
    assert source["files"]["model.safetensors"] == original["model.safetensors"]
    assert source["files"]["chat_template.jinja"] != original["chat_template.jinja"]
    assert source["chat_template"] == "inline"

    model, tok = load_model(custom_base, device="cpu")
    assert model.config._attn_implementation == "eager"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.chat_template == NO_SYSTEM
    _, trained = load_base(custom_base, "lora", "fp32")
    assert trained.config._attn_implementation == "eager"
    ref, _ = load_model(base_model_dir, device="cpu")  # no option recorded: the default
    assert ref.config._attn_implementation == "sdpa"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[name], ref.state_dict()[name])


@pytest.mark.slow
def test_sdpa_is_passed_through(tmp_path, base_model_dir):
    from temper.evaluation.generation import load_model

    out = run(
        ModelConfig(base=str(base_model_dir), dir=str(tmp_path / "b"), attn_implementation="sdpa")
    )
    model, _ = load_model(out, device="cpu")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_chat_template_file_override(tmp_path, base_model_dir):
    from temper.model_source import load_tokenizer

    path = tmp_path / "t.jinja"
    path.write_text(NO_SYSTEM)
    out = run(
        ModelConfig(base=str(base_model_dir), dir=str(tmp_path / "b"), chat_template=str(path))
    )
    assert load_tokenizer(out).chat_template == NO_SYSTEM
    with pytest.raises(ConfigError, match="does not render"):
        run(
            ModelConfig(
                base=str(base_model_dir), dir=str(tmp_path / "c"), chat_template="{{ nope( }}"
            )
        )
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_system_prompt_is_folded_everywhere_a_prompt_is_rendered(custom_base, task, prepared_dir):
    from temper.chat import render, supports_system
    from temper.evaluation.generation import generate, load_model
    from temper.model_source import load_tokenizer
    from temper.records.tokens import TokenCounter
    from temper.training.data import fit_prompt, to_dataset, tokenize_pair

    tok = load_tokenizer(custom_base)
    records = read_jsonl(prepared_dir / "test.jsonl")[:3]
    messages = task.messages(records[0]["text"])
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(messages, tokenize=False)  # what would happen unfolded
    assert not supports_system(tok)
    text = render(tok, messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(f"<|im_start|>user\n{task.system_prompt}\n\n")
    assert "<|im_start|>system" not in text

    # Training data: trl sees folded prompts; the labels still cover the answer only.
    recs = [
        {**r, "completion": [{"role": "assistant", "content": task.format_answer(r["gold"])}]}
        for r in records
    ]
    ds, _ = to_dataset(tok, recs, 256)
    assert [m["role"] for m in ds[0]["prompt"]] == ["user"]
    assert ds[0]["prompt"][0]["content"].startswith(task.system_prompt)
    fitted, _ = fit_prompt(tok, recs[0], 256)
    pair = tokenize_pair(tok, fitted)
    answer = tok.decode([t for t in pair["labels"] if t != -100])
    assert answer.startswith(task.format_answer(records[0]["gold"]))

    # Token counts (prepare's length filter) agree with the folded render.
    counter = TokenCounter(tok, task)
    answers = [task.format_answer(r["gold"]) for r in records]
    full = [
        render(
            tok, task.messages(r["text"]) + [{"role": "assistant", "content": a}], tokenize=False
        )
        for r, a in zip(records, answers, strict=True)
    ]
    assert counter.count(records)[0] == counter.lengths(full)

    # Generation renders the same folded prompt and answers.
    model, tok2 = load_model(custom_base, device="cpu")
    gens = generate(model, tok2, [messages], max_new_tokens=3, batch_size=1, progress=False)
    assert gens[0].new_tokens > 0


@pytest.mark.slow
def test_all_linear_selects_exactly_the_old_module_list(base_model_dir):
    from temper.training.model import add_lora, load_base, target_modules

    _, model = load_base(base_model_dir, "lora", "fp32")
    assert sorted(target_modules(model, "all-linear")) == sorted(TARGETS_ALL)
    peft_model = add_lora(model, TrainConfig(layers=8))  # the shipped rank 16, top 8 blocks
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 1_302_528
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert len(adapted) == 8 * 7 and all(n.rsplit(".", 1)[-1] in TARGETS_ALL for n in adapted)
    assert not any("lm_head" in n for n in adapted)


@pytest.mark.slow
def test_qlora_candidate_is_scored_on_the_4bit_base_unmerged(tmp_path, base_model_dir, task):
    """As served: the evaluation model is the training model (4-bit base + adapter), not the
    adapter merged into the 16-bit base, whose logits differ measurably."""
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel

    from temper.evaluation.generation import generate, load_model
    from temper.training.model import add_lora, load_base, write_quantization_marker

    torch.manual_seed(0)
    tok, model = load_base(base_model_dir, "qlora", "fp32")
    model = add_lora(model, TrainConfig(method="qlora", rank=4, alpha=8, layers=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = tmp_path / "cand" / "adapter"
    model.save_pretrained(adapter)
    write_quantization_marker(adapter, "qlora")
    model.eval()
    ids = tok.apply_chat_template(
        task.messages("This Agreement is governed by New York law."),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=ids).logits

    served, stok = load_model(base_model_dir, adapter, device="cpu")
    assert isinstance(served, PeftModel), "a QLoRA adapter must not be merged for scoring"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in served.modules())
    with torch.no_grad():
        got = served(input_ids=ids).logits
    (adapter / QUANT_FILE).unlink()  # without the marker it is taken for LoRA: merged, 16-bit
    merged, _ = load_model(base_model_dir, adapter, device="cpu")
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        other = merged(input_ids=ids).logits
    as_served = (got - trained).abs().max().item()
    assert as_served < 1e-3, as_served
    assert (other - trained).abs().max().item() > 10 * max(as_served, 1e-4)
    write_quantization_marker(adapter, "qlora")
    gens = generate(served, stok, [task.messages("x")], max_new_tokens=2, progress=False)
    assert gens[0].new_tokens > 0


def test_qlora_without_bitsandbytes_is_a_clear_error(tmp_path, monkeypatch):
    from temper.evaluation.generation import load_model

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    write_json(adapter / QUANT_FILE, {"method": "qlora"})
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    monkeypatch.setattr("temper.model_source.load_tokenizer", lambda d: FakeTok())
    with pytest.raises(RuntimeError, match="4-bit base it was trained on"):
        load_model(base, adapter, device="cpu")


class FakeTok:
    pad_token_id = 0
    padding_side = "right"
