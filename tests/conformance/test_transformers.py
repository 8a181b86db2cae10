# SPDX-License-Identifier: Apache-2.0
"""Hugging Face transformers' MoE blocks against the library's layer (host backend, float64):
Mixtral, Qwen3-MoE, DeepSeek-V3 (e_score_correction_bias, groups, routed_scaling_factor) and
the Switch Transformers sparse MLP. Weights are copied across (moe's are the transpose of
PyTorch's: the gate weight is (hidden, experts), a GLU's w13 (E, H, 2F) holds [gate | up], w2
is (E, F, H)); whole-block outputs, and dx and every weight's gradient from autograd against
the layer's backward of ⟨dy, y⟩.

Differences the framework's own code shows, kept as the library's behaviour and pinned here:
- The Mixtral, Qwen3-MoE and DeepSeek-V3 routers compute in float32 whatever the model's
  dtype (Mixtral's softmax of logits.float(), Qwen3's softmax(dtype=torch.float), DeepSeek's
  logits of x.type(torch.float32)): their routing weights carry float32 rounding in a float64
  model (test_routers_round_to_float32, where the selections still agree exactly). The
  blocks are compared to 1e-10 with those casts lifted (`routers_in_float64`: the same code,
  its float32 casts returning the float64 tensor unchanged). The Switch router computes in
  config.router_dtype, which the config validates to float32, float16 or bfloat16: its
  `dtype` attribute is set to float64 after construction.
- DeepSeek-V3's router scores a group by its top-2 biased scores whatever k and the group
  count, and renormalises at every k: preset::deepseek_native; preset::deepseek<K, G, M>
  (Megatron-Core's generalisation) differs from it where ⌊k/M⌋ ≠ 2 or k = 1
  (test_deepseek_generalisations_differ).
- DeepSeek-V3's block adds shared experts, which the layer does not model: their output
  projection is zero here.
- gpt-oss's block runs on the CPU, but its expert (a clamped SwiGLU, σ(1.702 g) · g · (u + 1),
  with interleaved gate and up columns and biases) and its router's bias are not library
  policies: it is not compared.
"""

import contextlib
import random
import warnings

import pytest
import torch

from conftest import OUTPUT_RTOL, WEIGHT_RTOL, as_rows, assert_close, run_library

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers import (DeepseekV3Config, MixtralConfig, Qwen3MoeConfig,
                              SwitchTransformersConfig)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    from transformers.models.switch_transformers.modeling_switch_transformers import \
        SwitchTransformersSparseMLP

FLOAT32_RTOL = 4e-6  # float32 router weights against the library's double
VANISHING = 1e-12  # a gradient whose largest element is below this on both sides is zero


@contextlib.contextmanager
def routers_in_float64():
    """Runs the blocks' own code with their float32 casts of float64 tensors made no-ops."""
    tensor_float, tensor_type = torch.Tensor.float, torch.Tensor.type
    softmax = torch.nn.functional.softmax

    def keep_float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else tensor_float(self, *args, **kwargs)

    def keep_type(self, dtype=None, *args, **kwargs):
        if dtype is torch.float32 and self.dtype == torch.float64:
            return self
        return tensor_type(self, dtype, *args, **kwargs)

    def keep_softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype is torch.float32 and x.dtype == torch.float64:
            dtype = None
        return softmax(x, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.Tensor.float, torch.Tensor.type = keep_float, keep_type
    torch.nn.functional.softmax = keep_softmax
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.type = tensor_float, tensor_type
        torch.nn.functional.softmax = softmax


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def fill_(t, g, scale):
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * scale)


def glu_block(block, gate_weight, g, hidden, ffn):
    """Random router and SwiGLU expert weights in a block whose experts are
    gate_up_proj (E, 2F, H) [gate | up] and down_proj (E, H, F)."""
    fill_(gate_weight, g, 1.0 / hidden ** 0.5)
    fill_(block.experts.gate_up_proj, g, 1.0 / hidden ** 0.5)
    fill_(block.experts.down_proj, g, 1.0 / ffn ** 0.5)


def glu_request(block, gate_weight, x, dy, ffn):
    return {"x": as_rows(x), "w_gate": as_rows(gate_weight.t()), "dy": as_rows(dy),
            "ffn": ffn, "w13": flat(block.experts.gate_up_proj.transpose(1, 2)),
            "w2": flat(block.experts.down_proj.transpose(1, 2))}


