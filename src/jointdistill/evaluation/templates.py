"""The Markdown templates of the documents the pipeline writes for people: the evaluation report
(``report.md``; ``report.html`` is rendered from the same Markdown) and the exported model's card
(``MODEL_CARD.md``). Jinja2 syntax; `evaluation.report.render` fills them. They live in a Python module so that
they are part of the code that DVC and the code digest track.
"""

MODEL_CARD = """\
# Model card: jointdistill student

One network that predicts, for every pixel of an RGB image, a **semantic class** and a **metric depth**.
It was distilled (JointDistill, mode `{{ record.mode }}`) from two single-task teachers into a \
`{{ config.backbone }}` encoder with `{{ config.head }}` heads, on the `{{ meta.dataset }}` dataset.

## Files

| file | variant | size | for |
| --- | --- | --- | --- |
{% for f in files %}
| `{{ f.file }}` | {{ f.name }} | {{ "%.2f" | format(f.bytes / 1e6) }} MB | {{ f.use }} |
{% endfor %}

## Input and outputs

- input `image`: float32 N×3×H×W, RGB scaled to [0, 1], then `(x - mean) / std` with mean \
{{ norm.mean }} and std {{ norm.std }}; N is free; H×W: {{ size_rule }}.
- output `segmentation_logits`: float32 N×{{ meta.classes | length }}×H×W; the class is the argmax over axis 1.
- output `depth`: float32 N×1×H×W, metres, always > 0.
- `metadata_props` hold all of the above (every value JSON): `classes`, `palette`, `input_size`, \
`size_multiple`, `mean`, `std`, `depth_unit`, `params_digest`, `code_digest`, …

## Classes

| id | class | colour (RGB) |
| --- | --- | --- |
{% for name, colour in classes %}
| {{ loop.index0 }} | {{ name }} | {{ colour }} |
{% endfor %}

## Accuracy on `test` ({{ meta.counts.test }} images)

| model | mIoU | pixAcc | AbsErr (m) | RelErr | δ<1.25 |
| --- | --- | --- | --- | --- | --- |
{% for label, t in accuracy %}
| {{ label }} | {{ t.miou | num }} | {{ t.pixacc | num }} | {{ t.abs_err | num(3) }} | {{ t.rel_err | num }} | \
{{ t.delta1 | num }} |
{% endfor %}

## Parity with PyTorch

{% set v = parity.fp32.val %}
onnxruntime (CPU) against PyTorch eager on {{ v.images }} val images: segmentation logits max |Δ| \
{{ "%.2e" | format(v.segmentation_logits.max_abs_err) }}, argmax agreement \
{{ "%.3f" | format(100 * v.segmentation_logits.argmax_agreement) }} %; depth max |Δ| \
{{ "%.2e" | format(v.depth.max_abs_err) }} m, max relative error {{ "%.2e" | format(v.depth.max_rel_err) }}. \
The export fails unless depth relative error ≤ {{ "%g" | format(parity.tolerance.depth_rel_tol) }} and agreement ≥ \
{{ "%g" | format(100 * parity.tolerance.seg_agreement_min) }} % (also checked on random inputs and at shapes \
{{ shapes }}).
{% for name, res in parity.variants.items() %}
- `{{ name }}`: argmax agreement {{ "%.2f" | format(100 * res.val.segmentation_logits.argmax_agreement) }} %, \
depth max relative error {{ "%.2e" | format(res.val.depth.max_rel_err) }} (not gated; see its test accuracy).
{% endfor %}

## Other runtimes

- OpenVINO (CPU plugin): compile with `INFERENCE_PRECISION_HINT` set to `f32` to reproduce the parity above. Its \
default on a CPU with bf16 instructions (AVX512-BF16, AMX) computes in bf16: faster on such CPUs, but depth moves by \
centimetres to metres and some pixels change class. `python -m bench --only openvino` measures both hints against \
onnxruntime on this model's test split (accuracy, largest depth change, label agreement, latency).

## Latency

Latency depends on the machine, so it is not written here: the export measured every file on its own machine \
(`latency_ms` in the stage's run.json, per file and batch size), and `jointdistill bench export` measures it on yours.
{% if flops %}

## Cost at {{ h }}×{{ w }}

{{ "%.3f" | format(flops.student / 1e9) }} GFLOP per image (forward, counted by `torch.utils.flop_counter`).\
{% if teacher_flops %}
 Its teachers: {% for task, f in teacher_flops.items() %}{{ task }} {{ "%.3f" | format(f / 1e9) }}\
{{ ", " if not loop.last else "" }}{% endfor %} GFLOP; the student costs \
{{ "%.0f" | format(100 * flops.student / (teacher_flops.values() | sum)) }} % of the two together.\
{% endif %}

{% endif %}

## Use

```
jointdistill predict student.onnx photos/ --out predictions/
```

writes per image `NAME.labels.png` (palette PNG of class ids), `NAME.depth.png` (16-bit, millimetres) and \
`NAME.depth_color.png`. It needs onnxruntime, numpy and Pillow only, and uses the GPU when onnxruntime-gpu is \
installed (`pip install 'jointdistill[gpu]'`).

## Lineage and limits

- params digest `{{ record.params_digest }}`, data checksum `{{ record.data_checksum }}`, code digest \
`{{ code[:23] }}`, jointdistill {{ version }}, opset {{ report.opset }}.
- Trained on `{{ meta.dataset }}` at {{ h }}×{{ w }}; accuracy on other domains, or far from that size, is unmeasured.
- Depth is metric only for cameras like the training camera (focal length, height).
{% if meta.dataset == "synthetic" %}
- The synthetic street scenes exercise the pipeline; this model is not meant for real photos.
{% endif %}
"""

