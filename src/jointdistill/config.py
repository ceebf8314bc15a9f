"""Typed parameters: ``params.yaml`` is the one knob file; every stage, DVC and KFP read it through here.

Every section forbids unknown keys, so a typo fails loudly instead of silently using a default:

    >>> load_params("params.yaml", ["prepare.num_samples=64"]).prepare.num_samples
    64
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from jointdistill.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SensorParams(_Section):
    """Synthetic source only: degrade the train split's targets as a real sensor and annotator would (val and test
    stay exact). A real dataset's targets already come from its sensor and annotators: there it does nothing.
    See jointdistill.data.sensor."""

    enabled: bool = Field(False, description="sensor-like depth and labels on the train split")
    depth_noise: float = Field(
        0.05, ge=0.0, le=1.0, description="relative std of the depth noise at 50 m (grows linearly with distance)"
    )
    depth_holes: float = Field(0.1, ge=0.0, lt=1.0, description="share of valid depth pixels lost in blobs")
    edge_holes: int = Field(2, ge=0, le=16, description="pixels around depth discontinuities with no depth")
    label_jitter: int = Field(2, ge=0, le=16, description="largest shift of a label boundary, in pixels")


class BudgetParams(_Section):
    """The synthetic benchmark's label budget: the share of frames (train and val together: val is paid from the
    labels) that carry each task's label, drawn by the seed. The draws nest: every frame with the smaller share's
    label also has the larger's, as a camera with a depth sensor labels every frame it records and an annotator
    labels a few of them. A frame with no label of any task joins the unlabelled split."""

    seg: float = Field(1.0, ge=0.0, le=1.0, description="share of frames with a semantic label")
    depth: float = Field(1.0, ge=0.0, le=1.0, description="share of frames with (sensor) depth")

    def share(self, task: str) -> float:
        return float(getattr(self, task))

    @model_validator(mode="after")
    def _some_labels(self) -> BudgetParams:
        if self.seg == 0 and self.depth == 0:
            raise ValueError("a budget of no labels at all leaves nothing to train the teachers on")
        return self


class PrepareParams(_Section):
    """The ``prepare`` stage: which source, at which resolution, and how it is split."""

    dataset: Literal["synthetic", "nyuv2", "cityscapes", "folder"] = Field(
        "synthetic", description="source of the samples; 'synthetic' is generated offline"
    )
    root: str | None = Field(None, description="folder of a real source (unused by 'synthetic')")
    num_samples: int = Field(1200, ge=1, description="number of synthetic frames (train + test)")
    height: int = Field(128, ge=16, le=4096, description="output height in pixels")
    width: int = Field(256, ge=16, le=4096, description="output width in pixels")
    val_fraction: float = Field(
        0.15, gt=0.0, lt=1.0, description="share of the labelled train frames held out as val (val is paid from labels)"
    )
    test_fraction: float = Field(
        0.15, gt=0.0, lt=1.0, description="share of synthetic frames in its own test split (real sources have theirs)"
    )
    world_seed: int = Field(
        0,
        ge=0,
        description="synthetic only: the seed of the generated world (its frames and its own test split); "
        "the top-level seed draws val, the labelled frames and the sensor noise, so seeds share one test split",
    )
    budget: BudgetParams = Field(
        default_factory=lambda: BudgetParams(),
        description="synthetic only: the label budget, a labelled share of frames per task (real sources keep "
        "every label they have)",
    )
    max_depth: float = Field(100.0, gt=0.0, description="depth beyond this (metres) is invalid (0)")
    invalid_depth: Literal["mask", "error"] = Field(
        "mask", description="NaN/inf/negative depth pixels: mask them (set 0, count in meta.json) or fail"
    )
    cityscapes_classes: Literal[7, 19] = Field(
        7, description="cityscapes only: the 7 categories or the 19 training classes of the official label table"
    )
    nyuv2_class_map: str | None = Field(
        None,
        description="nyuv2 official .mat only: class-mapping file from the 894 labels to 13, 40 or K classes "
        "(classMapping13.mat / classMapping40.mat, or YAML/JSON {classes, map})",
    )
    nyuv2_splits: str | None = Field(
        None, description="nyuv2 official .mat only: splits.mat (default: splits.mat beside the labelled .mat)"
    )
    normalization: Literal["imagenet", "dataset"] = Field(
        "imagenet", description="mean/std recorded in meta.json: ImageNet's, or measured on train"
    )
    gallery_images: int = Field(6, ge=0, le=64, description="rows in gallery.png (0: none)")
    sensor: SensorParams = Field(default_factory=SensorParams, description="synthetic only: sensor-like train targets")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "labelled_fraction" in data:
            raise ValueError(
                "prepare.labelled_fraction is gone: the label budget is now per task, "
                "prepare.budget.seg and prepare.budget.depth (synthetic only; real sources keep every label)"
            )
        return data

    @model_validator(mode="after")
    def _check_source(self) -> PrepareParams:
        # prepare.root of a real dataset is checked when prepare runs (data.base.make_source): in a Kubeflow run
        # pinned to a DVC version, the pipeline's source step supplies it.
        if self.val_fraction + (self.test_fraction if self.dataset == "synthetic" else 0) >= 1:
            raise ValueError("val_fraction + test_fraction must leave some training samples")
        return self


class AugmentParams(_Section):
    """Joint augmentation of image, labels and depth in the training loader."""

    scale_min: float = Field(0.75, gt=0.0, description="smallest random scale factor")
    scale_max: float = Field(1.5, gt=0.0, description="largest random scale factor")
    hflip: bool = Field(True, description="random horizontal flip with probability 0.5")
    crop_height: int | None = Field(None, ge=8, description="crop height (default: prepared height)")
    crop_width: int | None = Field(None, ge=8, description="crop width (default: prepared width)")

    @model_validator(mode="after")
    def _check_range(self) -> AugmentParams:
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must not exceed scale_max")
        return self


class ModelParams(_Section):
    """Architecture of one network. Paper: resnet101 + aspp (teachers), resnet50 + aspp (student)."""

    backbone: Literal["tiny", "resnet18", "resnet34", "resnet50", "resnet101"] = Field(
        "tiny", description="encoder (output stride 8); 'tiny' is the CPU preset"
    )
    head: Literal["light", "aspp"] = Field("light", description="'aspp' = torchvision's DeepLabV3 head")
    head_channels: int = Field(64, ge=8, description="hidden channels of the light head")
    widths: tuple[int, int, int, int] = Field(
        (24, 48, 96, 128), description="channels of the tiny encoder's four stages (tiny only)"
    )
    pretrained_backbone: str | None = Field(
        None, description="local torchvision-format state dict for the encoder (never downloaded)"
    )


def _yaml_switch(value):
    """YAML 1.1 reads a bare on/off as true/false: take those as the words the user meant."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]


