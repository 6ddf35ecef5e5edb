"""Run configuration: one pydantic model per stage and one for the whole run.

Defaults are the reference values of the method (``docs/method.md``): a config that sets
nothing reproduces the paper's recipe. The bundled ``coreg/configs/digits.yaml`` shrinks
the budget so the demo finishes in minutes on a laptop CPU.

Every model forbids unknown keys, so a typo in a YAML file is an error that names the key
rather than a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coreg.atomic import write_text
from coreg.errors import CoregError
from coreg.storage import StorageConfig
from coreg.tracking import TrackingConfig

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the images come from and how they are split."""

    source: Literal["digits", "animal_mnist", "folder", "manifest"] = Field(
        "digits",
        description="digits: scikit-learn's 8x8 digits; animal_mnist: the animal-mnist package's 10,000 "
        "28x28 silhouettes; folder: a directory of images; manifest: a CSV or Parquet file.",
    )
    path: str | None = Field(
        None, description="Image folder (source=folder) or manifest file (source=manifest)."
    )
    class_names: list[str] | None = Field(
        None,
        description="Class names in label order. Required for a flat folder and for a manifest without "
        "a label column; otherwise taken from the sub-folder names or the built-in data set.",
    )
    root: str | None = Field(
        None,
        description="Folder every manifest path, and every image file of a folder source, must stay inside "
        "(symlinks followed). Default: $COREG_DATA_ROOT when set, else the manifest's (or image folder's) own "
        "folder. Keeps a manifest or a symlink from reading files it should not.",
    )
    path_column: str = Field("path", description="Manifest column with the image path or URI.")
    id_column: str | None = Field(
        None, description="Manifest column with a stable sample id; default: the path itself."
    )
    label_column: str | None = Field(
        None,
        description="Optional manifest column with ground-truth class names, used only for evaluation.",
    )
    image_size: PositiveInt = Field(32, description="Side length, in pixels, images are resized to.")
    channels: Literal[1, 3] | None = Field(
        None, description="1 (grey) or 3 (RGB); default: 1 for digits/animal_mnist, 3 otherwise."
    )
    test_fraction: Fraction = Field(0.2, description="Share of samples held out as the test split.")
    split_seed: int = Field(0, description="Seed of the stratified-by-nothing train/test split.")
    limit: PositiveInt | None = Field(
        None, description="Keep only the first N samples (by sample id order) for a quick run."
    )

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source in ("folder", "manifest") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self

    def resolved_channels(self) -> int:
        if self.channels is not None:
            return self.channels
        return 1 if self.source in ("digits", "animal_mnist") else 3


class OpenClipModelConfig(_Section):
    """One open_clip model; each of its prompt templates is one annotator.

    Weights come from ``pretrained``: an open_clip tag (downloaded by open_clip from its hub in
    the user's environment) or a local checkpoint file, so air-gapped clusters can use a
    file copied in by hand.
    """

    name: str = Field(
        ...,
        description="open_clip architecture, e.g. 'ViT-B-32' (see open_clip.list_models()); a config added "
        "with open_clip.add_model_config works too.",
    )
    pretrained: str | None = Field(
        None,
        description="An open_clip pretrained tag ('openai', 'laion2b_s34b_b79k'; needs the hub or its cache) or "
        "the path of a local checkpoint (.safetensors, .bin, .pt). None: random weights, for tests only.",
    )
    templates: Literal["imagenet27", "imagenet80", "simple7"] | list[str] = Field(
        "imagenet27",
        description="Prompt templates, one annotator each. imagenet27: the 27 small ImageNet templates (the "
        "method's default); imagenet80: CLIP's 80 ImageNet templates (open_clip's OPENAI_IMAGENET_TEMPLATES); "
        "simple7: open_clip's SIMPLE_IMAGENET_TEMPLATES; or your own list of strings with one '{}' each.",
    )
    synonyms: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Class name -> names put into every template instead of it; the class's text embedding is "
        "the mean of the synonyms' embeddings (e.g. {'one': ['one', 'the digit 1']}).",
    )
    class_prompts: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Class name -> full prompts that replace the templates for that class. One prompt per "
        "template: prompt t is annotator t's text; any other number: their mean embedding serves every "
        "annotator.",
    )
    annotator_prefix: str | None = Field(
        None,
        description="Prefix of this model's annotator names ('<prefix>/t00', ...); default: the model name "
        "plus the pretrained tag or checkpoint file name.",
    )
    logit_scale: Annotated[float, Field(gt=0)] | None = Field(
        100.0,
        description="p_t(x) = softmax(logit_scale * cos(image, text_t)). 100 is the method's value (and CLIP's "
        "trained scale); null uses the model's own exp(logit_scale).",
    )


