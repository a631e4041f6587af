"""The one place TensorFlow is imported.

tensorflow-recommenders 0.7.7 needs Keras 2, which TensorFlow 2.16+ only uses when
TF_USE_LEGACY_KERAS=1 is set before TensorFlow is first imported. Every module that needs
TensorFlow imports it from here, so that the order can never be wrong.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# C++ log lines on a CPU machine are noise (the cuInit probe, oneDNN notes): kept only with
# TWO_TOWER_VERBOSE=1 (`two-tower -v`; app.quiet sets both before this import)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL",
                      "0" if os.environ.get("TWO_TOWER_VERBOSE", "") not in ("", "0") else "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only; skips a failing cuInit probe

import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402
import tf_keras as keras  # noqa: E402

if os.environ["TF_USE_LEGACY_KERAS"] != "1":  # pragma: no cover - a misconfigured process
    raise RuntimeError("TF_USE_LEGACY_KERAS must be 1: tensorflow-recommenders needs Keras 2")

__all__ = ["tf", "tfrs", "keras"]
