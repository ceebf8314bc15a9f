"""bench.target_quality: the training targets scored against the exact ground truth."""

import numpy as np
import pytest

from bench.target_quality import measure
from jointdistill.data.prepared import PreparedDataset


def test_target_quality_scores_labels_and_teacher_predictions(prepared, tmp_path):
    train = PreparedDataset(prepared, "train")
    k = len(train.meta["classes"])
    preds = []
    for i in range(len(train)):
        item = train[i]
        label, depth = item["label"].numpy(), item["depth"].numpy()[0]
        logits = np.zeros((k + 1, *label.shape), np.float16)
        logits[np.where(label == train.ignore_index, 0, label), *np.indices(label.shape)] = 5.0
        logits[-1] = np.where(depth > 0, depth * 1.1, 1.0)  # 10 % too far everywhere
        preds.append(logits)
    np.save(tmp_path / "train_targets.npy", np.stack(preds))
    # The data against itself: labels exact; the "teacher" right on seg, 10 % off on depth.
    result = measure(prepared, prepared, tmp_path, every=1)
    assert result["images"] == len(train)
    assert result["seg_pixel_accuracy"] == {"labels": 1.0, "teachers": 1.0}
    assert result["depth_abs_log_error"]["labels"] == 0.0
    assert result["depth_abs_log_error"]["teachers"] == pytest.approx(np.log(1.1), rel=1e-3)
    assert result["label_holes_share_of_valid"] == 0.0
