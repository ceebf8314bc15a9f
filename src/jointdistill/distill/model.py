"""What the engine trains in the `distill` stage: the student and (where it has a role) the connector, with
the frozen teachers alongside. The connector trains when its outputs are the soft targets (``kd_target:
connector``) or when the trajectory reads its fused map (``full``); otherwise (``static_kd`` and ``adaptive``
with ``kd_target: teachers``) it is left out, and a KD step costs about what an mtl step does.

The teachers are held outside the module tree, so they are in neither ``parameters()`` (the optimiser and
DDP never see them) nor ``state_dict()`` (checkpoints hold only what is trained), yet ``.to()`` moves them.
In eval mode the model is just the student, so the engine's validation measures the student alone.
Where the connector's outputs are not soft targets (``kd_target: teachers``, mode ``full``) its only loss is on
labels, so it runs on the batch's labelled rows alone: under a label budget half of every batch is unlabelled, and
running the connector there was work no loss read (what it saved: docs/method.md, Evidence).
With the teacher-output cache there are no teachers here at all: each training batch brings the teachers'
(augmented) feature maps, and the probe set's maps come precomputed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from jointdistill.distill.connector import Connector
from jointdistill.evaluation.metrics import IGNORE_INDEX
from jointdistill.models import MultiHeadNet, Network

_PROBE_CHUNK = 16


def labelled_rows(label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Which images of a batch (N×H×W labels) carry any label; under a label budget the others are raw frames."""
    return (label != ignore_index).flatten(1).any(1)


