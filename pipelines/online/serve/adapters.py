"""The served adapters: loaded from the registry over one base model, swapped when aliases move.

Each entry of `serve.models` becomes a `Served`: a registered version pulled as a bundle
(`temper pull`'s folder, so the task, prompts, tokenizer and generation settings are the
version's own) or a pulled folder given directly. The engine makes it servable
(`engines.py`): the built-in engine reads each base from disk once and merges each LoRA adapter
into its own copy, the way evaluation scored it; the vLLM engine loads the adapter at runtime
over one shared base (multi-LoRA).

Hot swap: a watcher thread reads each watched alias every `watch_interval_s`. When it points
at a new version, that version is pulled and opened beside the current one, then the table
entry is replaced in one assignment. Requests already admitted hold the old `Served` and
finish on it; once its in-flight count is zero the engine closes it (frees the merged copy, or
unloads the vLLM adapter). A registry
that cannot be reached leaves the current version serving and says so (log, metric).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import bundle
from ...task import TaskConfig

log = logging.getLogger(__name__)

URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass
class Source:
    """One `serve.models` entry: where its versions come from and the id clients use."""

    spec: str
    id: str
    name: str | None = None  # registered model name (None: a local folder)
    alias: str | None = None  # watched alias
    version: str | None = None  # pinned version

    @classmethod
    def parse(cls, spec: str) -> Source:
        m = URI.match(spec.strip())
        if m and m["alias"]:
            return cls(spec, m["alias"], m["name"], alias=m["alias"])
        if m:
            return cls(spec, f"{m['name']}-v{m['version']}", m["name"], version=m["version"])
        path = Path(spec)
        if not (path / bundle.MANIFEST).exists():
            raise bundle.BundleError(
                f"serve.models: {spec!r} is neither models:/<name>@<alias>, "
                f"models:/<name>/<version> nor a pulled bundle folder (no {bundle.MANIFEST})"
            )
        return cls(spec, path.resolve().name)


def resolve_version(client: Any, source: Source) -> str | None:
    """The version a source names now: its pinned one, or its alias's (None: a folder)."""
    from ...tracking import alias_version, version_str

    if source.name is None:
        return None
    if source.version is not None:
        return source.version
    mv = alias_version(client, source.name, source.alias or "")
    if mv is None:
        raise bundle.BundleError(f"{source.name}@{source.alias} does not exist in the registry")
    return version_str(mv.version)


@dataclass(eq=False)
class Served:
    """A loaded version: the engine's handle of it (the built-in engine's merged model, or
    the vLLM adapter's name), its tokenizer, task and generation settings."""

    source: Source
    version: str | None
    model: Any
    tokenizer: Any
    task: TaskConfig
    generation: bundle.GenerationSettings
    base: dict[str, Any]
    path: Path
    inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    constraints: dict[str, Any] = field(default_factory=dict)
    prefixes: dict[tuple[int, ...], Any] = field(default_factory=dict)  # prompt prefix KV

    @property
    def label(self) -> str:
        return f"{self.source.name}-v{self.version}" if self.version else self.source.id

    @property
    def fingerprint(self) -> str:
        """`system_fingerprint` of its answers: which version answered."""
        return self.label

    def constraint(self, schema: dict[str, Any]) -> Any:
        """The compiled grammar for `schema` (compiled once per schema, ~0.4 s)."""
        import json

        from ...evaluation.constrained import json_logits_processor

        key = json.dumps(schema, sort_keys=True)
        with self.lock:
            if key not in self.constraints:
                self.constraints[key] = json_logits_processor(schema, self.tokenizer)
            return self.constraints[key]

    def enter(self) -> None:
        with self.lock:
            self.inflight += 1

    def leave(self) -> None:
        with self.lock:
            self.inflight -= 1


