"""The student's objective for the engine: its loss in each mode, its metrics, and what happens at the end of
every timeframe (feedback → teacher weights ω; the connector's and the student's trajectories). Which terms exist
is the plan's decision (`distill.plan`); this module only follows it.

Loss of one step, with ω the current teacher weights and L_depth the configured depth loss (default L1 of log
depth, so that depth does not drown segmentation on the shared encoder):

    L   = λ_seg·CE(S_seg, y) + λ_depth·L_depth(S_depth, d)                              (every mode)
        + λ_KD·Σ_i ω_i·D_i(S_i, p_i)   (p_i: the plan's soft targets, the teachers' or the connector's)  (KD)
        + s_traj·L_traj                                                 (the trajectory, once the buffer fills)
    L_C = Σ_i L_task,i(C_i, y_i)                                        (the connector, on labels, where it trains)

ω weights what the student takes from each teacher, never the connector's own label loss. s_traj is λ_traj, or,
with ``traj_share``, a scale calibrated every ``grad_log_every`` steps so that the trajectory term's gradient
on the student's encoder is that share of the other terms' (a deliberate, logged fraction).

Every ``grad_log_every`` steps each term's gradient norm on the student's encoder is measured (one extra
backward per term through the encoder) and kept in ``grad_norms``: the balance between the tasks is visible.

The engine minimises L + L_C in one backward: the two touch disjoint parameters (the connector's outputs are
detached where the student uses them) and their gradients are clipped separately (`DistillModel.clip_groups`),
so this is the same as training them side by side. Clipped jointly, the connector's larger gradients would shrink
the student's step (how much was measured: docs/method.md, "Evidence").
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jointdistill.config import DistillParams
from jointdistill.distill.losses import kd_depth, kd_seg
from jointdistill.distill.model import DistillModel, labelled_rows
from jointdistill.distill.plan import DistillPlan
from jointdistill.distill.trajectory import (
    Points,
    TrajectoryBuffer,
    attention_map,
    point_overlap,
    resize_attention,
    top_k_points,
    trajectory_distance,
    trajectory_loss,
)
from jointdistill.distill.weights import TeacherWeights, task_score
from jointdistill.evaluation.metrics import ConfusionMatrix, DepthMeter, depth_loss, seg_loss
from jointdistill.models.nets import TASKS
from jointdistill.training.objectives import Objective

TRAJECTORY_COLUMNS = ("timeframe", "step", "image", "rank", "y", "x", "value", "source")
WEIGHTS_COLUMNS = ("timeframe", "step", "task", "score", "feedback", "noise", "z", "omega")
_COLUMN_TYPES = {
    "timeframe": np.int32,
    "step": np.int64,
    "image": np.int32,
    "rank": np.int16,
    "y": np.int16,
    "x": np.int16,
    "value": np.float32,
    "source": object,
}


def kd_pixels(
    label: torch.Tensor, depth: torch.Tensor, ignore_index: int, soft_depth: torch.Tensor, max_depth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The label and depth maps that say where the KD terms apply. On a frame with the task's label: its labelled
    pixels. On a frame without it (a raw frame, a frame the budget left without that task's label) the soft
    targets are the only supervision: seg KD on every pixel, depth KD where the teacher's depth can be checked,
    inside its valid range (0, max_depth), so not the sky or what lies beyond the sensor's range."""
    no_label = ~labelled_rows(label, ignore_index)
    if no_label.any():
        label = torch.where(no_label[:, None, None], torch.zeros_like(label), label)
    no_depth = (depth <= 0).flatten(1).all(1)
    if no_depth.any():
        soft = soft_depth.detach().to(depth.dtype)
        in_range = torch.where((soft > 0) & (soft < max_depth), torch.ones_like(depth), torch.zeros_like(depth))
        depth = torch.where(no_depth[:, None, None, None], in_range, depth)
    return label, depth


def mt_score(metrics: dict) -> float:
    """The number that picks the student's best epoch, the same in every mode: mean of mIoU and δ<1.25
    (both higher-is-better in [0, 1]; no teacher needed, so mtl is selected by the same rule)."""
    return 0.5 * (metrics["miou"] + metrics["delta1"])


