"""The open_clip annotator for real: a tiny open_clip model with random weights saved to a local
checkpoint, real image files (one corrupt), resume after an interruption, offline failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from coreg.annotate import run_annotate
from coreg.annotate.openclip import class_texts
from coreg.annotate.shards import AnnotateInterrupted
from coreg.annotate.templates import IMAGENET_TEMPLATES_27, resolve_templates
from coreg.cli import main
from coreg.config import OpenClipModelConfig, RunConfig
from coreg.contracts import read_annotations, read_classes, read_samples, read_skipped
from coreg.errors import CoregError

TINY = "coreg-test-tiny"
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ["bird", "cat", "dog"]  # folder classes come sorted
PER_CLASS = 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A registered tiny model config, its random weights as a .safetensors file, and an image folder."""
    root = tmp_path_factory.mktemp("openclip")
    (root / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / f"{TINY}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(root / "tiny.safetensors"))
    images = root / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (images / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 255, (40 + c * 8, 48, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class colour, so the classes differ
            suffix = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(images / name / f"{i:03d}.{suffix}")
    (images / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("L", (30, 30), 128).save(images / "bird" / "grey.png")  # a grey image must work too
    return {"root": root, "checkpoint": root / "tiny.safetensors", "images": images}


def _config(assets: dict[str, Path], **annotate: object) -> RunConfig:
    settings = {
        "method": "open_clip",
        "models": [{"name": TINY, "pretrained": str(assets["checkpoint"])}],
        "batch_size": 5,
        "shard_size": 8,
        "num_workers": 0,
        "device": "cpu",
    }
    settings.update(annotate)
    return RunConfig.model_validate(
        {"output_dir": str(assets["root"] / "runs"), "data": {"source": "folder", "path": str(assets["images"])},
         "annotate": settings}
    )


@pytest.fixture(scope="module")
def annotated(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "annotate"
    run_annotate(_config(assets, num_workers=1), out, progress=False)
    return out


def test_stage_writes_contract_files_and_lists_corrupt_image(annotated: Path) -> None:
    names = read_classes(annotated)
    assert names == CLASSES
    samples = read_samples(annotated)
    ann = read_annotations(annotated, len(names))
    skipped = read_skipped(annotated)
    assert skipped["sample_id"].tolist() == ["dog/corrupt.png"]
    assert "cannot read image" in skipped["reason"].iloc[0]
    readable = set(samples["sample_id"]) - {"dog/corrupt.png"}
    assert set(ann["sample_id"]) == readable
    assert ann["annotator"].nunique() == 27
    assert ann.groupby("sample_id").size().eq(27).all()
    probs = np.stack(ann["probs"].to_numpy())
    assert probs.shape[1] == 3 and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(axis=1), ann["label"].to_numpy())
    assert np.allclose(probs[np.arange(len(ann)), ann["label"]], ann["probability"])
    summary = json.loads((annotated / "annotation_summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["n_samples"] == len(readable)
    assert summary["open_clip"]["models"][0]["logit_scale"] == 100.0
    assert summary["first_annotator"] == f"{TINY}-tiny/t00"
    assert not (annotated.parent / ".annotate.work").exists()  # the work folder is gone after publishing


def test_probabilities_are_softmax_of_100_cosines(assets: dict[str, Path], annotated: Path) -> None:
    """Recompute p_t0(x) = softmax(100 * cos(img, text_t0)) for one image directly with open_clip."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(assets["checkpoint"]))
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY)
    sid = "cat/001.png"
    with torch.no_grad():
        img = F.normalize(model.encode_image(preprocess(Image.open(assets["images"] / sid)).unsqueeze(0)), dim=-1)
        text = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}" for c in CLASSES])), dim=-1)
        expected = torch.softmax(100 * img @ text.T, dim=-1)[0].numpy()
    ann = read_annotations(annotated, 3)
    row = ann[(ann["sample_id"] == sid) & (ann["annotator"] == f"{TINY}-tiny/t00")]
    assert np.allclose(row["probs"].iloc[0], expected, atol=1e-4)


def test_resume_after_interruption_matches_uninterrupted_run(
    assets: dict[str, Path], annotated: Path, tmp_path: Path
) -> None:
    out = tmp_path / "annotate"
    config = _config(assets)
    with pytest.raises(AnnotateInterrupted):
        run_annotate(config, out, progress=False, stop_after_shards=2)
    assert not out.exists()  # nothing published
    work = tmp_path / ".annotate.work"
    assert len(list(work.glob("*/shard-*.parquet"))) == 2
    run_annotate(config, out, progress=False)
    resumed = pd.read_parquet(out / "annotations.parquet")
    full = pd.read_parquet(annotated / "annotations.parquet")
    pd.testing.assert_frame_equal(resumed, full)
    assert read_skipped(out).equals(read_skipped(annotated))
    summary = json.loads((out / "annotation_summary.json").read_text())
    assert summary["open_clip"]["models"][0]["shards_reused"] == 2
    assert not work.exists()


def test_pretrained_tag_without_hub_is_one_clear_error(assets: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(assets, models=[{"name": "RN50", "pretrained": "openai"}])
    with pytest.raises(CoregError) as info:
        run_annotate(config, tmp_path / "annotate", progress=False)
    message = str(info.value)
    assert message.startswith("annotate.models[0].pretrained: cannot get the 'openai' weights of RN50")
    assert "HF_HUB_OFFLINE" in message and "local checkpoint" in message and "\n" not in message
    assert not (tmp_path / "annotate").exists()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"name": TINY, "pretrained": "/nowhere/w.safetensors"}, "w.safetensors: checkpoint file not found"),
        ({"name": "NoSuchNet", "pretrained": None}, "annotate.models[0].name: 'NoSuchNet' is not an open_clip model"),
        ({"name": TINY, "templates": ["no placeholder"]}, "annotate.models[0].templates[0]"),
        ({"name": TINY, "synonyms": {"cow": ["cattle"]}}, "annotate.models[0].synonyms: 'cow' is not a class name"),
    ],
)
def test_model_config_errors_name_the_field(assets: dict[str, Path], tmp_path: Path, model: dict,
                                            expected: str) -> None:
    with pytest.raises(CoregError, match=expected.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        run_annotate(_config(assets, models=[model]), tmp_path / "annotate", progress=False)


def test_template_sets_come_from_open_clip() -> None:
    assert resolve_templates("imagenet27") == list(IMAGENET_TEMPLATES_27)
    assert len(resolve_templates("imagenet27")) == 27
    eighty = resolve_templates("imagenet80")
    assert len(eighty) == 80 and eighty[0] == open_clip.OPENAI_IMAGENET_TEMPLATES[0]("{}")
    assert len(resolve_templates("simple7")) == len(open_clip.SIMPLE_IMAGENET_TEMPLATES)


def test_synonyms_and_class_prompts_replace_class_names() -> None:
    cfg = OpenClipModelConfig(
        name=TINY, templates=["a photo of a {}", "art of a {}"],
        synonyms={"cat": ["cat", "kitten"]}, class_prompts={"bird": ["a bird in the sky", "a drawing of a bird"]},
    )
    templates, prompts = class_texts(cfg, CLASSES, "m")
    assert templates == ["a photo of a {}", "art of a {}"]
    assert prompts[0][1] == ["a photo of a cat", "a photo of a kitten"]
    assert prompts[1][2] == ["art of a dog"]
    assert prompts[0][0] == ["a bird in the sky"] and prompts[1][0] == ["a drawing of a bird"]


def test_two_models_custom_templates_and_model_logit_scale(assets: dict[str, Path], tmp_path: Path) -> None:
    models = [
        {"name": TINY, "pretrained": str(assets["checkpoint"]), "templates": ["a photo of a {}", "a {}"]},
        {"name": TINY, "pretrained": None, "templates": "simple7", "annotator_prefix": "rnd", "logit_scale": None},
    ]
    out = run_annotate(_config(assets, models=models, limit=10), tmp_path / "annotate", progress=False)
    ann = read_annotations(out, 3)
    assert sorted(ann["annotator"].unique())[:3] == [f"{TINY}-tiny/t00", f"{TINY}-tiny/t01", "rnd/t00"]
    assert ann["annotator"].nunique() == 2 + 7
    assert len(read_samples(out)) == 10  # limit: the first 10 samples
    summary = json.loads((out / "annotation_summary.json").read_text())
    assert summary["open_clip"]["models"][1]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)


def test_cli_preview_and_limit(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _config(assets, models=[{"name": TINY, "pretrained": str(assets["checkpoint"]),
                                      "templates": ["a photo of a {}"]}])
    config.output_dir = str(tmp_path / "runs")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["annotate", "--config", str(path), "--preview", "--limit", "6", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "candidate set" in printed and "bird/000.jpg" in printed
    preview = tmp_path / "runs" / "annotate-preview"
    assert len(read_samples(preview)) == 6
    assert not (tmp_path / "runs" / "annotate").exists()  # a preview never replaces a full run
