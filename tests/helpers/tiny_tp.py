"""A tiny tensor-parallel model, its deterministic batches, an optimizer config and
a training loop: the common ground of the optimizer tests."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from megatron.config import Config
from megatron.mpu.layers import ColumnParallelLinear, RowParallelLinear

H, FFN, MB = 8, 16, 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _init(t):
    t.normal_(0.0, 0.4)


class TinyTP(torch.nn.Module):
    """LayerNorm -> column-parallel -> gelu -> row-parallel (+ residual) -> linear head,
    squared-error loss. Weights equal the TP=1 model's whatever the TP size."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = torch.nn.LayerNorm(H)
        with torch.no_grad():
            self.norm.weight.add_(0.1 * torch.randn(H))
            self.norm.bias.add_(0.1 * torch.randn(H))
        for p in self.norm.parameters():
            p.tensor_model_parallel = False
        self.fc1 = ColumnParallelLinear(H, FFN, gather_output=False, init_method=_init)
        self.fc2 = RowParallelLinear(FFN, H, input_is_parallel=True, init_method=_init)
        self.head = torch.nn.Linear(H, 1)
        for p in self.head.parameters():
            p.tensor_model_parallel = False
        self.to(dtype)

    def forward(self, x, y):
        a, _ = self.fc1(self.norm(x.to(self.head.weight.dtype)))
        b, _ = self.fc2(F.gelu(a))
        out = self.head(b + x.to(b.dtype)).squeeze(-1).float()
        return ((out - y) ** 2).mean()


def batch(step, micro, dp_rank, size=MB):
    """The deterministic micro batch ``micro`` of iteration ``step`` for DP rank ``dp_rank``."""
    g = torch.Generator().manual_seed(100_000 * step + 1000 * micro + dp_rank)
    x = torch.randn(size, H, generator=g)
    return x, torch.sin(x.sum(-1))


def run_iters(model, opt, start, n, num_micro=2):
    """``n`` training iterations from iteration ``start``; this rank's losses and step results."""
    from megatron.mpu.distributed import finalize_model_grads as finalize
    losses, steps = [], []
    dp = mpu.get_data_parallel_rank()
    for it in range(start, start + n):
        opt.zero_grad()
        total = 0.0
        for i in range(num_micro):
            x, y = batch(it, i, dp)
            loss = model(x, y) / num_micro
            opt.scale_loss(loss).backward()
            total += loss.item()
        finalize([model])
        steps.append(opt.step())
        losses.append(total)
    return losses, steps


def make_cfg(precision="fp32", distributed_optimizer=False, clip_grad=1.0, lr=1e-2, **opt):
    """A Config for get_megatron_optimizer."""
    cfg = Config()
    cfg.training.precision = precision
    cfg.parallel.distributed_optimizer = distributed_optimizer
    cfg.optimizer.clip_grad = clip_grad
    cfg.optimizer.lr = lr
    cfg.optimizer.weight_decay = 0.1
    for k, v in opt.items():
        setattr(cfg.optimizer, k, v)
    return cfg


def full_params(model):
    """Every param gathered over TP (full TP=1 tensors), by name."""
    out = {}
    tp = mpu.get_tensor_model_parallel_world_size()
    for name, p in model.named_parameters():
        t = p.detach().float()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=mpu.get_tensor_model_parallel_group())
            t = mpu.stride_merge(parts, p.partition_dim, getattr(p, "partition_stride", 1))
        out[name.removeprefix("module.")] = t.clone()
    return out
