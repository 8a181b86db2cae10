# SPDX-License-Identifier: Apache-2.0
"""DeepSpeed's gates (deepspeed.moe.sharded_moe: top1gating, top2gating, topkgating) against
preset::deepspeed, preset::deepspeed_top2 and the compositions of driver.cpp, on the CPU.

Differences the frameworks' own code shows, kept as the library's behaviour and pinned here:
- l_aux: DeepSpeed takes ce (the 1st-choice fraction) as mask.float(), a float32 mean, so its
  l_aux carries float32 rounding even for float64 logits; the library's is exact in double
  (test_l_aux_float32_ce).
- top1gating without RTS keeps the top C of a 0/1 mask by torch.topk, which on the CPU does
  not return the lowest tied indices: which of an overflowing expert's tokens are kept is
  arbitrary there, so only kept counts and weights are compared (test_topk_ties_on_cpu).
- top2gating does not run with float64 logits (its einsum mixes them with a float32 mask and
  raises): it is compared in float32, selections exactly, weights to float32 rounding.
- topkgating's "probs" policy numbers the kept tokens of an expert in token order; the
  library's by_score numbers them in score order. The slot is a row of the [E, C, H] buffer,
  so only the layout differs: the kept sets and weights are compared.
"""

import itertools
import random
import warnings

import pytest
import torch

from conftest import WEIGHT_RTOL, as_rows, assert_close, random_logits, rel_err, run_library

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

FLOAT32_RTOL = 4e-6  # float32 softmax and ce, against the library's double

SHAPES = [(8, 2), (16, 4), (40, 4), (64, 8), (96, 16), (128, 64), (200, 8), (333, 32), (256, 64)]
FACTORS = [0.5, 1.0, 1.1, 1.2, 1.25, 2.0]


def sweep(count, seed, ks=(1,)):
    """`count` cases (T, E, k, f, min_capacity, seed) drawn from the grid."""
    grid = [(t, e, k, f, m) for (t, e), k, f, m in
            itertools.product(SHAPES, ks, FACTORS, (0, 4)) if k <= e and t >= m]
    rng = random.Random(seed)
    picked = rng.sample(grid, min(count, len(grid)))
    return [(t, e, k, f, m, seed * 1000 + i) for i, (t, e, k, f, m) in enumerate(picked)]


def kept_per_expert(expert, kept, experts):
    return torch.bincount(expert[kept], minlength=experts)


def exact_switch_aux(logits, expert, k):
    """E / (k·T) · Σ_e count_e · me_e in float64 (k = 1: GShard's E · Σ me · ce)."""
    tokens, experts = logits.shape
    me = torch.softmax(logits, dim=1).mean(dim=0)
    counts = torch.bincount(expert.flatten(), minlength=experts).to(torch.float64)
    return float(experts / (k * tokens) * (counts * me).sum())


