"""What the tower-parity tests share: an exported model's two user towers and the check
that they agree (the NumPy tower served online against the SavedModel, to ATOL)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

ATOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Exported:
    trained: object
    model_dir: Path
    saved_model: object
    numpy_tower: object

    @property
    def spec(self):
        return self.trained.dataset.spec


def training_inputs(exported: Exported, n: int = 200) -> dict[str, np.ndarray]:
    """The user-tower inputs of the first ``n`` training examples."""
    from contracts.inputs import training_examples

    examples = training_examples(exported.trained.dataset)
    return {f.name: examples[f.name][:n] for f in exported.spec.user_input_features}


def assert_towers_agree(exported: Exported, inputs: dict[str, np.ndarray]) -> None:
    expected = exported.saved_model(inputs)
    got = exported.numpy_tower(inputs)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
