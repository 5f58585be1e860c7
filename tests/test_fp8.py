"""Block-FP8 models (issue 19), on CPU: tiny FP8 checkpoints in the shipped layout against a transformers
reference of their dequantized weights whose GEMMs round activations as the FP8 GEMMs do; loading errors;
on-the-fly quantization; weight updates re-quantized in place; tensor parallelism; routing capture."""

import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from routereplay import LLM, SamplingParams
from routereplay.config import ModelConfig
from routereplay.kernels.fp8 import FP8_DTYPE
from routereplay.layers.parallel import TP
from routereplay.models.loader import load_checkpoint
from routereplay.models.transformer import MoECausalLM
from routereplay.tiny import FP8_BLOCK, FP8_STYLE, make_tiny_fp8_checkpoint
from tests.helpers import (
    assert_logprobs_match_full_forward,
    fp8_activations,
    fp8_checkpoint_weights,
    load_reference,
    reference_forward,
    routed_forward,
)
from tests.test_capture import DEBUG, assert_positions
from tests.test_engine import prompts
from tests.test_models import our_forward

FP8_FAMILIES = sorted(FP8_STYLE)
# Engine (fp32 activations, e4m3 weights, activations rounded per token group) vs transformers on the dequantized
# weights with the same activation rounding: measured max |logit difference| 1.8e-7 (qwen3_moe), 1.5e-7
# (glm4_moe), 1.6e-6 (deepseek_v3) on 37 tokens, <= 1.8e-7 for qwen2_moe, mixtral, ernie4_5_moe; fp32 sums in
# another order are all that differ. Without the activation rounding the same weights differ by ~2e-2 (2.2 for
# the deepseek_v3 model, whose initializer_range is 0.1).
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fp8"))


def tiny(root: str, model_type: str, seed: int = 0):
    return make_tiny_fp8_checkpoint(os.path.join(root, f"{model_type}-{seed}"), model_type, seed=seed)


def shipped_quantization(model_dir: str) -> dict:
    """The FP8 checkpoint's quantization_config, as the `quantization` option of its original."""
    return json.load(open(os.path.join(model_dir, "config.json")))["quantization_config"]


def build(model_dir: str, quantization=None) -> MoECausalLM:
    mc = ModelConfig.from_dir(model_dir, quantization)
    model = MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids, mc.quant)
    load_checkpoint(model, model_dir)
    return model.eval()


def same_sets(a, b) -> bool:
    return np.array_equal(np.sort(np.asarray(a, dtype=np.int64), -1), np.sort(np.asarray(b, dtype=np.int64), -1))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.uint8) if t.dtype == FP8_DTYPE else t.detach()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(bits(sa[name]), bits(sb[name])), name


@pytest.mark.parametrize("model_type", FP8_FAMILIES)
def test_fp8_logits_and_experts_equal_the_dequantized_reference(root, model_type):
    t = tiny(root, model_type)
    mc = ModelConfig.from_dir(t.fp8)
    assert mc.quant.prequantized and mc.quant.block == FP8_BLOCK
    toks = torch.randint(3, 100, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_logits, ref_ids = reference_forward(t.reference, toks, fp8_checkpoint=t.fp8)
    logits, ids = our_forward(build(t.fp8), toks, mc.num_moe_layers, mc.top_k)
    assert (logits - ref_logits).abs().max().item() <= LOGIT_ATOL
    assert same_sets(ids.numpy(), ref_ids.numpy())
    # the activation rounding is what the reference adds: without it the same weights give other logits
    plain, _ = reference_forward(t.reference, toks)
    assert (logits - plain).abs().max().item() > 100 * LOGIT_ATOL


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe"])
def test_tiny_fp8_checkpoints_are_what_transformers_reads(root, model_type):
    """transformers' own FP8 loader (which dequantizes on a CPU) reads the tiny FP8 checkpoint as exactly the
    reference's weights: the names, the scale convention and the per-expert tensors are the shipped layout.
    (It refuses deepseek_v3's partial blocks, kv_a_proj_with_mqa's 40 rows in blocks of 16, though DeepSeek-V3
    ships them too: 576 rows in blocks of 128.)"""
    from transformers import AutoModelForCausalLM

    t = tiny(root, model_type)
    theirs = AutoModelForCausalLM.from_pretrained(t.fp8, dtype=torch.float32).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(t.reference, dtype=torch.float32).state_dict()
    assert theirs.keys() == reference.keys()
    assert all(torch.equal(theirs[n], reference[n]) for n in reference)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "ernie4_5_moe"])
