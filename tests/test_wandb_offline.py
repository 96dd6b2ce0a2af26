"""W&B in offline mode into a temp dir: the run's files hold the logged metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eexit.training import train
from tests.conftest import compose_train


def _read_offline_run(run_file: Path) -> dict[str, float]:
    """Read the last logged value of every key from an offline ``run-*.wandb`` file."""
    import json

    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    ds = datastore.DataStore()
    ds.open_for_scan(str(run_file))
    values: dict[str, float] = {}
    while True:
        data = ds.scan_data()
        if data is None:
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        items = []
        if record.HasField("history"):
            items = record.history.item
        elif record.HasField("summary"):
            items = record.summary.update
        for item in items:
            key = item.key or "/".join(item.nested_key)
            try:
                values[key] = json.loads(item.value_json)
            except ValueError:
                continue
    return values


def test_wandb_offline_run_contains_logged_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_train(tmp_path, ["data=synthetic", "model=micro", "debug=fdr", "logger=wandb"])
    metrics, objs = train(cfg)
    import wandb

    wandb.finish()
    run_files = list((tmp_path / "out").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list((tmp_path / "out").rglob("*"))
    logged = _read_offline_run(run_files[0])
    for key in ("val/acc/heavy", "val/acc/tiny", "test/acc/heavy", "train/loss/attn_kl_step"):
        assert key in logged, f"{key} missing from the W&B run; logged: {sorted(logged)[:20]}"
    assert logged["test/acc/heavy"] == pytest.approx(metrics["test/acc/heavy"], abs=1e-6)
    assert os.environ["WANDB_MODE"] == "offline"
