"""The analytic memory model against the dry run, layout by layout, at realistic width.

The planner drops layouts by the analytic model (``memory_model.py``, fast enough to
price thousands of layouts); the dry run (``megatron.dryrun``) runs the real code of
one rank on fake tensors and was validated within 2.6 % of real steps. ``CASES`` are
layouts of ``configs/gpt2_345m.yaml`` and ``configs/llama2_7b.yaml`` at full width
with a few layers (so one dry run takes seconds) on 8 to 64 ranks, over TP, PP, VP,
DP, sequence parallelism, recompute none / selective / full, the distributed
optimizer and fp32 / bf16. ``compare`` dry-runs the first, (a middle) and the last
pipeline stage of a case (TP rank 0, DP rank 0) and sets the model's figures beside
the report's: static bytes, the schedule's activation peak and the total peak.

Kernels: the dry run's ``--target cuda`` runs CUDA's attention kernel and every
other op as on the CPU (it does not emulate the Triton fusions), which is the memory
model's ``dry-run`` device; its ``cuda`` device (Triton's 1-byte dropout masks, fp32
norm statistics, the SwiGLU kernel) is reported beside it for the difference.
"""
import copy
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPT2, LLAMA = "configs/gpt2_345m.yaml", "configs/llama2_7b.yaml"
# The tokenizers' vocabularies (their files are not in the repository).
VOCAB = {GPT2: 50257, LLAMA: 32000}


def _fields(layers, world, tp=1, pp=1, vp=None, gbs=None, mb=1, recompute="none", sp=False,
            do=False, precision="bf16"):
    gbs = gbs or mb * world // (tp * pp)
    return [f"model.num_layers={layers}", f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.virtual_pipeline_model_parallel_size={'null' if vp is None else vp}",
            f"parallel.sequence_parallel={sp}", f"parallel.distributed_optimizer={do}",
            f"training.micro_batch_size={mb}", f"training.global_batch_size={gbs}",
            f"training.recompute={recompute}", f"training.precision={precision}"]


# (name, config, world size, overrides). Micro batches per step: 1 to 8.
CASES = [
    ("GPT-2 345M TP1 DP8 bf16", GPT2, 8, _fields(2, 8)),
    ("GPT-2 345M TP8 DP8 mb2 fp32", GPT2, 64, _fields(2, 64, tp=8, mb=2, precision="fp32")),
    ("GPT-2 345M TP2 PP2 DP4 m4 selective", GPT2, 16,
     _fields(4, 16, tp=2, pp=2, gbs=16, recompute="selective")),
    ("GPT-2 345M TP4 PP2 VP2 DP2 m4 full", GPT2, 16,
     _fields(4, 16, tp=4, pp=2, vp=2, gbs=8, recompute="full")),
    ("GPT-2 345M TP2 PP4 DP8 m8 SP DO selective", GPT2, 64,
     _fields(4, 64, tp=2, pp=4, gbs=64, recompute="selective", sp=True, do=True)),
    ("GPT-2 345M TP2 DP4 SP DO fp32", GPT2, 8, _fields(2, 8, tp=2, sp=True, do=True,
                                                     precision="fp32")),
    ("Llama-2 7B TP2 DP4 SP DO selective", LLAMA, 8,
     _fields(2, 8, tp=2, sp=True, do=True, recompute="selective")),
    ("Llama-2 7B TP4 PP2 VP2 DP4 m4", LLAMA, 32, _fields(4, 32, tp=4, pp=2, vp=2, gbs=16)),
    ("Llama-2 7B TP8 PP2 DP2 m4 SP full", LLAMA, 32,
     _fields(2, 32, tp=8, pp=2, gbs=8, sp=True, recompute="full")),
]


def case_config(path, overrides):
    """The (unfinalized) config of a case: ``path`` under the repository root, overridden."""
    from megatron.config import load_config
    return load_config(os.path.join(ROOT, path), overrides)


def compare(name, path, world, overrides, stages=None):
    """Rows of one case, one per pipeline stage dry-run (default: the first, the second and
    the last): the dry run's figures, the model's on its ``dry-run`` and ``cuda`` devices,
    and the relative errors (model vs dry run, %) of the activation and total peaks."""
    from megatron.config import finalize
    from megatron.dryrun import dry_run, global_rank
    from megatron.planning.layout import Layout, ModelShape
    from megatron.planning.memory_model import rank_memory
    cfg = case_config(path, overrides)
    final = finalize(copy.deepcopy(cfg), world)
    layout = Layout.from_config(final, world)
    shape = ModelShape.from_config(final, VOCAB[path])
    stages = stages if stages is not None else sorted({0, min(1, layout.pp - 1), layout.pp - 1})
    rows = []
    for stage in stages:
        report = dry_run(cfg, world, global_rank(0, stage, 0, world, layout.tp, layout.pp),
                         target="cuda", vocab_size=VOCAB[path])
        model = rank_memory(shape, layout, stage, device="dry-run")
        cuda = rank_memory(shape, layout, stage, device="cuda")
        dry = dict(params=report.parameter_bytes, grads=report.gradient_bytes,
                   masters=report.master_weight_bytes, optimizer_state=report.optimizer_state_bytes,
                   static=report.state_bytes, activations=report.activation_peak_bytes,
                   peak=report.peak_bytes, in_flight=report.in_flight_microbatches)
        ours = dict(params=model.params, grads=model.grads, masters=model.masters,
                    optimizer_state=model.optimizer_state, static=model.static,
                    activations=model.schedule_peak, peak=model.total, in_flight=model.in_flight)
        rows.append(dict(
            name=name, world=world, layout=layout.describe(), precision=layout.precision,
            stage=stage, microbatches=layout.num_microbatches, dry_run=dry, model=ours,
            cuda=dict(activations=cuda.schedule_peak, peak=cuda.total), detail=model.detail,
            seconds=report.seconds,
            error_pct={k: 100.0 * (ours[k] - dry[k]) / dry[k]
                       for k in ("static", "activations", "peak")}))
    return rows


def markdown_table(rows):
    """The rows as a Markdown table (MiB; errors of the model vs the dry run)."""
    def mib(n):
        return f"{n / 2 ** 20:,.1f}"
    lines = ["| case | ranks | stage | static MiB model / dry run | err | activations MiB "
             "model / dry run | err | peak MiB model / dry run | err | model on Triton (cuda): "
             "activations / peak MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m, d, e = r["model"], r["dry_run"], r["error_pct"]
        lines.append(f"| {r['name']} | {r['world']} | {r['stage']} | {mib(m['static'])} / "
                     f"{mib(d['static'])} | {e['static']:+.4f} % | {mib(m['activations'])} / "
                     f"{mib(d['activations'])} | {e['activations']:+.1f} % | {mib(m['peak'])} / "
                     f"{mib(d['peak'])} | {e['peak']:+.1f} % | {mib(r['cuda']['activations'])} / "
                     f"{mib(r['cuda']['peak'])} |")
    return "\n".join(lines)


__all__ = ["CASES", "VOCAB", "compare", "case_config", "markdown_table"]
