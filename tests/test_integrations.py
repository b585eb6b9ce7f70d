"""Adapters for Hugging Face Trainer, timm's optimizer factory, Lightning and accelerate.

Each test skips with the reason when its framework is not installed (none is a fastortho dependency;
``pip install transformers timm accelerate lightning`` installs them). Models are built from local
configs (no hub access) and trained for a few steps on CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastortho


def _group_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> str:
    opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
    for g in opt.param_groups:
        if any(q is p for q in g["params"]):
            return g["algorithm"]
    return "none"


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second contended thread only slows them down
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ----------------------------------------------------------------------------------------------
def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers, transformers.GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=40, T=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 64, (n, T), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.mark.parametrize("factory", [True, False], ids=["factory", "params_kwarg"])
def test_hf_trainer_trains_with_muon(tmp_path, one_thread, factory):
    transformers, model = _tiny_gpt2()
    from fastortho.integrations.transformers import MuonFactory, muon

    if factory and not hasattr(__import__("transformers.trainer_optimizer").trainer_optimizer,
                               "is_optimizer_factory"):
        pytest.skip(f"transformers {transformers.__version__} has no optimizer factories (added in 5.x)")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls_kwargs = muon(model, lr=0.02, adamw_lr=1e-3, factory=factory)
    assert (cls_kwargs[0] is MuonFactory) == factory
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=123.0)  # ignored on this path
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   optimizer_cls_and_kwargs=cls_kwargs)
    out = trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, fastortho.Muon)
    assert out.global_step == 5 and torch.isfinite(torch.tensor(out.training_loss))
    # routed by module: attention/MLP matrices to Muon, embeddings (and the tied head), biases, norms to AdamW
    h0 = model.transformer.h[0]
    assert _group_of(opt, h0.attn.c_attn.weight) == "muon" and _group_of(opt, h0.mlp.c_fc.weight) == "muon"
    assert _group_of(opt, model.transformer.wte.weight) == "adamw" and _group_of(opt, h0.ln_1.weight) == "adamw"
    assert _group_of(opt, h0.attn.c_attn.bias) == "adamw"
    # the Trainer's linear schedule scaled our lrs (not its learning_rate=123): initial_lr is ours
    assert {g["initial_lr"] for g in opt.param_groups} == {0.02, 1e-3}
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[n]), n  # every parameter was updated
    assert max(abs(p.detach() - before[n]).max().item() for n, p in model.named_parameters()) < 1.0


def test_hf_muon_leaves_frozen_parameters_out():
    _, model = _tiny_gpt2()
    from fastortho.integrations.transformers import muon

    model.transformer.h[0].requires_grad_(False)
    cls, kw = muon(model, lr=0.02, factory=False)
    ids = {id(p) for g in kw["params"] for p in g["params"]}
    assert id(model.transformer.h[0].attn.c_attn.weight) not in ids
    assert id(model.transformer.h[1].attn.c_attn.weight) in ids
    with pytest.raises(ValueError, match="pass the model"):
        muon(None, factory=False)


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------
def _tiny_vit():
    timm = pytest.importorskip("timm")
    import timm.optim  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10)
    return timm, model


def _train_steps(model, opt, steps=3):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_timm_create_optimizer_v2_with_module_routing(one_thread):
    timm, model = _tiny_vit()
    from fastortho.integrations import timm as fo_timm

    fo_timm.register()
    fo_timm.register()  # idempotent
    assert "fastorthomuon" in timm.optim.list_optimizers()
    opt = timm.optim.create_optimizer_v2(model, "fastorthomuon", lr=0.02, momentum=0.95,
                                         param_group_fn=fo_timm.param_groups)
    assert isinstance(opt, fastortho.Muon)
    assert _group_of(opt, model.head.weight) == "adamw"            # classifier head
    assert _group_of(opt, model.pos_embed) == "adamw"              # position table
    assert _group_of(opt, model.cls_token) == "adamw"
    assert _group_of(opt, model.blocks[0].attn.qkv.weight) == "muon"
    assert _group_of(opt, model.patch_embed.proj.weight) == "muon"  # conv stem, flattened
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    _train_steps(model, opt)
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)


def test_timm_own_groups_fallback_list_and_lookahead(one_thread):
    timm, model = _tiny_vit()
    from fastortho.integrations import timm as fo_timm

    fo_timm.register()
    opt = timm.optim.create_optimizer_v2(model, "fastorthomuon", lr=0.02, weight_decay=0.05,
                                         fallback_list=["head*"], betas=(0.9, 0.95))
    assert isinstance(opt, fastortho.Muon)
    assert _group_of(opt, model.head.weight) == "adamw"   # timm's use_fallback groups
    assert _group_of(opt, model.blocks[0].norm1.weight) == "adamw"
    assert _group_of(opt, model.blocks[0].mlp.fc1.weight) == "muon"
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model.blocks[0].mlp.fc1.weight)] == 0.05  # timm's decay group
    assert wd[id(model.pos_embed)] == 0.0  # the model's no_weight_decay() list keeps its 0
    assert {g["betas"] for g in opt.param_groups if g["algorithm"] == "adamw"} == {(0.9, 0.95)}
    _train_steps(model, opt, steps=1)
    la = timm.optim.create_optimizer_v2(model, "lookahead_fastorthomuon", lr=0.02)
    assert isinstance(la._base_optimizer, fastortho.Muon)
    _train_steps(model, la, steps=1)
    with pytest.raises(ValueError, match="layer_decay"):
        timm.optim.create_optimizer_v2(model, "fastorthomuon", lr=0.02, layer_decay=0.7)


def test_timm_underscore_name_is_timms_own_muon():
    timm, model = _tiny_vit()
    from fastortho.integrations import timm as fo_timm

    # timm splits at '_' and takes the last part: "fastortho_muon" is timm's "muon" (why the entry has no '_')
    opt = timm.optim.create_optimizer_v2(model, "fastortho_muon", lr=0.02)
    assert not isinstance(opt, fastortho.Muon)
    with pytest.raises(ValueError, match="without underscores"):
        fo_timm.register("fastortho_muon")


# ----------------------------------------------------------------------------------------------
# Lightning and accelerate
# ----------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def test_lightning_configure_optimizers(one_thread):
    L = pytest.importorskip("lightning")
    from fastortho.integrations.lightning import configure_optimizers

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return configure_optimizers(self, lr=0.02, adamw_lr=1e-3, heads=[self.net[4]],
                                        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))

    m = Module()
    before = m.net[2].weight.detach().clone()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, torch.utils.data.DataLoader(_batches(), batch_size=None))
    opt = trainer.optimizers[0]
    assert isinstance(opt, fastortho.Muon)
    assert _group_of(opt, m.net[2].weight) == "muon" and _group_of(opt, m.net[4].weight) == "adamw"
    assert not torch.equal(before, m.net[2].weight)
    assert {g["lr"] for g in opt.param_groups} == {0.02 * 0.5 ** 3, 1e-3 * 0.5 ** 3}  # 3 scheduler steps


def test_accelerate_prepare_after_construction_matches_plain(one_thread):
    accelerate = pytest.importorskip("accelerate")

    def run(prepare: bool, accum: int):
        model = _mlp()
        opt = fastortho.Muon(fastortho.muon_param_groups(model, heads=[model[4]]), lr=0.02, adamw_lr=1e-3)
        acc = None
        if prepare:
            acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accum)
            model, opt = acc.prepare(model, opt)
        for i, (x, y) in enumerate(_batches()):
            loss = nn.functional.cross_entropy(model(x), y)
            if prepare:
                with acc.accumulate(model):
                    acc.backward(loss)
                    opt.step()
                    opt.zero_grad()
            else:
                (loss / accum).backward()
                if (i + 1) % accum == 0:
                    opt.step()
                    opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt

    for accum in (1, 2):
        ref, _ = run(False, accum)
        got, opt = run(True, accum)
        assert isinstance(opt.optimizer, fastortho.Muon)
        for a, b in zip(ref, got):
            # both runs divide the loss by accum before backward: bit-identical (measured max |Δ| = 0)
            assert torch.equal(a, b)
        sd = opt.state_dict()
        assert any("momentum_buffer" in s for s in sd["state"].values())