def test_other_families_quantized_on_the_fly_equal_their_dequantized_reference(root, model_type):
    """The families of the same layout: quantized as they load (blocks of 16 x 32), equal to transformers holding
    the engine's dequantized weights with the same activation rounding; expert sets equal."""
    from routereplay.kernels.fp8 import dequantize_block_weight
    from routereplay.tiny import make_tiny_checkpoint

    d = make_tiny_checkpoint(os.path.join(root, model_type), model_type)
    mc = ModelConfig.from_dir(d, {"weight_block_size": list(FP8_BLOCK)})
    ours = build(d, {"weight_block_size": list(FP8_BLOCK)})
    state = ours.state_dict()
    fp8 = {n for n, p in state.items() if p.dtype == FP8_DTYPE}
    assert any(".experts." in n for n in fp8) and any("self_attn" in n for n in fp8)
    ref = load_reference(d, eager_experts=True)
    with torch.no_grad():
        for n in fp8:
            ref.get_parameter(n).copy_(dequantize_block_weight(state[n], state[n + "_scale_inv"], FP8_BLOCK))
    toks = torch.randint(3, 100, (29,), generator=torch.Generator().manual_seed(4)).tolist()
    ref_logits, ref_ids = routed_forward(ref, toks, (fp8, FP8_BLOCK[1]))
    logits, ids = our_forward(ours, toks, mc.num_moe_layers, mc.top_k)
    assert (logits - ref_logits).abs().max().item() <= LOGIT_ATOL
    assert same_sets(ids.numpy(), ref_ids.numpy())


def test_not_converted_names_are_the_checkpoints(root):
    """modules_to_not_convert names checkpoint modules: Mixtral's block_sparse_moe is renamed as its tensors are."""
    from routereplay.tiny import make_tiny_checkpoint

    d = make_tiny_checkpoint(os.path.join(root, "mixtral"), "mixtral")
    model = build(d, {"weight_block_size": list(FP8_BLOCK),
                      "modules_to_not_convert": ["model.layers.0.block_sparse_moe"]})
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == FP8_DTYPE


def test_what_stays_unquantized(root):
    """Routers, norms, embeddings, the LM head and modules_to_not_convert keep the model dtype; the rest is e4m3."""
    model = build(tiny(root, "qwen3_moe").fp8)
    params = dict(model.named_parameters())
    fp8 = {n for n, p in params.items() if p.dtype == FP8_DTYPE}
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.gate_up_proj",
            "model.layers.1.mlp.experts.down_proj", "model.layers.0.mlp.down_proj.weight"} <= fp8
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight",
                 "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"):
        assert params[name].dtype == torch.float32, name
    assert all(params[n + "_scale_inv"].dtype == torch.float32 for n in fp8)  # X.weight_scale_inv
    glm = dict(build(tiny(root, "glm4_moe").fp8).named_parameters())  # ignored_layers: layer 0's dense MLP
    assert glm["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert glm["model.layers.1.mlp.shared_experts.up_proj.weight"].dtype == FP8_DTYPE


@pytest.mark.parametrize("model_type", FP8_FAMILIES)
def test_engine_logprobs_and_routing_equal_the_reference(root, model_type):
    """Prefill and decode steps (MLA's absorbed decode included): each sampled token's log-prob and every
    routing row equal the reference's full forward over prompt + generated tokens."""
    t = tiny(root, model_type)
    ps = prompts(3, seed=7)
    llm = LLM(t.fp8, max_model_len=256, block_size=4, routing_replay={"enable": True})
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(
        temperature=1.0, max_tokens=8, seed=0, ignore_eos=True), use_tqdm=False)
    llm.close()
    ref = load_reference(t.reference, eager_experts=True)
    with fp8_activations(ref, *fp8_checkpoint_weights(t.fp8)):
        assert_logprobs_match_full_forward(ref, ps, outs, atol=1e-4)
    for p, o in zip(ps, outs, strict=True):
        c = o.outputs[0]
        _, ref_ids = reference_forward(t.reference, p + c.token_ids[:-1], fp8_checkpoint=t.fp8)
        assert same_sets(c.routed_experts, ref_ids.numpy())


