"""The Megatron-LM paper's weak-scaling study (Shoeybi et al. 2019, Table 1 and Figure 5).

Four GPT-2 models, each on as many GPUs of tensor ("model") parallelism as its
size needs, batch 8 per model replica, V100 32GB in DGX-2H servers; then the
same with 64-way data parallelism on top (64 to 512 GPUs). The efficiencies are
the paper's: per-GPU throughput over the single-GPU baseline (1.2B parameters,
39 TFLOP/s, 30 % of peak). ``predicted_scaling`` sets the time model's beside them.
"""
from megatron.planning.layout import GPT2_VOCAB_SIZE, Layout, ModelShape

BASELINE_FLOPS = 39e12  # FLOP/s of the 1.2B model on one GPU (paper, sec. 5.1)

# name: (layers, hidden, heads, tensor-parallel GPUs), as configs/gpt2_<name>.yaml.
MODELS = {
    "1.2B": (40, 1536, 16, 1),
    "2.5B": (54, 1920, 20, 2),
    "4.2B": (64, 2304, 24, 4),
    "8.3B": (72, 3072, 32, 8),
}
# Figure 5: weak-scaling efficiency (%), model parallel alone and with 64-way DP.
MODEL_PARALLEL_EFFICIENCY = {"1.2B": 100, "2.5B": 95, "4.2B": 82, "8.3B": 77}
MODEL_DATA_PARALLEL_EFFICIENCY = {"1.2B": 96, "2.5B": 83, "4.2B": 79, "8.3B": 74}
DATA_PARALLEL = 64


def paper_shape(name):
    """The ``ModelShape`` of one of the paper's models (GPT-2 vocabulary, s = 1024)."""
    layers, hidden, heads, _ = MODELS[name]
    return ModelShape(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      ffn_hidden_size=4 * hidden, seq_length=1024, vocab_size=GPT2_VOCAB_SIZE,
                      max_position_embeddings=1024)


def paper_layout(tp, dp):
    """The paper's runs: fp16 with fp32 masters, activations recomputed per layer, batch 8
    per replica in one micro batch, fp16 gradients all-reduced (its code's default)."""
    return Layout(tp=tp, pp=1, dp=dp, micro_batch=8, num_microbatches=1, recompute="full",
                  precision="fp16", grad_fp32=False)


def predicted_scaling(hw, compute_efficiency, gpus_per_node=None):
    """Rows of (model, GPUs, predicted %, paper %) for both studies, model-parallel first,
    and the predicted per-GPU FLOP/s."""
    from megatron.planning.time_model import step_time
    rows = []
    for dp, paper in ((1, MODEL_PARALLEL_EFFICIENCY), (DATA_PARALLEL, MODEL_DATA_PARALLEL_EFFICIENCY)):
        for name, (_, _, _, tp) in MODELS.items():
            st = step_time(paper_shape(name), paper_layout(tp, dp), hw, compute_efficiency,
                           gpus_per_node)
            flops = st.hardware_flops_per_device()
            rows.append(dict(model=name, gpus=tp * dp, tp=tp, dp=dp,
                             predicted=100.0 * flops / BASELINE_FLOPS, paper=float(paper[name]),
                             flops_per_gpu=flops, step_seconds=st.total, time=st))
    return rows
