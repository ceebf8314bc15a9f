"""The student's task for the engine (DESIGN §6): its loss in each mode, its metrics, and what happens at the
end of every timeframe (feedback → teacher weights ω; the connector's and the student's trajectories).

Loss of one step, with ω the current teacher weights:

    L   = λ_seg·CE(S_seg, y) + λ_depth·L1(S_depth, d)                                  (every mode)
        + λ_KD·Σ_i ω_i·D_i(S_i, C_i)                                                    (static_kd, adaptive, full)
        + λ_traj·L_traj                                                                 (full, once the buffer fills)
    L_C = Σ_i ω_i·L_task,i(C_i, y_i)                                                    (the connector, on labels)

The engine minimises L + L_C in one backward: the two touch disjoint parameters (the connector's outputs are
detached where the student uses them) and their gradients are clipped separately (`DistillModel.clip_groups`),
so this is the same as training them side by side. (Clipped jointly, the connector's larger gradients would shrink
the student's step: on the default run the connector held 40–65 % of the joint norm at every step.)
"""

from __future__ import annotations

import time

import torch

from ..config import DistillParams
from ..metrics import ConfusionMatrix, DepthMeter, depth_loss, seg_loss
from .losses import kd_depth, kd_seg
from .model import DistillModel
from .trajectory import (
    Points,
    TrajectoryBuffer,
    attention_map,
    point_overlap,
    resize_attention,
    top_k_points,
    trajectory_distance,
    trajectory_loss,
)
from .weights import TeacherWeights, task_score

TASKS = ("seg", "depth")


def mt_score(metrics: dict) -> float:
    """The number that picks the student's best epoch, the same in every mode: mean of mIoU and δ<1.25
    (both higher-is-better in [0, 1]; no teacher needed, so mtl is selected by the same rule)."""
    return 0.5 * (metrics["miou"] + metrics["delta1"])


