"""`temper pull`: a registered adapter, checked and bound to the local base model.

Download a version's adapter, check it against its recorded hash, find its base model by hash
and point the adapter config at it, so `PeftModel.from_pretrained` loads it directly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from .. import tracking
from ..io import adapter_hash, atomic_dir, model_hash, read_json, write_json
from .promote import PromoteError

log = logging.getLogger(__name__)

URI_RE = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?$")


def resolve(client: Any, uri: str, default_alias: str = "champion") -> Any:
    """`models:/name@alias`, `models:/name/3`, `name@alias`, `name/3` or `name` (champion)."""
    m = URI_RE.match(uri.strip())
    if not m:
        raise PromoteError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    name = m["name"]
    if m["version"]:
        return client.get_model_version(name, m["version"])
    alias = m["alias"] or default_alias
    mv = tracking.alias_version(client, name, alias)
    if mv is None:
        raise PromoteError(f"{name}@{alias} does not exist in the registry")
    return mv


def pull(uri: str, out_dir: str | Path | None, base_dir: str | Path) -> Path:
    """Download a version's adapter and bind it to the local base model with the same hash."""
    import mlflow

    client = mlflow.MlflowClient()
    mv = resolve(client, uri)
    version = tracking.version_str(mv.version)
    tags = mv.tags
    want = tags.get("temper.base_model_hash")
    base_dir = Path(base_dir).resolve()
    if not (base_dir / "temper_source.json").exists():
        raise PromoteError(
            f"{base_dir}: no base model here (run `temper base-model` with "
            f"model.base={tags.get('temper.base_model')})"
        )
    have = model_hash(base_dir)
    if want and have != want:
        raise PromoteError(
            f"{mv.name} v{version} needs base model "
            f"{tags.get('temper.base_model')} with hash {want}; {base_dir} has "
            f"hash {have} (set model.base / model.dir and run `temper base-model`)"
        )
    out = Path(out_dir) if out_dir else Path("models/pulled") / f"{mv.name}-v{version}"
    with atomic_dir(out) as tmp:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{mv.name}/{version}", dst_path=str(tmp)
        )
        got = adapter_hash(tmp)
        if tags.get("temper.adapter_sha256") and got != tags["temper.adapter_sha256"]:
            raise PromoteError(
                f"{mv.name} v{version}: downloaded adapter hash {got} differs "
                f"from the registered {tags['temper.adapter_sha256']}"
            )
        config_path = tmp / "adapter_config.json"
        config = read_json(config_path)
        config["base_model_name_or_path"] = str(base_dir)
        write_json(config_path, config)
        write_json(
            tmp / "temper_pull.json",
            {
                "model": mv.name,
                "version": version,
                "aliases": [str(a) for a in mv.aliases],
                "run_id": mv.run_id,
                "source": mv.source,
                "model_id": tracking.version_model_id(mv),
                "base_model": tags.get("temper.base_model"),
                "base_model_hash": have,
                "base_model_dir": str(base_dir),
                "adapter_sha256": got,
                "git_commit": tags.get("temper.git_commit"),
            },
        )
    log.info("pulled %s v%s into %s (base %s)", mv.name, version, out, base_dir)
    return out


def load_pulled(path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from a pulled folder, the plain peft way: AutoPeftModel reads the
    base model's folder from the adapter config that `pull` rewrote."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    path = Path(path)
    model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    base = read_json(path / "temper_pull.json")["base_model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(
        path if (path / "tokenizer_config.json").exists() else base
    )
    model.eval()
    return model, tokenizer
