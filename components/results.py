"""KFP component for the optional last step: the run's outputs pushed into a DVC remote, with `.dvc` pointers.

On when the pipeline's ``results_remote`` parameter is set (the URL of the DVC remote the project uses, e.g.
``gs://bucket/dvc``). The step pushes the prepared data, both teachers, the student, the evaluation and the
ONNX export with DVC's own API, writes one ``.dvc`` pointer per output under ``results_prefix`` into its
``pointers`` artifact (with the run's ``params.yaml``) and, with ``results_git_repo``, commits them to
``results_git_branch`` of that repository, so that ``dvc pull`` (or ``dvc import`` from that branch) on a
laptop gets exactly these bytes. Credentials are the pod's (workload identity or
GOOGLE_APPLICATION_CREDENTIALS), never parameters.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def push_results(
    params: dict,
    prepared: Input[Dataset],
    teacher_seg: Input[Model],
    teacher_depth: Input[Model],
    student: Input[Model],
    evaluation: Input[Dataset],
    onnx_model: Input[Model],
    remote: str,
    prefix: str,
    git_repo: str,
    git_branch: str,
    run_name: str,
    pointers: Output[Artifact],
):
    """Push the six outputs to ``remote``; the pointers (and RESULTS.json) go to ``pointers``, under ``prefix``
    (default ``runs/<the KFP run's name>``)."""
    from jointdistill.cloud import dvc_results

    prefix = prefix or f"runs/{run_name}"
    outputs = {
        "prepared": prepared.path,
        "teacher_seg": teacher_seg.path,
        "teacher_depth": teacher_depth.path,
        "student": student.path,
        "evaluation": evaluation.path,
        "export": onnx_model.path,
    }
    record = dvc_results.push(outputs, remote, pointers.path, prefix, git_repo, git_branch, params=params)
    pointers.metadata.update(
        {
            "remote": remote,
            "prefix": prefix,
            "md5": {name: o["md5"] for name, o in record["outputs"].items()},
            **({"git": record["git"]} if "git" in record else {}),
        }
    )


def component(image: str):
    return dsl.component(push_results, base_image=image, install_kfp_package=False)