class ImportConfig(_Section):
    """Answers of another VLM or a labelling service, read from a JSONL or CSV file.

    One row per answer: a sample (id or image path), an annotator name, the answer (free text or
    a class name/index) and an optional score. Free text is mapped to class names (case,
    punctuation, plurals, articles, synonyms); unmatched answers are counted per annotator.
    """

    path: str = Field(..., description="JSONL (.jsonl, .ndjson) or CSV (.csv, .tsv) file of answers.")
    annotator: str | None = Field(
        None, description="Annotator name for every row when the file has no annotator column."
    )
    id_column: str = Field("sample_id", description="Column with the sample id (as in samples.parquet).")
    path_column: str = Field(
        "path", description="Column with the image path, used when a row has no sample id (relative paths are "
        "relative to the answers file, then to the image folder)."
    )
    annotator_column: str = Field("annotator", description="Column with the annotator name.")
    answer_column: str = Field("answer", description="Column with the free-text answer.")
    label_column: str = Field(
        "label", description="Column with a class name or class index; used instead of the answer when set."
    )
    score_column: str = Field("score", description="Optional column with the answer's probability in [0, 1].")
    synonyms: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Class name -> other answers that mean it (e.g. {'seven': ['7', 'number seven']}).",
    )


class AnnotateConfig(_Section):
    """How the noisy annotators label the images."""

    method: Literal["simulate_vlm", "synthetic", "open_clip", "import"] = Field(
        "simulate_vlm",
        description="simulate_vlm: a weak teacher plus M biased 'prompt' annotators (instance-dependent "
        "noise, like the templates of one VLM); synthetic: the NPLL protocol with rates q and eta; "
        "open_clip: real VLM zero-shot answers of annotate.models; import: only the answers of "
        "annotate.imports. Imports are added to every method's answers.",
    )
    num_annotators: PositiveInt = Field(
        27, description="Number of simulated prompt annotators (the reference uses 27 templates)."
    )
    teacher_samples_per_class: PositiveInt = Field(
        5,
        description="Labelled samples per class the weak teacher is fitted on; fewer means a weaker, "
        "noisier teacher. They are drawn from the train split only.",
    )
    teacher_blur: Annotated[float, Field(ge=0.0)] = Field(
        3.0,
        description="Gaussian blur sigma (pixels of the teacher view) of the degraded view the teacher sees. "
        "The defaults give, on digits, a zero-shot accuracy of about 65%, a noise rate of about 12% and "
        "mean |S| of about 2.2 (like CLIP on a hard data set).",
    )
    teacher_image_size: PositiveInt = Field(
        16, description="Side length, in pixels, of the grey, downsampled view the weak teacher sees."
    )
    teacher_logit_scale: Annotated[float, Field(gt=0.0)] = Field(
        4.0,
        description="Mean per-sample std of the teacher's logits after standardising; sets how confident the "
        "teacher is relative to bias_scale and logit_noise, the same way on every data set.",
    )
    bias_scale: Annotated[float, Field(ge=0.0)] = Field(
        0.8, description="Std of each annotator's per-class logit bias (its own confusions)."
    )
    temperature_range: tuple[float, float] = Field(
        (0.5, 2.0), description="Each annotator's softmax temperature is drawn log-uniformly from this range."
    )
    logit_noise: Annotated[float, Field(ge=0.0)] = Field(
        0.7, description="Std of per-sample, per-annotator logit noise."
    )
    q: Probability = Field(0.3, description="Synthetic protocol: each wrong label enters the set with prob q.")
    eta: Probability = Field(
        0.2, description="Synthetic protocol: prob of swapping the true label for a non-candidate one."
    )
    seed: int = Field(0, description="Seed of the annotator simulation.")
    models: list[OpenClipModelConfig] = Field(
        default_factory=lambda: [OpenClipModelConfig(name="ViT-B-32", pretrained="openai")],
        description="open_clip method: the models; every template of every model is one annotator.",
    )
    batch_size: PositiveInt = Field(64, description="open_clip method: images per forward pass.")
    num_workers: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="open_clip method: DataLoader processes that decode images; null: min(8, CPUs - 1), "
        "0 decodes in the main process.",
    )
    device: str = Field("auto", description="open_clip method: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="open_clip method: autocast dtype of the image encoder; auto: fp16 on CUDA, fp32 on CPU. "
        "Probabilities are always computed and stored in float32.",
    )
    shard_size: PositiveInt = Field(
        4096,
        description="open_clip method: samples per shard of the work folder; finished shards survive an "
        "interruption and are skipped when the stage is run again (resume).",
    )
    work_dir: str | None = Field(
        None,
        description="Persistent work folder for shards (resume); default: '.<out folder name>.work' beside the "
        "output folder. Removed after the output folder is published.",
    )
    limit: PositiveInt | None = Field(
        None,
        description="Annotate only the first N samples (by sample id) for a preview; unlike data.limit the "
        "train/test split is that of the whole data set. The CLI's --limit sets it.",
    )
    imports: list[ImportConfig] = Field(
        default_factory=list, description="Files of answers from other VLMs, added as further annotators."
    )
    few_shot_labels: str | None = Field(
        None,
        description="Optional CSV or JSONL file of human labels (sample_id or path, label = class name) for a "
        "few samples; aggregate gives them single-label sets marked few_shot.",
    )

    @model_validator(mode="after")
    def _temperature_order(self) -> AnnotateConfig:
        lo, hi = self.temperature_range
        if not 0 < lo <= hi:
            raise ValueError("annotate.temperature_range must be (low, high) with 0 < low <= high")
        if self.method == "open_clip" and not self.models:
            raise ValueError("annotate.method 'open_clip' needs at least one entry in annotate.models")
        return self


