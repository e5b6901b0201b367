"""`temper pull`: a registered version as a self-contained bundle folder (relative paths only).

Downloads the version's adapter (checked against its recorded hash) and the serving files that
registration logged under `serving/` of the version's run (task.yaml, tokenizer + chat
template, serving.json with the base model's identity and the generation settings), and writes
a README. With `with_base` the base weights are copied in too (checked against the recorded
base hash), so the folder needs nothing else. `temper.bundle.load_bundle` loads
the result on any machine; see that module for the layout. Here on the shared floor (registry
I/O) because both the release commands and the online server pull versions.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from .. import bundle, tracking
from ..errors import TemperError
from ..io import adapter_hash, atomic_dir, write_json
from ..models import describe

log = logging.getLogger(__name__)


class PullError(TemperError, ValueError):
    """A version that cannot be resolved or pulled (the message says which and why)."""


URI_RE = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?$")

README = """# {model} v{version}: a Temper bundle

Task `{task}`. Everything here is addressed by relative paths (see `serving.json`):
`adapter/` (LoRA, sha256 `{adapter_sha}`), `task.yaml`, `tokenizer/` (with its chat template),
{base_line}

Load it, on any machine:

```python
from temper.bundle import load_bundle
b = load_bundle("path/to/this/folder")        # or base_dir=... for a local copy of the base
```

or run it on a file: `temper predict --model path/to/this/folder --input records.jsonl`.

---

"""


def resolve(client: Any, uri: str, default_alias: str = "champion") -> Any:
    """`models:/name@alias`, `models:/name/3`, `name@alias`, `name/3` or `name` (champion)."""
    m = URI_RE.match(uri.strip())
    if not m:
        raise PullError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    name = m["name"]
    if m["version"]:
        return client.get_model_version(name, m["version"])
    alias = m["alias"] or default_alias
    mv = tracking.alias_version(client, name, alias)
    if mv is None:
        raise PullError(f"{name}@{alias} does not exist in the registry")
    return mv


def download_adapter(mv: Any, dst: Path) -> str:
    """Download version `mv`'s adapter into `dst` and check it against its recorded hash."""
    import mlflow

    mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{mv.name}/{tracking.version_str(mv.version)}", dst_path=str(dst)
    )
    bundle.strip_pyfunc(dst)  # the version's MLflow pyfunc files are not the adapter
    have, want = adapter_hash(dst), mv.tags.get("temper.adapter_sha256")
    if want and have != want:
        raise PullError(
            f"{mv.name} v{tracking.version_str(mv.version)}: downloaded adapter hash {have} "
            f"differs from the registered {want}"
        )
    return have


def pull_adapter(uri: str, out: str | Path) -> Path:
    """Only the adapter of version `uri` (hash-checked) into `out`: what re-scoring needs,
    for versions registered before bundles too."""
    import mlflow

    mv = resolve(mlflow.MlflowClient(), uri)
    with atomic_dir(out) as tmp:
        download_adapter(mv, tmp)
    return Path(out)


def pull(
    uri: str,
    out_dir: str | Path | None,
    base_dir: str | Path | None = None,
    with_base: bool = False,
) -> Path:
    """Write version `uri` as a bundle into `out_dir` (default models/pulled/<name>-v<n>).
    `base_dir` is only read with `with_base` (its hash must be the registered one)."""
    import mlflow

    client = mlflow.MlflowClient()
    mv = resolve(client, uri)
    version = tracking.version_str(mv.version)
    tags = mv.tags
    label = f"{mv.name} v{version}"
    out = Path(out_dir) if out_dir else Path("models/pulled") / f"{mv.name}-v{version}"
    with atomic_dir(out) as tmp:
        try:
            got = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path="serving", dst_path=str(tmp / ".dl")
            )
        except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for "absent"
            raise PullError(
                f"{label}: its run {mv.run_id} has no serving/ files (registered before "
                f"bundles existed?): register it again with `temper register` ({err})"
            ) from None
        for item in Path(got).iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(tmp / ".dl")
        manifest = bundle.read_manifest(tmp)
        adapter = tmp / manifest.adapter
        have = download_adapter(mv, adapter)
        if have != manifest.adapter_sha256:
            raise PullError(
                f"{label}: adapter hash {have} differs from serving.json's "
                f"{manifest.adapter_sha256}"
            )
        if with_base:
            if base_dir is None:
                raise PullError("--with-base needs the base model folder (--base or model.dir)")
            bundle.check_base(Path(base_dir), manifest.base, "--base")
            bundle.copy_base(base_dir, tmp / "base")
            manifest.base_weights = "base"
        manifest.registry = {
            "model": mv.name,
            "version": version,
            "aliases": sorted(str(a) for a in mv.aliases),
            "run_id": mv.run_id,
            "model_id": tracking.version_model_id(mv),
            "git_commit": tags.get("temper.git_commit"),
        }
        write_json(tmp / bundle.MANIFEST, manifest.model_dump(mode="json"))
        card_file = adapter / "README.md"
        card = card_file.read_text(encoding="utf-8") if card_file.exists() else ""
        base_line = (
            "`base/` (the base model's weights)."
            if with_base
            else f"and the base model's identity ({describe(manifest.base)}, "
            f"hash `{manifest.base['hash']}`), fetched by identity on load."
        )
        head = README.format(
            model=mv.name,
            version=version,
            task=manifest.task_name,
            adapter_sha=have,
            base_line=base_line,
        )
        (tmp / "README.md").write_text(head + card, encoding="utf-8")
    log.info("pulled %s into %s", label, out)
    return out
