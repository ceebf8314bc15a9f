import math

import pytest
import torch

from jointdistill.evaluation.metrics import ConfusionMatrix, DepthMeter, class_ids, depth_loss, seg_loss


def test_confusion_matrix_hand_computed():
    # 3 classes, ignore 255. gt / pred pairs:
    gt = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pr = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pr, gt)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = cm.compute()
    # IoU0 = 1/(2+2-1)=1/3, IoU1 = 2/(2+3-2)=2/3, IoU2 = 0/(1+0-0)=0
    assert m["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert m["miou"] == pytest.approx(1 / 3)
    assert m["pixacc"] == pytest.approx(3 / 5)


def test_absent_classes_do_not_count_and_logits_work():
    cm = ConfusionMatrix(4)
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 1, 0, 0] = 5  # predicts class 1 at pixel 0
    logits[0, 0, 0, 1] = 5  # class 0 at pixel 1
    cm.update(logits, torch.tensor([[[1, 0]]]))
    m = cm.compute()
    assert m["miou"] == 1.0 and m["per_class_iou"][2] is None and m["per_class_iou"][3] is None


def test_class_ids_equal_argmax_and_break_ties_to_the_first_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 9, 11, generator=g)
    logits[:, 4] = logits[:, 2]  # exact ties between classes 2 and 4
    logits[0, :, 0, 0] = 1.0  # a pixel where every class ties
    ids = class_ids(logits)
    assert torch.equal(ids, logits.argmax(1)) and ids.dtype == torch.int64
    assert ids[0, 0, 0] == 0 and not (ids == 4).any()  # 4 never beats the equal 2 before it


def test_accumulation_is_exact_across_batches():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 5, (6, 8, 8), generator=g)
    gt[gt == 4] = 255
    pr = torch.randint(0, 5, (6, 8, 8), generator=g)
    whole = ConfusionMatrix(5)
    whole.update(pr, gt)
    parts = ConfusionMatrix(5)
    for i in range(6):
        parts.update(pr[i : i + 1], gt[i : i + 1])
    assert torch.equal(whole.mat, parts.mat)


def test_out_of_range_target_raises():
    with pytest.raises(ValueError, match="outside 0..2"):
        ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([3]))


def test_depth_meter_hand_computed():
    gt = torch.tensor([2.0, 4.0, 0.0, 10.0])  # third pixel invalid
    pr = torch.tensor([3.0, 4.0, 7.0, 5.0])
    dm = DepthMeter()
    dm.update(pr, gt)
    m = dm.compute()
    assert m["abs_err"] == pytest.approx((1 + 0 + 5) / 3)
    assert m["rel_err"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    # ratios: 1.5, 1.0, 2.0 -> one below 1.25
    assert m["delta1"] == pytest.approx(1 / 3)


def test_depth_meter_no_valid_pixels_is_nan():
    dm = DepthMeter()
    dm.update(torch.ones(3), torch.zeros(3))
    assert math.isnan(dm.compute()["abs_err"])


def test_losses():
    logits = torch.zeros(1, 3, 1, 2, requires_grad=True)
    target = torch.tensor([[[0, 255]]])
    assert seg_loss(logits, target).item() == pytest.approx(math.log(3))
    assert seg_loss(logits, torch.full((1, 1, 2), 255)).item() == 0.0
    pred = torch.tensor([1.0, 2.0, 3.0])
    gt = torch.tensor([2.0, 0.0, 3.0])
    assert depth_loss(pred, gt).item() == pytest.approx(0.5)
    # scale-invariant: a global scale of the prediction costs nothing with lambda = 1
    assert depth_loss(gt[gt > 0] * 2, gt[gt > 0], "silog", silog_lambda=1.0).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError):
        depth_loss(pred, gt, "l2")
