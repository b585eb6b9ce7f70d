"""Parameter shapes of four models, for the distributed cost model (``bench/simulate_distributed.py``).

Each preset lists its Muon parameters (weight matrices and stacked expert weights, in the
``(out_features, in_features)`` orientation of ``nn.Linear``) and its AdamW parameters (embeddings,
output head, norms), with the count of each per model, plus the parameters one token touches (dense
models: all; MoE: the routed top-k experts only), which set the forward+backward flops.

Shapes come from the published configurations:

* ``gpt2-xl``: GPT-2 XL (48 layers, d = 1600, 25 heads, context 1024, vocabulary 50257, tied head).
  The attention input projection is one fused QKV matrix 4800×1600, as GPT-2 stores it.
* ``llama3-8b`` / ``llama3-70b``: Llama 3 (32 / 80 layers, d = 4096 / 8192, 32 / 64 query heads and
  8 key/value heads of dimension 128 (GQA: k and v are 1024×d), SwiGLU width 14336 / 28672,
  vocabulary 128256, untied head).
* ``moe-1t``: a Kimi-K2-like MoE (61 layers, the first dense with SwiGLU width 18432; 60 MoE layers of
  384 routed experts, gate/up 2048×7168 and down 7168×2048, top 8, one shared expert of the same
  shape; router 384×7168; MLA attention with 64 heads: q_a 1536×7168, q_b 12288×1536
  (64·(128+64)), kv_a 576×7168 (512 + 64), kv_b 16384×512 (64·(128+128)), o 7168×8192;
  vocabulary 163840, untied head). About 1.03e12 parameters, 3.2e10 touched per token.

Expert weights are stacked per layer and projection, ``(384, m, n)``, one parameter each (how MoE
code under expert parallelism stores them; ``fastortho.Muon`` orthogonalizes each expert of a stack
independently).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MuonParam", "Preset", "PRESETS", "preset"]


@dataclass(frozen=True)
class MuonParam:
    """``count`` parameters of ``shape``: ``(m, n)`` a matrix, ``(B, m, n)`` a stack of B experts."""

    name: str
    shape: tuple[int, ...]
    count: int
    expert: bool = False  # a stack of routed experts (sharded over the expert-parallel dim)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Preset:
    name: str
    muon: tuple[MuonParam, ...]
    adamw_numel: int  # embeddings, head, norms, biases
    active_per_token: int  # parameters one token multiplies (for 6·N·tokens)
    n_experts: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def muon_numel(self) -> int:
        return sum(p.numel * p.count for p in self.muon)

    @property
    def total(self) -> int:
        return self.muon_numel + self.adamw_numel


def _gpt2_xl() -> Preset:
    L, d, V, ctx = 48, 1600, 50257, 1024
    muon = (MuonParam("attn.qkv", (3 * d, d), L), MuonParam("attn.proj", (d, d), L),
            MuonParam("mlp.fc", (4 * d, d), L), MuonParam("mlp.proj", (d, 4 * d), L))
    # wte, wpe; per layer 2 LayerNorms (2·2d) and the biases (3d + d + 4d + d); the final LayerNorm
    adamw = V * d + ctx * d + L * (4 * d + 9 * d) + 2 * d
    p = Preset("gpt2-xl", muon, adamw, 0)
    # the tied head multiplies every token; wpe/wte lookups are not matmuls
    return Preset("gpt2-xl", muon, adamw, p.muon_numel + V * d,
                  notes="fused QKV 4800x1600; tied embedding/head")


def _llama3(name: str, L: int, d: int, heads: int, kv: int, ffn: int, V: int = 128256) -> Preset:
    hd = d // heads
    muon = (MuonParam("attn.q", (heads * hd, d), L), MuonParam("attn.k", (kv * hd, d), L),
            MuonParam("attn.v", (kv * hd, d), L), MuonParam("attn.o", (d, heads * hd), L),
            MuonParam("mlp.gate", (ffn, d), L), MuonParam("mlp.up", (ffn, d), L),
            MuonParam("mlp.down", (d, ffn), L))
    adamw = 2 * V * d + L * 2 * d + d  # embedding, untied head, RMSNorms
    mn = sum(p.numel * p.count for p in muon)
    return Preset(name, muon, adamw, mn + V * d, notes=f"GQA: {heads} q heads, {kv} kv heads of {hd}")


def _moe_1t() -> Preset:
    L, d, V, E, topk = 61, 7168, 163840, 384, 8
    moe_ffn, dense_ffn, n_dense = 2048, 18432, 1
    Lm = L - n_dense
    h, q_lora, kv_lora, nope, rope, vd = 64, 1536, 512, 128, 64, 128
    attn = (MuonParam("attn.q_a", (q_lora, d), L), MuonParam("attn.q_b", (h * (nope + rope), q_lora), L),
            MuonParam("attn.kv_a", (kv_lora + rope, d), L),
            MuonParam("attn.kv_b", (h * (nope + vd), kv_lora), L),
            MuonParam("attn.o", (d, h * vd), L))
    dense = (MuonParam("dense.gate", (dense_ffn, d), n_dense), MuonParam("dense.up", (dense_ffn, d), n_dense),
             MuonParam("dense.down", (d, dense_ffn), n_dense))
    shared = (MuonParam("shared.gate", (moe_ffn, d), Lm), MuonParam("shared.up", (moe_ffn, d), Lm),
              MuonParam("shared.down", (d, moe_ffn), Lm), MuonParam("router", (E, d), Lm))
    experts = (MuonParam("experts.gate", (E, moe_ffn, d), Lm, expert=True),
               MuonParam("experts.up", (E, moe_ffn, d), Lm, expert=True),
               MuonParam("experts.down", (E, d, moe_ffn), Lm, expert=True))
    muon = attn + dense + shared + experts
    # embedding, untied head; RMSNorms: 2 per layer + q_a/kv_a norms + final
    adamw = 2 * V * d + L * (2 * d + q_lora + kv_lora) + d
    per_token = sum(p.numel * p.count for p in attn + dense + shared) \
        + topk * 3 * moe_ffn * d * Lm + V * d
    return Preset("moe-1t", muon, adamw, per_token, n_experts=E,
                  notes="Kimi-K2-like: 384 experts (top 8) + 1 shared, MLA attention")


PRESETS: dict[str, Preset] = {p.name: p for p in (_gpt2_xl(), _llama3("llama3-8b", 32, 4096, 32, 8, 14336),
                                                  _llama3("llama3-70b", 80, 8192, 64, 8, 28672), _moe_1t())}


def preset(name: str) -> Preset:
    """The preset called ``name`` (one of :data:`PRESETS`); a clear error otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"--model must be one of {sorted(PRESETS)}, got {name!r}") from None
