"""Single-process optimizer checks: param groups, lr schedule, DDP grad buffer,
loss scaling with accumulation, exact resume of the mixed-precision optimizer."""
import copy
import io
import math

import pytest
import torch

from megatron.config import Config
from megatron.mpu.distributed import DistributedDataParallel
from megatron.optimizer import OptimizerParamScheduler, get_megatron_optimizer, get_param_groups
from tests.helpers.tiny_tp import TinyTP, batch, make_cfg, run_iters

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def test_no_weight_decay_on_biases_and_norms():
    model = TinyTP()
    decay, no_decay = get_param_groups([model], 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {"fc1.weight", "fc2.weight", "head.weight"}
    assert all(names[id(p)].endswith(".bias") or p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def _sched(style, warmup=10, decay=110, lr=1.0, min_lr=0.1):
    cfg = Config().optimizer
    cfg.lr, cfg.min_lr, cfg.lr_warmup_iters = lr, min_lr, warmup
    cfg.lr_decay_iters, cfg.lr_decay_style = decay, style
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    return OptimizerParamScheduler(opt, cfg, train_iters=1000), opt


def _lr_at(sched, n):
    sched.num_steps = 0
    sched.step(n)
    return sched.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_lr_schedule(style):
    s, opt = _sched(style)
    assert opt.param_groups[0]["lr"] == 0.0  # warmup starts at 0
    assert math.isclose(_lr_at(s, 5), 0.5)
    assert math.isclose(_lr_at(s, 10), 1.0)
    mid, end = _lr_at(s, 60), _lr_at(s, 110)
    if style == "constant":
        assert mid == end == 1.0
    else:
        assert math.isclose(mid, 0.55)  # halfway between lr and min_lr for both shapes
        assert math.isclose(end, 0.1) and _lr_at(s, 500) == 0.1
        quarter = _lr_at(s, 35)
        expect = 0.1 + 0.9 * ((1 + math.cos(math.pi / 4)) / 2 if style == "cosine" else 0.75)
        assert math.isclose(quarter, expect)
        lrs = [_lr_at(s, n) for n in range(10, 111)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # Resume: the step count comes back and the lr is applied at once.
    s.num_steps = 0
    s.step(42)
    t, opt2 = _sched(style)
    t.load_state_dict(s.state_dict())
    assert t.num_steps == 42 and opt2.param_groups[0]["lr"] == s.get_lr()


def test_lr_schedule_config_errors_name_values():
    with pytest.raises(ValueError, match="cosinus"):
        _sched("cosinus")
    with pytest.raises(ValueError, match="5.*10|10.*5"):
        _sched("linear", warmup=10, decay=5)


def test_ddp_accumulates_fp32_main_grad_and_keeps_module_keys():
    torch.manual_seed(0)
    bare = TinyTP(seed=1, dtype=torch.bfloat16)
    ref = TinyTP(seed=1, dtype=torch.float32)
    ddp = DistributedDataParallel(TinyTP(seed=1, dtype=torch.bfloat16))
    assert set(ddp.state_dict()) == set(bare.state_dict())
    bare.load_state_dict(ddp.state_dict())
    for i in range(3):
        x, y = batch(0, i, 0)
        ddp(x, y).backward()
        ref(x, y).backward()
    for (name, p), (_, r) in zip(ddp.module.named_parameters(), ref.named_parameters()):
        assert p.grad is None and p.main_grad.dtype == torch.float32, name
        # bf16 activations: about 3 significant digits per micro batch.
        torch.testing.assert_close(p.main_grad, r.grad, rtol=0.05, atol=0.02)
    # All main grads live in one buffer.
    buf = ddp.buffers_[0].data
    assert all(p.main_grad.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
               for p in ddp.module.parameters())
    ddp.zero_grad_buffer()
    assert float(buf.abs().sum()) == 0.0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_accumulation_with_loss_scaling_equals_one_big_batch(precision):
    # An fp32 model under the fp16 optimizer: the loss scale (2**10) and the
    # division by the micro-batch count are exact, so the grad norm and the
    # update of 4 x 2 samples must equal those of one batch of 8.
    def one_step(num_micro):
        model = DistributedDataParallel(TinyTP(seed=2))
        opt = get_megatron_optimizer(make_cfg(precision, clip_grad=1e9,
                                              initial_loss_scale=2.0 ** 10), [model])
        opt.zero_grad()
        x, y = batch(0, 0, 0, size=8)
        for xs, ys in zip(x.chunk(num_micro), y.chunk(num_micro)):
            opt.scale_loss(model(xs, ys) / num_micro).backward()
        ok, norm, _ = opt.step()
        assert ok
        return norm, {k: v.clone() for k, v in model.state_dict().items()}, opt

    norm_big, params_big, opt = one_step(1)
    norm_acc, params_acc, _ = one_step(4)
    assert float(opt.get_loss_scale()) == (2.0 ** 10 if precision == "fp16" else 1.0)
    assert math.isclose(norm_acc, norm_big, rel_tol=1e-5), (norm_acc, norm_big)
    for k in params_big:
        torch.testing.assert_close(params_acc[k], params_big[k], rtol=1e-5, atol=1e-6)


def _save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_exact_resume_of_optimizer_state(precision):
    def build():
        model = DistributedDataParallel(TinyTP(seed=4, dtype=DTYPES[precision]))
        opt = get_megatron_optimizer(make_cfg(precision, initial_loss_scale=2.0 ** 12,
                                              loss_scale_window=2), [model])
        return model, opt

    model, opt = build()
    run_iters(model, opt, 0, 3)
    model_state, opt_state = _save(model.state_dict()), _save(opt.state_dict())
    expect, _ = run_iters(model, opt, 3, 3)
    final = copy.deepcopy(model.state_dict())
    scaler_final = opt.grad_scaler.state_dict() if opt.grad_scaler else None

    model2, opt2 = build()
    model2.load_state_dict(model_state)
    opt2.load_state_dict(opt_state)
    got, _ = run_iters(model2, opt2, 3, 3)
    assert got == expect
    assert all(torch.equal(final[k], v) for k, v in model2.state_dict().items())
    if precision == "fp16":
        assert opt2.grad_scaler.state_dict() == scaler_final
        assert scaler_final["scale"] > 2.0 ** 12  # the window of 2 let it grow: state mattered


def test_reload_model_params_refreshes_masters():
    model = DistributedDataParallel(TinyTP(seed=4, dtype=torch.bfloat16))
    opt = get_megatron_optimizer(make_cfg("bf16"), [model])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt.reload_model_params()
    for p, master in opt._pairs:
        assert torch.equal(master, p.float())


def test_cpu_optimizer_is_fused_adamw_and_matches_foreach():
    """The builder picks torch's fused AdamW on CPU (this torch has it); its updates equal
    the foreach implementation's to rounding, so the choice changes speed, not training."""
    from megatron.optimizer import adamw_builder
    cfg = make_cfg("fp32")
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 7)]
    params = {kind: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                     for i, s in enumerate(shapes)] for kind in ("built", "foreach")}
    built = adamw_builder(cfg.optimizer, torch.device("cpu"))([{"params": params["built"]}])
    assert built.defaults["fused"] is True
    kwargs = {k: built.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
    ref = torch.optim.AdamW(params["foreach"], foreach=True, **kwargs)
    for _ in range(5):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for opt, ps in ((built, params["built"]), (ref, params["foreach"])):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            opt.step()
    for i, (a, b) in enumerate(zip(params["built"], params["foreach"])):
        initial = torch.randn(shapes[i], generator=torch.Generator().manual_seed(i))
        assert (a - initial).abs().max() > 100 * 1e-7  # the steps moved the params
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