class StudentObjective(Objective):
    monitor, higher_is_better = "mt_score", True

    def __init__(
        self,
        model: DistillModel,
        cfg: DistillParams,
        num_classes: int,
        ignore_index: int,
        teacher_scores: dict[str, float] | None,
        probe_ids: list[int],
        connector_eval: Callable[[], dict] | None = None,
        plan: DistillPlan | None = None,
        max_depth: float = 100.0,
    ):
        """``plan``: how this student is distilled (default: the plan of ``cfg`` alone); ``max_depth``: the end of
        the valid depth range (depth KD on frames without depth stays inside it)."""
        self.model, self.cfg = model, cfg
        self.plan = plan = plan if plan is not None else DistillPlan.from_params(cfg)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.weights = None
        if plan.teachers:
            if teacher_scores is None:
                raise ValueError(f"mode {plan.mode} needs the teachers' val scores")
            self.weights = TeacherWeights(
                TASKS,
                teacher_scores,
                cfg.alpha,
                cfg.beta,
                adaptive=plan.adaptive,
                w_min=cfg.weight_min,
                w_max=cfg.weight_max,
                direction=cfg.feedback,
                kind=cfg.feedback_kind,
                window=cfg.feedback_window,
                band=cfg.noise_band,
            )
        self.max_depth = max_depth
        self.forgetting: list[dict] = []  # the student's KD loss on the probes, per teacher, every timeframe
        self.buffer = TrajectoryBuffer(cfg.trajectory_length)
        self.probe_ids = list(probe_ids)
        self.grid: tuple[int, int] | None = None
        self.trajectories: list[tuple[str, Points]] = []  # every timeframe's points, both sources
        self.timeframes: list[dict] = []  # per-timeframe trajectory statistics
        self.logging_seconds = 0.0
        self.connector_eval = connector_eval
        self.connector_history: list[dict] = []  # the connector's val metrics, every timeframe
        self.grad_norms: list[dict] = []  # per-term gradient norms on the student's encoder
        self._last_step: int | None = None
        self.traj_scale: float | None = None if cfg.traj_share else cfg.lambda_traj
        self.model_inputs = plan.model_inputs()
        self.keep_last = not cfg.hold_out_val

    # ------------------------------------------------------------------ training
    def omega(self) -> dict[str, float]:
        return self.weights.weights if self.weights is not None else dict.fromkeys(TASKS, 1.0)

    def loss(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, s = self.cfg, outputs["student"]
        label, depth = batch["label"], batch["depth"]
        ce = seg_loss(s["seg"].float(), label, self.ignore_index)
        dl = depth_loss(s["depth"].float(), depth, cfg.depth_loss)
        terms = {"seg": cfg.lambda_seg * ce, "depth": cfg.lambda_depth * dl}
        parts = {"seg_ce": ce.detach(), f"depth_{cfg.depth_loss}": dl.detach()}
        connector_loss = None
        if "connector" in outputs:
            c = outputs["connector"]
            rows = c.get("rows")  # the labelled rows alone (DistillModel.connector_on_labelled)
            c_label, c_depth = (label, depth) if rows is None else (label[rows], depth[rows])
            c_ce = seg_loss(c["seg"].float(), c_label, self.ignore_index)
            c_dl = depth_loss(c["depth"].float(), c_depth, cfg.depth_loss)
            connector_loss = c_ce + c_dl
            parts.update(connector_seg_ce=c_ce.detach(), connector_depth=c_dl.detach())
        soft = outputs.get("targets", outputs.get("connector"))  # the teachers' own (kd_target), or the connector's
        if self.plan.kd_source is not None and soft is not None:
            w = self.omega()
            kd_label, kd_gt = kd_pixels(label, depth, self.ignore_index, soft["depth"], self.max_depth)
            d_seg = kd_seg(s["seg"], soft["seg"], kd_label, cfg.temperature, self.ignore_index)
            d_depth = kd_depth(
                s["depth"], soft["depth"], kd_gt if cfg.kd_depth_pixels == "valid" else None, cfg.depth_loss
            )
            terms["kd_seg"] = cfg.lambda_kd * w["seg"] * d_seg
            terms["kd_depth"] = cfg.lambda_kd * w["depth"] * d_depth
            parts.update(kd_seg=d_seg.detach(), kd_depth=d_depth.detach())
        traj = None
        if "probe" in outputs:
            assert self.grid is not None  # set by the first timeframe, before any probe forward
            att = resize_attention(attention_map(outputs["probe"]["features"]), self.grid)
            traj = trajectory_loss(att, self.buffer, outputs["probe"]["index"])
            parts["traj"] = traj.detach()
        step = int(self.model.steps) - 1  # the forward that made ``outputs``
        every = cfg.grad_log_every
        if self.model.training and ((every and step % every == 0) or (traj is not None and self.traj_scale is None)):
            self.measure_gradients(step, terms, traj)
        if traj is not None:
            terms["traj"] = (self.traj_scale or 0.0) * traj
        total = cast(torch.Tensor, sum(terms.values()))
        if connector_loss is not None:
            total = total + connector_loss
        return total, parts

    def measure_gradients(self, step: int, terms: dict[str, torch.Tensor], traj: torch.Tensor | None) -> None:
        """Each term's gradient norm on the student's encoder (and the trajectory scale, if calibrated).

        Skipped under DDP: a second backward through the wrapped module would upset its gradient reducer."""
        if dist.is_available() and dist.is_initialized():
            return
        params = [p for p in self.model.student.backbone.parameters() if p.requires_grad]
        named = dict(terms)
        if traj is not None:
            named["traj_raw"] = traj
        grads = {}
        for name, term in named.items():
            if not term.requires_grad:
                continue
            g = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat(
                [
                    (x if x is not None else torch.zeros_like(p)).flatten().float()
                    for x, p in zip(g, params, strict=True)
                ]
            )
        if not grads:
            return

        def norm(*names) -> float:
            vs = [grads[n] for n in names if n in grads]
            return float(torch.stack(vs).sum(0).norm()) if vs else 0.0

        rest = [n for n in grads if n != "traj_raw"]
        row = {"step": step, **{f"norm/{n}": norm(n) for n in rest}}
        row["norm/total"] = norm(*rest)
        row["ratio/depth_seg"] = norm("depth") / max(norm("seg"), 1e-12)
        row["ratio/depth_seg_with_kd"] = norm("depth", "kd_depth") / max(norm("seg", "kd_seg"), 1e-12)
        if traj is not None and self.cfg.traj_share:
            raw = norm("traj_raw")
            if raw > 0 and math.isfinite(raw):
                self.traj_scale = self.cfg.traj_share * row["norm/total"] / raw
            row["traj_scale"] = self.traj_scale or 0.0
        if traj is not None:
            row["norm/traj"] = norm("traj_raw") * (self.traj_scale or 0.0)
        self.grad_norms.append(row)

    def gradient_summary(self) -> dict:
        """Mean gradient norm per term and each term's share of their sum, over every measurement."""
        if not self.grad_norms:
            return {}
        terms = sorted(
            {k.removeprefix("norm/") for r in self.grad_norms for k in r if k.startswith("norm/") and k != "norm/total"}
        )
        mean = {t: sum(r.get(f"norm/{t}", 0.0) for r in self.grad_norms) / len(self.grad_norms) for t in terms}
        total = sum(mean.values()) or 1.0
        ratios = [r["ratio/depth_seg"] for r in self.grad_norms]
        with_kd = [r["ratio/depth_seg_with_kd"] for r in self.grad_norms]
        return {
            "measurements": len(self.grad_norms),
            "every_steps": self.cfg.grad_log_every,
            "mean_norm": mean,
            "share": {t: v / total for t, v in mean.items()},
            "depth_seg_ratio": sum(ratios) / len(ratios),
            "depth_seg_ratio_with_kd": sum(with_kd) / len(with_kd),
            "traj_scale": self.traj_scale if self.plan.trajectory else None,
        }

    def progress(self, parts: dict) -> dict[str, str]:
        out = {}
        if "kd_seg" in parts:
            out["kd"] = f"{parts['kd_seg'] + parts['kd_depth']:.3f}"
        if "traj" in parts:
            out["traj"] = f"{parts['traj']:.4f}"
        if self.weights is not None:
            w = self.weights.weights
            out["ω"] = f"{w['seg']:.2f}/{w['depth']:.2f}"
        return out

    # ------------------------------------------------------------------ metrics
    def new_meters(self):
        return {"seg": ConfusionMatrix(self.num_classes, self.ignore_index), "depth": DepthMeter()}

    def update(self, meters, outputs, batch):
        meters["seg"].update(outputs["seg"], batch["label"])
        meters["depth"].update(outputs["depth"], batch["depth"])

    def compute(self, meters) -> dict:
        out = {**meters["seg"].compute(), **meters["depth"].compute()}
        out["mt_score"] = mt_score(out)
        return out

    # ------------------------------------------------------------------ timeframes
    def end_timeframe(self, timeframe: int, step: int, val: dict, model: nn.Module) -> dict:
        assert isinstance(model, DistillModel)  # the engine hands back the model it trains
        logs = {}
        if self.weights is not None:
            self.weights.step(timeframe, step, {t: task_score(t, val) for t in TASKS})
            for row in self.weights.history[-len(TASKS) :]:
                for key in ("omega", "feedback", "noise", "z"):
                    if row[key] != "":
                        logs[f"{key}/{row['task']}"] = row[key]
        logs.update(self.record_forgetting(timeframe, step, model))
        if self.plan.self_targets:  # the next timeframe's targets: the student as it is now
            model.refresh_self_teacher()
        if self.connector_eval is not None:
            c = self.connector_eval()
            self.connector_history.append({"timeframe": timeframe, "step": step, **c})
            logs.update({f"connector/{k}": c[k] for k in ("miou", "abs_err", "rel_err") if k in c})
        # The gradient measurements since the last timeframe (dvclive logs one row per timeframe).
        recent = [r for r in self.grad_norms if r["step"] < step and r["step"] >= (self._last_step or 0)]
        if recent:
            for key in sorted({k for r in recent for k in r if k != "step"}):
                vals = [r[key] for r in recent if key in r]
                logs[f"grad/{key}"] = sum(vals) / len(vals)
        self._last_step = step
        logs.update(self.record_trajectories(timeframe, step, model))
        return logs

    def record_trajectories(self, timeframe: int, step: int, model: DistillModel) -> dict:
        """Top-k essential points of the connector's g^F and of the student's f^S on every probe image."""
        t0 = time.perf_counter()
        k = self.cfg.top_k
        fused, student = model.probe_features()
        ref = fused if fused is not None else student
        gh, gw = ref.shape[-2:]
        grid = self.grid = (int(gh), int(gw))
        student_att = resize_attention(attention_map(student), grid)
        stu = top_k_points(student_att, k, timeframe, step)
        self.trajectories.append(("student", _cpu(stu)))
        stats: dict[str, Any] = {"timeframe": timeframe, "step": step}
        if fused is not None:
            con = top_k_points(attention_map(fused), k, timeframe, step)
            self.trajectories.append(("connector", _cpu(con)))
            self.buffer.append(_cpu(con))
            # How far the student's trajectory is from the connector's: rank-wise L1 of the values, L1 of the
            # student's attention at the connector's points (L_traj on this timeframe alone), shared points.
            at_points = student_att.flatten(1).cpu().gather(1, (con.ys * grid[1] + con.xs).cpu())
            stats.update(
                l1_values=trajectory_distance(con, stu),
                l1_at_points=float((at_points - con.values.cpu()).abs().mean()),
                overlap=point_overlap(con, stu),
            )
        self.timeframes.append(stats)
        model.trajectory_on = self.plan.trajectory and len(self.buffer) > 0
        self.logging_seconds += time.perf_counter() - t0
        return {f"traj/{k}": v for k, v in stats.items() if k not in ("timeframe", "step")}

    def record_forgetting(self, timeframe: int, step: int, model: DistillModel) -> dict:
        """The student's KD loss on the probe images against each teacher's targets (forgetting: does it rise for a
        teacher whose weight ω falls, and does the trajectory hold it down?). KD modes with teachers only."""
        if model.probe_targets is None:
            return {}
        with torch.no_grad():
            s = model.probe_predictions()
            t = model.probe_targets
            label, depth = kd_pixels(
                torch.full(s["seg"].shape[:1] + s["seg"].shape[2:], self.ignore_index, dtype=torch.long),
                torch.zeros_like(s["depth"]),
                self.ignore_index,
                t["depth"],
                self.max_depth,
            )
            row = {
                "timeframe": timeframe,
                "step": step,
                "seg": float(kd_seg(s["seg"], t["seg"], label, self.cfg.temperature, self.ignore_index)),
                "depth": float(kd_depth(s["depth"], t["depth"], depth, self.cfg.depth_loss)),
            }
        self.forgetting.append(row)
        return {"probe_kd/seg": row["seg"], "probe_kd/depth": row["depth"]}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {
            "weights": self.weights.state_dict() if self.weights is not None else None,
            "buffer": self.buffer.state_dict(),
            "grid": list(self.grid) if self.grid else None,
            "trajectories": [(src, p.__dict__) for src, p in self.trajectories],
            "timeframes": list(self.timeframes),
            "logging_seconds": self.logging_seconds,
            "connector_history": list(self.connector_history),
            "grad_norms": list(self.grad_norms),
            "traj_scale": self.traj_scale,
            "last_step": self._last_step,
            "forgetting": list(self.forgetting),
            "self_teacher": self.model.self_teacher_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.weights is not None and state["weights"] is not None:
            self.weights.load_state_dict(state["weights"])
        self.buffer.load_state_dict(state["buffer"])
        self.grid = tuple(state["grid"]) if state["grid"] else None
        self.trajectories = [(src, Points(**p)) for src, p in state["trajectories"]]
        self.timeframes = list(state["timeframes"])
        self.logging_seconds = float(state["logging_seconds"])
        self.connector_history = list(state.get("connector_history", []))
        self.grad_norms = list(state.get("grad_norms", []))
        self.traj_scale = state.get("traj_scale", self.traj_scale)
        self._last_step = state.get("last_step")
        self.forgetting = list(state.get("forgetting", []))
        if state.get("self_teacher") is not None:
            self.model.refresh_self_teacher(state["self_teacher"])
        self.model.trajectory_on = self.plan.trajectory and len(self.buffer) > 0

    # ------------------------------------------------------------------ the tables this objective records
    def write_weights(self, path: Path) -> int:
        """weights.csv: ω of each task at every timeframe (timeframe 0: the start, ω = 1); no rows in mtl."""
        rows: list[dict] = []
        if self.weights is not None:
            rows = [
                dict.fromkeys(WEIGHTS_COLUMNS, "") | {"timeframe": 0, "step": 0, "task": t, "omega": 1.0} for t in TASKS
            ]
            rows += self.weights.history
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=WEIGHTS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return len(rows)

    def write_trajectory(self, path: Path, train_seconds: float) -> dict:
        """trajectory.parquet: one row per essential point (timeframe, step, image, rank, y, x, value, source);
        ``image`` is the probe image's index in train. Returns what the trajectory cost: its file against
        storing the fused maps of the probe set every timeframe, and the time spent recording it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: dict[str, list] = {c: [] for c in TRAJECTORY_COLUMNS}
        ids = np.asarray(self.probe_ids, dtype=np.int32)
        for source, pts in self.trajectories:
            p, k = pts.ys.shape
            cols["timeframe"].append(np.full(p * k, pts.timeframe, np.int32))
            cols["step"].append(np.full(p * k, pts.step, np.int64))
            cols["image"].append(np.repeat(ids, k))
            cols["rank"].append(np.tile(np.arange(k, dtype=np.int16), p))
            cols["y"].append(pts.ys.reshape(-1).numpy().astype(np.int16))
            cols["x"].append(pts.xs.reshape(-1).numpy().astype(np.int16))
            cols["value"].append(pts.values.reshape(-1).numpy().astype(np.float32))
            cols["source"].append(np.full(p * k, source, dtype=object))
        arrays = {c: (np.concatenate(v) if v else np.zeros(0, _COLUMN_TYPES[c])) for c, v in cols.items()}
        arrays["source"] = pa.array(arrays["source"].tolist(), type=pa.dictionary(pa.int8(), pa.string()))
        pq.write_table(pa.table(arrays), path, compression="zstd")

        model = self.model
        channels = model.connector.out_channels if model.connector is not None else model.student.feature_channels
        gh, gw = self.grid or (0, 0)
        full = len(self.probe_ids) * channels * gh * gw * 4 * len(self.timeframes)  # float32 maps, every timeframe
        size = path.stat().st_size
        return {
            "timeframes": len(self.timeframes),
            "probe_images": len(self.probe_ids),
            "top_k": self.cfg.top_k,
            "grid": list(self.grid) if self.grid else None,
            "rows": len(arrays["timeframe"]),
            "bytes": size,
            "full_maps_bytes": full,
            "storage_ratio": size / full if full else None,
            "logging_seconds": round(self.logging_seconds, 4),
            "logging_share": self.logging_seconds / train_seconds if train_seconds > 0 else None,
            "per_timeframe": self.timeframes,
        }


def _cpu(p: Points) -> Points:
    return Points(p.timeframe, p.step, p.ys.cpu(), p.xs.cpu(), p.values.cpu().float())
