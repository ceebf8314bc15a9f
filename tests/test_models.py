import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.segmentation import deeplabv3_resnet101

from jointdistill.errors import ModelError
from jointdistill.models import build_student, build_teacher, load_model, save_model


@pytest.mark.parametrize("backbone,head", [("tiny", "light"), ("resnet18", "light"), ("resnet50", "aspp")])
def test_teacher_outputs_and_feature_stride(backbone, head):
    m = build_teacher("seg", backbone, head, num_classes=7).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 96))
    assert set(out) == {"features", "seg"}
    assert out["seg"].shape == (2, 7, 64, 96)
    assert out["features"].shape == (2, m.feature_channels, 8, 12)  # stride 8
    assert m.feature_stride == 8


def test_depth_teacher_is_positive_and_starts_near_ten_metres():
    m = build_teacher("depth", "tiny", "light", num_classes=7).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 32, 48))
    assert set(out) == {"features", "depth"} and out["depth"].shape == (1, 1, 32, 48)
    assert (out["depth"] > 0).all()
    torch.testing.assert_close(out["depth"], torch.full_like(out["depth"], 10.0))


def test_student_has_shared_encoder_and_two_heads():
    s = build_student("tiny", "light", num_classes=5)
    out = s(torch.randn(2, 3, 32, 64))
    assert set(out) == {"features", "seg", "depth"}
    assert out["seg"].shape == (2, 5, 32, 64) and out["depth"].shape == (2, 1, 32, 64)
    (out["seg"].mean() + out["depth"].mean()).backward()
    assert s.backbone.stem[0].weight.grad is not None  # both heads reach the shared encoder


def test_paper_teacher_is_torchvision_deeplabv3_resnet101():
    ours = build_teacher("seg", "resnet101", "aspp", num_classes=7)
    tv = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=7, aux_loss=False).eval()
    mapped = {
        ("heads.seg." + k[len("classifier.") :]) if k.startswith("classifier.") else k: v
        for k, v in tv.state_dict().items()
    }
    ours.load_state_dict(mapped)  # strict: same modules, same shapes
    ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["seg"], tv(x)["out"])


def test_pretrained_backbone_from_local_file(tmp_path):
    ref = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    m = build_teacher("seg", "resnet18", "light", 7, pretrained_backbone=str(path))
    torch.testing.assert_close(m.backbone.conv1.weight, ref.conv1.weight)
    torch.testing.assert_close(m.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_partial_or_wrong_backbone_weights_list_the_keys(tmp_path):
    state = resnet18(weights=None).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ModelError) as err:
        build_teacher("seg", "resnet18", "light", 7, pretrained_backbone=str(tmp_path / "partial.pth"))
    msg = str(err.value)
    assert "missing: layer4.1.bn1.bias" in msg and "unexpected: extra.weight" in msg
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ModelError, match="wrong shape: conv1.weight"):
        build_teacher("seg", "resnet18", "light", 7, pretrained_backbone=str(tmp_path / "shape.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="unreadable"):
        build_teacher("seg", "resnet18", "light", 7, pretrained_backbone=str(tmp_path / "junk.pth"))
    with pytest.raises(ModelError, match="file not found"):
        build_teacher("seg", "resnet18", "light", 7, pretrained_backbone=str(tmp_path / "nope.pth"))


def test_unknown_backbone_and_task():
    with pytest.raises(ModelError, match="unknown backbone 'vgg'"):
        build_teacher("seg", "vgg", "light", 7)
    with pytest.raises(ValueError, match="unknown task"):
        build_teacher("normals", "tiny", "light", 7)


def test_model_file_roundtrip_and_bad_files(tmp_path):
    m = build_student("tiny", "light", 7)
    save_model(tmp_path / "m.pt", m, classes=["a"] * 7)
    loaded, record = load_model(tmp_path / "m.pt")
    assert record["classes"] == ["a"] * 7
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(ModelError, match="file not found"):
        load_model(tmp_path / "missing.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="unreadable"):
        load_model(tmp_path / "cut.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a jointdistill model file"):
        load_model(tmp_path / "other.pt")
    rec = torch.load(tmp_path / "m.pt", weights_only=True)
    del rec["state_dict"]["heads.seg.3.weight"]
    torch.save(rec, tmp_path / "partial.pt")
    with pytest.raises(ModelError, match="missing: heads.seg.3.weight"):
        load_model(tmp_path / "partial.pt")