def glu_grads(block, gate_weight, x):
    return {"dx": x.grad, "d_w_gate": gate_weight.grad.t(),
            "d_w13": block.experts.gate_up_proj.grad.transpose(1, 2).reshape(-1),
            "d_w2": block.experts.down_proj.grad.transpose(1, 2).reshape(-1)}


def grad_of(parameter):
    """Its gradient; zero for an expert autograd never reached (it received no token)."""
    return parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)


def run_block(block, x3, dy3):
    """y, and the gradients of ⟨dy, y⟩, from the block's own forward and autograd."""
    x3 = x3.clone().requires_grad_(True)
    y = block(x3)
    y.backward(dy3)
    return y.detach().reshape(-1, x3.shape[-1]), x3


def compare(cases, results, report, key, compared, preset):
    """Each case's (request, reference) against the library's result; records the largest
    error under `key`."""
    worst = 0.0
    for (request, ref), lib in zip(cases, results):
        what = f"{request['layer']} T={len(request['x'])} seed={ref['seed']}"
        worst = max(worst, assert_close(lib["y"], ref["y"], OUTPUT_RTOL, f"{what} y"))
        for name in ("dx", "d_w_gate", "d_w13", "d_w1", "d_w2"):
            if name not in ref:
                continue
            value = torch.as_tensor(lib[name], dtype=torch.float64).reshape(ref[name].shape)
            if max(value.abs().max(), ref[name].abs().max()) < VANISHING:
                # A gradient that is zero in exact arithmetic (k = 1 renormalised: the weight is
                # the constant 1): both sides are rounding noise, compared absolutely.
                worst = max(worst, float((value - ref[name]).abs().max()))
                continue
            worst = max(worst, assert_close(value, ref[name], OUTPUT_RTOL, f"{what} {name}"))
        if "load" in ref:
            assert lib["load"].tolist() == ref["load"], f"{what}: loads differ"
    report.add(key, "transformers", compared, len(cases), worst, preset=preset)


def seeds_and_shapes(count, shapes):
    rng = random.Random(17)
    return [(seed, *rng.choice(shapes)) for seed in range(count)]


# --- Mixtral ---------------------------------------------------------------------------------

def glu_block_case(block, seed, tokens, hidden, ffn):
    """A SwiGLU block's weights, input and output gradient drawn from `seed`, run in float64:
    the driver's request (without its layer) and the reference y, dx and weight gradients."""
    block = block.double()
    g = torch.Generator().manual_seed(seed)
    glu_block(block, block.gate.weight, g, hidden, ffn)
    x = torch.randn(1, tokens, hidden, generator=g, dtype=torch.float64)
    dy = torch.randn(1, tokens, hidden, generator=g, dtype=torch.float64)
    with routers_in_float64():
        y, x_leaf = run_block(block, x, dy)
    request = glu_request(block, block.gate.weight, x[0], dy[0], ffn)
    ref = {"seed": seed, "y": y, **glu_grads(block, block.gate.weight, x_leaf)}
    ref["dx"] = ref["dx"].reshape(tokens, hidden)
    return request, ref


def mixtral_case(seed, tokens, hidden, ffn, experts, k):
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                           num_experts_per_tok=k, router_jitter_noise=0.0)
    config._experts_implementation = "eager"
    request, ref = glu_block_case(MixtralSparseMoeBlock(config), seed, tokens, hidden, ffn)
    request.update(layer="mixtral" if k == 2 else "mixtral_any", args={"k": k})
    return request, ref


def test_mixtral(report):
    shapes = [(64, 16, 24, 8, 2), (128, 8, 12, 8, 2), (200, 12, 8, 16, 4), (96, 8, 8, 64, 8),
              (33, 10, 6, 4, 1)]
    cases = [mixtral_case(*c) for c in seeds_and_shapes(25, shapes)]
    compare(cases, run_library([c for c, _ in cases]), report, "mixtral block",
            "MixtralSparseMoeBlock vs preset::mixtral (k 2; top_any at k 1, 4, 8), "
            "ragged, SwiGLU: y, dx, d W_gate, d w13, d w2", "preset::mixtral")