class StudentTask:
    monitor, higher_is_better = "mt_score", True

    def __init__(self, model: DistillModel, cfg: DistillParams, num_classes: int, ignore_index: int,
                 teacher_scores: dict[str, float] | None, probe_ids: list[int]):
        self.model, self.cfg = model, cfg
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.kd = cfg.mode != "mtl"
        self.use_trajectory = cfg.mode == "full"
        self.weights = None
        if self.kd:
            if teacher_scores is None:
                raise ValueError(f"mode {cfg.mode} needs the teachers' val scores")
            self.weights = TeacherWeights(TASKS, teacher_scores, cfg.alpha, cfg.beta, adaptive=cfg.mode != "static_kd",
                                          w_min=cfg.weight_min, w_max=cfg.weight_max)
        self.buffer = TrajectoryBuffer(cfg.trajectory_length)
        self.probe_ids = list(probe_ids)
        self.grid: tuple[int, int] | None = None
        self.trajectories: list[tuple[str, Points]] = []  # every timeframe's points, both sources
        self.timeframes: list[dict] = []  # per-timeframe trajectory statistics
        self.logging_seconds = 0.0
        self.model_inputs = ("teacher_features",) if model.connector is not None and not model.teachers else ()

    # ------------------------------------------------------------------ training
    def omega(self) -> dict[str, float]:
        return self.weights.weights if self.weights is not None else dict.fromkeys(TASKS, 1.0)

    def loss(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, s = self.cfg, outputs["student"]
        label, depth = batch["label"], batch["depth"]
        ce = seg_loss(s["seg"].float(), label, self.ignore_index)
        dl = depth_loss(s["depth"].float(), depth, cfg.depth_loss)
        total = cfg.lambda_seg * ce + cfg.lambda_depth * dl
        parts = {"seg_ce": ce.detach(), f"depth_{cfg.depth_loss}": dl.detach()}
        if "connector" in outputs:
            c, w = outputs["connector"], self.omega()
            c_ce = seg_loss(c["seg"].float(), label, self.ignore_index)
            c_dl = depth_loss(c["depth"].float(), depth, cfg.depth_loss)
            d_seg = kd_seg(s["seg"], c["seg"], label, cfg.temperature, self.ignore_index)
            d_depth = kd_depth(s["depth"], c["depth"], depth)
            total = total + w["seg"] * c_ce + w["depth"] * c_dl
            total = total + cfg.lambda_kd * (w["seg"] * d_seg + w["depth"] * d_depth)
            parts.update(connector_seg_ce=c_ce.detach(), connector_depth=c_dl.detach(),
                         kd_seg=d_seg.detach(), kd_depth=d_depth.detach())
        if "probe" in outputs:
            att = resize_attention(attention_map(outputs["probe"]["features"]), self.grid)
            traj = trajectory_loss(att, self.buffer, outputs["probe"]["index"])
            total = total + cfg.lambda_traj * traj
            parts["traj"] = traj.detach()
        return total, parts

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
    def end_timeframe(self, timeframe: int, step: int, val: dict, model: DistillModel) -> dict:
        logs = {}
        if self.weights is not None:
            w = self.weights.step(timeframe, step, {t: task_score(t, val) for t in TASKS})
            fb = {h["task"]: h["feedback"] for h in self.weights.history[-len(TASKS):]}
            for t in TASKS:
                logs[f"omega/{t}"], logs[f"feedback/{t}"] = w[t], fb[t]
        logs.update(self.record_trajectories(timeframe, step, model))
        return logs

    def record_trajectories(self, timeframe: int, step: int, model: DistillModel) -> dict:
        """Top-k essential points of the connector's g^F and of the student's f^S on every probe image."""
        t0 = time.perf_counter()
        k = self.cfg.top_k
        fused, student = model.probe_features()
        ref = fused if fused is not None else student
        self.grid = tuple(ref.shape[-2:])
        student_att = resize_attention(attention_map(student), self.grid)
        stu = top_k_points(student_att, k, timeframe, step)
        self.trajectories.append(("student", _cpu(stu)))
        stats = {"timeframe": timeframe, "step": step}
        if fused is not None:
            con = top_k_points(attention_map(fused), k, timeframe, step)
            self.trajectories.append(("connector", _cpu(con)))
            self.buffer.append(_cpu(con))
            # How far the student's trajectory is from the connector's: rank-wise L1 of the values, L1 of the
            # student's attention at the connector's points (L_traj on this timeframe alone), shared points.
            at_points = student_att.flatten(1).cpu().gather(1, (con.ys * self.grid[1] + con.xs).cpu())
            stats.update(l1_values=trajectory_distance(con, stu),
                         l1_at_points=float((at_points - con.values.cpu()).abs().mean()),
                         overlap=point_overlap(con, stu))
        self.timeframes.append(stats)
        model.trajectory_on = self.use_trajectory and len(self.buffer) > 0
        self.logging_seconds += time.perf_counter() - t0
        return {f"traj/{k}": v for k, v in stats.items() if k not in ("timeframe", "step")}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {
            "weights": self.weights.state_dict() if self.weights is not None else None,
            "buffer": self.buffer.state_dict(),
            "grid": list(self.grid) if self.grid else None,
            "trajectories": [(src, p.__dict__) for src, p in self.trajectories],
            "timeframes": list(self.timeframes),
            "logging_seconds": self.logging_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.weights is not None and state["weights"] is not None:
            self.weights.load_state_dict(state["weights"])
        self.buffer.load_state_dict(state["buffer"])
        self.grid = tuple(state["grid"]) if state["grid"] else None
        self.trajectories = [(src, Points(**p)) for src, p in state["trajectories"]]
        self.timeframes = list(state["timeframes"])
        self.logging_seconds = float(state["logging_seconds"])
        self.model.trajectory_on = self.use_trajectory and len(self.buffer) > 0


def _cpu(p: Points) -> Points:
    return Points(p.timeframe, p.step, p.ys.cpu(), p.xs.cpu(), p.values.cpu().float())
