"""Checkpoints: round trip, config validation, refusal of pickled objects."""

import io
import pickle

import pytest
import torch

from model import ModelConfig, build_from_config, load_checkpoint, load_weights, save_checkpoint
from model.errors import MaskrayError

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}]


def _config(**kwargs):
    return ModelConfig.for_categories(CATEGORIES, backbone="resnet18", min_size=64, max_size=64, **kwargs)


def test_round_trip_gives_same_outputs(tmp_path):
    torch.manual_seed(0)
    config = _config(options={"rpn_post_nms_top_n_test": 50})
    model = build_from_config(config).eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, config, extra={"epoch": 3, "step": 120, "note": "x", "ema": torch.ones(2)})
    loaded, config2, extra = load_checkpoint(path)
    assert config2 == config and config2.category_ids() == [3, 7]
    assert extra["epoch"] == 3 and torch.equal(extra["ema"], torch.ones(2))
    assert not loaded.training
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    with torch.inference_mode():
        a, b = model(images), loaded(images)
    for x, y in zip(a, b):
        for key in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(x[key], y[key])

    # A binary file object and raw bytes work too.
    buffer = io.BytesIO()
    save_checkpoint(buffer, model, config)
    for source in (io.BytesIO(buffer.getvalue()), buffer.getvalue()):
        _, config3, extra3 = load_checkpoint(source)
        assert config3 == config and extra3 == {}


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_object_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    config = _config()
    torch.save({"format": "maskray-checkpoint/1", "config": config.to_dict(), "model": {}, "extra": {"x": Payload()}},
               path)
    with pytest.raises(MaskrayError, match=r"evil\.pt.*weights_only=True"):
        load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out

    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(MaskrayError, match="raw.pt"):
        load_checkpoint(raw)
    assert "unpickled!" not in capsys.readouterr().out


def test_other_files_are_refused_clearly(tmp_path):
    plain = tmp_path / "tv.pt"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    with pytest.raises(MaskrayError, match="neither a maskray checkpoint nor a torchvision detector state dict"):
        load_checkpoint(plain)
    other = tmp_path / "other.pt"
    torch.save({"format": "someone-else/3", "model": {}}, other)
    with pytest.raises(MaskrayError, match="not a maskray-checkpoint/1 file"):
        load_checkpoint(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MaskrayError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(MaskrayError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_not_matching_config_are_refused(tmp_path):
    model = build_from_config(_config())
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, _config())
    data = torch.load(path, weights_only=True)
    data["config"]["backbone"] = "resnet34"
    torch.save(data, path)
    with pytest.raises(MaskrayError, match="do not fit its config"):
        load_checkpoint(path)


def test_save_refuses_non_plain_extra(tmp_path):
    model = build_from_config(_config())
    with pytest.raises(MaskrayError, match=r"extra\['obj'\]"):
        save_checkpoint(tmp_path / "x.pt", model, _config(), extra={"obj": Payload()})


def test_config_validation_and_dict_round_trip():
    config = _config(variant="v2", norm="gn")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig().category_ids()[:3] == [1, 2, 3]
    with pytest.raises(MaskrayError, match="backbone"):
        ModelConfig(backbone="alexnet")
    with pytest.raises(MaskrayError, match="num_classes"):
        ModelConfig(categories=CATEGORIES, num_classes=5)
    with pytest.raises(MaskrayError, match="unknown fields: bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(MaskrayError, match="min_size"):
        ModelConfig(min_size=900, max_size=800)
    with pytest.raises(MaskrayError, match="repeat"):
        ModelConfig(options={"backbone": "resnet18"})


def test_load_weights_copies_what_fits_and_names_the_rest(tmp_path):
    torch.manual_seed(0)
    source = build_from_config(_config())  # 2 categories: 3 classes with background
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, source, _config())
    target = build_from_config(ModelConfig.for_categories(CATEGORIES + [{"id": 9, "name": "star"}],
                                                          backbone="resnet18", min_size=64, max_size=64))
    copied, skipped = load_weights(target, path.read_bytes())
    # the class-dependent predictor layers keep their init, everything else is the teacher's
    assert set(skipped) == {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                            "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
                            "roi_heads.mask_predictor.mask_fcn_logits.weight",
                            "roi_heads.mask_predictor.mask_fcn_logits.bias"}
    assert copied == len(target.state_dict()) - len(skipped)
    assert torch.equal(target.backbone.body.conv1.weight, source.backbone.body.conv1.weight)
    # a plain state dict (torchvision's format) works the same way
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    assert load_weights(target, buffer.getvalue())[0] == copied
    with pytest.raises(MaskrayError, match="none of their 1 tensors fits"):
        load_weights(target, _saved({"unrelated": torch.zeros(2)}))
    with pytest.raises(MaskrayError, match="neither a maskray checkpoint nor a state dict"):
        load_weights(target, _saved({"a": 1}))


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