def test_debug_rows_are_positions(root):
    """bf16 activations with e4m3 weights, chunked prefill: the bookkeeping is exact whatever the numerics."""
    llm = LLM(tiny(root, "deepseek_v3").fp8, dtype="bfloat16", max_model_len=256, block_size=4, routing_replay=DEBUG,
              max_num_batched_tokens=9)
    ps = prompts(4, seed=8)
    sps = [SamplingParams(temperature=1.0, max_tokens=3 + i, seed=i, ignore_eos=True) for i in range(len(ps))]
    for o in llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False):
        assert_positions(o)
    llm.close()


def test_on_the_fly_quantization_equals_the_fp8_checkpoint(root):
    """quantization= on the bf16/fp32 original gives the very weights (bitwise) of the shipped-layout checkpoint."""
    for model_type in FP8_FAMILIES:
        t = tiny(root, model_type)
        assert_same_weights(build(t.original, shipped_quantization(t.fp8)), build(t.fp8))
    mc = ModelConfig.from_dir(t.original, "fp8")
    assert mc.quant.block == (128, 128) and not mc.quant.prequantized and not mc.quant.not_converted
    assert ModelConfig.from_dir(t.original).quant is None


def _engine(model_dir: str, tp: int = 1, **kwargs) -> LLM:
    return LLM(model_dir, dtype="float32", max_model_len=256, block_size=8, max_num_seqs=8, num_kv_blocks=256,
               tensor_parallel_size=tp, routing_replay={"enable": True}, **kwargs)


def _run(model_dir: str, tp: int, ps, update=None, **kwargs) -> list:
    """Greedy tokens and routing of each prompt (after ``update``, if given)."""
    llm = _engine(model_dir, tp, **kwargs)
    try:
        if update is not None:
            llm.update_weights(update)
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        outs = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    finally:
        llm.close()
    return [(o.outputs[0].token_ids, o.outputs[0].routed_experts) for o in outs]


