"""What each stage returns: its report, typed by stage, with the three views the adapters show.

- ``headline()``: one line of figures: what the CLI prints after the stage and what ``jointdistill summary``
  prints for a finished output (the same words in both places);
- ``metadata()``: the KFP output artifact's metadata (besides its lineage, which `record_artifact` adds);
- ``metrics()``: the scalars a KFP ``Metrics`` artifact logs.

A result is the report itself (a ``dict``: ``result["test"]["miou"]``, ``json.dumps(result)``) with these views.
``read(folder)`` rebuilds the result of a finished output from its files (``report.json``, and ``run.json``
from the metrics folder for run facts such as latency), which is how ``summary`` and a Kubeflow Trainer step
get the same object a local run returns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar


class StageResult(dict[str, Any]):
    """The report of one stage run (``report.json``'s content, plus the run facts when the stage ran here)."""

    stage: ClassVar[str]
    report_file: ClassVar[str] = "report.json"

    def headline(self) -> str:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return {"params_digest": self.get("params_digest", "")}

    def metrics(self) -> dict[str, float]:
        return {}

    @classmethod
    def read(cls, folder: str | Path, metrics_dir: str | Path | None = None) -> StageResult | None:
        """The result of the finished output in ``folder``, or None where there is none. Run facts (``run.json``)
        are merged in from ``folder`` or ``metrics_dir``, where either has them."""
        folder = Path(folder)
        try:
            report = json.loads((folder / cls.report_file).read_text())
        except (OSError, ValueError):
            return None
        for place in (folder, Path(metrics_dir) if metrics_dir else None):
            if place is not None and (place / "run.json").is_file():
                report = _merged(report, json.loads((place / "run.json").read_text()))
                break
        return cls(report)


def _merged(content: Any, run: Any) -> Any:
    """``records.split`` undone: the run facts put back at their places in the content."""
    if isinstance(content, dict) and isinstance(run, dict):
        return {**content, **{k: _merged(content.get(k), v) for k, v in run.items()}}
    if isinstance(content, list) and isinstance(run, list) and len(content) == len(run):
        return [_merged(c, r) for c, r in zip(content, run, strict=True)]
    return content if run is None else run


def short_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A model's headline metrics, rounded (the connector's in the student's report)."""
    return {k: round(float(metrics[k]), 5) for k in ("miou", "pixacc", "abs_err", "rel_err", "delta1") if k in metrics}


def _numbers(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class PrepareResult(StageResult):
    """``meta.json`` of the prepared data."""

    stage = "prepare"
    report_file = "meta.json"

    @classmethod
    def from_run(
        cls,
        params: Any,
        source: Any,
        splits: dict,
        stats: dict,
        normalization: dict,
        checksum: str,
        params_digest: str,
    ) -> PrepareResult:
        """meta.json of a prepare run: what ``source`` is, the ``splits`` it was cut into, what writing them
        counted (``stats``), the normalisation, the checksum over every sample."""
        from jointdistill import __version__
        from jointdistill.data.contract import FORMAT_VERSION, SPLITS, UNLABELLED

        p = params.prepare
        return cls(
            {
                "format_version": FORMAT_VERSION,
                "dataset": source.name,
                "classes": list(source.classes),
                "palette": [list(c) for c in source.palette],
                "ignore_index": source.ignore_index,
                "depth_unit": "m",
                "depth_range": [stats["depth_min"] if stats["depth_valid"]["train"] else 0.0, p.max_depth],
                "depth_observed_max": stats["depth_max"],
                "resolution": [p.height, p.width],
                "normalization": normalization,
                "counts": {s: len(splits[s]) for s in (*SPLITS, UNLABELLED)},
                "labelled": stats["labelled"],
                "budget": p.budget.model_dump() if source.name == "synthetic" else "every label of the source",
                "val_fraction": p.val_fraction,
                "seed": params.seed,
                "class_pixels": {s: stats["class_pixels"][s].tolist() for s in SPLITS},
                "ignored_pixels": stats["ignored_pixels"],
                "valid_depth_pixels": stats["depth_valid"],
                "masked_depth_pixels": stats["masked"].as_dict(),
                "source": source.describe(),
                "train_targets": (
                    {"sensor": p.sensor.model_dump()}
                    if p.sensor.enabled and source.name == "synthetic"
                    else "as the source gives them"
                ),
                "source_checksum": checksum,
                "params_digest": params_digest,
                "jointdistill_version": __version__,
            }
        )

    def headline(self) -> str:
        """One line: the frames of each split, and of them how many carry each task's label."""
        c, lab = self["counts"], self.get("labelled", {})
        h, w = self["resolution"]

        def split(s: str) -> str:
            n = lab.get(s)
            return f"{s} {c[s]}" + (f" (seg {n['seg']}, depth {n['depth']})" if n else "")

        return (
            f"{self['dataset']}, {h}×{w}; "
            + ", ".join(split(s) for s in ("train", "val", "test"))
            + (f", unlabelled {c['unlabelled']}" if c.get("unlabelled") else "")
        )

    def metadata(self) -> dict[str, Any]:
        keys = ("dataset", "counts", "resolution", "source_checksum", "params_digest")
        return {k: self[k] for k in keys}


class TeacherResult(StageResult):
    stage = "train-teacher"

    @classmethod
    def from_run(
        cls,
        params: Any,
        task: str,
        objective: Any,
        model: Any,
        fitted: Any,
        test: dict,
        baseline: dict,
        train_images: int,
        epoch_samples: int | None,
        train_seconds: float,
        flops: int,
        world: int,
    ) -> TeacherResult:
        """The report of a teacher run: ``fitted`` (`engine.FitResult`), the best weights' ``test`` metrics next to
        the trivial ``baseline``'s, the labelled train images and how many samples an epoch drew."""
        import numpy as np

        spec = params.teacher.for_task(task)
        history = fitted.history
        return cls(
            {
                "task": task,
                "monitor": objective.monitor,
                "val": fitted.best_metrics,
                "test": test,
                "baseline": {"test": baseline},
                "best_epoch": fitted.best_epoch,
                "epochs": spec.epochs,
                "data": {"train": train_images, "epoch_samples": epoch_samples or train_images},
                "train_seconds": round(train_seconds, 2),
                "train_images_per_second": round(float(np.mean([e["train/images_per_second"] for e in history])), 2)
                if history
                else None,
                "resumed_from_step": fitted.resumed_from,
                "world_size": world,
                "model": {  # one image at the training size
                    "backbone": spec.backbone,
                    "head": spec.head,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "flops": flops,
                },
                "params_digest": params.digest("teacher", task),
            }
        )

    def headline(self) -> str:
        test, base = self["test"], self["baseline"]["test"]
        if self["task"] == "seg":
            return (
                f"test mIoU {test['miou']:.4f} (baseline {base['miou']:.4f}), "
                f"pixAcc {test['pixacc']:.4f} (baseline {base['pixacc']:.4f})"
            )
        return (
            f"test AbsErr {test['abs_err']:.3f} m (baseline {base['abs_err']:.3f}), "
            f"RelErr {test['rel_err']:.4f} (baseline {base['rel_err']:.4f})"
        )

    def metadata(self) -> dict[str, Any]:
        key = self["monitor"]
        return {
            "task": self["task"],
            "monitor": key,
            "val": self["val"][key],
            "test": self["test"][key],
            "best_epoch": self["best_epoch"],
            **super().metadata(),
        }

    def metrics(self) -> dict[str, float]:
        return {**_numbers(self["val"], "val/"), **_numbers(self["test"], "test/")}


class StudentResult(StageResult):
    stage = "distill"

    @classmethod
    def from_run(
        cls,
        params: Any,
        plan: Any,
        meta: dict,
        built: Any,
        fitted: Any,
        test: dict,
        warmup: dict | None,
        train_seconds: float,
        flops: int,
        world: int,
    ) -> StudentResult:
        """The report of a distill run: ``built`` (`distill.builder.Built`), ``fitted`` (`engine.FitResult`), the
        best weights' ``test`` metrics, the connector's ``warmup`` report, the training time (warm-up included),
        the student's FLOPs per image and the number of processes."""
        import numpy as np

        cfg, objective, student = params.distill, built.objective, built.student
        history = fitted.history
        ips = float(np.mean([e["train/images_per_second"] for e in history])) if history else None
        pool, pool_batch = built.pool
        cache = built.cache_report
        return cls(
            {
                "mode": plan.mode,
                "monitor": objective.monitor,
                "val": fitted.best_metrics,
                "test": test,
                "teachers": built.teacher_info,
                "weights": {
                    "final": objective.omega(),
                    "history": list(objective.weights.history) if objective.weights else [],
                },
                "trajectory": {},
                # The student's KD loss on the probe images per teacher, every timeframe (forgetting).
                "probe_kd": list(objective.forgetting),
                "best_epoch": fitted.best_epoch,
                "best_step": fitted.best_step,
                "epochs": cfg.epochs,
                # Train frames, of them fully labelled (each step's batch_size part), the pool of frames missing a
                # task's label (train frames and the unlabelled split) and how many of them each step adds, and the
                # frames an epoch draws.
                "data": {
                    "train": len(built.train_ds),
                    "fully_labelled": built.labelled_train,
                    "pool": pool,
                    "pool_batch": pool_batch,
                    "epoch_samples": built.epoch_samples or len(built.train_set),
                    "probes": {"split": plan.probe_split, "images": len(objective.probe_ids)},
                },
                "timeframes": len(history),
                "train_seconds": round(train_seconds, 2),
                # Validation, the ω update, connector scoring and trajectory records: the price of the timeframes.
                "validation_seconds": round(fitted.validation_seconds, 2),
                "validation_share": round(fitted.validation_seconds / train_seconds, 4) if train_seconds > 0 else None,
                "connector": {
                    "warmup": warmup,
                    "history": [short_metrics(c) | {"timeframe": c["timeframe"]} for c in objective.connector_history],
                },
                "gradients": objective.gradient_summary(),
                "flops": {"student": flops},
                # Training loop only (data, forward, backward, step), per process; validation excluded.
                "seconds_per_step": round((cfg.batch_size + pool_batch) / ips, 5) if ips else None,
                "train_images_per_second": round(ips, 2) if ips else None,
                # Images the teachers ran on in this process: per step without the cache, once when it was built.
                "teacher_forward_images": built.model.teacher_images
                + (cache["teacher_forward_images"] if cache and not cache["reused"] else 0),
                "teacher_cache": cache,
                "history": history,
                "resumed_from_step": fitted.resumed_from,
                "world_size": world,
                "model": {
                    "backbone": params.student.backbone,
                    "head": params.student.head,
                    "parameters": sum(p.numel() for p in student.parameters()),
                },
                "params_digest": params.digest("distill"),
            }
        )

    @staticmethod
    def curated(report: dict) -> dict:
        """The student's few numbers for metrics.json: test metrics and training time (the rest is in report.json)."""
        return {
            **{k: report["test"][k] for k in ("miou", "pixacc", "abs_err", "rel_err", "delta1")},
            "seconds": report["train_seconds"],
        }

    def headline(self) -> str:
        test, weights = self["test"], self["weights"]
        line = (
            f"{self['mode']}: test mIoU {test['miou']:.4f}, pixAcc {test['pixacc']:.4f}, "
            f"AbsErr {test['abs_err']:.3f} m, RelErr {test['rel_err']:.4f}"
        )
        if not weights["history"]:  # ω never moved (mtl, self_train, static_kd): naming it would suggest it did
            return line
        return line + "; final ω: " + ", ".join(f"{k} {v:.3f}" for k, v in weights["final"].items())

    def metadata(self) -> dict[str, Any]:
        return {
            "mode": self["mode"],
            "best_epoch": self["best_epoch"],
            "final_weights": self["weights"]["final"],
            **super().metadata(),
            **{f"test_{k}": self["test"][k] for k in ("miou", "pixacc", "abs_err", "rel_err")},
        }

    def metrics(self) -> dict[str, float]:
        return {
            **_numbers(self["val"], "val/"),
            **_numbers(self["test"], "test/"),
            **_numbers(self["weights"]["final"], "omega/"),
        }


class EvaluationResult(StageResult):
    """The evaluation report: ``{model: {split: metrics}}`` for the student, the teachers and any baseline."""

    stage = "evaluate"

    @property
    def split(self) -> str:
        """The split evaluated (``evaluate.split``): the one key of each model's entry."""
        return next(iter(self["student"]))

    def headline(self) -> str:
        m = self["student"][self.split]
        return (
            f"student Δm {m['delta_m']:+.2f} % vs the teachers on {self.split}; mIoU {m['miou']:.4f}, "
            f"AbsErr {m['abs_err']:.3f} m"
        )

    def metadata(self) -> dict[str, Any]:
        return {"split": self.split, "delta_m": self["student"][self.split]["delta_m"]}

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for model, by_split in self.items():
            if isinstance(by_split, dict) and isinstance(by_split.get(self.split), dict):
                out.update(_numbers(by_split[self.split], f"{model}/"))
        return out


class ExportResult(StageResult):
    stage = "export"

    @classmethod
    def from_run(
        cls,
        cfg: Any,
        record: dict,
        test_by_model: dict,
        latency: dict,
        file_bytes: dict,
        seconds: tuple[float, float],
        code: str,
        flops: dict,
    ) -> ExportResult:
        """The report of an export run (without its parity, which is its own file): test metrics of every file
        (the fp32 ONNX one's first), latency, sizes, (export, total) ``seconds``, the code digest and FLOPs."""
        return cls(
            {
                "test": test_by_model["onnx"],
                "test_by_model": test_by_model,
                "latency_ms": latency,
                "latency_runs": cfg.latency_runs,
                "file_bytes": file_bytes,
                "export_seconds": round(seconds[0], 2),
                "seconds": round(seconds[1], 2),
                "opset": cfg.opset,
                "code": code,
                "params_digest": record.get("params_digest"),
                "flops": flops,
            }
        )

    @classmethod
    def read(cls, folder: str | Path, metrics_dir: str | Path | None = None) -> StageResult | None:
        result = super().read(folder, metrics_dir)
        if result is not None and (Path(folder) / "parity.json").is_file():
            result["parity"] = json.loads((Path(folder) / "parity.json").read_text())
        return result

    def headline(self) -> str:
        val = self["parity"]["fp32"]["val"]
        test = self["test"]
        variants = ", ".join(sorted(set(self["file_bytes"]) - {"fp32"})) or "none"
        lat = ((self.get("latency_ms") or {}).get("onnx") or {}).get("batch1_ms")
        return (
            f"parity on {val['images']} val images: seg argmax agreement "
            f"{100 * val['segmentation_logits']['argmax_agreement']:.3f} %, depth max rel err "
            f"{val['depth']['max_rel_err']:.1e}; test mIoU {test['miou']:.4f}, AbsErr {test['abs_err']:.3f} m "
            f"in onnxruntime"
            + (f", {lat:.1f} ms/image at batch 1" if lat is not None else "")
            + f"; variants: {variants}"
        )

    def metadata(self) -> dict[str, Any]:
        val = self["parity"]["fp32"]["val"]
        return {
            "framework": "onnx",
            "file": "student.onnx",
            "opset": self["opset"],
            "variants": sorted(self["file_bytes"]),
            **super().metadata(),
            "parity_seg_argmax_agreement": val["segmentation_logits"]["argmax_agreement"],
            "parity_depth_max_rel_err": val["depth"]["max_rel_err"],
        }

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for model, values in self["test_by_model"].items():
            out.update(_numbers(values, f"test/{model}/"))
        for runtime, lat in (self.get("latency_ms") or {}).items():
            out.update(_numbers(lat, f"latency/{runtime}/"))
        return out


def record_artifact(artifact: Any, result: StageResult, metrics: Any = None) -> None:
    """A KFP output artifact's metadata (lineage, source commit, the result's metadata) and, with a ``Metrics``
    artifact, the result's metrics."""
    from jointdistill.provenance import lineage

    artifact.metadata["lineage"] = lineage.read(artifact.path)
    artifact.metadata["source_commit"] = lineage.source_commit() or ""
    artifact.metadata.update(result.metadata())
    if metrics is not None:
        for name, value in result.metrics().items():
            metrics.log_metric(name, value)


__all__ = [
    "StageResult",
    "PrepareResult",
    "TeacherResult",
    "StudentResult",
    "EvaluationResult",
    "ExportResult",
    "record_artifact",
]
