"""muon_param_groups on the module trees of real architectures, against the split written by hand.

Each model below is written here by hand to mirror its upstream module tree (names, module types,
shapes, tying), and built on the meta device: no weights, no downloads, no memory. The expected
split is the one a practitioner writes for Muon:

* Muon: the hidden matrices of the body: attention and MLP projections, and conv kernels. Convention
  (ours, following "Muon: an optimizer for hidden layers" by Keller Jordan, which trains every conv
  filter with Muon): a conv stem and a ViT patch projection are dense linear maps of pixel patches,
  so they are Muon matrices too; users who treat them as input layers pass ``force_adamw``.
* AdamW: token and position embeddings (lookup/additive tables), learned tokens, the output head
  (tied or not), norms, biases and every other 1-D parameter.

GPT-2 medium (width = context = 1024) and the byte-level char model (vocab = width = 256) routed
every ``c_proj`` to AdamW before head detection stopped reading layer sizes.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from fastortho.optim.param_groups import describe_param_groups, muon_param_groups


# ---------------------------------------------------------------------------------------------
# nanoGPT (karpathy/nanoGPT model.py): GPT-2 small / medium, and a byte-level char model
# ---------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None


class CausalSelfAttention(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.0)


class MLP(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d, bias=bias)
        self.dropout = nn.Dropout(0.0)


class Block(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(d, bias), CausalSelfAttention(d, bias)
        self.ln_2, self.mlp = LayerNorm(d, bias), MLP(d, bias)


class GPT(nn.Module):
    def __init__(self, vocab, ctx, d, layers, bias=True, tied=True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(ctx, d), drop=nn.Dropout(0.0),
            h=nn.ModuleList(Block(d, bias) for _ in range(layers)), ln_f=LayerNorm(d, bias),
        ))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.transformer.wte.weight = self.lm_head.weight  # nanoGPT's weight tying


def gpt_hand_split(model):
    """modded-nanogpt's split: the 2-D weights inside the blocks go to Muon, everything else to AdamW."""
    return {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2}


# ---------------------------------------------------------------------------------------------
# LLaMA (HF LlamaForCausalLM), Llama-3-8B shapes with 2 layers: GQA, SwiGLU, RMSNorm, untied head
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class LlamaAttention(nn.Module):
    def __init__(self, d, heads, kv_heads):
        super().__init__()
        hd = d // heads
        self.q_proj = nn.Linear(d, heads * hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(heads * hd, d, bias=False)


class LlamaMLP(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, d, heads, kv_heads, ff):
        super().__init__()
        self.self_attn, self.mlp = LlamaAttention(d, heads, kv_heads), LlamaMLP(d, ff)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)


class LlamaModel(nn.Module):
    def __init__(self, vocab, d, layers, heads, kv_heads, ff):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaDecoderLayer(d, heads, kv_heads, ff) for _ in range(layers))
        self.norm = RMSNorm(d)


class LlamaForCausalLM(nn.Module):
    def __init__(self, vocab=128256, d=4096, layers=2, heads=32, kv_heads=8, ff=14336):
        super().__init__()
        self.model = LlamaModel(vocab, d, layers, heads, kv_heads, ff)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def llama_hand_split(model):
    return {n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.ndim == 2}


# ---------------------------------------------------------------------------------------------
# T5 (HF T5ForConditionalGeneration, t5-small shapes): shared embedding used by encoder, decoder and
# the tied lm_head; a relative-attention-bias Embedding in the first block of each stack
# ---------------------------------------------------------------------------------------------
class T5Attention(nn.Module):
    def __init__(self, d, heads, d_kv, has_bias):
        super().__init__()
        inner = heads * d_kv
        self.q, self.k = nn.Linear(d, inner, bias=False), nn.Linear(d, inner, bias=False)
        self.v, self.o = nn.Linear(d, inner, bias=False), nn.Linear(inner, d, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(32, heads)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, d, heads, d_kv, has_bias):
        super().__init__()
        self.SelfAttention, self.layer_norm = T5Attention(d, heads, d_kv, has_bias), RMSNorm(d)
        self.dropout = nn.Dropout(0.0)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, d, heads, d_kv):
        super().__init__()
        self.EncDecAttention, self.layer_norm = T5Attention(d, heads, d_kv, False), RMSNorm(d)
        self.dropout = nn.Dropout(0.0)


class T5DenseActDense(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.wi, self.wo = nn.Linear(d, ff, bias=False), nn.Linear(ff, d, bias=False)
        self.dropout, self.act = nn.Dropout(0.0), nn.ReLU()


class T5LayerFF(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.DenseReluDense, self.layer_norm = T5DenseActDense(d, ff), RMSNorm(d)
        self.dropout = nn.Dropout(0.0)


class T5Block(nn.Module):
    def __init__(self, d, heads, d_kv, ff, decoder, has_bias):
        super().__init__()
        layers = [T5LayerSelfAttention(d, heads, d_kv, has_bias)]
        if decoder:
            layers.append(T5LayerCrossAttention(d, heads, d_kv))
        layers.append(T5LayerFF(d, ff))
        self.layer = nn.ModuleList(layers)


class T5Stack(nn.Module):
    def __init__(self, embed_tokens, d, heads, d_kv, ff, n, decoder):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(T5Block(d, heads, d_kv, ff, decoder, has_bias=i == 0) for i in range(n))
        self.final_layer_norm, self.dropout = RMSNorm(d), nn.Dropout(0.0)


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, vocab=32128, d=512, heads=8, d_kv=64, ff=2048, n=6):
        super().__init__()
        self.shared = nn.Embedding(vocab, d)
        self.encoder = T5Stack(self.shared, d, heads, d_kv, ff, n, decoder=False)
        self.decoder = T5Stack(self.shared, d, heads, d_kv, ff, n, decoder=True)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.shared.weight  # tie_word_embeddings=True for t5-small


def t5_hand_split(model):
    return {n for n, p in model.named_parameters()
            if ".block." in n and p.ndim == 2 and "relative_attention_bias" not in n}


# ---------------------------------------------------------------------------------------------
# ViT (timm VisionTransformer, vit_base_patch16_224)
# ---------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, d, patch=16):
        super().__init__()
        self.proj = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.norm = nn.Identity()


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.q_norm = self.k_norm = nn.Identity()


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)


class ViTBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(d), Attention(d), nn.Identity()
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(d), Mlp(d, 4 * d), nn.Identity()


class VisionTransformer(nn.Module):
    def __init__(self, d=768, depth=12, classes=1000, img=224, patch=16):
        super().__init__()
        self.patch_embed = PatchEmbed(d, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, d))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[ViTBlock(d) for _ in range(depth)])
        self.norm, self.fc_norm = nn.LayerNorm(d), nn.Identity()
        self.head = nn.Linear(d, classes)


def vit_hand_split(model):
    return {n for n, p in model.named_parameters()
            if (n.startswith("blocks.") and p.ndim == 2) or n == "patch_embed.proj.weight"}


# ---------------------------------------------------------------------------------------------
# ResNet (torchvision resnet18)
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)


class ResNet(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)


def resnet_hand_split(model):
    return {n for n, p in model.named_parameters() if p.ndim == 4}  # every conv kernel


# ---------------------------------------------------------------------------------------------
MODELS = {
    # name: (constructor, hand split, number of Muon matrices as a cross-check of the hand split)
    "nanogpt-small": (lambda: GPT(50304, 1024, 768, 12), gpt_hand_split, 12 * 4),
    "nanogpt-medium": (lambda: GPT(50304, 1024, 1024, 24), gpt_hand_split, 24 * 4),
    "char-vocab-eq-width": (lambda: GPT(256, 512, 256, 6, bias=False, tied=False), gpt_hand_split, 6 * 4),
    "llama": (LlamaForCausalLM, llama_hand_split, 2 * 7),
    "t5-small": (T5ForConditionalGeneration, t5_hand_split, 6 * 6 + 6 * 10),
    "vit-base": (VisionTransformer, vit_hand_split, 12 * 4 + 1),
    "resnet18": (ResNet, resnet_hand_split, 1 + 16 + 3),
}


def _build(name):
    with torch.device("meta"):
        return MODELS[name][0]()


@pytest.mark.parametrize("name", list(MODELS))
def test_routing_matches_the_hand_written_split(name):
    model = _build(name)
    _, hand, n_muon = MODELS[name]
    expected = hand(model)
    assert len(expected) == n_muon
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every head here is found by tying or by name: no guess
        rows = describe_param_groups(model)
        groups = muon_param_groups(model)
    got = {r.name for r in rows if r.group == "muon"}
    assert sorted(got - expected) == [] and sorted(expected - got) == []
    # The groups hold the same parameters as the table, each once.
    params = dict(model.named_parameters())
    in_muon = {id(p) for g in groups if g["algorithm"] == "muon" for p in g["params"]}
    assert in_muon == {id(params[n]) for n in expected}
    assert sum(len(g["params"]) for g in groups) == len(params)
    # Conv kernels are flattened; plain matrices carry no options.
    for g in groups:
        if g["algorithm"] == "muon":
            assert all(p.ndim == 4 for p in g["params"]) == g.get("flatten", False)


def test_gpt2_medium_keeps_every_c_proj_in_muon():
    # d = context = 1024: c_proj (1024 out) has the size of the position table.
    model = _build("nanogpt-medium")
    route = {r.name: r for r in describe_param_groups(model)}
    for i in range(24):
        for n in (f"transformer.h.{i}.attn.c_proj.weight", f"transformer.h.{i}.mlp.c_proj.weight"):
            assert route[n].group == "muon", route[n]
    assert route["transformer.wte.weight"].reason == "embedding, tied to the output head"
    assert "lm_head.weight" not in route  # the tied head is the embedding's parameter, listed once


def test_char_model_with_vocab_equal_to_width():
    model = _build("char-vocab-eq-width")
    route = {r.name: r for r in describe_param_groups(model)}
    assert route["lm_head.weight"].group == "adamw" and "named 'lm_head'" in route["lm_head.weight"].reason
    assert all(route[f"transformer.h.{i}.{k}.c_proj.weight"].group == "muon"
               for i in range(6) for k in ("attn", "mlp"))


def test_vit_learned_tokens_and_tables_go_to_adamw():
    route = {r.name: r for r in describe_param_groups(_build("vit-base"))}
    assert route["cls_token"].group == "adamw" and route["pos_embed"].group == "adamw"
    assert route["head.weight"].group == "adamw"
    assert route["patch_embed.proj.weight"].options == (("flatten", True),)


def test_t5_relative_attention_bias_is_an_embedding():
    route = {r.name: r for r in describe_param_groups(_build("t5-small"))}
    for stack in ("encoder", "decoder"):
        r = route[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        assert r.group == "adamw" and r.reason.startswith("embedding")
    assert route["shared.weight"].reason == "embedding, tied to the output head"
    assert not any(n.startswith(("encoder.embed_tokens", "decoder.embed_tokens")) for n in route)


def test_meta_models_are_free():
    # meta tensors carry shapes only: the 8B-vocabulary LLaMA tree costs no memory.
    model = _build("llama")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 1e9
    assert math.isclose(model.lm_head.weight.numel(), 128256 * 4096)
