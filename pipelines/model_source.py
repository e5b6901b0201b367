"""How every loader opens the base model folder (`model.dir`, written by the base_model stage).

`<model.dir>/temper_source.json` says where the weights are and how to load them:

- `files`: name -> SHA-256 of every file of the model as loaded (its identity, `io.model_hash`);
- `reference` (a local `model.base` folder): the weights stay in that folder and are not copied,
  so DVC does not store them a second time; `model.dir` then holds the small files (config,
  tokenizer, chat template) and the record of the referenced files' sizes, mtimes and hashes.
  `weights_dir` checks them on every load: a changed file is an error (a changed mtime alone
  triggers a re-hash, as DVC does, so checking costs a `stat` per file when nothing changed);
- `attn_implementation` (when `model.attn_implementation` is set), passed to `from_pretrained`.

A folder without `temper_source.json` (any Hugging Face model folder) loads as it is.

QLoRA adapters carry `temper_quantization.json` (written by training): they were trained on the
4-bit NF4 base and are scored and served on it, never silently on the 16-bit weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import TemperError
from .io import read_json, sha256_file

log = logging.getLogger(__name__)

SOURCE_FILE = "temper_source.json"
QUANT_FILE = "temper_quantization.json"
ATTN_CHOICES = ("eager", "sdpa", "flash_attention_2")


class ModelSourceError(TemperError, ValueError):
    """The base model folder or the folder it references is not what was recorded."""


def read_source(model_dir: str | Path) -> dict[str, Any]:
    """The folder's `temper_source.json`, or {} for a plain model folder."""
    path = Path(model_dir) / SOURCE_FILE
    return read_json(path) if path.exists() else {}


def make_reference(src: Path, names: list[str]) -> dict[str, Any]:
    """The record of `src`'s files `names` that `weights_dir` later checks."""
    files = {}
    for name in names:
        stat = (src / name).stat()
        files[name] = {
            "sha256": sha256_file(src / name),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
    return {"path": str(src.resolve()), "files": files}


def weights_dir(model_dir: str | Path) -> Path:
    """The folder `from_pretrained` reads the weights from: `model_dir` itself, or the folder
    it references after checking that its files are the ones recorded."""
    model_dir = Path(model_dir)
    ref = read_source(model_dir).get("reference")
    if not ref:
        return model_dir
    src = Path(ref["path"])
    where = f"{model_dir / SOURCE_FILE}"
    rerun = "run `temper base-model` again (dvc repro base_model) to reference it anew"
    for name, rec in ref["files"].items():
        file = src / name
        if not file.is_file():
            raise ModelSourceError(f"{where}: referenced file {file} is missing; {rerun}")
        stat = file.stat()
        if stat.st_size != rec["size"]:
            raise ModelSourceError(f"{where}: {file} changed size since it was referenced; {rerun}")
        if stat.st_mtime_ns != rec["mtime_ns"]:
            if sha256_file(file) != rec["sha256"]:
                raise ModelSourceError(
                    f"{where}: {file} changed (SHA-256 differs from the recorded one); {rerun}"
                )
            log.info("%s: touched but unchanged (hash checked)", file)
    return src


def load_options(model_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments every `from_pretrained` of this model gets (attention kernel)."""
    attn = read_source(model_dir).get("attn_implementation")
    return {"attn_implementation": attn} if attn else {}


def nf4_config(compute_dtype: Any) -> Any:
    """The QLoRA quantisation: 4-bit NF4 with double quantisation (bitsandbytes)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


def disable_bnb_cpu_repack(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference.

    bitsandbytes >= 0.49 on CPUs with AVX512-BF16 repacks the weights in place on the first
    no-grad eval forward (generate, the Trainer's eval loop); gradients through them are wrong
    afterwards (cosine 0.04 vs dense). Turning the fast path off keeps training correct, and evaluation scores the numbers
    training computed (the fast path computes in bf16: logits moved by ~0.6 here).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_causal_lm(model_dir: str | Path, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained` on the (checked) weights with the model's options."""
    from transformers import AutoModelForCausalLM

    options = {**load_options(model_dir), "use_safetensors": True, **kwargs}
    return AutoModelForCausalLM.from_pretrained(weights_dir(model_dir), **options)


# Tokenizer classes loaded by name rather than through `AutoTokenizer`, whose module imports
# transformers' auto-config machinery and with it torch: 2.5 CPU-s against 0.7 measured, paid
# by processes that need no model (prepare, register, a vLLM gateway). For these names
# AutoTokenizer picks the very same class (`PreTrainedTokenizerFast` is `TokenizersBackend`).
DIRECT_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer from `model_dir` itself (it holds the chat template override, if any)."""
    config = Path(model_dir) / "tokenizer_config.json"
    name = read_json(config).get("tokenizer_class") if config.exists() else None
    if name in DIRECT_TOKENIZERS:
        import transformers

        return getattr(transformers, name).from_pretrained(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def adapter_method(adapter: str | Path) -> str:
    """ "qlora" when the adapter was trained on the 4-bit base, else "lora".

    Read from the adapter's `temper_quantization.json` or, for candidates trained before it
    existed, the method in `train_metrics.json` beside the adapter folder.
    """
    adapter = Path(adapter)
    if (adapter / QUANT_FILE).exists():
        return str(read_json(adapter / QUANT_FILE).get("method", "qlora"))
    metrics = adapter.parent / "train_metrics.json"
    if metrics.exists():
        return str(read_json(metrics).get("config", {}).get("method", "lora"))
    return "lora"


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths are the same folder (a `model.base` equal to `model.dir`)."""
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False
