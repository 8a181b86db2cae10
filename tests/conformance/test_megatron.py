# SPDX-License-Identifier: Apache-2.0
"""Megatron-Core's TopKRouter (megatron.core.transformer.moe.router) against preset::megatron
and the compositions of driver.cpp that match its flags, on the CPU: TopKRouter.routing on
float64 logits in a one-process gloo group.

Differences the framework's own code shows, kept as the library's behaviour and pinned here:
- Megatron takes its softmax with dtype=torch.float32 and its sigmoid of logits.float(),
  whatever the logits' dtype (moe_router_dtype fp64 included): its probabilities, the aux
  loss and the gradients through them carry float32 rounding. They are compared to float32
  rounding; the selections, kept assignments and the z-loss (float64 there) exactly.
- The "position" drop policy keeps the top C of a 0/1 map by torch.topk, whose ties on the
  CPU are not the lowest indices (test_deepspeed.test_topk_ties_on_cpu): kept counts and the
  weights of the tokens both keep are compared there.
- The aux loss counts the plain top-k of the unbiased scores, without the expert bias and
  the group limit; the library's counts the experts it selected (test_aux_loss_counts).
"""

import os
import random
import warnings

import pytest
import torch

from conftest import OUTPUT_RTOL, WEIGHT_RTOL, as_rows, assert_close, dense, random_logits, \
    run_library

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import router as megatron_router
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

FLOAT32_RTOL = 4e-6


@pytest.fixture(scope="module", autouse=True)
def process_group():
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


recorded = {}


def _record(name, loss, *args, **kwargs):
    recorded[name] = float(loss.detach())


@pytest.fixture(autouse=True)
def record_losses(monkeypatch):
    """The router hands each loss (divided by its coefficient) to the logging tracker; keep
    the double value instead of the tracker's."""
    recorded.clear()
    monkeypatch.setattr(megatron_router, "save_to_aux_losses_tracker", _record)


def make_router(experts, k, expert_bias=None, **flags):
    world = dist.group.WORLD
    groups = ProcessGroupCollection(tp=world, cp=world, tp_cp=world, tp_dp_cp=world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                   num_moe_experts=experts, moe_router_topk=k,
                                   params_dtype=torch.float64, use_cpu_initialization=True,
                                   moe_router_dtype="fp64", **flags)
        r = TopKRouter(config, pg_collection=groups)
    r.set_layer_number(1)
    if expert_bias is not None:  # the constructor puts the bias on a CUDA device
        r.enable_expert_bias = True
        r.expert_bias = expert_bias.clone()
        r.local_tokens_per_expert = torch.zeros(experts, dtype=torch.float32)
    return r


SCORES = {"softmax_topk": {}, "softmax": {"moe_router_pre_softmax": True},
          "sigmoid": {"moe_router_score_function": "sigmoid"}}


def route_both(cases):
    """cases: dicts with tokens, experts, k, seed, score, policy, factor (None: dropless),
    pad, scale, aux (loss type or None), coef, z_coef, bias, groups (N, M) or None, bsz.
    Returns [(case, logits, theirs, ours)]."""
    requests, theirs = [], []
    for c in cases:
        tokens, experts, k = c["tokens"], c["experts"], c["k"]
        bsz = c.get("bsz", 1)
        logits = random_logits(c["seed"], tokens, experts, scale=c.get("logit_scale", 1.0))
        flags = dict(SCORES[c["score"]])
        if c.get("factor") is not None:
            flags.update(moe_expert_capacity_factor=c["factor"], moe_token_drop_policy=c["policy"],
                         moe_pad_expert_input_to_capacity=c.get("pad", False))
        if c.get("scale"):
            flags["moe_router_topk_scaling_factor"] = c["scale"]
        if c.get("groups"):
            flags.update(moe_router_num_groups=c["groups"][0], moe_router_group_topk=c["groups"][1])
        flags["moe_router_load_balancing_type"] = c.get("aux") or "none"
        flags["moe_aux_loss_coeff"] = c.get("coef", 0.0) if c.get("aux") else 0.0
        if c.get("z_coef"):
            flags["moe_z_loss_coeff"] = c["z_coef"]
        bias = c.get("bias")
        r = make_router(experts, k, expert_bias=bias, **flags)
        # Megatron's tokens are [seq, bsz] flattened: token s·bsz + b. The library's local
        # groups are contiguous: it gets them as b·S + s.
        seq = tokens // bsz
        order = torch.arange(tokens).view(seq, bsz).t().reshape(-1)
        x = logits.clone().view(seq, bsz, experts).requires_grad_(True)
        recorded.clear()
        probs, routing_map = r.routing(x)
        d_probs = random_logits(c["seed"] + 7, tokens, experts)
        (probs * d_probs).sum().backward()
        theirs.append({"probs": probs.detach(), "map": routing_map, "d_logits": x.grad.view(
            tokens, experts), "aux": recorded.get("load_balancing_loss",
                                                   recorded.get("seq_load_balancing_loss")),
                       "z": recorded.get("z_loss"), "order": order, "d_probs": d_probs})
        score = c["score"] + (f"_groups_{c['groups'][0]}_{c['groups'][1]}" if c.get("groups")
                              else "")
        prefix = "megatron" if c.get("factor") is not None else (
            "megatron_dropless_seq" if c.get("aux") == "seq_aux_loss" else "megatron_dropless")
        args = {"k": k, "capacity_factor": c.get("factor") or 0.0,
                "scaling_factor": c.get("scale") or 1.0, "groups": bsz,
                "aux_loss_coef": flags["moe_aux_loss_coeff"], "z_loss_coef": c.get("z_coef", 0.0)}
        if bias is not None:
            args["expert_bias"] = [float(b) for b in bias]
        requests.append({"gate": f"{prefix}_{score}_{c.get('policy', 'probs')}",
                         "logits": as_rows(logits[order]), "args": args})
    results = []
    for req, t, ours in zip(requests, theirs, run_library_with_grad(requests, theirs)):
        results.append((req, t, ours))
    return results


