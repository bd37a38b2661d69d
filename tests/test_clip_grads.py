"""Global grad norm and clipping across TP x DP ranks, and finalize_model_grads' sums.

The distributed half runs in the optimizer tests' shared 4-process launch
(tests/helpers/optimizer_launch.py, ``clip_body``).
"""
import math

import torch

from megatron.optimizer.clip_grads import counts_toward_norm
from tests.helpers.optimizer_launch import CLIP, CLIP_NUM_MICRO, distributed_results
from tests.helpers.tiny_tp import TinyTP, batch


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
    num_micro, clip = CLIP_NUM_MICRO, CLIP  # as in the shared launch
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
