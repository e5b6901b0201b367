"""A portable registered model: the serving manifest, and loading a pulled bundle anywhere.

A bundle is a folder with relative paths only (what `temper pull` writes):

    serving.json      this manifest (`Manifest`): what the files are and how to generate
    task.yaml         the task config, resolved (prompts, answer schema, labels)
    tokenizer/        the tokenizer files, its chat template in tokenizer/chat_template.jinja
    adapter/          the LoRA adapter, byte for byte as registered (checked by hash on load)
    base/             only with `temper pull --with-base`: the base model's weights
    README.md         how to load it, then the version's model card

The base model is found by its identity (`temper.models.identity`), never by a machine path:
the built-in model is materialised by name into the cache (`$TEMPER_CACHE/bases`), a hub
model by id and revision, a local folder only through `base_dir` (its content hash must match)
or the bundle's own `base/`. Shared floor: the online server loads bundles through
`load_bundle`, so this imports no stage and no release module. Registration writes the same
files (less the adapter, which is the version's own artifact) under `serving/` of the
version's run (`write_serving`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from . import model_source, models
from .config import Section
from .errors import TemperError
from .evaluation.config import EvaluateConfig
from .io import adapter_hash, model_hash, read_json, sha256_file, write_json
from .model_source import SOURCE_FILE, weights_dir
from .task import TaskConfig, load_task

log = logging.getLogger(__name__)

MANIFEST = "serving.json"
FORMAT = 1
# What registration adds beside the adapter's files in its logged model, so that the version
# also loads as an MLflow pyfunc model (`write_pyfunc`), and the file MLflow writes into a
# downloaded registered model: none of it is the adapter (`strip_pyfunc` before hashing).
PYFUNC_FILES = ("MLmodel", "serving", "registered_model_meta")
ROUTE_POLICY = "route.json"  # the route stage's fitted policy, in a version's serving files
PYFUNC_LOADER = "temper.online.pyfunc"


class BundleError(TemperError, ValueError):
    """A bundle is incomplete, does not match its recorded hashes, or its base is not found."""


class GenerationSettings(Section):
    """How the registered version was evaluated, so it is served the same way."""

    max_new_tokens: int = Field(gt=0, description="Generation budget (the task's).")
    stop_at_json: bool = Field(True, description="Stop a reply once its JSON answer is complete.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Inference dtype (auto: by device, as evaluate.dtype)."
    )
    constrained: bool = Field(False, description="Answers constrained to the task's schema.")
    greedy: bool = Field(True, description="Greedy decoding (the only kind used today).")


class Manifest(Section):
    """`serving.json`: every path is relative to the bundle folder."""

    format: int = Field(FORMAT, description="Manifest format version.")
    task: str = Field("task.yaml", description="The resolved task config.")
    task_name: str = Field(description="The task's name.")
    prompt_hash: str = Field(description="TaskConfig.prompt_hash of task.yaml.")
    tokenizer: str = Field("tokenizer", description="Tokenizer folder.")
    chat_template: str = Field(
        "tokenizer/chat_template.jinja", description="The tokenizer's chat template."
    )
    chat_template_sha256: str = Field(description="sha256 of the chat template file.")
    adapter: str = Field("adapter", description="The LoRA adapter folder.")
    adapter_sha256: str = Field(description="temper.io.adapter_hash of the adapter.")
    base: dict[str, Any] = Field(description="Base model identity (temper.models.identity).")
    base_weights: str | None = Field(None, description="Base weights in the bundle, if any.")
    generation: GenerationSettings
    registry: dict[str, Any] = Field(
        default_factory=dict, description="Where it came from: model, version, run, aliases."
    )


def generation_settings(task: TaskConfig, cfg: EvaluateConfig) -> GenerationSettings:
    """The settings the evaluation generated with (`evaluate:`), to serve the same way."""
    return GenerationSettings(
        max_new_tokens=task.max_new_tokens,
        stop_at_json=cfg.stop_at_json,
        dtype=cfg.dtype,
        constrained=cfg.constrained,
    )


def serving_tags(
    task: TaskConfig, base: dict[str, Any], generation: GenerationSettings
) -> dict[str, str]:
    """The version tags that repeat the essentials of its serving files."""
    return {
        "temper.task": task.name,
        "temper.task_prompt_hash": task.prompt_hash,
        "temper.serving": f"serving/{MANIFEST}",
        "temper.serving.base": json.dumps(base, sort_keys=True),
        "temper.serving.generation": json.dumps(generation.model_dump(), sort_keys=True),
    }


def write_serving(
    out: str | Path,
    task: TaskConfig,
    base_dir: str | Path,
    generation: GenerationSettings,
    adapter_sha256: str,
) -> Manifest:
    """Write task.yaml, tokenizer/ and serving.json into `out` (the bundle less its adapter).

    The tokenizer is the base model's (the one evaluation used), saved with its chat template.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(task.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    (out / "task.yaml").write_text(text, encoding="utf-8")
    tokenizer = model_source.load_tokenizer(base_dir)
    if not tokenizer.chat_template:
        raise BundleError(f"{base_dir}: the tokenizer has no chat_template (prompts need one)")
    tokenizer.init_kwargs.pop("local_files_only", None)  # a loading flag, not the tokenizer's
    tokenizer.save_pretrained(out / "tokenizer")
    template = out / "tokenizer" / "chat_template.jinja"
    template.write_text(tokenizer.chat_template, encoding="utf-8")
    manifest = Manifest(
        task_name=task.name,
        prompt_hash=task.prompt_hash,
        chat_template_sha256=sha256_file(template),
        adapter_sha256=adapter_sha256,
        base=models.identity(base_dir),
        generation=generation,
    )
    write_json(out / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def add_route_policy(route_json: str | Path | None, art: Path) -> bool:
    """Register the route stage's fitted policy with the version: `serving/route.json` (so a
    pulled bundle carries the threshold `temper serve` routes it by) and, for people, the
    report and its curve under `temper/`. False when there is none (no route stage ran)."""
    if route_json is None or not Path(route_json).exists():
        return False
    src = Path(route_json)
    shutil.copy(src, art / "serving" / ROUTE_POLICY)
    for name in (src.name, "route.md", "route_curve.png"):
        if (src.parent / name).exists():
            (art / "temper").mkdir(parents=True, exist_ok=True)
            shutil.copy(src.parent / name, art / "temper" / name)
    return True


def route_threshold(folder: str | Path) -> float | None:
    """The self threshold registered with a pulled version (None: it has no route policy)."""
    path = Path(folder) / ROUTE_POLICY
    return float(read_json(path)["threshold"]) if path.exists() else None


def write_pyfunc(out: str | Path, serving: str | Path) -> None:
    """Make `out` (a logged model's files: the adapter, its card) an MLflow pyfunc model:
    an `MLmodel` whose python_function flavor loads with `PYFUNC_LOADER`, and the serving
    files under `serving/`. `mlflow.pyfunc.load_model("models:/<name>@<alias>")` then answers
    a DataFrame of texts; `mlflow models serve` serves it (docs/serve.md)."""
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    out = Path(out)
    model = Model()
    mlflow.pyfunc.add_to_model(model, loader_module=PYFUNC_LOADER, data=".")
    model.signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]))
    model.save(str(out / "MLmodel"))
    shutil.copytree(serving, out / "serving")