def run_library_with_grad(requests, theirs):
    """Routes once for the experts, then again with d_weight = d_probs at those experts."""
    first = run_library(requests)
    for req, t, ours in zip(requests, theirs, first):
        d = t["d_probs"][t["order"]]
        req["d_weight"] = as_rows(d.gather(1, ours["expert"]))
    return run_library(requests)


def back(t, values):
    """Rows of the library's token order (b·S + s) back in Megatron's (s·bsz + b)."""
    out = torch.empty_like(values)
    out[t["order"]] = values
    return out


def compare(results, exact_kept=True, rtol=FLOAT32_RTOL):
    worst = 0.0
    for req, t, ours in results:
        experts = t["probs"].shape[1]
        kept = back(t, dense(ours["expert"], ours["kept"].to(torch.float64), experts)) > 0
        weight = back(t, dense(ours["expert"], ours["weight"], experts))
        if exact_kept:
            assert torch.equal(kept, t["map"]), req["gate"]
            worst = max(worst, assert_close(weight, t["probs"], rtol, "weights"))
        else:
            assert torch.equal(kept.sum(0), t["map"].sum(0))
            both = kept & t["map"]
            worst = max(worst, assert_close(weight[both], t["probs"][both], rtol, "weights"))
        if t["aux"] is not None:
            worst = max(worst, assert_close(ours["aux_loss"], t["aux"], rtol, "aux loss"))
        if t["z"] is not None:
            assert_close(ours["z_loss"], t["z"], WEIGHT_RTOL, "z-loss")
        if exact_kept or torch.equal(kept, t["map"]):  # the gradient follows the kept set
            worst = max(worst, assert_close(back(t, ours["d_w_gate"]), t["d_logits"], rtol,
                                            "d_logits"))
    return worst


SHAPES = [(16, 4), (40, 8), (64, 8), (96, 16), (128, 32), (200, 64), (256, 16)]


def sweep(count, seed, ks=(1, 2, 4, 8), score=None, vary=None, **fixed):
    """`count` cases of random shapes from `seed`, each with the `fixed` settings and those
    `vary(i, case)` returns for the i-th."""
    if score == "softmax_topk":  # Megatron asks for pre-softmax at k = 1
        ks = tuple(k for k in ks if k > 1)
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        tokens, experts = rng.choice(SHAPES)
        k = rng.choice([k for k in ks if k <= experts])
        case = {"tokens": tokens, "experts": experts, "k": k, "seed": seed * 1000 + i, **fixed}
        if score is not None:
            case["score"] = score
        if vary is not None:
            case.update(vary(i, case))
        cases.append(case)
    return cases


def route_and_report(report, name, compared, preset, cases, **options):
    """Routes `cases` through Megatron-Core and the library, compares them (compare's
    `options`) and adds the largest error to the README's table as `compared`."""
    worst = compare(route_both(cases), **options)
    report.add(name, "megatron-core", compared, len(cases), worst, preset=preset)


@pytest.mark.parametrize("score", ["softmax_topk", "softmax", "sigmoid"])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity(score, policy, report):
    cases = sweep(24, 3 + len(score) + len(policy), score=score, policy=policy, aux="aux_loss",
                  coef=0.0625, z_coef=0.125,
                  vary=lambda i, c: {"factor": [0.5, 1.0, 1.1, 1.25, 2.0][i % 5],
                                     "scale": [None, 2.5][i % 2]})
    results = route_both(cases)
    assert any(ours["dropped"] > 0 for _, _, ours in results)
    worst = compare(results, exact_kept=policy == "probs")
    report.add(f"megatron {score} {policy}", "megatron-core",
               f"TopKRouter {score}, drop_policy {policy}, scaling factor, aux_loss, z-loss: "
               "kept assignments, weights, losses, d_logits", len(cases), worst,
               preset=f"top_any<{score}>, megatron_capacity, {policy}")