class OptimParams(_Section):
    """One training run: optimisation, precision, checkpoints (shared by the teachers and the student)."""

    epochs: int = Field(8, ge=1, description="passes over train; val is evaluated after each")
    batch_size: int = Field(8, ge=1, description="images per step (per process under torchrun)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd (momentum, nesterov)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["poly", "cosine", "constant"] = Field("poly", description="per-step decay to 0")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (null: no clipping)")
    amp: Annotated[Literal["auto", "off", "fp16", "bf16"], BeforeValidator(lambda v: "off" if v is False else v)] = (
        Field("auto", description="auto: bf16 on CUDA, off on CPU")
    )
    channels_last: Switch = Field("auto", description="auto: on for CUDA")
    compile: Switch = Field(
        "auto", description="torch.compile the encoders and heads; auto: on for CUDA (see bench/results/gpu.md)"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (also at each epoch end)")
    num_workers: int = Field(0, ge=0, description="data loader worker processes")
    depth_loss: Literal["l1", "log_l1", "silog"] = Field(
        "l1",
        description="depth loss on valid pixels: L1 in metres, L1 of log depth (scale-aware), or scale-invariant log",
    )


class TrainParams(ModelParams, OptimParams):
    """A teacher's training run: its architecture and its optimisation."""


def _optional_copy(model: type[BaseModel], name: str) -> type[BaseModel]:
    """The same fields, all optional (None = inherit), with the same constraints."""
    fields = {
        n: (cast(Any, f.annotation) | None, FieldInfo.merge_field_infos(f, default=None))
        for n, f in model.model_fields.items()
    }
    return create_model(name, __base__=_Section, **cast(Any, fields))


if TYPE_CHECKING:  # a type checker sees the fields; at run time each one is optional
    TrainOverrides = TrainParams
else:
    TrainOverrides = _optional_copy(TrainParams, "TrainOverrides")


class TeacherParams(TrainParams):
    """The ``train-teacher`` stage. Keys here apply to both teachers; ``seg`` / ``depth`` override them for one
    teacher, so that changing one teacher's setting re-runs only that teacher under ``dvc repro``."""

    seg: TrainOverrides = Field(default_factory=TrainOverrides, description="overrides for the seg teacher")
    depth: TrainOverrides = Field(default_factory=TrainOverrides, description="overrides for the depth teacher")

    def for_task(self, task: str) -> TrainParams:
        base = {k: v for k, v in self.model_dump().items() if k not in ("seg", "depth")}
        over = getattr(self, task).model_dump(exclude_none=True)
        return TrainParams.model_validate({**base, **over})


class StudentParams(ModelParams):
    """The student's architecture (shared encoder + seg head + depth head)."""


class DistillParams(OptimParams):
    """The ``distill`` stage: the method's knobs, then the student's optimisation (as for a teacher)."""

    mode: Literal["mtl", "self_train", "static_kd", "adaptive", "full"] = Field(
        "full",
        description="mtl: task losses only; self_train: + the student's own earlier predictions as targets (no "
        "teachers, a control); static_kd: + KD with ω = 1; adaptive: + feedback ω; full: + knowledge trajectory "
        "(JointDistill)",
    )
    alpha: float = Field(
        1.5,
        ge=0.0,
        description="α of the weight update: how strongly ω follows the feedback "
        "(0: static; paper: best between 1 and 2)",
    )
    beta: float = Field(0.5, gt=0.0, description="β, step size of the weight update")
    feedback: Literal["progress", "deficit"] = Field(
        "progress",
        description="progress: more weight to the teacher whose task the student learns well; "
        "deficit: more weight to the lagging task",
    )
    feedback_kind: Literal["level", "rate", "closed"] = Field(
        "rate",
        description="what the feedback measures per task, on val: level = the student's score over the teacher's; "
        "rate = how fast the log gap to the teacher closes over the last feedback_window timeframes; closed = the "
        "share of the starting gap closed. rate and closed move ω in units of their noise",
    )
    feedback_window: int = Field(
        5, ge=1, description="timeframes the rate is measured over, and (at least 3) the noise is estimated from"
    )
    noise_band: float = Field(
        1.0,
        ge=0.0,
        description="rate/closed: a feedback within this many noise SDs of zero moves no weight (a dead band)",
    )
    weight_min: float = Field(0.1, gt=0.0, description="lower clip of ω (then rescaled so Σω = N)")
    weight_max: float = Field(10.0, gt=0.0, description="upper clip of ω")
    temperature: float = Field(1.0, gt=0.0, description="τ of the segmentation KL distillation")
    lambda_seg: float = Field(1.0, ge=0.0, description="λ of the student's segmentation loss on labels")
    lambda_depth: float = Field(1.0, ge=0.0, description="λ of the student's depth loss on ground truth")
    lambda_kd: float = Field(1.0, ge=0.0, description="λ_KD of the distillation loss Σ ω_i D_i")
    lambda_traj: float = Field(
        1.0,
        ge=0.0,
        description="λ_traj of the knowledge-trajectory loss (full mode; "
        "with traj_share set, the starting value of a scale that is then calibrated)",
    )
    traj_share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="full mode: the trajectory loss's gradient norm on the student's encoder "
        "as a share of the task and KD terms' (recalibrated every grad_log_every steps; 0: λ_traj as it is)",
    )
    top_k: int = Field(10, ge=1, description="essential points per probe image and timeframe")
    trajectory_length: int = Field(5, ge=1, description="L: timeframes kept in the trajectory buffer")
    probe_images: int = Field(
        16, ge=1, description="frames without labels the trajectory is read on (chosen by the seed)"
    )
    traj_every: int = Field(1, ge=1, description="steps between trajectory-loss evaluations (full mode)")
    traj_batch: int = Field(4, ge=1, description="probe images per trajectory-loss step, cycling through the set")
    connector_channels: int = Field(128, ge=8, description="width of the connector's fused map g^F")
    kd_target: Literal["connector", "teachers"] = Field(
        "connector",
        description="soft targets of the KD term: the connector's outputs, or the teachers' own "
        "heads (each teacher's prediction for its task)",
    )
    kd_depth_pixels: Literal["valid", "all"] = Field(
        "valid",
        description="where the depth KD term applies: pixels with valid ground truth, or every pixel (the "
        "teacher's depth also fills the ground truth's holes)",
    )
    unlabelled_batch: int = Field(
        8,
        ge=0,
        description="frames missing a task's label (a label budget, a user's raw footage) that each step adds "
        "to its batch_size fully labelled ones; there the teachers' predictions stand in for the missing labels "
        "(0: not used). mtl reads them only for the labels they have",
    )
    connector_warmup: int = Field(
        300,
        ge=0,
        description="steps that train the connector alone on the frozen teachers' features before the "
        "student starts (KD modes; 0: none)",
    )
    timeframe_steps: int = Field(
        50,
        ge=0,
        description="optimiser steps per timeframe (validation, ω update, trajectory record); 0: one per epoch",
    )
    grad_log_every: int = Field(
        50,
        ge=0,
        description="steps between measurements of each loss term's gradient norm on the student's encoder (0: never)",
    )
    hold_out_val: bool = Field(
        True,
        description="false: the val frames join training and the last weights are kept (no held-out val: what "
        "the 15 % val costs; not with adaptive feedback, which reads val)",
    )
    teacher_cache: bool = Field(
        True,
        description="run the frozen teachers once over train/val and train from their cached float16 "
        "feature maps (warped with each sample's augmentation) instead of running them every step",
    )

    @model_validator(mode="after")
    def _check_weights(self) -> DistillParams:
        if self.weight_min > self.weight_max:
            raise ValueError("weight_min must not exceed weight_max")
        if not self.weight_min <= 1.0 <= self.weight_max:
            raise ValueError("weight_min ≤ 1 ≤ weight_max must hold (ω starts at 1)")
        return self


