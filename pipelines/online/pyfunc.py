"""A registered version as an MLflow pyfunc model (the `MLmodel` that registration writes
names this module as its loader: `temper.bundle.write_pyfunc`).

    model = mlflow.pyfunc.load_model("models:/temper-clause-review@champion")
    model.predict(pd.DataFrame({"text": [clause, ...]}))   # one row per clause

The logged model holds the adapter's files at its root and the serving files under
`serving/` (task, tokenizer, base identity, generation settings): the loader checks the
adapter against the recorded hash, finds the base model by identity (or `base_dir` in
`model_config`, or `$TEMPER_BASE_DIR`; its hash must match), and answers each text as `temper predict` and the evaluation do. A loader
module rather than a `PythonModel` subclass: nothing is pickled, so the code that runs is the
installed temper, and `mlflow models serve -m models:/...@champion --env-manager local`
serves it over HTTP (POST /invocations) as a second path beside `temper serve`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import bundle
from ..evaluation.batch_predict import answer_texts


class TemperModel:
    """What `mlflow.pyfunc.load_model` returns inside its PyFuncModel wrapper."""

    def __init__(self, loaded: bundle.Bundle, batch_size: int = 16):
        self.bundle, self.batch_size = loaded, batch_size

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """A DataFrame (column `text`, else the first column) -> a DataFrame with one column
        per answer field, `confidence.<label field>`, `schema_valid` and `output`."""
        import pandas as pd

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        column = "text" if "text" in frame.columns else frame.columns[0]
        texts = [str(t) for t in frame[column].tolist()]
        rows = answer_texts(self.bundle, texts, self.batch_size, progress=False)
        out = []
        for row in rows:
            answer = row["answer"] if isinstance(row["answer"], dict) else {}
            flat = {f.name: answer.get(f.name) for f in self.bundle.task.fields}
            flat.update({f"confidence.{k}": v for k, v in row["confidence"].items()})
            flat.update(schema_valid=row["schema_valid"], output=row["output"])
            out.append(flat)
        return pd.DataFrame(out)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> TemperModel:
    """MLflow's loader hook: `data_path` is the downloaded logged model's folder."""
    root = Path(data_path)
    config = model_config or {}
    base_dir = config.get("base_dir") or os.environ.get("TEMPER_BASE_DIR") or None
    with tempfile.TemporaryDirectory(prefix="temper-pyfunc-") as tmp:
        # The bundle layout `load_bundle` reads: serving files + adapter/ (the model's root
        # without what is not the adapter: its card and the pyfunc files).
        folder = Path(tmp) / "bundle"
        shutil.copytree(root / "serving", folder)
        shutil.copytree(
            root, folder / "adapter", ignore=lambda d, names: _not_adapter(root, d, names)
        )
        loaded = bundle.load_bundle(folder, base_dir, threads=config.get("threads"), device="auto")
    return TemperModel(loaded, int(config.get("batch_size", 16)))


def _not_adapter(root: Path, directory: str, names: list[str]) -> list[str]:
    if Path(directory) != root:
        return []
    return [n for n in names if n in bundle.PYFUNC_FILES]
