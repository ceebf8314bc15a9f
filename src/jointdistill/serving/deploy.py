"""Cluster deployment of a published student on KServe: InferenceService objects built with the kserve SDK's
models, and the Triton model repository that KServe's Triton runtime serves without any code of ours.

Two InferenceServices for one published version (``gs://BUCKET/PREFIX/VERSION``, see storage.publish):

- **ours**: the project image running ``jointdistill serve /mnt/models/student.onnx`` (KServe's storage
  initializer downloads ``STORAGE_URI`` to /mnt/models), v2 readiness probe, CPU or GPU resources. Serves both
  input forms (normalised tensors and encoded images) and our metadata.
- **Triton**: ``modelFormat: onnx`` on KServe's Triton runtime, ``storageUri`` = the version's ``triton/``
  folder, a model repository ``<model>/1/model.onnx`` + ``<model>/config.pbtxt`` that ``publish`` lays out.
  Tensors only (``image`` normalised → ``segmentation_logits``, ``depth``), as the ONNX contract says.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from jointdistill.errors import ConfigError, ModelError
from jointdistill.io import atomic_write_text

PORT = 8080
MODEL_MOUNT = "/mnt/models"
TRITON_DIR = "triton"
TRITON_MODEL = "student"


# ----------------------------------------------------------------------------- Triton model repository
def triton_config(meta: dict, input_dims: list[int], name: str = TRITON_MODEL) -> str:
    """``config.pbtxt`` for the student: onnxruntime backend, batch and (when the export allows) H, W dynamic.

    ``max_batch_size: 0`` with the batch as the first dim (-1): Triton then passes shapes through unchanged,
    exactly as the ONNX graph declares them."""
    classes = len(meta["classes"])
    _, _, h, w = input_dims
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        "max_batch_size: 0",
        "input [",
        f'  {{ name: "image" data_type: TYPE_FP32 dims: [ -1, 3, {h}, {w} ] }}',
        "]",
        "output [",
        f'  {{ name: "segmentation_logits" data_type: TYPE_FP32 dims: [ -1, {classes}, {h}, {w} ] }},',
        f'  {{ name: "depth" data_type: TYPE_FP32 dims: [ -1, 1, {h}, {w} ] }}',
        "]",
        "instance_group [ { kind: KIND_AUTO } ]",
    ]
    return "\n".join(lines) + "\n"


def triton_layout(onnx_path: str | Path, name: str = TRITON_MODEL) -> dict[str, bytes]:
    """The Triton repository files for an exported student, as {relative path: content}."""
    import onnx

    from jointdistill.serving.infer import read_metadata

    onnx_path = Path(onnx_path)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"{onnx_path}: not a loadable ONNX model ({exc})") from None
    meta = read_metadata({p.key: p.value for p in model.metadata_props}, str(onnx_path))
    (inp,) = [i for i in model.graph.input if i.name == "image"] or [None]
    if inp is None:
        raise ModelError(f"{onnx_path}: no input named 'image'")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ModelError(f"{onnx_path}: input 'image' has rank {len(dims)}, expected 4")
    return {
        f"{name}/1/model.onnx": onnx_path.read_bytes(),
        f"{name}/config.pbtxt": triton_config(meta, dims, name).encode(),
    }


# ----------------------------------------------------------------------------- InferenceServices
def _check(storage_uri: str, name: str) -> None:
    import re

    if not storage_uri.startswith("gs://"):
        raise ConfigError(f"--storage-uri {storage_uri!r}: expected the published version, gs://BUCKET/PREFIX/VERSION")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,44}[a-z0-9])?", name):
        raise ConfigError(
            f"name {name!r}: an InferenceService name is a DNS label (lower case, digits, '-'; at most 46 characters)"
        )


def _resources(cpu: str, memory: str, gpu: bool):
    from kubernetes.client import V1ResourceRequirements

    limits = {"cpu": cpu, "memory": memory}
    if gpu:
        limits["nvidia.com/gpu"] = "1"
    return V1ResourceRequirements(requests=dict(limits), limits=limits)


def _isvc(name: str, namespace: str | None, predictor, annotations: dict | None = None):
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, constants
    from kubernetes.client import V1ObjectMeta

    return V1beta1InferenceService(
        api_version=constants.KSERVE_V1BETA1,
        kind=constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=V1ObjectMeta(
            name=name,
            namespace=namespace,
            annotations=annotations,
            labels={"app.kubernetes.io/part-of": "jointdistill"},
        ),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )


def predictor_service(
    storage_uri: str,
    image: str,
    name: str,
    namespace: str | None = None,
    gpu: bool = False,
    cpu: str = "2",
    memory: str = "4Gi",
    service_account: str | None = None,
):
    """Our model server: project image, `serve` command, readiness on the v2 path."""
    from kserve import V1beta1PredictorSpec
    from kubernetes.client import V1Container, V1ContainerPort, V1EnvVar, V1HTTPGetAction, V1Probe

    _check(storage_uri, name)
    if not image:
        raise ConfigError("--image: the project image is needed for the jointdistill predictor")
    container = V1Container(
        name="kserve-container",  # the name KServe's storage initializer looks for
        image=image,
        args=["serve", f"{MODEL_MOUNT}/student.onnx", "--host", "0.0.0.0", "--port", str(PORT), "--name", name],
        env=[V1EnvVar(name="STORAGE_URI", value=storage_uri.rstrip("/"))],
        ports=[V1ContainerPort(container_port=PORT, protocol="TCP")],
        resources=_resources(cpu, memory, gpu),
        readiness_probe=V1Probe(
            http_get=V1HTTPGetAction(path=f"/v2/models/{name}/ready", port=PORT),
            initial_delay_seconds=5,
            period_seconds=10,
            failure_threshold=3,
        ),
    )
    predictor = V1beta1PredictorSpec(containers=[container], min_replicas=1, service_account_name=service_account)
    return _isvc(name, namespace, predictor, {"serving.kserve.io/deploymentMode": "Serverless"})


def triton_service(
    storage_uri: str,
    name: str,
    namespace: str | None = None,
    gpu: bool = False,
    cpu: str = "2",
    memory: str = "4Gi",
    service_account: str | None = None,
):
    """KServe's Triton runtime on the published Triton repository (``modelFormat: onnx``, v2 protocol)."""
    from kserve import V1beta1ModelFormat, V1beta1ModelSpec, V1beta1PredictorSpec

    _check(storage_uri, name)
    model = V1beta1ModelSpec(
        model_format=V1beta1ModelFormat(name="onnx"),
        runtime="kserve-tritonserver",
        protocol_version="v2",
        storage_uri=f"{storage_uri.rstrip('/')}/{TRITON_DIR}",
        resources=_resources(cpu, memory, gpu),
    )
    predictor = V1beta1PredictorSpec(model=model, min_replicas=1, service_account_name=service_account)
    return _isvc(name, namespace, predictor)


