"""logger=wandb|mlflow|csv|tensorboard and lists of them: each gets the run's scalars, the
expert views go to every logger that takes images (W&B offline, MLflow to a local store),
and a logger that takes none is named in one warning."""

from __future__ import annotations

import json
import warnings

from moelab.run.train import run

from ..conftest import VIT_FAST, compose_config


def test_wandb_mlflow_and_csv_get_the_scalars_and_the_views_where_they_can(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config(tmp_path / "run", *VIT_FAST, "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1",
                         "logger=[wandb,mlflow,csv]", f"logger.mlflow.tracking_uri={store}",
                         f"logger.mlflow.artifact_location={tmp_path / 'artifacts'}",
                         "callbacks.expert_specialisation.every_n_epochs=1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg)
    said = [str(w.message) for w in caught]
    assert any("CSVLogger takes no images" in line for line in said), said
    assert any("MLflow takes no histograms" in line for line in said), said
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "ok"

    # W&B, offline: the run's files hold the load heatmap and the specialisation images.
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    images = {p.name.rsplit("_", 2)[0] for p in (offline / "files" / "media" / "images").rglob("*.png")}
    assert "load_heatmap" in images and "expert_class" in images, images
    # MLflow: the scalars as metrics, the views as image artifacts of the same run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "moelab"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert abs(found.data.metrics["val/acc"] - record["val/acc"]) < 1e-6
    assert "moe/layer1/load_max_over_mean" in found.data.metrics
    artifacts = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    assert any("load_heatmap" in path for path in artifacts), artifacts
    # CSV: the scalars only.
    (metrics_csv,) = (tmp_path / "run" / "csv").rglob("metrics.csv")
    assert "val/acc" in metrics_csv.read_text().splitlines()[0]
