"""DPO losses against float64 references written the naive way (math module, one pair at a time)."""

from __future__ import annotations

import math
import random
from typing import get_args

import pytest

torch = pytest.importorskip("torch")

from rlhf.trainer.jobs import REFERENCE_FREE_LOSSES, DPOLossType  # noqa: E402
from rlhf.trainer.losses import LOSSES, REFERENCE_FREE, dpo_loss, preference_metrics  # noqa: E402

B = 64


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return math.exp(log_sigmoid(z))


def naive(kind: str, pc, pr, rc, rr, nc, nr, *, beta, eps=0.0, gamma=0.5, alpha=0.0):
    """(loss, chosen reward, rejected reward) of one pair, float64, straight from the formulas."""
    if kind in ("sigmoid", "hinge", "ipo"):
        h = (pc - rc) - (pr - rr)
        rew = (beta * (pc - rc), beta * (pr - rr))
    if kind == "sigmoid":
        loss = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    elif kind == "hinge":
        loss = max(0.0, 1 - beta * h)
    elif kind == "ipo":
        loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    elif kind == "reference_free":
        h = pc - pr
        loss = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        rew = (beta * pc, beta * pr)
    elif kind == "simpo":
        loss = -log_sigmoid(beta * (pc / nc - pr / nr) - gamma)
        rew = (beta * pc / nc, beta * pr / nr)
    return loss + alpha * (-pc / nc), rew[0], rew[1]


def random_batch(seed: int, dtype=torch.float64):
    """Sequence log-probs of realistic size (tens to hundreds of nats) and lengths."""
    rng = random.Random(seed)
    nc = [rng.randint(1, 60) for _ in range(B)]
    nr = [rng.randint(1, 60) for _ in range(B)]
    pc = [-rng.uniform(0.5, 6.0) * n for n in nc]
    pr = [-rng.uniform(0.5, 6.0) * n for n in nr]
    rc = [p + rng.gauss(0, 3) for p in pc]
    rr = [p + rng.gauss(0, 3) for p in pr]
    t = lambda xs: torch.tensor(xs, dtype=dtype)  # noqa: E731
    return [t(x) for x in (pc, pr, rc, rr)] + [torch.tensor(nc), torch.tensor(nr)]


CASES = [
    ("sigmoid", dict(beta=0.1)),
    ("sigmoid", dict(beta=0.5, eps=0.2)),  # conservative DPO
    ("hinge", dict(beta=0.1)),
    ("hinge", dict(beta=2.0)),
    ("ipo", dict(beta=0.1)),
    ("ipo", dict(beta=1.0)),
    ("reference_free", dict(beta=0.1)),
    ("reference_free", dict(beta=0.3, eps=0.1)),
    ("simpo", dict(beta=2.0, gamma=0.5)),
    ("simpo", dict(beta=2.5, gamma=1.4)),
    ("sigmoid", dict(beta=0.1, alpha=1.0)),  # RPO: + NLL on y_w
    ("ipo", dict(beta=0.5, alpha=0.3)),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_each_loss_matches_its_naive_float64_reference(case, dtype, tol):
    kind, kw = CASES[case]
    pc, pr, rc, rr, nc, nr = random_batch(100 + case, dtype)
    loss, cr, rj = dpo_loss(
        pc, pr, rc, rr, beta=kw["beta"], loss_type=kind, label_smoothing=kw.get("eps", 0.0),
        simpo_gamma=kw.get("gamma", 0.5), rpo_alpha=kw.get("alpha", 0.0), chosen_len=nc,
        rejected_len=nr,
    )
    assert loss.shape == cr.shape == rj.shape == (B,)
    assert loss.dtype == dtype
    for i in range(B):
        want = naive(kind, *(float(x[i]) for x in (pc, pr, rc, rr, nc, nr)), **kw)
        for got, ref in zip((loss[i], cr[i], rj[i]), want):
            assert abs(float(got) - ref) <= tol * max(1.0, abs(ref)), (kind, i, float(got), ref)
    assert not cr.requires_grad and not rj.requires_grad


def test_sigmoid_gradients_match_the_closed_form():
    """d/dπ_c of −(1−ε)log σ(βh) − ε log σ(−βh) is −β[(1−ε)σ(−βh) − εσ(βh)]; d/dπ_r its negative."""
    pc, pr, rc, rr, nc, nr = random_batch(7)
    for beta, eps in ((0.1, 0.0), (0.5, 0.25)):
        a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        loss, _, _ = dpo_loss(a, b, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=eps)
        loss.sum().backward()
        for i in range(B):
            h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
            d = -beta * ((1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h))
            assert abs(float(a.grad[i]) - d) < 1e-12
            assert abs(float(b.grad[i]) + d) < 1e-12


def test_sigmoid_gradients_in_float32_match_float64():
    pc, pr, rc, rr, _, _ = random_batch(11)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        a = pc.detach().to(dtype).requires_grad_()
        b = pr.detach().to(dtype).requires_grad_()
        dpo_loss(a, b, rc.to(dtype), rr.to(dtype), beta=0.1)[0].mean().backward()
        grads[dtype] = (a.grad.double(), b.grad.double())
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert torch.allclose(g32, g64, rtol=1e-4, atol=1e-9)


def test_at_the_reference_the_sigmoid_loss_is_log_2_and_rewards_are_zero():
    pc, pr, _, _, _, _ = random_batch(3)
    loss, cr, rj = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    assert not cr.any() and not rj.any()
    assert preference_metrics(cr, rj)["accuracy"] == 0.5  # ties count half


def test_the_registry_and_the_job_spec_name_the_same_losses():
    assert set(LOSSES) == set(get_args(DPOLossType)) == {
        "sigmoid", "hinge", "ipo", "reference_free", "simpo"}
    assert set(REFERENCE_FREE) == set(REFERENCE_FREE_LOSSES) == {"reference_free", "simpo"}


def test_reference_free_losses_ignore_the_reference_and_the_others_need_it():
    pc, pr, rc, rr, nc, nr = random_batch(5)
    for kind in REFERENCE_FREE:
        lens = dict(chosen_len=nc, rejected_len=nr)
        with_ref = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=kind, **lens)
        without = dpo_loss(pc, pr, None, None, beta=0.2, loss_type=kind, **lens)
        for x, y in zip(with_ref, without):
            assert torch.equal(x, y)
    for kind in set(LOSSES) - set(REFERENCE_FREE):
        with pytest.raises(ValueError, match="ref_chosen"):
            dpo_loss(pc, pr, None, None, beta=0.2, loss_type=kind, chosen_len=nc, rejected_len=nr)


def test_length_normalised_losses_need_lengths_and_unknown_types_are_refused():
    pc, pr, rc, rr, _, _ = random_batch(9)
    with pytest.raises(ValueError, match="chosen_len"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_len"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="kto")


def test_preference_metrics():
    m = preference_metrics(torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([0.0, 2.0, 1.5, 1.0]))
    assert m == pytest.approx({"accuracy": (1 + 0.5 + 0 + 1) / 4, "margin": (1 + 0 - 1 + 2) / 4,
                               "chosen_reward": 6.5 / 4, "rejected_reward": 4.5 / 4})
