"""Writing the versioned model artifact: the towers as SavedModels and as NumPy arrays, the
item embeddings and ids, and the manifest with every file's checksum. Its layout and its
reader are contracts.model_manifest's.

The directory is written under a temporary name and renamed into place, so a reader never
sees half an artifact.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from contracts.feature_spec import Feature
from contracts.model_manifest import MANIFEST, MODEL_FORMAT, SIMILARITY, checksums, new_version


def export_model(trained, store: str | Path, training_summary: dict[str, Any]) -> Path:
    """Write ``trained`` (training.train.TrainedModel) as a new version under ``store``."""
    from training.tf_env import tf

    spec = trained.dataset.spec
    version = new_version("m")
    store = Path(store)
    tmp = store / f".tmp-{version}"
    tmp.mkdir(parents=True)
    try:
        item_emb = trained.item_embeddings()
        _save_tower(tf, trained.user_tower, spec.user_input_features, "user_emb", tmp / "user_tower")
        _save_tower(tf, trained.item_tower, spec.tower("item"), "item_emb", tmp / "item_tower")
        np.save(tmp / "item_embeddings.npy", item_emb, allow_pickle=False)
        item_ids = trained.dataset.items[spec.columns.item_id].astype(str)
        np.save(tmp / "item_ids.npy", item_ids, allow_pickle=False)
        write_numpy_user_tower(trained, tmp)
        manifest = {
            "format": MODEL_FORMAT,
            "model_version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "embedding_dim": int(item_emb.shape[1]),
            "similarity": SIMILARITY,
            # unit vectors: normalised towers without a linear part appended
            "normalized": bool(trained.config.tower.normalize) and trained.linear is None,
            "num_items": int(item_emb.shape[0]),
            "feature_spec": spec.to_dict(),
            "training": training_summary,
            "files": checksums(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        final = store / version
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_tower(tf, tower, features: tuple[Feature, ...], output: str, path: Path) -> None:
    signature = {f.name: _tensor_spec(tf, f) for f in features}
    signature.update({f.input_names[1]: tf.TensorSpec([None, f.max_length], tf.int32,
                                                      name=f.input_names[1])
                      for f in features if f.kind == "sequence"})  # its age buckets

    @tf.function(input_signature=[signature])
    def serve(inputs):
        return {output: tower(inputs, training=False)}

    tf.saved_model.save(tower, str(path), signatures={"serving_default": serve})


def _tensor_spec(tf, f: Feature):
    if f.kind == "numeric":
        return tf.TensorSpec([None], tf.float32, name=f.name)
    shape = [None, f.max_length] if f.is_sequence else [None]
    return tf.TensorSpec(shape, tf.string, name=f.name)


def write_numpy_user_tower(trained, directory: Path) -> None:
    """user_tower_numpy.{npz,json} into ``directory``: the user tower as plain arrays and a
    layer graph (training.numpy_export), served by retrieval.numpy_tower without TensorFlow.
    Call it before the manifest's checksums are taken, so the files are listed there."""
    from training.numpy_export import export_numpy_user_tower

    spec, linear = trained.dataset.spec, None
    if trained.linear is not None:  # the served user tower's table, as its SavedModel has it
        from training.linear_towers import USER_PART, linear_history_feature

        linear = {"feature": linear_history_feature(spec),
                  "table": trained.user_tower.get_layer(USER_PART).table.numpy()}
    export_numpy_user_tower(trained.model.user_tower, spec, trained.stats, directory, linear)