# --- Qwen3-MoE -------------------------------------------------------------------------------

def qwen3_case(seed, tokens, hidden, ffn, experts, k, norm):
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=ffn, num_experts=experts,
                            num_experts_per_tok=k, norm_topk_prob=norm)
    config._experts_implementation = "eager"
    request, ref = glu_block_case(Qwen3MoeSparseMoeBlock(config), seed, tokens, hidden, ffn)
    if k == 8 and norm:
        request.update(layer="qwen3")
    else:
        request.update(layer="qwen3_any",
                       args={"k": k, "normalize": "before_drops" if norm else "none"})
    return request, ref


def test_qwen3(report):
    shapes = [(64, 16, 12, 16, 8, True), (128, 8, 8, 64, 8, True), (100, 12, 8, 32, 4, False),
              (50, 8, 6, 8, 2, True), (80, 8, 8, 10, 1, False)]
    cases = [qwen3_case(*c) for c in seeds_and_shapes(25, shapes)]
    compare(cases, run_library([c for c, _ in cases]), report, "qwen3 block",
            "Qwen3MoeSparseMoeBlock vs preset::qwen3 (k 8, norm_topk_prob; top_any at other k "
            "and without it), ragged, SwiGLU: y, dx, d W_gate, d w13, d w2", "preset::qwen3")


# --- DeepSeek-V3 -----------------------------------------------------------------------------

def deepseek_block(seed, hidden, ffn, experts, k, groups, top_groups, scaling):
    config = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=ffn,
                              n_routed_experts=experts, num_experts_per_tok=k, n_group=groups,
                              topk_group=top_groups, routed_scaling_factor=scaling,
                              norm_topk_prob=True, n_shared_experts=1)
    config._experts_implementation = "eager"
    block = DeepseekV3MoE(config).double()
    g = torch.Generator().manual_seed(seed)
    glu_block(block, block.gate.weight, g, hidden, ffn)
    with torch.no_grad():  # the layer has no shared experts: theirs add 0
        block.shared_experts.down_proj.weight.zero_()
        # The library's expert bias is float32: a float32-representable bias of the order of
        # the score differences changes selections.
        bias = (torch.rand(experts, generator=g, dtype=torch.float64) * 0.2 - 0.1).float()
        block.gate.e_score_correction_bias.copy_(bias.double())
    return block, g


DEEPSEEK_SHAPES = {  # layer name: (k, groups, top groups)
    "deepseek_v3": (8, 8, 4),
    "deepseek_native_2_4_2": (2, 4, 2),
    "deepseek_native_1_4_2": (1, 4, 2),
    "deepseek_native_6_8_2": (6, 8, 2),
}


def deepseek_case(seed, tokens, hidden, ffn, experts, name, scaling):
    k, groups, top_groups = DEEPSEEK_SHAPES[name]
    block, g = deepseek_block(seed, hidden, ffn, experts, k, groups, top_groups, scaling)
    x = torch.randn(1, tokens, hidden, generator=g, dtype=torch.float64)
    dy = torch.randn(1, tokens, hidden, generator=g, dtype=torch.float64)
    with routers_in_float64():
        y, x_leaf = run_block(block, x, dy)
    request = glu_request(block, block.gate.weight, x[0], dy[0], ffn)
    request.update(layer=name, args={
        "scaling_factor": scaling,
        "expert_bias": [float(b) for b in block.gate.e_score_correction_bias.tolist()]})
    ref = {"seed": seed, "y": y, **glu_grads(block, block.gate.weight, x_leaf)}
    ref["dx"] = ref["dx"].reshape(tokens, hidden)
    return request, ref


def test_deepseek_v3(report):
    shapes = [(64, 16, 8, 64, "deepseek_v3", 2.5), (48, 8, 6, 32, "deepseek_v3", 1.0),
              (100, 8, 8, 16, "deepseek_native_2_4_2", 2.5),
              (80, 8, 8, 8, "deepseek_native_1_4_2", 1.5),
              (60, 8, 6, 64, "deepseek_native_6_8_2", 2.5)]
    cases = [deepseek_case(*c) for c in seeds_and_shapes(25, shapes)]
    compare(cases, run_library([c for c, _ in cases]), report, "deepseek_v3 block",
            "DeepseekV3MoE (e_score_correction_bias, n_group, topk_group, "
            "routed_scaling_factor; shared experts zeroed) vs preset::deepseek_v3 and "
            "deepseek_native<K, G, M>, ragged, SwiGLU: y, dx, d W_gate, d w13, d w2",
            "preset::deepseek_v3, deepseek_native")


