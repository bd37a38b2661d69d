"""The memory model's validation: small layouts measured for real on CPU, and its predictions.

``LAYOUTS`` covers TP, PP (1F1B and interleaved), DP, sequence parallelism,
recompute none / selective / full, the distributed optimizer and fp32 / bf16 /
fp16, and (``LLAMA``) today's decoder with all its options. ``measure_layouts`` runs on every rank of a gloo group (spawned by
``bench/memory_model.py`` or the test) and measures each layout of that world
size in turn; ``predicted_rows`` sets the model's figure beside each
measurement.
"""
from megatron.planning.layout import Layout, ModelShape
from megatron.planning.memory_model import rank_memory

# name, world size, and the config fields that differ from the defaults.
LAYOUTS = [
    dict(name="TP1 fp32", world=1, fields={}),
    dict(name="TP1 fp32 selective", world=1, fields={"training.recompute": "selective"}),
    dict(name="TP1 bf16 full", world=1, fields={"training.precision": "bf16",
                                                  "training.recompute": "full"}),
    dict(name="TP2 fp32", world=2, fields={"parallel.tensor_model_parallel_size": 2}),
    dict(name="TP2 SP fp32 selective", world=2,
         fields={"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
                 "training.recompute": "selective"}),
    dict(name="PP2 1F1B m4 fp32", world=2,
         fields={"parallel.pipeline_model_parallel_size": 2, "training.global_batch_size": 8}),
    dict(name="PP2 VP2 m4 fp32", world=2,
         fields={"parallel.pipeline_model_parallel_size": 2,
                 "parallel.virtual_pipeline_model_parallel_size": 2,
                 "training.global_batch_size": 8}),
    dict(name="DP2 distopt bf16", world=2,
         fields={"parallel.distributed_optimizer": True, "training.precision": "bf16"}),
    dict(name="TP2 PP2 fp16 full", world=4,
         fields={"parallel.tensor_model_parallel_size": 2,
                 "parallel.pipeline_model_parallel_size": 2, "training.precision": "fp16",
                 "training.recompute": "full", "training.global_batch_size": 4,
                 # A scale that does not overflow, so that the steps (and Adam state) happen.
                 "optimizer.initial_loss_scale": 1024.0}),
    dict(name="TP2 DP2 SP distopt fp32", world=4,
         fields={"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
                 "parallel.distributed_optimizer": True}),
]

# Today's decoder with every option on (docs/models.md): RoPE, RMSNorm, SwiGLU, two query
# groups of the four heads, no biases, an untied output layer, no dropout (as Llama).
LLAMA = {"model.position_embedding_type": "rope", "model.normalization": "RMSNorm",
         "model.activation": "swiglu", "model.num_query_groups": 2,
         "model.add_bias_linear": False, "model.untie_embeddings_and_output_weights": True,
         "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}
LAYOUTS += [
    dict(name="Llama TP2 SP bf16 selective", world=2,
         fields={**LLAMA, "parallel.tensor_model_parallel_size": 2,
                 "parallel.sequence_parallel": True, "training.precision": "bf16",
                 "training.recompute": "selective"}),
    dict(name="Llama PP2 VP2 m4 fp32", world=2,
         fields={**LLAMA, "parallel.pipeline_model_parallel_size": 2,
                 "parallel.virtual_pipeline_model_parallel_size": 2,
                 "training.global_batch_size": 8}),
    dict(name="Llama DP2 distopt bf16 full", world=2,
         fields={**LLAMA, "parallel.distributed_optimizer": True, "training.precision": "bf16",
                 "training.recompute": "full"}),
]


def build_config(spec, model, world_size):
    """The finalized config of one validation layout on a small model (``model``: the shape
    fields and ``micro_batch_size``, ``vocab_size``)."""
    from megatron.config import Config, finalize
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size = model["num_layers"], model["hidden_size"]
    m.num_attention_heads, m.seq_length = model["num_attention_heads"], model["seq_length"]
    cfg.training.micro_batch_size = model["micro_batch_size"]
    cfg.training.train_iters = 10
    for key, value in spec["fields"].items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return finalize(cfg, world_size)


def measure_layouts(specs, model):
    """On this rank: measure each layout of ``specs`` (all of this world size) in turn.
    Returns one dict per layout: name, pipeline rank, the measured bytes."""
    from megatron import mpu
    from megatron.planning.measure import measure_step_memory
    rows = []
    for spec in specs:
        cfg = build_config(spec, model, mpu.get_global_world_size())
        p = cfg.parallel
        mpu.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                      p.virtual_pipeline_model_parallel_size)
        try:
            result = measure_step_memory(cfg, model["vocab_size"])
            rows.append(dict(name=spec["name"], world=spec["world"],
                             pipeline_rank=mpu.get_pipeline_model_parallel_rank(), **result))
        finally:
            mpu.destroy_model_parallel()
    return rows


def predicted_rows(measured, model):
    """Each measurement of ``measured`` ({(name, pipeline rank): row}) with the model's
    prediction for that rank (CPU kernels) and the relative errors, in LAYOUTS order."""
    specs = {s["name"]: s for s in LAYOUTS}
    rows = []
    for (name, pp_rank), row in sorted(measured.items(),
                                       key=lambda kv: ([s["name"] for s in LAYOUTS].index(kv[0][0]),
                                                       kv[0][1])):
        cfg = build_config(specs[name], model, specs[name]["world"])
        shape = ModelShape.from_config(cfg, model["vocab_size"])
        layout = Layout.from_config(cfg, specs[name]["world"])
        pred = rank_memory(shape, layout, pp_rank, device="cpu")
        rows.append(dict(row, predicted=pred.total, detail=pred.detail,
                         predicted_static=pred.static,
                         error_pct=100.0 * (pred.total - row["peak"]) / row["peak"],
                         step_error_pct=100.0 * ((pred.total - pred.static)
                                                 - row["step_peak"]) / row["step_peak"]))
    return rows