@pytest.mark.parametrize("use_rts", [False, True])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_top1gating(use_rts, drop_tokens, report):
    cases = sweep(60, 1 + 2 * use_rts + drop_tokens)
    torch.manual_seed(0)  # RTS draws from torch's generator
    requests, theirs = [], []
    for tokens, experts, _, factor, min_capacity, seed in cases:
        logits = random_logits(seed, tokens, experts)
        l_aux, capacity, _, indices, locations, gates, counts = top1gating(
            logits.clone(), factor, min_capacity, drop_tokens=drop_tokens, use_rts=use_rts,
            sparse_routes=True)
        theirs.append((logits, float(l_aux), int(capacity), indices[0].long(), gates[0], counts))
        requests.append({"gate": "deepspeed", "logits": as_rows(logits),
                         "args": {"capacity_factor": factor if drop_tokens else 0.0,
                                  "min_capacity": min_capacity, "seed": seed}})
    weight_err = aux_err = 0.0
    results = run_library(requests)
    assert not drop_tokens or any(r["dropped"] > 0 for r in results)  # the sweep drops
    for (logits, l_aux, capacity, indices, gates, counts), ours in zip(theirs, results):
        experts = logits.shape[1]
        assert ours["capacity"] == capacity
        assert torch.equal(ours["load"], counts)
        assert torch.equal(ours["expert"][:, 0], torch.argmax(logits, dim=1))
        # Kept counts per expert, and each kept token's weight, its softmax score: which
        # tokens are kept depends on the draw (RTS) or on torch.topk's ties (no RTS).
        kept = indices >= 0
        assert torch.equal(kept_per_expert(ours["expert"][:, 0], ours["kept"][:, 0], experts),
                           torch.bincount(indices[kept], minlength=experts))
        chosen = ours["scores"].gather(1, ours["expert"][:, :1])[:, 0]
        weight_err = max(weight_err, assert_close(gates[kept], chosen[kept], WEIGHT_RTOL,
                                                  "weights"))
        assert torch.equal(ours["weight"][:, 0], torch.where(ours["kept"][:, 0], chosen, 0.0))
        # l_aux: exact in double here, float32-rounded ce in DeepSpeed.
        assert_close(ours["aux_loss"], exact_switch_aux(logits, ours["expert"][:, :1], 1),
                     WEIGHT_RTOL, "aux loss against float64")
        aux_err = max(aux_err, assert_close(ours["aux_loss"], l_aux, FLOAT32_RTOL, "l_aux"))
    name = f"top1gating(use_rts={use_rts}, drop_tokens={drop_tokens})"
    report.add(f"deepspeed {name} weights", "deepspeed", f"{name}: capacity, loads, kept counts, "
               "weights", len(cases), weight_err, preset="preset::deepspeed")
    report.add(f"deepspeed {name} l_aux", "deepspeed", f"{name}: l_aux (float32 ce)",
               len(cases), aux_err, preset="preset::deepspeed")


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_top2gating(drop_tokens, report):
    cases = sweep(60, 7 + drop_tokens, ks=(2,))
    requests, theirs = [], []
    for tokens, experts, _, factor, min_capacity, seed in cases:
        logits = random_logits(seed, tokens, experts).float()  # top2gating runs in float32 only
        l_aux, capacity, _, indices, locations, gates, counts = top2gating(
            logits.clone(), factor, min_capacity, drop_tokens=drop_tokens,
            top2_2nd_expert_sampling=False, sparse_routes=True)
        theirs.append((logits, float(l_aux), int(capacity), indices.long().t(),
                       locations.long().t(), gates.double().t(), counts))
        requests.append({"gate": "deepspeed_top2", "logits": as_rows(logits),
                         "args": {"capacity_factor": factor if drop_tokens else 0.0,
                                  "min_capacity": min_capacity}})
    weight_err = 0.0
    results = run_library(requests)
    assert not drop_tokens or any(r["dropped"] > 0 for r in results)
    for (logits, l_aux, capacity, indices, locations, gates, counts), ours in zip(theirs, results):
        kept = indices >= 0
        assert ours["capacity"] == capacity
        assert torch.equal(ours["load"], counts)
        assert torch.equal(ours["kept"], kept)
        selected = torch.topk(logits.double(), 2, dim=1).indices  # no ties in these draws
        assert torch.equal(ours["expert"], selected)
        assert torch.equal(ours["slot"][kept], locations[kept])
        weight_err = max(weight_err, assert_close(ours["weight"], gates, FLOAT32_RTOL, "weights"))
        assert_close(ours["aux_loss"], l_aux, FLOAT32_RTOL, "l_aux")
    name = f"top2gating(top2_2nd_expert_sampling=False, drop_tokens={drop_tokens}), float32"
    report.add(f"deepspeed {name}", "deepspeed", f"{name}: capacity, kept assignments and slots "
               "exact; weights, l_aux", len(cases), weight_err,
               preset="preset::deepspeed_top2")


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_topkgating(drop_policy, drop_tokens, report):
    cases = sweep(80, 11 + 2 * (drop_policy == "probs") + drop_tokens, ks=(1, 2, 3, 4, 6, 8))
    requests, theirs = [], []
    for tokens, experts, k, factor, min_capacity, seed in cases:
        logits = random_logits(seed, tokens, experts)
        l_aux, capacity, _, indices, locations, gates, counts = topkgating(
            logits.clone(), k, factor, min_capacity, drop_tokens=drop_tokens,
            drop_policy=drop_policy, sparse_routes=True)
        theirs.append((logits, k, float(l_aux), int(capacity), indices.long().t(),
                       locations.long().t(), gates.t(), counts))
        requests.append({"gate": f"deepspeed_topk_{drop_policy}", "logits": as_rows(logits),
                         "args": {"k": k, "capacity_factor": factor if drop_tokens else 0.0,
                                  "min_capacity": min_capacity, "normalize": "after_drops"}})
    weight_err = aux_err = 0.0
    results = run_library(requests)
    assert not drop_tokens or any(r["dropped"] > 0 for r in results)
    for (logits, k, l_aux, capacity, indices, locations, gates, counts), ours in zip(
            theirs, results):
        experts = logits.shape[1]
        kept = indices >= 0
        assert ours["capacity"] == capacity
        assert torch.equal(ours["load"], counts)
        assert torch.equal(ours["expert"], torch.topk(logits, k, dim=1).indices)
        assert torch.equal(ours["kept"], kept)
        if drop_policy == "position":
            assert torch.equal(ours["slot"][kept], locations[kept])
        else:  # kept tokens numbered in token order there, in score order here
            for e in range(experts):
                ours_e = ours["slot"][kept & (ours["expert"] == e)].sort().values
                theirs_e = locations[kept & (indices == e)].sort().values
                assert torch.equal(ours_e, theirs_e)
        weight_err = max(weight_err, assert_close(ours["weight"], gates, WEIGHT_RTOL, "weights"))
        assert_close(ours["aux_loss"], exact_switch_aux(logits, ours["expert"], k), WEIGHT_RTOL,
                     "aux loss against float64")
        aux_err = max(aux_err, assert_close(ours["aux_loss"], l_aux, FLOAT32_RTOL, "l_aux"))
    name = f"topkgating(drop_policy={drop_policy}, drop_tokens={drop_tokens})"
    report.add(f"deepspeed {name}", "deepspeed", f"{name}: capacity, kept assignments exact; "
               "weights", len(cases), weight_err, preset=f"top_any<softmax>, deepspeed_capacity, "
               f"{'by_score' if drop_policy == 'probs' else 'token_major'}, switch_aux")
    report.add(f"deepspeed {name} l_aux", "deepspeed", f"{name}: l_aux (float32 ce)",
               len(cases), aux_err, preset="top_any<softmax>, switch_aux")


