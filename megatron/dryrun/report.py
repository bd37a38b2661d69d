"""What the dry run of one rank found (``DryRunReport``), and how it is printed."""
from dataclasses import asdict, dataclass, field

GIB = 2 ** 30


@dataclass
class DryRunReport:
    """One rank of a ``world_size``-rank job after one full training step on fake tensors.

    Memory figures are bytes of tensor storage on this rank (each storage once, views
    included in their base): ``parameter_bytes`` (the model chunks' parameters; with the
    distributed optimizer, the parameter buffer they are views of), ``gradient_bytes``
    (the DP gradient buffers, ``main_grad``), ``master_weight_bytes`` (fp32 copies of
    fp16/bf16 parameters, or the distributed optimizer's fp32 shards),
    ``optimizer_state_bytes`` (Adam's moments and step counters);
    ``activation_peak_bytes`` (the most the forward/backward schedule held above what
    was live when it started, with ``in_flight_microbatches`` micro batches held at
    once); ``first_step_peak_bytes`` (the peak of the first step, in which Adam creates
    its state after the activations are gone); ``peak_bytes`` (the peak of every later
    step: the figure to hold against the device's memory).

    ``collectives`` lists ``{"group", "kind", "calls", "bytes"}`` per step, groups
    ``tp``, ``sp`` (the TP group's all-gathers / reduce-scatters of sequence
    parallelism), ``pp``, ``dp``, ``mp``, ``embedding``, ``world``. ``flops`` are the
    FLOPs this rank's step ran (matrix products, as ``torch.utils.flop_counter`` counts
    them); ``formula_flops`` the paper's per-iteration formula (bench/flops.py) over
    the whole job divided by ``world_size``. ``host_reads`` counts the values the step
    read back to the host (``.item()`` and friends), each answered with zero (the
    common path: no overflow, a finite norm).

    ``simulated_microbatches``: how many of the step's ``layout["num_microbatches"]``
    the dry run ran (all, or as many as determine the peak: then the FLOPs, the
    collectives that come with each micro batch and the host reads are extrapolated to
    all of them; the memory figures are those of the step, exactly).
    """
    rank: int
    world_size: int
    role: str
    tensor_model_parallel_rank: int
    pipeline_model_parallel_rank: int
    data_parallel_rank: int
    layout: dict
    num_parameters: int
    parameter_bytes: int
    gradient_bytes: int
    master_weight_bytes: int
    optimizer_state_bytes: int
    activation_peak_bytes: int
    in_flight_microbatches: int
    first_step_peak_bytes: int
    peak_bytes: int
    collectives: list = field(default_factory=list)
    flops: int = 0
    formula_flops: float = 0.0
    host_reads: int = 0
    seconds: float = 0.0
    simulated_microbatches: int = 0

    @property
    def state_bytes(self):
        """Bytes kept between steps: parameters, gradients, masters, optimizer state."""
        return (self.parameter_bytes + self.gradient_bytes + self.master_weight_bytes
                + self.optimizer_state_bytes)

    def to_dict(self):
        """A JSON-ready dict of every field."""
        return asdict(self)

    def format(self):
        """The report as indented text lines (GiB with three decimals)."""
        def gib(n):
            return f"{n / GIB:9.3f} GiB"
        lay = self.layout
        lines = [
            f"rank {self.rank} of {self.world_size} ({self.role}: TP rank "
            f"{self.tensor_model_parallel_rank}, PP rank {self.pipeline_model_parallel_rank}, "
            f"DP rank {self.data_parallel_rank}); TP {lay['tp']} x PP {lay['pp']}"
            f"{' x VP ' + str(lay['vp']) if lay['vp'] > 1 else ''} x DP {lay['dp']}, "
            f"{lay['precision']}, recompute {lay['recompute']}"
            f"{', sequence parallel' if lay['sequence_parallel'] else ''}"
            f"{', distributed optimizer' if lay['distributed_optimizer'] else ''}, "
            f"micro batch {lay['micro_batch_size']} x {lay['num_microbatches']}",
        ]
        if 0 < self.simulated_microbatches < lay["num_microbatches"]:
            lines.append(f"  simulated {self.simulated_microbatches} of {lay['num_microbatches']} "
                         f"micro batches (the memory peak is theirs); counts extrapolated")
        lines += [
            f"  parameters        {self.num_parameters / 1e6:12.2f} M",
            f"  parameter bytes   {gib(self.parameter_bytes)}",
            f"  gradient buffer   {gib(self.gradient_bytes)}",
            f"  fp32 masters      {gib(self.master_weight_bytes)}",
            f"  optimizer state   {gib(self.optimizer_state_bytes)}",
            f"  activations peak  {gib(self.activation_peak_bytes)}  "
            f"({self.in_flight_microbatches} micro batch(es) in flight)",
            f"  peak, first step  {gib(self.first_step_peak_bytes)}",
            f"  peak              {gib(self.peak_bytes)}",
            f"  FLOPs per step    {self.flops / 1e12:12.3f} T (formula / world "
            f"{self.formula_flops / 1e12:.3f} T)",
            f"  host reads        {self.host_reads:12d} (answered as the common path)",
            "  collectives per step (group, kind: calls, bytes):",
        ]
        for c in self.collectives:
            lines.append(f"    {c['group']:>9} {c['kind']:<15} {c['calls']:6d}  "
                         f"{c['bytes'] / 2 ** 20:12.2f} MiB")
        lines.append(f"  dry run took {self.seconds:.1f} s")
        return lines