class EvaluateParams(_Section):
    """The ``evaluate`` stage: which split, and what goes into the report."""

    split: Literal["test", "val"] = Field("test", description="split the models are compared on")
    batch_size: int = Field(16, ge=1, description="images per forward pass")
    qualitative_images: int = Field(4, ge=0, le=32, description="rows of the qualitative grid")
    depth_bins: int = Field(8, ge=1, le=64, description="log-spaced distance bins of the depth-error curve")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")


class ExportParams(_Section):
    """The ``export`` stage: ONNX graph, parity gate against PyTorch, optional optimised variants."""

    opset: int = Field(18, ge=18, le=23, description="ONNX opset of the exported graph")
    dynamic_size: bool = Field(
        True, description="height and width dynamic (multiples of 8), not fixed to the training size"
    )
    batch_size: int = Field(8, ge=1, description="images per onnxruntime call in parity checks and test metrics")
    parity_images: int = Field(32, ge=0, description="val images compared with PyTorch (0: all of val)")
    depth_rel_tol: float = Field(1e-3, gt=0, description="gate: largest allowed depth |onnx - eager| / eager")
    seg_agreement_min: float = Field(
        0.999, ge=0, le=1, description="gate: least share of pixels whose argmax class matches PyTorch's"
    )
    fp16: bool = Field(False, description="also write student.fp16.onnx (float16 weights, float32 I/O; for GPUs)")
    int8: Literal["none", "dynamic", "static"] = Field(
        "none", description="also write student.int8.onnx: dynamic, or static calibrated on val"
    )
    calibration_images: int = Field(32, ge=1, description="val images that calibrate static int8")
    latency_runs: int = Field(10, ge=1, description="timed runs per latency figure in the model card")