def strip_pyfunc(folder: str | Path) -> None:
    """Remove the pyfunc files from a downloaded adapter folder (they are not the adapter)."""
    for name in PYFUNC_FILES:
        path = Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise BundleError(f"{folder}: no {MANIFEST} (not a bundle written by `temper pull`)")
    try:
        manifest = Manifest.model_validate(read_json(path))
    except ValueError as err:
        raise BundleError(f"{path}: not a serving manifest: {err}") from None
    if manifest.format != FORMAT:
        raise BundleError(f"{path}: format {manifest.format}, this temper reads {FORMAT}")
    return manifest


def folder_hash(folder: Path) -> str:
    """A base folder's identity: from its temper_source.json, or from its files."""
    return model_hash(folder) if (folder / SOURCE_FILE).exists() else models.content_hash(folder)


def check_base(folder: Path, ident: dict[str, Any], where: str) -> Path:
    have, want = folder_hash(folder), ident["hash"]
    if have != want:
        raise BundleError(
            f"{where} {folder} has base model hash {have}, but this bundle was trained on "
            f"{models.describe(ident)} with hash {want}: point --base at that model, leave "
            "--base out to fetch it by its identity, or pull with --with-base to carry it"
        )
    return folder


def find_base(bundle: Path, manifest: Manifest, base_dir: str | Path | None = None) -> Path:
    """The base model folder for a bundle, by identity (see the module docstring)."""
    ident = manifest.base
    if base_dir is not None:
        return check_base(Path(base_dir), ident, "--base")
    if manifest.base_weights:
        return check_base(bundle / manifest.base_weights, ident, "the bundle's")
    kind = ident.get("kind")
    if kind == "local":
        raise BundleError(
            f"{bundle}: its base model was a local folder (hash {ident['hash']}, copied from "
            f"{ident.get('provenance', {}).get('path')}): pass that model with --base, or "
            "pull with --with-base"
        )
    if kind == "builtin":
        spec, revision, slug = ident["name"], None, ident["name"]
    elif kind == "hub":
        spec, revision = ident["repo_id"], ident["revision"]
        slug = f"{spec.replace('/', '--')}-{str(revision)[:12]}"
    else:
        raise BundleError(f"{bundle}/{MANIFEST}: unknown base model kind {kind!r}")
    target = models.cache_dir() / "bases" / f"{slug}-{ident['hash']}"
    if not (target / SOURCE_FILE).exists():
        log.info("materialising base model %s into %s", models.describe(ident), target)
        models.materialise(spec, revision, target)
    return check_base(target, ident, "the materialised")