def to_dict(obj) -> dict:
    from kserve import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def from_dict(data: dict, type_name: str = "V1beta1InferenceService"):
    """Load a manifest back into the SDK's model objects (kserve's, and the kubernetes client's for the V1 types
    inside), refusing any key a model does not declare, so a typo or a wrong nesting cannot pass."""
    import re

    import kserve.models
    import kubernetes.client

    if data is None:
        return None
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return [from_dict(x, m[1]) for x in data]
    if m := re.fullmatch(r"dict\(([^,]+), (.+)\)", type_name):
        return {k: from_dict(v, m[2]) for k, v in data.items()}
    if type_name in ("str", "int", "float", "bool", "object", "datetime", "date"):
        return data
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client, type_name)
    if not isinstance(data, dict):
        raise ConfigError(f"{type_name}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - set(cls.attribute_map.values())
    if unknown:
        raise ConfigError(f"{type_name}: unknown field(s) {', '.join(sorted(unknown))}")
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    return cls(**{by_key[k]: from_dict(v, cls.openapi_types[by_key[k]]) for k, v in data.items()})


def write_manifests(
    out: str | Path,
    storage_uri: str,
    image: str | None,
    name: str,
    namespace: str | None = None,
    gpu: bool = False,
    cpu: str = "2",
    memory: str = "4Gi",
    service_account: str | None = None,
) -> list[Path]:
    """OUT/NAME.yaml (ours; only with an image) and OUT/NAME-triton.yaml."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    services = []
    if image:
        services.append(
            (
                out / f"{name}.yaml",
                predictor_service(storage_uri, image, name, namespace, gpu, cpu, memory, service_account),
            )
        )
    triton_name = f"{name}-triton"
    services.append(
        (
            out / f"{triton_name}.yaml",
            triton_service(storage_uri, triton_name, namespace, gpu, cpu, memory, service_account),
        )
    )
    for path, isvc in services:
        atomic_write_text(path, yaml.safe_dump(to_dict(isvc), sort_keys=False))
    return [p for p, _ in services]


__all__ = [
    "triton_config",
    "triton_layout",
    "predictor_service",
    "triton_service",
    "to_dict",
    "from_dict",
    "write_manifests",
]