@pytest.mark.parametrize("score", ["softmax_topk", "sigmoid"])
def test_pad_to_capacity(score, report):
    cases = sweep(12, 17 + len(score), score=score, policy="probs", pad=True,
                  vary=lambda i, c: {"factor": [0.5, 1.0, 3.0][i % 3]})
    results = route_both(cases)
    for req, t, ours in results:
        # Every expert's column holds C tokens (padding with weight 0), the library's C rows.
        assert torch.all(t["map"].sum(0) == ours["capacity"]), req["gate"]
        experts = t["probs"].shape[1]
        weight = back(t, dense(ours["expert"], ours["weight"], experts))
        assert_close(weight, t["probs"], FLOAT32_RTOL, "weights")
    report.add(f"megatron {score} pad_to_capacity", "megatron-core",
               f"TopKRouter {score}, pad_to_capacity: capacity, weights", len(cases), 0.0,
               preset=f"top_any<{score}>, megatron_capacity")


def test_sigmoid_expert_bias(report):
    cases = []
    for i, c in enumerate(sweep(16, 23)):
        bias = (torch.randn(c["experts"], generator=torch.Generator().manual_seed(i)) * 0.25)
        c.update(score="sigmoid", bias=bias.float().double(), scale=2.5,
                 factor=[None, 1.0][i % 2], policy="probs")
        cases.append(c)
    route_and_report(report, "megatron sigmoid expert bias",
                     "TopKRouter sigmoid with expert bias and scaling factor: kept assignments, "
                     "weights, d_logits", "top_any<sigmoid> with expert bias", cases)


@pytest.mark.parametrize("score,groups", [("softmax", (4, 2)), ("sigmoid", (4, 2)),
                                          ("sigmoid", (8, 4))])
def test_group_limited(score, groups, report):
    cases = []
    for i, c in enumerate(sweep(16, 29 + groups[0], ks=(2, 4, 8))):
        if c["experts"] % groups[0] or c["k"] < groups[1] or \
                c["experts"] // groups[0] * groups[1] < c["k"]:
            continue
        c.update(score=score, groups=groups, factor=[None, 1.0][i % 2], policy="probs")
        cases.append(c)
    assert cases
    route_and_report(report, f"megatron {score} groups {groups}",
                     f"TopKRouter {score}, {groups[0]} groups, best {groups[1]}: kept "
                     "assignments, weights, d_logits",
                     f"top_any<{score}>, group_limited<{groups[0]}, {groups[1]}>", cases)


@pytest.mark.parametrize("score", ["softmax_topk", "sigmoid"])
def test_seq_aux_loss(score, report):
    cases = sweep(12, 41 + len(score), score=score, aux="seq_aux_loss", coef=0.0625,
                  vary=lambda i, c: {"bsz": [2, 4][i % 2]})
    route_and_report(report, f"megatron {score} seq_aux_loss",
                     f"TopKRouter {score}, seq_aux_loss over sequences: weights, loss, d_logits",
                     f"top_any<{score}>, dropless, sequence_aux", cases)


def test_megatron_preset(report):
    """preset::megatron is the router's defaults at k = 2 with token dropping (probs)."""
    cases = sweep(16, 53, ks=(2,), score="softmax_topk", policy="probs", aux="aux_loss",
                  coef=0.0625, vary=lambda i, c: {"factor": [0.5, 1.0, 1.5][i % 3]})
    results = route_both(cases)
    for req, _, _ in results:
        req["gate"] = "megatron"
    for (req, _, expected), ours in zip(results, run_library([r for r, _, _ in results])):
        assert torch.equal(ours["kept"], expected["kept"])
        assert torch.equal(ours["weight"], expected["weight"])
        assert ours["aux_loss"] == expected["aux_loss"]
    worst = compare(results)
    report.add("megatron preset", "megatron-core", "preset::megatron (k 2, probs, aux_loss): "
               "kept assignments, weights, aux loss, d_logits", len(cases), worst,
               preset="preset::megatron")


def test_aux_loss_counts_unbiased_top_k():
    """Megatron's aux loss counts the top-k of the unbiased scores: with an expert bias that
    moves the selection its loss differs from the library's, which counts the selected."""
    c = {"tokens": 64, "experts": 8, "k": 2, "seed": 5, "score": "sigmoid", "aux": "aux_loss",
         "coef": 0.0625, "bias": torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)}
    (_, t, ours), = route_both([c])
    assert abs(ours["aux_loss"] - t["aux"]) > 1e-3 * abs(t["aux"])
    c.pop("bias")
    (_, t, ours), = route_both([c])
    assert_close(ours["aux_loss"], t["aux"], FLOAT32_RTOL, "aux loss without bias")