def test_l_aux_float32_ce():
    """DeepSpeed's l_aux is E · Σ me · ce with ce a float32 mean: it differs from the exact
    double value by float32 rounding, which the library does not reproduce."""
    logits = random_logits(5, 40, 4)
    l_aux, *_ = top1gating(logits.clone(), 1.0, 4, use_rts=False, sparse_routes=True)
    expert = torch.argmax(logits, dim=1)[:, None]
    exact = exact_switch_aux(logits, expert, 1)
    counts = torch.bincount(expert[:, 0], minlength=4)
    ce32 = (counts.float() / 40).double()  # the float32 fractions
    me = torch.softmax(logits, dim=1).mean(dim=0)
    assert rel_err(float(l_aux), exact) > 1e-12
    assert float(l_aux) == pytest.approx(float(4 * (me * ce32).sum()), rel=1e-15)
    ours = run_library([{"gate": "deepspeed", "logits": as_rows(logits),
                         "args": {"capacity_factor": 1.0}}])[0]
    assert ours["aux_loss"] == pytest.approx(exact, rel=1e-15)


def test_topk_ties_on_cpu():
    """torch.topk over a column of equal values on the CPU does not return its lowest indices,
    so top1gating without RTS (and Megatron's "position" policy) keep an arbitrary choice
    among an overflowing expert's tokens: the tests compare kept counts there."""
    ones = torch.ones(64, 1, dtype=torch.int64)
    picked = torch.topk(ones, k=10, dim=0).indices[:, 0].sort().values
    assert not torch.equal(picked, torch.arange(10))


def test_capacity_float32():
    """DeepSpeed's capacity is float32 arithmetic on the double factor (the library's
    deepspeed_capacity does the same): T = 25, E = 2, f = 1.2 gives 16, where double gives 15."""
    logits = random_logits(3, 25, 2)
    _, capacity, *_ = top1gating(logits.clone(), 1.2, 0, use_rts=False, sparse_routes=True)
    assert int(capacity) == 16
    ours = run_library([{"gate": "deepspeed", "logits": as_rows(logits),
                         "args": {"capacity_factor": 1.2, "min_capacity": 0}}])[0]
    assert ours["capacity"] == 16