class Loader:
    """Pulls versions and opens them on the engine (which reads each base model once)."""

    def __init__(
        self,
        cache_dir: str | Path,
        base_dir: str | Path | None,
        engine: Any,
        base_hint: str | Path | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.base_dir = Path(base_dir) if base_dir else None  # must match: an error if not
        self.base_hint = Path(base_hint) if base_hint else None  # used when it matches
        self.engine = engine  # an engines.Engine

    def folder(self, source: Source, version: str | None) -> Path:
        if source.name is None:
            return Path(source.spec)
        out = self.cache_dir / f"{source.name}-v{version}"
        if not (out / bundle.MANIFEST).exists():
            from ...tracking import pull

            pull.pull(f"models:/{source.name}/{version}", out)
        return out

    def base_for(self, path: Path, manifest: bundle.Manifest) -> Path:
        """`base_dir` (checked), else the hint (the project's model.dir) when its hash is the
        bundle's, else the base found by the bundle's identity."""
        if self.base_dir is None:
            hint = bundle.matching_base(self.base_hint, manifest)
            if hint is not None:
                return hint
        return bundle.find_base(path, manifest, self.base_dir)

    def load(self, source: Source, version: str | None) -> Served:
        from .engines import OpenSpec

        path = self.folder(source, version)
        manifest, task, adapter = bundle.open_bundle(path)
        tokenizer = bundle.load_tokenizer(path / manifest.tokenizer)
        label = f"{source.name}-v{version}" if version else source.id
        spec = OpenSpec(label, path, manifest, adapter, lambda: self.base_for(path, manifest))
        model = self.engine.open(spec)
        log.info("loaded %s from %s", f"{source.id} ({source.name} v{version})", path)
        return Served(
            source,
            version,
            model,
            tokenizer,
            task,
            manifest.generation,
            manifest.base,
            path,
        )


class ModelTable:
    """The served id -> `Served` map, kept current with the registry by a watcher thread."""

    def __init__(self, sources: list[Source], loader: Loader, interval_s: float, metrics: Any):
        ids = [s.id for s in sources]
        if len(set(ids)) != len(ids):
            raise bundle.BundleError(f"serve.models: two entries share an id ({ids})")
        self.sources, self.loader, self.interval = sources, loader, interval_s
        self.metrics = metrics
        self.current: dict[str, Served] = {}
        self.retired: list[Served] = []
        self.registry_ok = True
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.client: Any = None

    def resolve_version(self, source: Source) -> str | None:
        if source.name is not None and source.version is None and self.client is None:
            import mlflow

            self.client = mlflow.MlflowClient()
        return resolve_version(self.client, source)

    def load_all(self) -> None:
        """The first load (the server answers 503 until it is done; retried on failure)."""
        for source in self.sources:
            if source.id in self.current:
                continue
            served = self.loader.load(source, self.resolve_version(source))
            self.current[source.id] = served
            self.metrics.adapter_loaded(served, True)

    def get(self, model_id: str) -> Served | None:
        """The entry for a request's `model`: the id, or the spec it was configured with."""
        hit = self.current.get(model_id)
        if hit is None:
            for source in self.sources:
                if model_id in (source.spec, f"{source.name}@{source.alias}"):
                    hit = self.current.get(source.id)
        return hit

    def check(self) -> None:
        """One watch round: swap every alias that moved; free retired versions now idle."""
        try:
            moved = []
            for source in self.sources:
                if source.alias is None:
                    continue
                version = self.resolve_version(source)
                cur = self.current.get(source.id)
                if cur is None or cur.version != version:
                    moved.append((source, version))
            if not self.registry_ok:
                log.warning("registry reachable again")
            self.registry_ok = True
        except Exception as err:  # noqa: BLE001 - any failure to read keeps the current versions
            if self.registry_ok:
                log.warning("registry unreachable, keeping the current versions: %s", err)
            self.registry_ok = False
            moved = []
        self.metrics.registry_up(self.registry_ok)
        for source, version in moved:
            old = self.current.get(source.id)
            try:
                new = self.loader.load(source, version)
            except Exception as err:  # noqa: BLE001 - a bad new version keeps the old one
                log.error("could not load %s v%s, keeping the current: %s", source.id, version, err)
                self.metrics.swap_failed(source.id)
                continue
            self.current[source.id] = new  # the switch: one assignment
            self.metrics.adapter_loaded(new, True)
            log.info("swapped %s: v%s -> v%s", source.id, old.version if old else None, new.version)
            if old is not None:
                self.retired.append(old)
        self.free_idle()

    def free_idle(self) -> None:
        idle = [s for s in self.retired if s.inflight == 0]
        if idle:
            self.retired = [s for s in self.retired if s.inflight > 0]
            for served in idle:
                self.loader.engine.close(served)
                self.metrics.adapter_loaded(served, False)
                log.info("freed %s (no requests left on it)", served.label)
            del idle, served

    def watch(self) -> None:
        def loop() -> None:
            while not self.stop.wait(self.interval):
                self.check()

        if any(s.alias for s in self.sources):
            self.thread = threading.Thread(target=loop, name="temper-watch", daemon=True)
            self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
