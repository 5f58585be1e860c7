"""Our model code vs transformers on the same tiny checkpoint: logits and chosen experts."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from routereplay.config import ModelConfig
from routereplay.context import Context, reset_context, set_context
from routereplay.models.loader import load_checkpoint
from routereplay.models.transformer import MoECausalLM
from tests.helpers import FAMILIES, reference_forward, tiny_checkpoint


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpts"))


def build(model_dir: str) -> MoECausalLM:
    mc = ModelConfig.from_dir(model_dir)
    model = MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids)
    load_checkpoint(model, model_dir)
    return model.eval()


def our_forward(model, token_ids, num_moe_layers, top_k):
    """Full-sequence forward without a KV cache; routing recorded into a fresh routing cache."""
    n = len(token_ids)
    cache = torch.full((n + 1, num_moe_layers, top_k), -1, dtype=torch.int32)
    set_context(Context(positions=torch.arange(n), slot_mapping=torch.arange(n), routing_cache=cache))
    try:
        with torch.no_grad():
            logits = model.compute_logits(model(torch.tensor(token_ids)))
    finally:
        reset_context()
    return logits, cache[:n]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_and_experts_match_transformers(ckpt_root, model_type):
    d = tiny_checkpoint(ckpt_root, model_type)
    mc = ModelConfig.from_dir(d)
    tokens = torch.randint(3, 100, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_logits, ref_ids = reference_forward(d, tokens)
    logits, ids = our_forward(build(d), tokens, mc.num_moe_layers, mc.top_k)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert ref_ids.shape == ids.shape
    ours = ids.long().sort(-1).values
    theirs = ref_ids.long().sort(-1).values
    mismatch = (ours != theirs).any(-1).nonzero().tolist()
    assert not mismatch, f"expert sets differ at (token, moe layer) {mismatch[:5]}"


def test_model_facts_are_derived(ckpt_root):
    mc = ModelConfig.from_dir(tiny_checkpoint(ckpt_root, "glm4_moe"))
    assert mc.moe_layer_ids == [1, 2, 3] and mc.top_k == 2 and mc.num_experts == 8
    mc = ModelConfig.from_dir(tiny_checkpoint(ckpt_root, "qwen3_moe"))
    assert mc.moe_layer_ids == [1, 3]  # decoder_sparse_step=2
    mc = ModelConfig.from_dir(tiny_checkpoint(ckpt_root, "qwen2_moe"))
    assert mc.moe_layer_ids == [1, 2, 3]  # mlp_only_layers=[0]
    assert str(mc.routing_dtype) == "uint8"


def _copy(ckpt_root, tmp_path, model_type="qwen3_moe"):
    src = tiny_checkpoint(ckpt_root, model_type)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return str(dst)


def test_unknown_model_type_lists_supported(tmp_path, ckpt_root):
    d = _copy(ckpt_root, tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "llama_moe_x"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"llama_moe_x.*supported: .*qwen3_moe"):
        ModelConfig.from_dir(d)


def test_unreadable_config(tmp_path, ckpt_root):
    d = _copy(ckpt_root, tmp_path)
    open(os.path.join(d, "config.json"), "w").write("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        ModelConfig.from_dir(d)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_dir(d)


def _edit_checkpoint(d, edit):
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
         r"tensor missing .*model\.layers\.1\.mlp\.experts\.gate_up_proj \(expert 3, up\)"),
        (lambda t: t.pop("model.norm.weight"), r"tensor missing .*model\.norm\.weight"),
        (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}),
         r"unexpected tensor 'model\.layers\.0\.extra\.weight'"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 64)}),
         r"shape mismatch for 'model\.layers\.0\.self_attn\.q_proj\.weight'.*expected \[64, 64\], found \[3, 64\]"),
    ],
    ids=["missing-expert", "missing", "unexpected", "shape"],
)
def test_bad_checkpoint_is_rejected_before_loading(tmp_path, ckpt_root, edit, message):
    d = _copy(ckpt_root, tmp_path)
    _edit_checkpoint(d, edit)
    mc = ModelConfig.from_dir(d)
    model = MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(model, d)
    assert all((p == 7.0).all() for p in model.parameters()), "a failed load wrote some parameters"


def test_sharded_checkpoint_loads(tmp_path, ckpt_root):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint(ckpt_root, "mixtral")
    dst = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, max_shard_size="100KB")
    assert os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
    a, b = build(src), build(dst)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