@dataclass
class Bundle:
    """A loaded bundle: the merged model, its tokenizer, the task and how to generate."""

    path: Path
    manifest: Manifest | None
    model: Any
    tokenizer: Any
    task: TaskConfig
    generation: GenerationSettings
    base_dir: Path


def load_tokenizer(folder: str | Path) -> Any:
    tokenizer = model_source.load_tokenizer(folder)
    tokenizer.padding_side = "left"  # as generation.load_model: decoder-only, batched
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def open_bundle(folder: str | Path) -> tuple[Manifest, TaskConfig, Path]:
    """A bundle's manifest, task and adapter folder, checked against the manifest: the
    adapter by its hash, the task by its prompt hash. Nothing is loaded yet."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    adapter = folder / manifest.adapter
    if not (adapter / "adapter_config.json").exists():
        raise BundleError(f"{adapter}: no adapter_config.json (incomplete bundle)")
    got = adapter_hash(adapter)
    if got != manifest.adapter_sha256:
        raise BundleError(
            f"{adapter}: adapter hash {got} differs from the registered "
            f"{manifest.adapter_sha256} (files changed since the pull): pull it again"
        )
    task = load_task(folder / manifest.task)
    if task.prompt_hash != manifest.prompt_hash:
        raise BundleError(f"{folder / manifest.task}: prompt hash differs from {MANIFEST}'s")
    return manifest, task, adapter


def matching_base(candidate: str | Path | None, manifest: Manifest) -> Path | None:
    """`candidate` (e.g. the project's model.dir) when it holds the bundle's base model, else
    None: a local copy that spares materialising the base again."""
    if candidate is None or not (Path(candidate) / "config.json").exists():
        return None
    try:
        return Path(candidate) if folder_hash(Path(candidate)) == manifest.base["hash"] else None
    except (OSError, KeyError, ValueError):
        return None


def load_bundle(
    folder: str | Path,
    base_dir: str | Path | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    device: str = "auto",
) -> Bundle:
    """Load a pulled bundle: adapter checked against its hash, base found by identity;
    `dtype` (default: the bundle's) and `device` as `generation.load_model` takes them."""
    from .evaluation.generation import load_model

    folder = Path(folder)
    manifest, task, adapter = open_bundle(folder)
    base = find_base(folder, manifest, base_dir)
    generation = manifest.generation
    model, _ = load_model(base, adapter, dtype or generation.dtype, threads, device)
    tokenizer = load_tokenizer(folder / manifest.tokenizer)
    return Bundle(folder, manifest, model, tokenizer, task, generation, base)


def copy_base(base_dir: str | Path, out: Path) -> None:
    """The base model into a bundle (`--with-base`): its files, the weights of a referenced
    local folder included (checked first), and a `temper_source.json` with the same file
    hashes (so the same `model_hash`) and no reference to a machine path."""
    base_dir = Path(base_dir)
    source = read_json(base_dir / SOURCE_FILE)
    out.mkdir(parents=True)
    weights = weights_dir(base_dir)
    for name in source["files"]:
        src = base_dir / name if (base_dir / name).is_file() else weights / name
        shutil.copy2(src, out / name)
    source.pop("reference", None)
    source.pop("path", None)
    write_json(out / SOURCE_FILE, source)


def load_adapter(
    adapter: str | Path,
    base_dir: str | Path,
    task: TaskConfig,
    generation: GenerationSettings,
    threads: int | None = None,
    device: str = "auto",
) -> Bundle:
    """A plain adapter folder (no manifest) as a Bundle: task, base and settings given."""
    from .evaluation.generation import load_model

    model, tokenizer = load_model(base_dir, adapter, generation.dtype, threads, device)
    return Bundle(Path(adapter), None, model, tokenizer, task, generation, Path(base_dir))
