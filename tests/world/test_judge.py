"""The committed judge (condistill/assets/judge) and the recipe that makes it."""
import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

from condistill.world.judge import (
    ATTRIBUTES,
    Judge,
    JudgeConfig,
    JudgeNet,
    evaluate_on_records,
    images_to_tensor,
    load_judge,
    save_judge,
)
from condistill.evaluation.metrics import frechet_distance
from condistill.world.scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SyntheticScenes, attribute_labels

BAR = 0.95


@pytest.fixture(scope="module")
def judge() -> Judge:
    return load_judge()


@pytest.fixture(scope="module")
def heldout():
    scenes = SyntheticScenes("heldout", 64)
    return [scenes[i] for i in range(len(scenes))]


def test_committed_judge_files_are_small_and_documented():
    folder = ROOT / "condistill" / "assets" / "judge"
    weights = folder / "judge.safetensors"
    assert weights.stat().st_size < 5 * 1024 * 1024
    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["train_seconds"] > 0
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["heldout"]["scenes"] == 1000
    for attr in ATTRIBUTES:
        assert metrics["heldout"][attr] >= BAR, (attr, metrics["heldout"][attr])


def test_judge_scores_heldout_batch_above_bar(judge, heldout):
    images = [r.image for r in heldout]
    prompts = [r.caption for r in heldout]
    result = judge.score(images, prompts)
    for key in ("background", "colour", "shape", "both"):
        assert result[key] >= BAR, (key, result)
        assert result[f"n_{key}"] == len(heldout)
    assert result["n_images"] == len(heldout)
    # the same through the exact labels, plus the depth head
    exact = evaluate_on_records(judge, heldout)
    for attr in ATTRIBUTES:
        assert exact[attr] >= BAR
    assert exact["depth_error"] < 0.05


def test_score_detects_wrong_prompts(judge, heldout):
    images = [r.image for r in heldout[:32]]
    # name a background / object colour / shape that is *not* the scene's for every image
    wrong = []
    for r in heldout[:32]:
        lab = attribute_labels(r)
        bg = list(BACKGROUND_COLOURS)[(lab["background"] + 1) % len(BACKGROUND_COLOURS)]
        col = list(OBJECT_COLOURS)[(lab["colour"] + 1) % len(OBJECT_COLOURS)]
        shape = SHAPES[(lab["shape"] + 1) % len(SHAPES)]
        wrong.append(f"a large {col} {shape} on a plain {bg} background")
    result = judge.score(images, wrong)
    for key in ("background", "colour", "shape", "both"):
        assert result[key] <= 0.1, (key, result)


def test_score_skips_fields_the_prompt_does_not_name(judge, heldout):
    recs = heldout[:8]
    prompts = [f"a {r.attributes['objects'][0]['shape']}" for r in recs]
    result = judge.score([r.image for r in recs], prompts)
    assert result["background"] is None and result["n_background"] == 0
    assert result["colour"] is None and result["both"] is None
    assert result["n_shape"] == 8 and result["shape"] >= 0.75
    with pytest.raises(ValueError, match="prompts"):
        judge.score([r.image for r in recs], prompts[:3])


def test_predict_features_depth_shapes_and_inputs(judge, heldout):
    recs = heldout[:5]
    images = [r.image for r in recs]
    preds = judge.predict(images)
    assert set(preds) == set(ATTRIBUTES)
    assert all(len(v) == 5 for v in preds.values())
    assert all(p in BACKGROUND_COLOURS for p in preds["background"])
    assert all(p in SHAPES for p in preds["shape"])
    feats = judge.features(images)
    assert feats.shape == (5, judge.feature_dim) and 128 <= judge.feature_dim <= 256
    depth = judge.depth(images)
    assert depth.shape == (5, 64, 64) and depth.min() >= 0 and depth.max() <= 1
    # a tensor batch gives the same answers as PIL images; batching does not change them
    x = images_to_tensor(images)
    assert torch.allclose(judge.features(x), feats, atol=1e-5)
    small_batches = Judge(judge.net, batch_size=2)
    assert torch.allclose(small_batches.features(x), feats, atol=1e-5)
    assert judge.predict(images[0])["shape"] == preds["shape"][:1]


def test_other_resolutions_are_resized(judge):
    scenes = SyntheticScenes("heldout", 24, resolution=128)
    recs = [scenes[i] for i in range(len(scenes))]
    depth = judge.depth([r.image for r in recs[:3]])
    assert depth.shape == (3, 128, 128)
    result = judge.score([r.image for r in recs], [r.caption for r in recs])
    assert result["background"] >= 0.9 and result["colour"] >= 0.9 and result["shape"] >= 0.8


def test_features_separate_real_from_corrupted_sets(judge):
    a = SyntheticScenes("heldout", 96)
    b = SyntheticScenes("heldout", 96, seed=5)
    real_a = images_to_tensor([a[i].image for i in range(len(a))])
    real_b = images_to_tensor([b[i].image for i in range(len(b))])
    fa, fb = judge.features(real_a), judge.features(real_b)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)
    base = frechet_distance(fa, fb)
    g = torch.Generator().manual_seed(0)
    noisy = judge.features((real_b + 0.15 * torch.randn(real_b.shape, generator=g)).clamp(0, 1))
    assert frechet_distance(fa, noisy) > 1.5 * base


