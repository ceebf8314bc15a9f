"""Kubeflow Trainer jobs for the pipeline's training steps (``pipeline.trainjob.enabled``).

With it on, the KFP steps `train-teacher-*` and `distill` no longer train in their own pod: each launches a
TrainJob (Kubeflow Trainer v2, through the official ``kubeflow`` SDK) that runs the same image and the same stage
command under torchrun on ``num_nodes`` × ``gpus_per_node``, waits for it, and hands the job's output on as the
step's output artifact. The torch runtime (``pipeline.trainjob.runtime``, a ClusterTrainingRuntime) gives every
node PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT, which torchrun reads; the processes per
node are set explicitly. Data moves through the pipeline root on gs://: the job reads the input artifacts'
URIs and writes its output below the step's own output URI (``<uri>.trainjob``), see staging.py.

The TrainJob object is built here with the SDK's models (``manifest``) and submitted with
``TrainerClient.train`` (``launch``); both start from the same ``JobRequest``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from jointdistill.config import Params, TrainJobParams
from jointdistill.distill.plan import uses_teachers
from jointdistill.errors import ConfigError, OutputError

log = logging.getLogger(__name__)

STAGE_COMMANDS = {"teacher": "train-teacher", "distill": "distill"}
# Passed from the launching step to the job when set there (an emulator in tests, the project for GCS clients).
FORWARDED_ENV = ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_STAGE = "jointdistill.io/stage"


@dataclass(frozen=True)
class JobRequest:
    """Everything a TrainJob of one stage needs; ``manifest`` and ``launch`` both read it."""

    name: str
    runtime: str
    image: str
    num_nodes: int
    procs_per_node: int
    resources_per_node: dict
    command: list[str]
    args: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    namespace: str | None
    deadline_seconds: int
    output_url: str


def job_name(stage: str, task: str | None, output_url: str) -> str:
    """A DNS-1035 label, unique per output artifact (so a retried KFP step re-attaches to nothing stale)."""
    digest = hashlib.sha256(output_url.encode()).hexdigest()[:10]
    return f"jd-{stage}{'-' + task if task else ''}-{digest}"


def staging_url(output_uri: str) -> str:
    if not output_uri.startswith("gs://"):
        raise ConfigError(
            f"pipeline.trainjob needs a gs:// pipeline root (the job exchanges data through it); "
            f"this step's output is {output_uri!r}"
        )
    return output_uri.rstrip("/") + ".trainjob"


def _resources(cfg: TrainJobParams) -> dict:
    res: dict = {}
    if cfg.cpu_per_node:
        res["cpu"] = cfg.cpu_per_node
    if cfg.memory_per_node:
        res["memory"] = cfg.memory_per_node
    if cfg.gpus_per_node:
        res["gpu"] = str(cfg.gpus_per_node)  # a Kubernetes quantity: a string, not the float the SDK makes of an int
    return res


def request(
    params: Params,
    stage: str,
    image: str,
    params_url: str,
    data_url: str,
    output_uri: str,
    task: str | None = None,
    teacher_urls: tuple[str, str] | None = None,
) -> JobRequest:
    """The TrainJob for ``stage`` (teacher | distill) reading gs:// inputs and writing below ``output_uri``."""
    if stage not in STAGE_COMMANDS:
        raise ConfigError(f"stage {stage!r}: a TrainJob runs one of {', '.join(STAGE_COMMANDS)}")
    cfg = params.pipeline.trainjob
    out = staging_url(output_uri)
    nproc = cfg.gpus_per_node or cfg.procs_per_node
    args = [f"--nproc_per_node={nproc}", "-m", "jointdistill", STAGE_COMMANDS[stage]]
    if stage == "teacher":
        if task not in ("seg", "depth"):
            raise ConfigError(f"teacher task {task!r}: expected seg or depth")
        args += ["--task", task]
    args += ["--params", params_url, "--data", data_url]
    if stage == "distill" and uses_teachers(params.distill.mode):
        if not teacher_urls:
            raise ConfigError(f"distill mode {params.distill.mode!r} needs the two teachers' URLs")
        args += ["--teachers", *teacher_urls]
    args += ["--out", out]
    env = {"DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    cpus = cfg.cpu_per_node or ""
    if not cfg.gpus_per_node and cpus.isdigit():
        # torchrun would set 1 thread per process; give each CPU process its share of the node instead.
        env["OMP_NUM_THREADS"] = str(max(1, int(cpus) // nproc))
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return JobRequest(
        name=job_name(stage, task, output_uri),
        runtime=cfg.runtime,
        image=image,
        num_nodes=cfg.num_nodes,
        procs_per_node=nproc,
        resources_per_node=_resources(cfg),
        command=["torchrun"],
        args=args,
        env=env,
        labels={LABEL_PART_OF: "jointdistill", LABEL_STAGE: stage + (f"-{task}" if task else "")},
        namespace=cfg.namespace,
        deadline_seconds=cfg.timeout,
        output_url=out,
    )


def _container(req: JobRequest):
    from kubeflow.trainer import CustomTrainerContainer

    return CustomTrainerContainer(
        image=req.image, num_nodes=req.num_nodes, resources_per_node=dict(req.resources_per_node), env=dict(req.env)
    )


def _options(req: JobRequest) -> list:
    from kubeflow.trainer.options.common import Name
    from kubeflow.trainer.options.kubernetes import ActiveDeadlineSeconds, Labels, TrainerArgs, TrainerCommand

    return [
        Name(name=req.name),
        Labels(labels=dict(req.labels)),
        TrainerCommand(command=list(req.command)),
        TrainerArgs(args=list(req.args)),
        ActiveDeadlineSeconds(seconds=req.deadline_seconds),
    ]


def manifest(req: JobRequest, runtime_kind: str = "ClusterTrainingRuntime") -> dict:
    """The TrainJob object (apiVersion trainer.kubeflow.org/v1alpha1) built from the SDK's models, as
    ``kubectl apply -f`` takes it."""
    from kubeflow.trainer.backends.kubernetes import utils as k8s_utils
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types import types
    from kubeflow_trainer_api import models

    runtime = types.Runtime(
        name=req.runtime,
        kind=types.RuntimeKind(runtime_kind),
        trainer=types.RuntimeTrainer(trainer_type=types.TrainerType.CUSTOM_TRAINER, framework="torch", image=req.image),
    )
    trainer = k8s_utils.get_trainer_cr_from_custom_trainer(runtime, _container(req))
    trainer.command = list(req.command)
    trainer.args = list(req.args)
    job = models.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION,
        kind=constants.TRAINJOB_KIND,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=req.name, namespace=req.namespace, labels=dict(req.labels)
        ),
        spec=models.TrainerV1alpha1TrainJobSpec(
            runtimeRef=models.TrainerV1alpha1RuntimeRef(name=runtime.name, kind=runtime.kind.value),
            trainer=trainer,
            activeDeadlineSeconds=req.deadline_seconds,
        ),
    )
    return job.to_dict()


def launch(req: JobRequest, poll_interval: int, timeout: int, client=None) -> str:
    """Submit the TrainJob with the SDK's TrainerClient, wait until it completes; return its name.

    A failed job or a timeout is an OutputError naming the job, with the last lines of its node-0 log."""
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

    client = client or TrainerClient(KubernetesBackendConfig(namespace=req.namespace))
    try:
        name = client.train(runtime=req.runtime, trainer=_container(req), options=_options(req))
        log.info(
            "TrainJob %s submitted: %d node(s) × %d process(es), image %s",
            name,
            req.num_nodes,
            req.procs_per_node,
            req.image,
        )
    except RuntimeError as exc:
        # A retried KFP step (its pod was preempted) finds the job it started: same output, same name.
        try:
            client.get_job(req.name)
        except (RuntimeError, TimeoutError):
            raise OutputError(f"TrainJob {req.name}: could not create it ({exc}; {exc.__cause__})") from None
        name = req.name
        log.info("TrainJob %s exists already (a retried step): waiting for it", name)
    try:
        client.wait_for_job_status(name, status={"Complete"}, timeout=timeout, polling_interval=poll_interval)
    except (RuntimeError, TimeoutError) as exc:
        raise OutputError(f"TrainJob {name}: {exc}{_tail(client, name)}") from None
    return name


def _tail(client, name: str, lines: int = 20) -> str:
    try:
        text = "".join(client.get_job_logs(name))
    except Exception:  # noqa: BLE001 - logs are a courtesy on the error path; the failure itself is reported
        return ""
    return "\nlast lines of its log:\n" + "\n".join(text.splitlines()[-lines:]) if text else ""


def run_step(
    params: Params,
    stage: str,
    image: str,
    inputs: dict[str, str],
    output_uri: str,
    output_path: str,
    task: str | None = None,
    client=None,
) -> dict:
    """What a KFP training step does in TrainJob mode: upload params, launch, wait, copy the job's output folder
    into the step's output artifact path. ``inputs``: ``data`` and (distill) ``teacher_seg``/``teacher_depth``
    URIs. Returns the stage's report.json."""
    import tempfile

    from jointdistill.cloud import storage

    out = staging_url(output_uri)
    params_url = f"{out}.params.json"
    with tempfile.TemporaryDirectory(prefix="jointdistill-trainjob-") as tmp:
        local_params = Path(tmp) / "params.json"
        local_params.write_text(json.dumps(params.model_dump(mode="json"), indent=1))
        storage.upload_file(local_params, params_url)
    teachers = (inputs["teacher_seg"], inputs["teacher_depth"]) if "teacher_seg" in inputs else None
    req = request(params, stage, image, params_url, inputs["data"], output_uri, task, teachers)
    cfg = params.pipeline.trainjob
    name = launch(req, cfg.poll_interval, cfg.timeout, client)
    if not storage.exists(f"{out}/{storage.SUCCESS}"):
        raise OutputError(
            f"TrainJob {name} completed but {out} is incomplete (no {storage.SUCCESS}): its rank 0 "
            "did not finish the upload"
        )
    storage.download_tree(out, output_path)
    return json.loads((Path(output_path) / "report.json").read_text())


__all__ = ["JobRequest", "request", "manifest", "launch", "run_step", "job_name", "staging_url"]