def router_request(block, gate_weight, x, name, args):
    return {"gate": name, "x": as_rows(x), "w_gate": as_rows(gate_weight.t()), "args": args}


def test_deepseek_generalisations_differ(report):
    """Hugging Face's router is deepseek_native at every shape; preset::deepseek (Megatron's
    generalisation) selects other experts where ⌊k/M⌋ ≠ 2, and weighs differently at k = 1."""
    differing = {name: 0 for name in ("deepseek_2_4_2", "deepseek_1_4_2", "deepseek_6_8_2")}
    worst, cases = 0.0, 0
    for seed in range(6):
        for native, megatron in (("deepseek_native_2_4_2", "deepseek_2_4_2"),
                                 ("deepseek_native_1_4_2", "deepseek_1_4_2"),
                                 ("deepseek_native_6_8_2", "deepseek_6_8_2")):
            k, groups, top_groups = DEEPSEEK_SHAPES[native]
            experts = 32 if groups == 4 else 64
            block, g = deepseek_block(seed, 8, 4, experts, k, groups, top_groups, 2.5)
            x = torch.randn(64, 8, generator=g, dtype=torch.float64)
            with routers_in_float64(), torch.no_grad():
                _, hf_weight, hf_index = block.gate(x)
            args = {"scaling_factor": 2.5,
                    "expert_bias": [float(b) for b in block.gate.e_score_correction_bias]}
            lib, other = run_library([router_request(block, block.gate.weight, x, native, args),
                                      router_request(block, block.gate.weight, x, megatron,
                                                     args)])
            hf_sorted, order = hf_index.sort(dim=1)
            lib_sorted, lib_order = lib["expert"].sort(dim=1)
            assert torch.equal(lib_sorted, hf_sorted), f"{native} seed {seed}: selections"
            worst = max(worst, assert_close(lib["weight"].gather(1, lib_order),
                                            hf_weight.gather(1, order), WEIGHT_RTOL,
                                            f"{native} seed {seed}: weights"))
            cases += 1
            other_sorted, other_order = other["expert"].sort(dim=1)
            if not torch.equal(other_sorted, hf_sorted) or not torch.allclose(
                    other["weight"].gather(1, other_order), hf_weight.gather(1, order)):
                differing[megatron] += 1
    # Megatron's generalisation disagrees with Hugging Face's router at each of these shapes.
    assert all(count > 0 for count in differing.values()), differing
    report.add("deepseek_v3 router", "transformers",
               "DeepseekV3TopkRouter vs deepseek_native<K, G, M> (k 1, 2, 6): selections "
               "exact, weights", cases, worst, preset="preset::deepseek_native")


# --- Switch Transformers ---------------------------------------------------------------------

def switch_case(seed, batch, seq, hidden, ffn, experts, capacity):
    config = SwitchTransformersConfig(d_model=hidden, d_ff=ffn, num_experts=experts,
                                      expert_capacity=capacity, router_jitter_noise=0.0,
                                      dropout_rate=0.0, dense_act_fn="relu", router_bias=False)
    block = SwitchTransformersSparseMLP(config).double().eval()
    # The router computes in its `dtype`, from config.router_dtype, which the config's
    # validation limits to float32, float16 and bfloat16: set the attribute itself.
    block.router.dtype = torch.float64
    g = torch.Generator().manual_seed(seed)
    fill_(block.router.classifier.weight, g, 1.0)
    experts_list = [block.experts[f"expert_{e}"] for e in range(experts)]
    for e in experts_list:
        fill_(e.wi.weight, g, 1.0 / hidden ** 0.5)
        fill_(e.wo.weight, g, 1.0 / ffn ** 0.5)
    x = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64)
    dy = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64)
    y, x_leaf = run_block(block, x, dy)
    with torch.no_grad():
        mask, _, _ = block.router(x)
    tokens = batch * seq
    # preset::switch_transformer's capacity is max(4, min(S, ⌊S · f / E⌋)) per local group
    # (a sequence): f = (C + ½) · E / S gives Hugging Face's expert_capacity C.
    factor = (capacity + 0.5) * experts / seq
    request = {"layer": "switch_transformer", "x": as_rows(x.reshape(tokens, hidden)),
               "w_gate": as_rows(block.router.classifier.weight.t()),
               "dy": as_rows(dy.reshape(tokens, hidden)), "ffn": ffn,
               "w1": flat(torch.stack([e.wi.weight.t() for e in experts_list])),
               "w2": flat(torch.stack([e.wo.weight.t() for e in experts_list])),
               "args": {"groups": batch, "capacity_factor": factor,
                        "eval_capacity_factor": factor}}
    ref = {"seed": seed, "y": y, "dx": x_leaf.grad.reshape(tokens, hidden),
           "d_w_gate": block.router.classifier.weight.grad.t(),
           "d_w1": torch.stack([grad_of(e.wi.weight).t() for e in experts_list]).reshape(-1),
           "d_w2": torch.stack([grad_of(e.wo.weight).t() for e in experts_list]).reshape(-1)}
    return request, ref, int(mask.sum()), tokens