def test_bad_inputs(judge):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge.predict(torch.rand(2, 3, 64, 64) * 2 - 1)
    with pytest.raises(ValueError, match="N, 3, H, W"):
        judge.features(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="floating point"):
        judge.features(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        judge.features([])
    with pytest.raises(TypeError, match="PIL"):
        judge.features(["not an image"])


def test_missing_weights_error_names_the_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/train_judge.py"):
        load_judge(tmp_path / "nowhere")


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = JudgeNet(JudgeConfig(widths=(8, 8, 16, 16), decoder_widths=(8, 8, 8, 8), reduce_channels=4,
                               feature_dim=32)).eval()
    save_judge(net, tmp_path / "j")
    loaded = load_judge(tmp_path / "j")
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
    assert torch.allclose(loaded.features(x), ref["features"], atol=1e-6)
    assert torch.allclose(loaded.depth(x), ref["depth"], atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 16"):
        JudgeConfig(resolution=40)
    with pytest.raises(ValueError, match="labels lacks"):
        JudgeConfig(labels={"background": ["a", "b"]})


def test_recipe_smoke_mode(tmp_path):
    out = tmp_path / "judge"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_judge.py"), "--smoke", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("judge.safetensors", "config.json", "metrics.json"):
        assert (out / name).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["config"]["steps"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(ATTRIBUTES) <= set(metrics["heldout"]) and "depth_error" in metrics["heldout"]
    judge = load_judge(out)
    assert judge.depth(torch.rand(2, 3, 64, 64)).shape == (2, 64, 64)


def test_recipe_rejects_bad_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_judge.py"), "--smoke", "--batch-size", "0",
         "--output-dir", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "batch_size must be a positive integer" in proc.stderr


def _recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_judge_recipe", ROOT / "tools" / "train_judge.py")
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_recipe_is_deterministic_by_seed(tmp_path):
    from safetensors.torch import load_file

    recipe = _recipe_module()
    threads = torch.get_num_threads()
    try:
        tiny = dict(train_scenes=12, heldout_scenes=4, steps=2, batch_size=4, widths=(8, 8, 16, 16),
                    decoder_widths=(8, 8, 8, 8), reduce_channels=4, feature_dim=16)
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            recipe.train(recipe.TrainJudgeConfig.smoke(output_dir=str(tmp_path / name), seed=seed, **tiny))
    finally:
        torch.set_num_threads(threads)
    a, b, c = (load_file(str(tmp_path / n / "judge.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_recipe_config_validation():
    recipe = _recipe_module()
    with pytest.raises(ValueError, match="probability"):
        recipe.TrainJudgeConfig(jpeg_prob=1.5)
    with pytest.raises(ValueError, match="cannot exceed"):
        recipe.TrainJudgeConfig(train_scenes=10, batch_size=64)
    with pytest.raises(ValueError, match="save_dtype"):
        recipe.TrainJudgeConfig(save_dtype="int8")


def _tiny_judge_folder(path):
    torch.manual_seed(0)
    net = JudgeNet(JudgeConfig(widths=(8, 8, 16, 16), decoder_widths=(8, 8, 8, 8), reduce_channels=4,
                               feature_dim=32)).eval()
    save_judge(net, path)
    return net


def test_depth_net_is_used_when_present_and_leaves_features_alone(tmp_path):
    from condistill.world.judge import DepthNet, DepthNetConfig, save_depth_net

    net = _tiny_judge_folder(tmp_path / "j")
    assert load_judge(tmp_path / "j").depth_source == "judge_head"
    depth_net = DepthNet(DepthNetConfig(widths=(4, 8, 8, 8))).eval()
    with torch.no_grad():
        depth_net.out.bias.fill_(3.0)  # a recognisable output: sigmoid(3 + ...) is near 0.95
    save_depth_net(depth_net, tmp_path / "j")
    loaded = load_judge(tmp_path / "j")
    assert loaded.depth_source == "depth_net"
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref, want = net(x), depth_net(x)
    assert torch.allclose(loaded.features(x), ref["features"], atol=1e-6)
    assert torch.allclose(loaded.depth(x), want, atol=1e-6)
    assert not torch.allclose(loaded.depth(x), ref["depth"], atol=1e-2)
    assert loaded.depth(torch.rand(2, 3, 32, 32)).shape == (2, 32, 32)


def test_depth_net_half_present_or_mismatched_is_refused(tmp_path):
    from condistill.world.judge import DEPTH_CONFIG_NAME, DEPTH_WEIGHTS_NAME, DepthNet, DepthNetConfig, save_depth_net

    _tiny_judge_folder(tmp_path / "j")
    save_depth_net(DepthNet(DepthNetConfig(widths=(4, 8, 8, 8))), tmp_path / "j")
    config = json.loads((tmp_path / "j" / DEPTH_CONFIG_NAME).read_text())
    config["architecture"]["widths"] = [4, 8, 8, 16]
    (tmp_path / "j" / DEPTH_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        load_judge(tmp_path / "j")
    (tmp_path / "j" / DEPTH_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="train_depth_judge.py"):
        load_judge(tmp_path / "j")


def test_depth_recipe_smoke_mode(tmp_path):
    out = tmp_path / "judge"
    _tiny_judge_folder(out)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_depth_judge.py"), "--smoke", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "depth_net.json").read_text())
    errors = info["heldout_depth_error"]
    assert errors["scenes"] == 8 and 0 < errors["depth_net"] < 1 and 0 < errors["judge_head"] < 1
    assert load_judge(out).depth_source == "depth_net"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_depth_judge.py"), "--smoke",
                           "--output-dir", str(tmp_path / "empty")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds no judge" in proc.stderr


def test_committed_depth_net_is_small_sharper_than_the_head_and_loaded(judge):
    folder = ROOT / "condistill" / "assets" / "judge"
    assert (folder / "depth_net.safetensors").stat().st_size < 5 * 1024 * 1024
    errors = json.loads((folder / "depth_net.json").read_text())["heldout_depth_error"]
    assert errors["scenes"] == 1000 and errors["depth_net"] < errors["judge_head"] / 2
    assert judge.depth_source == "depth_net"
