"""`temper serve`: the registered champion behind an OpenAI-compatible endpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import ConfigError
from ..params import TemperParams
from .common import PARAMS, ParamsOpt, SetOpt, load


def serve_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default serve.port).")] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Serve this (repeatable; default serve.models): "
            "models:/<name>@<alias>, models:/<name>/<version> or a pulled bundle folder.",
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="builtin: Temper's own engine (CPU, or CUDA when present); vllm: a vLLM "
            "server started from the `vllm:` section (or serve.engine_url). Default: "
            "serve.engine."
        ),
    ] = None,
    print_command: Annotated[
        bool,
        typer.Option(
            "--print-command",
            help="With --engine vllm: check the adapters, print the `vllm serve` line for a "
            "vLLM run by someone else (attach with serve.engine_url), and exit.",
        ),
    ] = False,
) -> None:
    """Serve registered versions with the OpenAI chat-completions API (docs/serve.md).

    Clients switch by changing `base_url` to http://<host>:<port>/v1. Watched aliases are
    hot-swapped when `temper promote` / `rollback` moves them, on either engine. Exit codes:
    0 stopped, 2 bad configuration (e.g. a non-loopback bind without API keys, an adapter
    vLLM cannot serve, no vLLM environment).
    """
    from ..online.serve import auth, serve

    p = load(params, set_)
    cfg = serve_config(p, host, port, model, engine)
    keys = auth.load_keys(cfg.api_keys_file, cfg.api_keys_env)
    if not print_command:
        auth.check_bind(cfg.host, keys)  # before anything is opened or loaded
    if any(m.startswith("models:/") for m in cfg.models):
        from .release import registry_client

        registry_client(p)
    if print_command:
        if cfg.engine != "vllm":
            raise ConfigError("--print-command goes with --engine vllm")
        typer.echo(vllm_command(cfg, p.model.dir))
        return
    serve(
        cfg,
        keys,
        base_hint=p.model.dir,
        route=p.route,
        cache=p.cache,
        monitor=p.monitor,
        mlflow_cfg=p.mlflow,
        vllm_cfg=p.vllm,
    )


def serve_config(
    p: TemperParams,
    host: str | None,
    port: int | None,
    models: list[str] | None,
    engine: str | None,
):
    """`serve:` with the command line's options on top (validated again)."""
    from ..online.serve import ServeConfig

    engine = {"temper": "builtin"}.get(engine or "", engine)  # the old name of builtin
    if engine not in (None, "builtin", "vllm"):
        raise ConfigError(f"--engine {engine!r}: use builtin or vllm")
    options = {"host": host, "port": port, "models": models or None, "engine": engine}
    return ServeConfig.model_validate(
        {**p.serve.model_dump(), **{k: v for k, v in options.items() if v is not None}}
    )


def vllm_command(cfg, base_hint: str) -> str:
    """Pull what `cfg` serves, check it for vLLM, and return the command line."""
    import mlflow

    from .. import bundle
    from ..online.serve import auth
    from ..online.serve.adapters import Loader, Source, resolve_version
    from ..online.serve.vllm import command, render

    sources = [Source.parse(spec) for spec in cfg.models]
    loader = Loader(cfg.cache_dir, cfg.base_dir, None, base_hint)
    client = mlflow.MlflowClient()
    served = [(s, loader.folder(s, resolve_version(client, s))) for s in sources]
    manifest = bundle.read_manifest(served[0][1])
    ident = manifest.base
    base = (
        ident["repo_id"]
        if ident.get("kind") == "hub"
        else str(loader.base_for(served[0][1], manifest).resolve())
    )
    keys = bool(auth.load_keys(cfg.api_keys_file, cfg.api_keys_env))
    return render(command(served, base, cfg.host, cfg.port, keys))
