"""Global grad norm and clipping across TP x DP ranks, and finalize_model_grads' sums.

Also holds the tiny tensor-parallel model the other optimizer tests share.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from megatron.config import Config
from megatron.mpu.distributed import DistributedDataParallel, finalize_model_grads
from megatron.mpu.layers import ColumnParallelLinear, RowParallelLinear
from megatron.optimizer import get_megatron_optimizer
from megatron.optimizer.clip_grads import counts_toward_norm, get_grad_norm
from tests.dist_harness import run_distributed

H, FFN, MB = 8, 16, 4


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
            t = torch.cat(parts, dim=p.partition_dim)
        out[name.removeprefix("module.")] = t.clone()
    return out


# ---- distributed body ---------------------------------------------------------

def _tp_dp_clip_body(num_micro, clip):
    mpu.initialize_model_parallel(2, 1)
    res = {}
    model = DDP = DistributedDataParallel(TinyTP(), accumulate_allreduce_grads_in_fp32=True)
    opt = get_megatron_optimizer(make_cfg(clip_grad=clip), [model])
    opt.zero_grad()
    dp = mpu.get_data_parallel_rank()
    for i in range(num_micro):
        x, y = batch(0, i, dp)
        (model(x, y) / num_micro).backward()
    finalize_model_grads([model])
    counted = [p.main_grad for p in model.parameters() if counts_toward_norm(p)]
    res["norm"] = get_grad_norm(counted)
    ok, res["step_norm"], _ = opt.step()
    res["ok"] = ok
    res["params"] = full_params(DDP)

    # finalize_model_grads: a sequence_parallel param is summed over TP, then
    # every param averaged over DP.
    holder = torch.nn.Module()
    holder.sp = torch.nn.Parameter(torch.zeros(3))
    holder.sp.sequence_parallel = True
    holder.plain = torch.nn.Parameter(torch.zeros(3))
    ddp = DistributedDataParallel(holder)
    me = dist.get_rank()
    ddp.module.sp.main_grad.fill_(me + 1)
    ddp.module.plain.main_grad.fill_(me + 1)
    finalize_model_grads([ddp])
    layout = [None] * dist.get_world_size()
    dist.all_gather_object(layout, (mpu.get_tensor_model_parallel_global_ranks(),
                                    mpu.get_data_parallel_global_ranks()))
    tp_of = {r: layout[r][0] for r in range(len(layout))}
    dp_ranks = layout[me][1]
    res["sp_expected"] = sum(sum(t + 1 for t in tp_of[d]) for d in dp_ranks) / len(dp_ranks)
    res["plain_expected"] = sum(d + 1 for d in dp_ranks) / len(dp_ranks)
    res["sp"] = ddp.module.sp.main_grad.clone()
    res["plain"] = ddp.module.plain.main_grad.clone()
    mpu.destroy_model_parallel()

    # PP=2: the tied embedding's grads are summed over the embedding group; the
    # last stage's copy (shared_embedding) is left out of the norm.
    mpu.initialize_model_parallel(1, 2)
    stage = mpu.get_pipeline_model_parallel_rank()
    holder = torch.nn.Module()
    holder.emb = torch.nn.Parameter(torch.zeros(4))
    holder.emb.tied_embedding = True
    if stage == 1:
        holder.emb.shared_embedding = True
    holder.own = torch.nn.Parameter(torch.zeros(2))
    ddp = DistributedDataParallel(holder)
    ddp.module.emb.main_grad.copy_(torch.arange(4.0) * (stage + 1))
    ddp.module.own.main_grad.fill_(stage + 2.0)
    finalize_model_grads([ddp])
    res["emb"] = ddp.module.emb.main_grad.clone()
    counted = [p.main_grad for p in holder.parameters() if counts_toward_norm(p)]
    res["pp_norm"] = get_grad_norm(counted)
    mpu.destroy_model_parallel()
    return res


def _all_checks():
    # One 4-rank launch runs the distributed checks of all the optimizer test
    # files: process start-up dominates their cost on a small CPU box.
    from tests.test_distributed_optimizer import _body as distopt_body
    from tests.test_mixed_precision import _inf_body
    return {"clip": _tp_dp_clip_body(2, 0.05), "distopt": distopt_body(6), "inf": _inf_body(3)}


_RESULTS = {}


def distributed_results(key):
    """Per-rank results of check ``key`` from the shared 4-rank launch (run once
    per pytest session; a failure is re-raised by every test that asks)."""
    if "all" not in _RESULTS:
        try:
            _RESULTS["all"] = run_distributed(_all_checks, 4)
        except BaseException as e:  # remember it: do not relaunch for each test
            _RESULTS["all"] = e
    got = _RESULTS["all"]
    if isinstance(got, BaseException):
        raise AssertionError(f"shared distributed launch failed: {got}")
    return [r[key] for r in got]


def _serial_reference(num_micro, clip, lr=1e-2, wd=0.1):
    model = TinyTP()
    for i in range(num_micro):
        xs, ys = zip(*(batch(0, i, r) for r in range(2)))
        (model(torch.cat(xs), torch.cat(ys)) / num_micro).backward()
    params = list(model.parameters())
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    coeff = clip / (norm + 1e-6)
    if coeff < 1:
        for p in params:
            p.grad.mul_(coeff)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() == 1]
    torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                       {"params": no_decay, "weight_decay": 0.0}], lr=lr).step()
    return norm, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_clip_norm_tp2_dp2_equals_serial_and_finalize_sums():
    num_micro, clip = 2, 0.05  # as in _all_checks
    results = distributed_results("clip")
    norm, params = _serial_reference(num_micro, clip)
    assert norm > clip  # so that clipping really happens
    for r in results:
        assert math.isclose(r["norm"], norm, rel_tol=1e-5), (r["norm"], norm)
        assert math.isclose(r["step_norm"], norm, rel_tol=1e-5)
        assert r["ok"]
        for name, ref in params.items():
            torch.testing.assert_close(r["params"][name], ref, rtol=1e-5, atol=1e-6)
        assert torch.all(r["sp"] == r["sp_expected"]), (r["sp"], r["sp_expected"])
        assert torch.all(r["plain"] == r["plain_expected"])
    # PP ranks 0,1 are stage 0 and 2,3 stage 1; the embedding grad is the sum
    # over both stages, counted once in the norm.
    emb_sum = torch.arange(4.0) * 1 + torch.arange(4.0) * 2
    own = [2.0, 3.0]
    pp_norm = math.sqrt(float(emb_sum.pow(2).sum()) + 2 * own[0] ** 2 + 2 * own[1] ** 2)
    for r in results:
        torch.testing.assert_close(r["emb"], emb_sum)
        assert math.isclose(r["pp_norm"], pp_norm, rel_tol=1e-6), (r["pp_norm"], pp_norm)


def test_counts_toward_norm_flags():
    p = torch.nn.Parameter(torch.zeros(1))
    assert counts_toward_norm(p)  # replicated, and TP rank is 0 outside a group
    p.tensor_model_parallel = True
    assert counts_toward_norm(p)
    p.shared_embedding = True
    assert not counts_toward_norm(p)