ACCELERATOR_LIMITS = (0, 1, 2, 4, 8, 16)  # what the KFP backend accepts for a task's accelerator limit


class StepResources(_Section):
    """What one Kubeflow step asks the cluster for (kfp.local ignores all of it)."""

    cpu: str | None = Field(None, description="CPU request and limit, e.g. '4' or '500m'")
    memory: str | None = Field(None, description="memory request and limit, e.g. '16G'")
    accelerator_type: str | None = Field(None, description="e.g. 'nvidia.com/gpu' (Kubeflow) or 'NVIDIA_L4' (Vertex)")
    accelerator_limit: int = Field(0, description=f"GPUs per task, one of {ACCELERATOR_LIMITS}")
    cache: bool = Field(True, description="let the backend reuse this step's result for identical inputs")

    @field_validator("accelerator_limit")
    @classmethod
    def _limit(cls, v: int) -> int:
        if v not in ACCELERATOR_LIMITS:
            raise ValueError(f"{v} is not an accelerator limit KFP accepts ({', '.join(map(str, ACCELERATOR_LIMITS))})")
        return v

    @model_validator(mode="after")
    def _type_with_limit(self) -> StepResources:
        if self.accelerator_limit and not self.accelerator_type:
            raise ValueError("accelerator_limit > 0 needs accelerator_type")
        return self