def _trainer_weights(model_dir: str, dtype: torch.dtype):
    """A trainer's step: transformers' model of ``model_dir`` in ``dtype``, every weight nudged."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return hf


def test_update_weights_requantizes_in_place(root, tmp_path):
    """bf16 trainer tensors (transformers' runtime names, fused experts) are re-quantized into the e4m3 weights and
    their scales, in the same storages; the model then equals a fresh load of the updated checkpoint."""
    t = tiny(root, "glm4_moe")
    quant = shipped_quantization(t.fp8)
    llm = _engine(t.original, quantization=quant)
    model = llm.engine.runner.model
    storages = {n: p.untyped_storage().data_ptr() for n, p in model.state_dict().items()}
    before = {n: bits(p).clone() for n, p in model.state_dict().items()}
    hf = _trainer_weights(t.original, torch.bfloat16)
    assert llm.update_weights(hf.named_parameters()) == len(list(hf.named_parameters()))
    hf.save_pretrained(tmp_path / "updated")
    assert_same_weights(model, build(str(tmp_path / "updated"), quant))
    state = model.state_dict()
    assert {n: p.untyped_storage().data_ptr() for n, p in state.items()} == storages
    assert not torch.equal(bits(state["model.layers.1.mlp.experts.down_proj_scale_inv"]),
                           before["model.layers.1.mlp.experts.down_proj_scale_inv"])
    # an FP8 checkpoint's e4m3 weights and scales are copied as they are
    other = tiny(root, "glm4_moe", seed=1)
    llm.engine.update_weights_from_checkpoint(other.fp8)
    assert_same_weights(model, build(other.fp8))
    llm.close()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_tp2_equals_tp1(root, model_type):
    """Weights and their scales sharded on block boundaries; row-parallel and expert partial sums in fp32."""
    t = tiny(root, model_type)
    ps = prompts(4, seed=12)
    one, two = _run(t.fp8, 1, ps), _run(t.fp8, 2, ps)
    for (t1, r1), (t2, r2) in zip(one, two, strict=True):
        assert t1 == t2 and same_sets(r1, r2)
    assert not multiprocessing.active_children(), "a tensor-parallel worker outlived close()"


def test_update_weights_under_tp2_equals_tp1(root):
    t = tiny(root, "qwen3_moe")
    quant = shipped_quantization(t.fp8)
    named = [(n, p.detach().clone()) for n, p in _trainer_weights(t.original, torch.float32).named_parameters()]
    ps = prompts(3, seed=13)
    one, two = (_run(t.original, tp, ps, update=named, quantization=quant) for tp in (1, 2))
    assert [tok for tok, _ in one] == [tok for tok, _ in two]
    assert all(same_sets(a, b) for (_, a), (_, b) in zip(one, two, strict=True))
    assert [tok for tok, _ in one] != [tok for tok, _ in _run(t.fp8, 1, ps)], "the update changed nothing"


# ---- load errors: each names the tensor (or field), and nothing is written -----------------------------------

def _copy(root, tmp_path, model_type="qwen3_moe") -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(tiny(root, model_type).fp8, dst)
    return dst


def _edit(d: str, edit) -> None:
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


Q = "model.layers.1.self_attn.q_proj"
UP = "model.layers.1.mlp.experts.3.up_proj"


def _set(name: str, fn):
    return lambda t: t.update({name: fn(t[name])})


@pytest.mark.parametrize("edit, message", [
    (_set(f"{Q}.weight_scale_inv", lambda s: s[:, :1].contiguous()),
     rf"shape mismatch for '{Q}\.weight_scale_inv'.*expected \[4, 2\], found \[4, 1\] \(one scale per \[16, 32\] "
     r"block of the weight \[64, 64\]\)"),
    (_set(f"{Q}.weight_scale_inv", lambda s: s.index_fill(1, torch.tensor([1]), float("nan"))),
     rf"'{Q}\.weight_scale_inv'.*must be finite and > 0, found 4 bad value\(s\) \(first nan at block \[0, 1\]\)"),
    (_set(f"{UP}.weight_scale_inv", lambda s: s.index_fill(0, torch.tensor([0]), 0.0)),
     rf"'{UP}\.weight_scale_inv'.*must be finite and > 0.*first 0\.0"),
    (_set(f"{UP}.weight_scale_inv", torch.neg), rf"'{UP}\.weight_scale_inv'.*must be finite and > 0.*first -"),
    (_set(f"{UP}.weight_scale_inv", lambda s: s.to(torch.int32)),
     rf"'{UP}\.weight_scale_inv'.*is torch\.int32: a weight_scale_inv must be float32"),
    (_set(f"{Q}.weight", lambda w: w.to(torch.bfloat16)),
     rf"'{Q}\.weight'.*is torch\.bfloat16, but the checkpoint's quantization_config converts its module"),
    (_set("model.layers.0.self_attn.o_proj.weight", lambda w: w.to(FP8_DTYPE)),
     r"'model\.layers\.0\.self_attn\.o_proj\.weight'.*is torch\.float8_e4m3fn, but its module is not quantized"),
    (lambda t: t.pop(f"{Q}.weight_scale_inv"), rf"tensor missing from .*: {Q}\.weight_scale_inv"),
    (lambda t: t.pop(f"{UP}.weight_scale_inv"),
     r"tensor missing from .*: model\.layers\.1\.mlp\.experts\.gate_up_proj_scale_inv \(expert 3, up\)"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(4, 2)}),
     r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv'.*\(its module is not quantized\)"),
], ids=["scale-shape", "scale-nan", "scale-zero", "scale-negative", "scale-dtype", "weight-bf16", "weight-not-fp8",
        "scale-missing", "expert-scale-missing", "scale-unexpected"])
def test_bad_fp8_checkpoint_is_rejected_before_loading(root, tmp_path, edit, message):
    d = _copy(root, tmp_path)
    _edit(d, edit)
    mc = ModelConfig.from_dir(d)
    model = MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids, mc.quant)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(model, d)
    assert all((p.float() == 7.0).all() for p in model.parameters()), "a failed load wrote some parameters"


@pytest.mark.parametrize("change, message", [
    (dict(quant_method="compressed-tensors", config_groups={}, format="float-quantized"),  # GLM-4.5-FP8's kind
     r"quantization_config in .*config\.json\.quant_method = 'compressed-tensors' is not supported \(only 'fp8'"),
    (dict(weight_block_size=[128]), r"\.weight_block_size must be two positive integers .*got \[128\]"),
    (dict(weight_block_size=None), r"\.weight_block_size must be two positive integers"),
    (dict(activation_scheme="static"), r"\.activation_scheme = 'static' is not supported \(only 'dynamic'"),
    (dict(scale_fmt="ue8m0"), r"\.scale_fmt = 'ue8m0' is not supported"),
    (dict(modules_to_not_convert="lm_head"), r"\.modules_to_not_convert must be a list of module names"),
    (dict(ignored_layers=["(bad"]), r"\.ignored_layers entry '\(bad' is not a valid pattern"),
    (dict(kv_cache_scheme={"num_bits": 8}), r"unsupported field\(s\) \['kv_cache_scheme'\]"),
], ids=["method", "block-one", "block-none", "static", "ue8m0", "not-a-list", "bad-pattern", "unknown-field"])
def test_bad_quantization_config_names_the_field(root, tmp_path, change, message):
    d = _copy(root, tmp_path)
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"].update(change)
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dir(d)


def test_bad_quantization_option(root):
    t = tiny(root, "qwen3_moe")
    with pytest.raises(ValueError, match=r"quantization must be None, 'fp8' or a quantization_config dict, got 'int8'"):
        ModelConfig.from_dir(t.original, "int8")
    with pytest.raises(ValueError, match=r"differs from the checkpoint's quantization_config"):
        ModelConfig.from_dir(t.fp8, {"weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match=r"FP8 is not supported for gpt_oss"):
        from routereplay.tiny import make_tiny_checkpoint

        ModelConfig.from_dir(make_tiny_checkpoint(os.path.join(root, "gpt_oss"), "gpt_oss"), "fp8")
    # the default block (128 x 128) does not fit the tiny experts' 64 rows: said at build time, naming the tensor
    mc = ModelConfig.from_dir(t.original, "fp8")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj: each expert's gate and up "
                                         r"have 64 rows, not a multiple of weight_block_size block_n 128"):
        MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids, mc.quant)


@pytest.mark.parametrize("block, message", [
    ((32, 32), r"model\.layers\.0\.self_attn\.k_proj\.weight: tensor_parallel_size 2 leaves each rank 16 of its 32 "
               r"rows, not a multiple of weight_block_size block_n 32"),
    ((16, 64), r"model\.layers\.0\.self_attn\.o_proj\.weight: tensor_parallel_size 2 leaves each rank 32 of its 64 "
               r"columns, not a multiple of weight_block_size block_k 64"),
])
def test_tp_shard_off_a_block_boundary_is_refused(root, block, message):
    """Checked where each rank builds its shard, before anything is loaded (so without spawning ranks here)."""
    mc = ModelConfig.from_dir(tiny(root, "qwen3_moe").original, {"weight_block_size": list(block)})
    TP.rank, TP.size = 0, 2
    try:
        with pytest.raises(ValueError, match=message):
            MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids, mc.quant)
    finally:
        TP.rank, TP.size = 0, 1


# ---- on CUDA (skipped without a GPU): the Triton FP8 GEMMs and fused MoE inside the engine -------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model_type", FP8_FAMILIES)
def test_fp8_on_cuda_matches_the_cpu_reference(root, model_type):
    """The same FP8 model on CUDA (Triton kernels) and on CPU (PyTorch references), fp32 activations: quantization
    is bitwise alike on both (IEEE division), so only the fp32 sums' order differs; an activation that lands on
    an e4m3 rounding boundary may still round the other way, hence a tolerance rather than equality."""
    t = tiny(root, model_type)
    mc = ModelConfig.from_dir(t.fp8)
    toks = torch.randint(3, 100, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    cpu_logits, cpu_ids = our_forward(build(t.fp8), toks, mc.num_moe_layers, mc.top_k)
    with torch.device("cuda"):
        model = MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids, mc.quant)
    load_checkpoint(model, t.fp8)
    from routereplay.context import Context, reset_context, set_context

    n = len(toks)
    cache = torch.full((n + 1, mc.num_moe_layers, mc.top_k), -1, dtype=torch.int32, device="cuda")
    set_context(Context(positions=torch.arange(n, device="cuda"), slot_mapping=torch.arange(n, device="cuda"),
                        routing_cache=cache))
    try:
        with torch.no_grad():
            logits = model.eval().compute_logits(model(torch.tensor(toks, device="cuda"))).cpu()
    finally:
        reset_context()
    assert (logits - cpu_logits).abs().max().item() <= 1e-3
    ours, theirs = cache[:n].cpu().long().sort(-1).values, cpu_ids.long().sort(-1).values
    assert (ours == theirs).all(-1).float().mean().item() >= 0.97


@pytest.mark.gpu
@needs_cuda
def test_fp8_cuda_graphs_match_eager_and_debug_rows_are_positions(root):
    t = tiny(root, "qwen3_moe")
    ps = prompts(24, seed=1, lo=2, hi=60)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    runs = []
    for eager in (False, True):
        llm = LLM(t.fp8, dtype="bfloat16", max_model_len=256, block_size=16, max_num_seqs=32, num_kv_blocks=512,
                  enforce_eager=eager, routing_replay=DEBUG)
        assert bool(llm.engine.runner.graphs) != eager
        runs.append(llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False))
        llm.close()
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]
    for o in runs[0]:
        assert_positions(o)