def test_switch_transformers(report):
    shapes = [(2, 32, 8, 12, 4, 6), (1, 64, 8, 8, 8, 4), (4, 16, 6, 8, 4, 4),
              (2, 50, 8, 6, 8, 10), (3, 40, 12, 8, 2, 24)]
    runs = [switch_case(*c) for c in seeds_and_shapes(25, shapes)]
    cases = [(request, ref) for request, ref, _, _ in runs]
    results = run_library([c for c, _ in cases])
    dropped_somewhere = False
    for (request, ref), (_, _, kept, tokens), lib in zip(cases, runs, results):
        assert lib["dropped"] == tokens - kept, f"seed {ref['seed']}: dropped tokens"
        dropped_somewhere |= kept < tokens
    assert dropped_somewhere  # the capacities drop tokens in some cases
    compare(cases, results, report, "switch_transformers block",
            "SwitchTransformersSparseMLP (router dtype float64, expert_capacity per "
            "sequence) vs preset::switch_transformer, capacity, ReLU FFN: dropped, y, dx, "
            "d W_gate, d w1, d w2", "preset::switch_transformer")


# --- the float32 routers ---------------------------------------------------------------------

def test_routers_round_to_float32():
    """Mixtral's, Qwen3's and DeepSeek-V3's routers return float32-rounded weights in a
    float64 model; with the casts lifted they agree with the library to double rounding."""
    g = torch.Generator().manual_seed(3)
    mixtral = MixtralSparseMoeBlock(MixtralConfig(hidden_size=8, intermediate_size=4,
                                                  num_local_experts=8,
                                                  num_experts_per_tok=2)).double()
    qwen3 = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=8, moe_intermediate_size=4,
                                                  num_experts=16, num_experts_per_tok=8,
                                                  norm_topk_prob=True)).double()
    deepseek, _ = deepseek_block(3, 8, 4, 64, 8, 8, 4, 2.5)
    routers = [(mixtral.gate, "mixtral", {}), (qwen3.gate, "qwen3", {}),
               (deepseek.gate, "deepseek_v3",
                {"scaling_factor": 2.5,
                 "expert_bias": [float(b) for b in deepseek.gate.e_score_correction_bias]})]
    for router, name, args in routers:
        if name != "deepseek_v3":
            fill_(router.weight, g, 1.0)
        x = torch.randn(64, 8, generator=g, dtype=torch.float64)
        lib = run_library([router_request(None, router.weight, x, name, args)])[0]
        lib_sorted, lib_order = lib["expert"].sort(dim=1)
        lib_weight = lib["weight"].gather(1, lib_order)
        for lifted in (False, True):
            with routers_in_float64() if lifted else contextlib.nullcontext(), torch.no_grad():
                _, weight, index = router(x)
            hf_sorted, order = index.sort(dim=1)
            assert torch.equal(hf_sorted, lib_sorted), f"{name}: selections"
            err = assert_close(weight.double().gather(1, order), lib_weight, FLOAT32_RTOL, name)
            if lifted:
                assert err <= WEIGHT_RTOL, f"{name} in float64: {err:.3e}"
            else:
                assert err > 1e-9, f"{name}: expected float32 rounding, got {err:.3e}"