@contextmanager
def frozen_batchnorm(module: nn.Module):
    """Batch norm uses its running statistics inside the block: the few unaugmented probe images of a step
    are too small (and too repetitive) a batch for batch statistics, and must not skew the running ones."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in bns:
        m.train(False)
    try:
        yield
    finally:
        for m in bns:
            m.train(True)


def rescale_depth(outputs: dict, scale: torch.Tensor | None) -> dict:
    """Depth read from cached maps, in the augmented sample's geometry.

    A cached map was computed on the un-augmented image and only resampled by the sample's zoom s, so a head
    reading it (local convolutions) predicts the un-zoomed depth d; the augmented labels hold d / s (zooming in by
    s makes the scene s times closer). Dividing by s puts the prediction where the labels are: without it the
    teachers' depth targets were off by the zoom (up to 1.5×) and pulled the student away from the truth. Live
    teachers see the zoomed image itself and need no correction (``scale`` None)."""
    if scale is None or "depth" not in outputs:
        return outputs
    return {**outputs, "depth": outputs["depth"] / scale.to(outputs["depth"].dtype).view(-1, 1, 1, 1)}


class DistillModel(Network):
    steps: torch.Tensor  # a buffer: training forwards so far

    def __init__(
        self,
        student: MultiHeadNet,
        connector: Connector | None = None,
        teachers: list[MultiHeadNet] | None = None,
        probes: torch.Tensor | None = None,
        traj_every: int = 1,
        traj_batch: int = 4,
        probe_teacher_features: torch.Tensor | None = None,
        target_teachers: list[MultiHeadNet] | None = None,
        connector_on_labelled: bool = False,
        ignore_index: int = IGNORE_INDEX,
        self_train: bool = False,
        probe_targets: dict[str, torch.Tensor] | None = None,
    ):
        """``self_train``: the soft targets are a frozen copy of the student, refreshed every timeframe
        (`refresh_self_teacher`; none before the first). ``probe_targets``: the teachers' predictions on the probe
        images (seg logits, depth), for measuring forgetting."""
        super().__init__()
        if connector is not None and not teachers and probe_teacher_features is None:
            raise ValueError("the connector needs the teachers, or their cached features for the probe set")
        # The probe set's teacher feature maps when they come from the cache (then no teacher is held).
        self._probe_teacher = probe_teacher_features
        self.student = student
        self.connector = connector
        self._teachers = tuple(teachers or ())
        for t in self._teachers:
            t.eval().requires_grad_(False)
        self._probes = probes
        # The teachers whose own heads give the KD targets (``distill.kd_target: teachers``): with the cache only
        # their heads run, on the cached features. Frozen, outside the module tree like the teachers.
        self._target_teachers = tuple(target_teachers or ())
        for t in self._target_teachers:
            t.eval().requires_grad_(False)
        self.traj_every, self.traj_batch = traj_every, traj_batch
        # The connector sees only the rows with a label (forward's ``label``): see the module's docstring.
        self.connector_on_labelled, self.ignore_index = connector_on_labelled, ignore_index
        # Set by the student task once the trajectory buffer holds a timeframe (full mode only).
        self.trajectory_on = False
        # Training forwards so far: picks each step's probe slice, so a resumed run uses the same slices.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.teacher_images = 0  # images the teachers have seen in this process (mtl: stays 0)
        self.self_train = self_train
        self._self_teacher: MultiHeadNet | None = None  # outside the module tree: never trained, never saved with it
        self.probe_targets = probe_targets

    @property
    def teachers(self) -> tuple[MultiHeadNet, ...]:
        return self._teachers

    @property
    def probes(self) -> torch.Tensor | None:
        return self._probes

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for t in {id(t): t for t in (*self._teachers, *self._target_teachers)}.values():
            t._apply(fn, *args, **kwargs)
        if self._probes is not None:
            self._probes = fn(self._probes)
        if self._probe_teacher is not None:
            self._probe_teacher = fn(self._probe_teacher)
        if self._self_teacher is not None:
            self._self_teacher._apply(fn, *args, **kwargs)
        if self.probe_targets is not None:
            self.probe_targets = {k: fn(v) for k, v in self.probe_targets.items()}
        return self

    def refresh_self_teacher(self, state: dict | None = None) -> None:
        """self_train: the targets from now on are the student as it is now (or as ``state`` holds it)."""
        import copy

        if self._self_teacher is None:
            self._self_teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self._self_teacher.load_state_dict(state if state is not None else self.student.state_dict())

    def self_teacher_state(self) -> dict | None:
        return None if self._self_teacher is None else self._self_teacher.state_dict()

    def compile_targets(self) -> list[nn.Module]:
        """What `training.devices.compile_networks` compiles: every network's encoder and heads, and the connector."""
        nets = (self.student, *self._teachers)
        return [m for net in nets for m in net.compile_targets()] + (
            [self.connector] if self.connector is not None else []
        )

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The student and the connector have their gradients clipped separately (`training.engine.clip_gradients`)."""
        groups = [list(self.student.parameters())]
        if self.connector is not None:
            groups.append(list(self.connector.parameters()))
        return groups

    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            feats = [t.encode(x) for t in self._teachers]
        self.teacher_images += x.shape[0]
        return feats

    def probe_slice(self, step: int) -> torch.Tensor:
        """The probe images used at ``step``: ``traj_batch`` of them, cycling through the probe set."""
        assert self._probes is not None, "no probe images: the trajectory is off"
        p = self._probes.shape[0]
        start = (step // self.traj_every) * self.traj_batch
        return torch.arange(start, start + min(self.traj_batch, p)) % p

    def forward(
        self,
        x: torch.Tensor,
        teacher_features: torch.Tensor | None = None,
        feature_scale: torch.Tensor | None = None,
        target_seg: torch.Tensor | None = None,
        target_depth: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
    ) -> dict:
        """``teacher_features``: the batch's cached teacher maps (concatenated along channels), if cached;
        ``feature_scale``: the zoom each sample's maps were warped by (see `rescale_depth`); ``target_seg`` /
        ``target_depth``: the teachers' cached predictions, augmented like the labels (kd_target: teachers);
        ``label``: the batch's labels, which pick the connector's rows when ``connector_on_labelled`` (its outputs
        then carry ``rows``, the indices of the batch rows they are for)."""
        if not self.training:
            return self.student(x)
        out = {"student": self.student(x)}
        feats = None
        if self.connector is not None:
            feats = self._features(x, teacher_features)
            out["connector"] = self._connector(feats, x.shape[-2:], feature_scale, label)
        if target_seg is not None and target_depth is not None:
            out["targets"] = {"seg": target_seg, "depth": target_depth}
        elif self._target_teachers:  # without a connector (static_kd, adaptive) the teachers run for these alone
            feats = feats if feats is not None else self._features(x, teacher_features)
            out["targets"] = rescale_depth(self.teacher_targets(feats, x.shape[-2:]), feature_scale)
        elif self._self_teacher is not None:
            with torch.no_grad():
                out["targets"] = self._self_teacher(x)
        step = int(self.steps)
        if self.trajectory_on and step % self.traj_every == 0:
            idx = self.probe_slice(step)
            # Inside the (DDP) forward, so its gradient is reduced with the rest of the step's.
            assert self._probes is not None
            with frozen_batchnorm(self.student):
                probe_feats = self.student.encode(self._probes[idx.to(self._probes.device)])
            out["probe"] = {"features": probe_feats, "index": idx}
        self.steps += 1
        return out

    def _connector(
        self, feats: list[torch.Tensor], size, scale: torch.Tensor | None, label: torch.Tensor | None
    ) -> dict:
        rows = None
        if self.connector_on_labelled and label is not None:
            labelled = labelled_rows(label, self.ignore_index)
            if labelled.any() and not labelled.all():  # (no labelled row at all: its loss is 0 either way)
                rows = labelled.nonzero().squeeze(1)
                feats = [f[rows] for f in feats]
                scale = scale[rows] if scale is not None else None
        assert self.connector is not None
        out = rescale_depth(self.connector(feats, size), scale)
        return out if rows is None else {**out, "rows": rows}

    def _features(self, x: torch.Tensor, cached: torch.Tensor | None) -> list[torch.Tensor]:
        """The teachers' feature maps of the batch: its cached ones, or the held teachers run on it."""
        if cached is not None:
            return [cached.to(x.dtype)]
        if not self._teachers:
            raise ValueError("no teachers here: a batch must bring its cached teacher_features")
        return self.teacher_features(x)

    @torch.no_grad()
    def teacher_targets(self, feats: list[torch.Tensor], size) -> dict[str, torch.Tensor]:
        """Each teacher's own prediction for its task, from its features (one map each, or the cache's
        concatenation, split by the teachers' channel counts)."""
        if len(feats) == 1 and len(self._target_teachers) > 1:
            feats = list(feats[0].split([t.feature_channels for t in self._target_teachers], dim=1))
        out = {}
        for teacher, f in zip(self._target_teachers, feats, strict=True):
            out.update(teacher.predict(f, size))
        return out

    @torch.no_grad()
    def probe_predictions(self) -> dict[str, torch.Tensor]:
        """The student's predictions on the whole probe set, in eval mode."""
        was = self.training
        self.eval()
        try:
            assert self._probes is not None, "no probe images"
            parts = [self.student(chunk) for chunk in self._probes.split(_PROBE_CHUNK)]
        finally:
            self.train(was)
        return {k: torch.cat([p[k].float() for p in parts]) for k in parts[0]}

    @torch.no_grad()
    def probe_features(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(g^F of the connector or None, f^S of the student) on the whole probe set, in eval mode."""
        was = self.training
        self.eval()
        fused, student = [], []
        try:
            assert self._probes is not None, "no probe images: the trajectory is off"
            for i, chunk in enumerate(self._probes.split(_PROBE_CHUNK)):
                if self.connector is not None:
                    feats = (
                        [self._probe_teacher[i * _PROBE_CHUNK : (i + 1) * _PROBE_CHUNK]]
                        if self._probe_teacher is not None
                        else self.teacher_features(chunk)
                    )
                    fused.append(self.connector.fused(feats).float())
                student.append(self.student.encode(chunk).float())
        finally:
            self.train(was)
        return (torch.cat(fused) if fused else None), torch.cat(student)