EVALUATION = """\
# jointdistill — evaluation report

The **{{ mode }}** student scores Δm = **{{ "%+.2f" | format(st.delta_m) }} %** against the two single-task \
teachers on `{{ split }}` ({{ "better" if st.delta_m > 0 else "worse" }} on average over mIoU, pixel accuracy, \
AbsErr and RelErr)\
{% if st.delta_m_vs_mtl is defined %}, and Δm = **{{ "%+.2f" | format(st.delta_m_vs_mtl) }} %** against the MTL \
baseline{% endif %}.

## Metrics

| model | mIoU ↑ | pixAcc ↑ | AbsErr (m) ↓ | RelErr ↓ | δ<1.25 ↑ | Δm vs teachers |
|---|---|---|---|---|---|---|
{% for name, m in rows %}
| {{ name }} | {% for k in shown %}{{ m.get(k) | fmt }} | {% endfor %}\
{{ ("%+.2f %%" | format(m.delta_m)) if "delta_m" in m else "(reference)" }} |
{% endfor %}

{% if gate is none %}
Can this benchmark show distillation? Only if the teachers beat plain multi-task training by at least 5 mIoU \
points and 5 % AbsErr: give an MTL baseline (`--mtl`) to check it here, or run `jointdistill ablate`, which checks \
it for every seed.
{% elif gate.passed %}
Gate passed: the teachers beat the MTL baseline by {{ "%.1f" | format(gate.miou_points) }} mIoU points and \
{{ "%.1f" | format(gate.abs_err_percent) }} % AbsErr (needed: 5 and 5), so this benchmark can show distillation.
{% else %}
Gate failed: the teachers beat the MTL baseline by only {{ "%.1f" | format(gate.miou_points) }} mIoU points and \
{{ "%.1f" | format(gate.abs_err_percent) }} % AbsErr (needed: 5 and 5){{ gate_failure }}.
{% endif %}

Cost: the student needs {{ "%.2f" | format(cost.flops.student / 1e9) }} GFLOP per image, \
{{ "%.0f" | format(100 * cost.student_flops_vs_teachers) }} % of the two teachers' together \
({{ "%.2f" | format(cost.flops.teacher_seg / 1e9) }} and {{ "%.2f" | format(cost.flops.teacher_depth / 1e9) }}). \
Latency, measured on the machine that ran this, is in the stage's run.json.

Δm = (1/4)·Σ_k (−1)^l_k·(M_k − M_ref,k)/M_ref,k·100 over {{ delta_m_metrics | join(", ") }}; l_k = 1 where lower \
is better; the reference is the seg teacher's mIoU/pixAcc and the depth teacher's AbsErr/RelErr. Exact metrics over \
the whole split (one confusion matrix, pixel sums).

### Per-class IoU

| class | {{ per_class_models | join(" | ") }} |
|{% for _ in per_class_models %}---|{% endfor %}---|
{% for row in per_class_rows %}
| {{ row | join(" | ") }} |
{% endfor %}

![IoU per class on the test split](plots/per_class_iou.png)
*IoU per class on the test split*

![student confusion matrix (rows: ground truth)](plots/confusion.png)
*student confusion matrix (rows: ground truth)*

![depth AbsErr against ground-truth distance](plots/depth_error.png)
*depth AbsErr against ground-truth distance*

{% if examples %}
## Examples

![the first {{ examples }} {{ split }} images](plots/qualitative.png)
*the first {{ examples }} {{ split }} images*

{% endif %}
## How the student learned

{% if final_weights is not none %}
Teacher weights ω are updated after each timeframe from the feedback on val (per task: the student's score, \
mIoU or δ<1.25, against its teacher's; with the rate and closed rules, in units of its noise, shaded). Final ω: \
{% for k, v in final_weights.items() %}{{ k }} {{ "%.3f" | format(v) }}{{ ", " if not loop.last else "" }}{% endfor %}.

![teacher weights and feedback over timeframes](plots/weights.png)
*teacher weights and feedback over timeframes*

{% endif %}
{% if trajectory is not none %}
Knowledge trajectory: top-{{ trajectory.top_k }} attention points of the connector (○) and the student (×) on train \
probe image {{ trajectory.image }}, per timeframe. Stored as {{ trajectory.rows }} rows, {{ trajectory.bytes }} \
bytes ({{ "%.3f" | format(100 * trajectory.storage_ratio) }} % of the fused maps).

![essential points over timeframes](plots/trajectory.png)
*essential points over timeframes*

{% if trajectory.per_timeframe %}
| timeframe | L1 at connector points | L1 of values by rank | shared points |
|---|---|---|---|
{% for f in trajectory.per_timeframe %}
| {{ f.timeframe }} | {{ f.l1_at_points | fmt }} | {{ f.l1_values | fmt }} | {{ f.overlap | fmt(2) }} |
{% endfor %}

{% endif %}
{% endif %}
## Data and models

Data `{{ data }}`: {{ meta.dataset }}, {{ meta.resolution[0] }}×{{ meta.resolution[1] }}, train \
{{ meta.counts.train }} / val {{ meta.counts.val }} / test {{ meta.counts.test }}\
{% if meta.counts.get("unlabelled") %} / unlabelled {{ meta.counts.unlabelled }}{% endif %}, classes: \
{{ meta.classes | join(", ") }}; source checksum `{{ (meta.get("source_checksum") | string)[:16] }}`.

| model | backbone | head | parameters | best epoch |
|---|---|---|---|---|
{% for row in models %}
| {{ row | join(" | ") }} |
{% endfor %}

## Params

```yaml
{{ params_yaml }}
```
"""