class AggregateConfig(_Section):
    """How per-annotator answers become one candidate label set per image."""

    rule: Literal["union", "topk", "ratio", "min_votes"] = Field(
        "union",
        description="union: every annotator's top-1 (reference default); topk: the k best classes of the "
        "mean probabilities; ratio: top-k classes whose mean probability is >= ratio x the max; "
        "min_votes: classes named by at least min_votes annotators.",
    )
    k: PositiveInt = Field(5, description="k of the topk and ratio rules.")
    ratio: Fraction = Field(0.5, description="Threshold of the ratio rule, relative to the max probability.")
    min_votes: PositiveInt = Field(2, description="Threshold of the min_votes rule.")
    report: bool = Field(
        True,
        description="Write quality_report.md and a self-contained quality_report.html (plots, example images "
        "per class) beside quality.json.",
    )
    report_examples_per_class: Annotated[int, Field(ge=0)] = Field(
        4, description="Example images per class in the report's image grid (0: no grid)."
    )


class TrainConfig(_Section):
    """Co-Reg training. Defaults are the reference recipe (method.md)."""

    method: Literal["coreg", "zero_shot", "ce_majority", "soft_distill", "proden", "dividemix"] = Field(
        "coreg",
        description="coreg: the method (docs/method.md). Baselines (coreg.baselines), same backbone, views, "
        "optimiser, schedule and model selection: zero_shot: the annotators' plurality vote, no network "
        "(writes zero_shot_predictions.parquet, no model.pt); ce_majority: one net, cross-entropy on the "
        "annotators' plurality top-1 (hard distillation); soft_distill: one net, cross-entropy on the mean "
        "annotator probabilities (needs probabilities); proden: one net, PRODEN on the candidate sets; "
        "dividemix: DivideMix-style co-training (two nets, GMM co-divide, MixMatch) on the plurality top-1.",
    )
    backbone: Literal["preact_resnet18", "small_cnn"] = Field(
        "preact_resnet18",
        description="preact_resnet18: the paper's backbone (stride adapts to 32 or 64 px); small_cnn: a "
        "fast network for CPU runs.",
    )
    epochs: PositiveInt = Field(800, description="Total epochs, warm-up included; the cosine spans them all.")
    warmup_epochs: Annotated[int, Field(ge=0)] = Field(50, description="Warm-up epochs (each net alone).")
    batch_size: PositiveInt = Field(256, description="Labelled (and unlabelled) rows per Co-Reg step.")
    warmup_batch_size: PositiveInt = Field(512, description="Batch size during warm-up.")
    eval_batch_size: PositiveInt = Field(1024, description="Batch size of prediction passes.")
    lr: Annotated[float, Field(gt=0)] = Field(0.01, description="SGD learning rate.")
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="SGD momentum.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(5e-4, description="SGD weight decay.")
    lr_min_factor: Probability = Field(1e-3, description="Cosine schedule ends at lr x this factor.")
    confidence_penalty: Annotated[float, Field(ge=0)] = Field(
        1.0, description="Weight of the negative-entropy penalty in warm-up."
    )
    loss_history: PositiveInt = Field(5, description="Epochs the max-candidate loss is averaged over.")
    clean_threshold: Fraction = Field(0.5, description="GMM posterior above which a sample is clean.")
    sharpen_temperature: Annotated[float, Field(gt=0)] = Field(0.5, description="Sharpening temperature.")
    mixup_alpha: Annotated[float, Field(gt=0)] = Field(4.0, description="Beta(a, a) of MixMatch.")
    rampup_epochs: PositiveInt = Field(16, description="Epochs over which r(e) ramps 0 -> 1 after warm-up.")
    lambda_u: Annotated[float, Field(ge=0)] = Field(1.0, description="Final weight of the unlabelled loss.")
    reg_weight: Annotated[float, Field(ge=0)] = Field(0.1, description="Weight of L_proto + L_con.")
    reg_start_offset: Annotated[int, Field(ge=0)] = Field(
        10, description="L_proto and L_con start this many epochs after warm-up."
    )
    proto_momentum: Probability = Field(0.999, description="EMA momentum of the shared prototypes.")
    proto_temperature: Annotated[float, Field(gt=0)] = Field(0.3, description="Prototype softmax temperature.")
    con_temperature: Annotated[float, Field(gt=0)] = Field(0.07, description="Contrastive temperature.")
    key_momentum: Probability = Field(0.999, description="Momentum of the key encoder.")
    queue_size: PositiveInt = Field(8192, description="Keys in each network's contrastive queue.")
    proj_dim: PositiveInt = Field(128, description="Projection (embedding) dimension.")
    proj_hidden: PositiveInt = Field(512, description="Hidden width of the projection head.")
    randaugment_magnitude: Annotated[int, Field(ge=0, le=30)] = Field(
        5, description="Magnitude of the one RandAugment op of the strong view."
    )
    horizontal_flip: bool | None = Field(
        None, description="Flip in the weak view; default: off for digits, on otherwise."
    )
    validation_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.1,
        description="Share of training samples held out (with their candidate sets only) for model "
        "selection: the checkpoint whose predictions fall most often in the held-out candidate sets wins. "
        "Test labels are never looked at. 0 disables selection (the last epoch is kept).",
    )
    selection_start_epoch: PositiveInt | None = Field(
        None,
        description="First epoch (1-based) that model selection may pick. Default: the first epoch at which every "
        "loss of the method is at full weight (warmup_epochs + max(rampup_epochs, reg_start_offset) + 1, capped at "
        "epochs). Earlier epochs score high on the hit rate because they fit the candidate sets, noise included.",
    )
    num_workers: Annotated[int, Field(ge=0)] = Field(0, description="DataLoader worker processes.")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'.")
    seed: int = Field(0, description="Seed of weights, views, mixing and sampling.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError("train.warmup_epochs must not exceed train.epochs")
        if self.selection_start_epoch is not None and self.selection_start_epoch > self.epochs:
            raise ValueError("train.selection_start_epoch must not exceed train.epochs")
        return self

    def first_selectable_epoch(self) -> int:
        """1-based first epoch model selection may choose (see ``selection_start_epoch``)."""
        if self.selection_start_epoch is not None:
            return self.selection_start_epoch
        full_strength = self.warmup_epochs + max(self.rampup_epochs, self.reg_start_offset) + 1
        return min(full_strength, self.epochs)


class EvaluateConfig(_Section):
    """How the trained model is evaluated on the test split."""

    batch_size: PositiveInt = Field(1024, description="Batch size of the test pass.")
    plots: bool = Field(True, description="Write the confusion matrix and training curves as PNG.")


class RunConfig(_Section):
    """A whole run: every stage's settings and where its outputs go."""

    output_dir: str = Field("runs/demo", description="Folder that receives one sub-folder per stage.")
    data: DataConfig = Field(default_factory=DataConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)


BUNDLED_CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = BUNDLED_CONFIG_DIR / "digits.yaml"


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: invalid config field '{loc}': {msg}{more}"


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain dict into a :class:`RunConfig`, with a one-line error on failure."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise CoregError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (default: the bundled digits demo) and apply ``key.sub=value`` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise CoregError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CoregError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise CoregError(f"{path}: config must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return parse_config(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set one ``section.field=value`` (value parsed as YAML) in a raw config dict, in place."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise CoregError(f"override {item!r}: expected key.sub=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CoregError(f"override {item!r}: '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def save_config(config: RunConfig, directory: str | Path) -> Path:
    """Write the resolved config as ``config.yaml`` in ``directory`` (atomically)."""
    target = Path(directory) / "config.yaml"
    write_text(target, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return target