class Toleration(_Section):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class TrainJobParams(_Section):
    """Run the KFP training steps (teachers, distill) as a Kubeflow Trainer job: the same image and stage command
    under torchrun on ``num_nodes`` × ``gpus_per_node``, data exchanged through the pipeline root on gs://. The KFP
    step then only launches the job and waits for it."""

    enabled: bool = Field(False, description="launch teacher and distill steps as Kubeflow Trainer TrainJobs")
    runtime: str = Field("torch-distributed", description="the (Cluster)TrainingRuntime that sets up torchrun")
    num_nodes: int = Field(1, ge=1, le=1024, description="nodes (pods) of the job")
    gpus_per_node: int = Field(0, ge=0, le=16, description="GPUs per node; torchrun starts one process per GPU")
    procs_per_node: int = Field(1, ge=1, le=64, description="processes per node when gpus_per_node is 0 (CPU)")
    cpu_per_node: str | None = Field("8", description="CPU per node, e.g. '8'")
    memory_per_node: str | None = Field("32G", description="memory per node, e.g. '32G'")
    namespace: str | None = Field(None, description="namespace of the job [default: the launcher pod's own]")
    timeout: int = Field(24 * 3600, ge=60, description="seconds to wait for the job before failing the step")
    poll_interval: int = Field(30, ge=1, description="seconds between status checks")

    @field_validator("cpu_per_node", "memory_per_node", mode="before")
    @classmethod
    def _quantity(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _poll_below_timeout(self) -> TrainJobParams:
        if self.poll_interval >= self.timeout:
            raise ValueError("poll_interval must be below timeout")
        return self


class PipelineParams(_Section):
    """The Kubeflow pipeline (compile time): resources per step, placement, retries. Not a DVC stage's params,
    and not part of `Params.digest()`: where a step runs does not change what it computes."""

    retries: int = Field(2, ge=0, le=10, description="retries of a failed step (preemption, node loss)")
    retry_backoff: str = Field("60s", description="first wait before a retry; doubles each time")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels for the training steps")
    tolerations: list[Toleration] = Field(default_factory=list, description="taints the training steps tolerate")
    prepare: StepResources = StepResources(cpu="2", memory="4G")
    teacher: StepResources = StepResources(cpu="4", memory="16G")
    distill: StepResources = StepResources(cpu="4", memory="16G", cache=False)
    evaluate: StepResources = StepResources(cpu="2", memory="8G", cache=False)
    export: StepResources = StepResources(cpu="2", memory="8G", cache=False)
    trainjob: TrainJobParams = TrainJobParams()


class Params(_Section):
    seed: int = Field(0, ge=0, description="global seed: data, splits, initialisation, order")
    prepare: PrepareParams = PrepareParams()
    augment: AugmentParams = AugmentParams()
    teacher: TeacherParams = TeacherParams()
    student: StudentParams = StudentParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    pipeline: PipelineParams = PipelineParams()

    def stage_params(self, stage: str | None = None, task: str | None = None) -> dict:
        """The values ``stage`` reads (all but ``pipeline`` when None); the teacher's ``teacher`` section is its
        ``task``'s resolved spec, so the other teacher's overrides do not count."""
        data = self.model_dump(mode="json", exclude={"pipeline"})
        if stage is None:
            return data
        if stage not in STAGE_PARAMS:
            raise ValueError(f"unknown stage {stage!r}")
        keep = {k: data[k] for k in STAGE_PARAMS[stage]}
        if stage == "teacher" and task is not None:
            keep["teacher"] = self.teacher.for_task(task).model_dump(mode="json")
        return keep

    def digest(self, stage: str | None = None, task: str | None = None) -> str:
        """A stable hash of every value that can change a result (defaults included; not ``pipeline``), or of
        those that ``stage`` reads: a stage's outputs record only its own, so that a change elsewhere in
        params.yaml leaves them byte for byte the same (and DVC's hash with them)."""
        text = json.dumps(self.stage_params(stage, task), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# The params sections each stage reads: its DVC params deps (tests/test_dvc.py compares them with dvc.yaml) and
# what its outputs' params digest covers. evaluate reads the sections that made the models it reports on.
STAGE_PARAMS = {
    "prepare": ("seed", "prepare"),
    "teacher": ("seed", "augment", "teacher"),
    "distill": ("seed", "augment", "student", "distill"),
    "evaluate": ("seed", "prepare", "augment", "teacher", "student", "distill", "evaluate"),
    "export": ("seed", "export"),
}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prepare.height=96"`` → (["prepare", "height"], 96); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. prepare.height=96")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty part in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.problem})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _model_at(path: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Params
    for part in path:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _explain(exc: ValidationError, source: str, overrides: list[str] | None = None) -> ConfigError:
    """One error naming every bad key, each blamed on where its value came from: the params file, or the
    ``--set`` that gave it (or a key inside the section it checks)."""
    sets = {o.split("=", 1)[0].strip(): o for o in overrides or []}
    groups: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            line = f"{key}: unknown key{hint} (known: {', '.join(known)})"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            line = f"{key}: {msg}{shown}"
        given = [o for k, o in sets.items() if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
        where = f"--set {', --set '.join(given)}" if given else source
        groups.setdefault(where, []).append(line)
    return ConfigError("; ".join(f"{where}: " + "; ".join(lines) for where, lines in groups.items()))


def params_from_dict(data: dict | None, source: str = "params", overrides: list[str] | None = None) -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source, overrides) from None


def read_params_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    return data or {}


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read ``path`` (or only defaults when None), apply ``--set`` overrides, validate."""
    data = read_params_file(path) if path is not None else {}
    if overrides:
        data = apply_overrides(data, overrides)
    return params_from_dict(data, source=str(path) if path is not None else "params", overrides=overrides)
