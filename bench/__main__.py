"""python -m bench [--quick] [--only data] [--out bench/results]"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import ablation, data, ddp, distill, docs, export, gpu, openvino, pipeline, serve, teachers
from .common import machine_info, write_results

SUITES = {
    "data": lambda quick, params: (
        data.generator_rows(quick) + data.prepare_rows(quick, params) + data.cityscapes_rows(quick, params)
    ),
    "teachers": teachers.rows,
    "distill": distill.rows,
    # full's step over static_kd's, the variants taking turns on one core: the 1.25× target's verdict.
    "distill-steps": distill.step_ratio_rows,
    "export": export.rows,
    "serve": serve.rows,
    "loader": pipeline.loader_rows,
    "pipeline": pipeline.repro_rows,
    "ddp": ddp.rows,
    "ablation": ablation.rows,
    "distill-paper": distill.paper_rows,
    "teacher-cache": ablation.cache_rows,
    "export-paper": lambda quick, params: export.rows(quick, params, ("paper",)),
    # On a GPU machine with onnxruntime-gpu: CUDA execution provider vs PyTorch eager on CUDA.
    "export-gpu": lambda quick, params: export.rows(quick, params, ("default", "paper"), device="cuda"),
    # Training throughput of the paper configuration on a CUDA GPU: AMP, channels_last, compile, MFU, loader.
    "gpu": gpu.rows,
    # A second runtime (optional extra): OpenVINO at f32 and at its CPU default, against onnxruntime.
    "openvino": openvino.rows,
}
SLOW = (
    "pipeline",
    "ddp",
    "ablation",
    "teacher-cache",
    "distill-paper",
    "export-paper",
    "export-gpu",
    "gpu",
    "openvino",
)
DEFAULT = [name for name in SUITES if name not in SLOW]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmarks run, not speed")
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated suites ({', '.join(SUITES)}; "
        "default: all but ablation, which trains 15 models and takes about an hour on 2 cores; "
        "teacher-cache (8 models, about 30 minutes); "
        "pipeline (a whole dvc repro, about 20 minutes on 2 cores); "
        "ddp (torchrun scaling, about 10 minutes); "
        "distill-paper and export-paper, the paper's ResNet-101/ResNet-50 models on the CPU; and "
        "export-gpu and gpu, for a CUDA machine)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    args = ap.parse_args(argv)
    info = machine_info()
    for name in args.only.split(","):
        rows = SUITES[name](args.quick, args.params)
        js, md = write_results(args.out, name, rows, info)
        print(md.read_text())
        print(f"→ {js}\n→ {md}")
    if args.out.resolve() == docs.RESULTS:  # the committed results changed: so does the page built from them
        print(f"→ {docs.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
