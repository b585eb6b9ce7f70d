"""The op layer (``fastortho.ops``): every ``torch.ops.fastortho`` op has a typed wrapper there and an
``opcheck``; the ``muon_apply_.tensor`` overload; the warning when ``fastortho._C`` is present but broken."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import fastortho
from fastortho import ops
from fastortho.ops import _load

REQUIRE_C = os.environ.get("FASTORTHO_REQUIRE_C") == "1"
needs_c = pytest.mark.skipif(not _load.HAS_C and not REQUIRE_C,
                             reason=f"fastortho._C not built ({_load.IMPORT_ERROR!r})")

#: op -> its wrapper in the op layer
WRAPPERS = {
    "fastortho::muon_momentum_": ops.muon_momentum_,
    "fastortho::muon_apply_": ops.muon_apply_,
    "fastortho::newton_schulz_triton": ops.newton_schulz_triton,
}


def _opcheck_momentum():
    shapes = [(8, 12), (3,), (0, 4)]
    grads = [torch.randn(s).bfloat16() for s in shapes]
    bufs = [torch.randn(s) for s in shapes]
    outs = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
    torch.library.opcheck(torch.ops.fastortho.muon_momentum_.default,
                          (grads, bufs, outs, torch.empty(len(shapes), dtype=torch.float64), 0.9, True, True))


def _apply_lists():
    return [torch.randn(8, 12), torch.randn(5)], [torch.randn(8, 12).bfloat16(), torch.randn(5).bfloat16()]


def _opcheck_apply():
    params, updates = _apply_lists()
    torch.library.opcheck(torch.ops.fastortho.muon_apply_.default, (params, updates, 0.02, 0.1, [1.0, 2.0]))


def _opcheck_apply_tensor():
    params, updates = _apply_lists()
    torch.library.opcheck(torch.ops.fastortho.muon_apply_.tensor,
                          (params, updates, torch.tensor(0.02), torch.tensor(0.1), torch.tensor([1.0, 2.0])))


#: op overload -> its CPU opcheck here, or the test file that runs it (the Triton op runs on CPU tensors
#: only under TRITON_INTERPRET=1, set before the kernels are defined: tests/test_kernels_interpret.py
#: runs that file in such a subprocess)
OPCHECKS = {
    "fastortho::muon_momentum_": _opcheck_momentum,
    "fastortho::muon_apply_": _opcheck_apply,
    "fastortho::muon_apply_.tensor": _opcheck_apply_tensor,
    "fastortho::newton_schulz_triton": "tests/interpret/test_ops_interpret.py",
}


def _registered() -> set[str]:
    """Every fastortho op overload the dispatcher knows (``ns::name`` or ``ns::name.overload``)."""
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("fastortho::"):
            names.add(schema.name + (f".{schema.overload_name}" if schema.overload_name else ""))
    return names


def test_every_op_has_a_wrapper_and_an_opcheck():
    registered = _registered()
    expected = set(_load.OPS) if _load.HAS_C else set()
    if _load.triton_available():
        expected.add("fastortho::newton_schulz_triton")
    assert expected <= registered, f"ops not registered: {expected - registered}"
    assert registered <= OPCHECKS.keys(), f"ops without an opcheck: {registered - OPCHECKS.keys()}"
    assert {r.split(".")[0] for r in registered} <= WRAPPERS.keys(), "ops without a wrapper in fastortho.ops"
    assert all(getattr(ops, w.__name__) is w for w in WRAPPERS.values())
    for where in OPCHECKS.values():
        if isinstance(where, str):
            assert "torch.library.opcheck" in (_load_text(where)), where


def _load_text(rel: str) -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / rel).read_text()


@needs_c
@pytest.mark.parametrize("op", [k for k, v in OPCHECKS.items() if callable(v)])
def test_opcheck_cpu(op):
    OPCHECKS[op]()


@needs_c
@pytest.mark.parametrize("lr, wd, scales", [
    (torch.tensor(0.02), 0.1, [1.0, 2.0]),
    (0.02, torch.tensor(0.1), [1.0, 2.0]),
    (0.02, 0.1, torch.tensor([1.0, 2.0])),
], ids=["lr", "weight_decay", "scales"])
def test_mixed_scalars_take_the_tensor_overload(lr, wd, scales):
    """Any scalar given as a tensor sends the call to ``muon_apply_.tensor`` (fp32 scalar math): the same
    bits as passing all three as float32 tensors."""
    p_c, u = _apply_lists()
    p_ref = [p.clone() for p in p_c]
    calls = []
    real = torch.ops.fastortho.muon_apply_.tensor
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.fastortho.muon_apply_, "tensor", lambda *a: (calls.append(a), real(*a))[1])
        ops.muon_apply_(p_c, u, lr=lr, weight_decay=wd, scales=scales, backend="c")
    real(p_ref, u, torch.tensor(0.02), torch.tensor(0.1), torch.tensor([1.0, 2.0]))
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(p_c, p_ref))


@needs_c
def test_tensor_overload_rejects_wrong_scalars():
    params, updates = _apply_lists()
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32 tensor of shape"):
        torch.ops.fastortho.muon_apply_.tensor(params, updates, torch.tensor(0.1), torch.tensor(0.0),
                                               torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="lr must be a float32 tensor with one element"):
        torch.ops.fastortho.muon_apply_.tensor(params, updates, torch.tensor(0.1, dtype=torch.float64),
                                               torch.tensor(0.0), torch.tensor([1.0, 2.0]))


# ----------------------------------------------------------------------------------------------
# loading fastortho._C
# ----------------------------------------------------------------------------------------------
def _raiser(exc: BaseException):
    def import_module(name: str):
        raise exc
    return import_module


def test_broken_extension_warns_with_the_reason_and_the_rebuild_command():
    err = ImportError("libc10_cuda.so: cannot open shared object file: No such file or directory")
    with pytest.warns(RuntimeWarning) as rec:
        mod, got = _load.load_extension(_raiser(err))
    assert mod is None and got is err and len(rec) == 1
    msg = str(rec[0].message)
    assert "libc10_cuda.so: cannot open shared object file" in msg
    assert "pip install --no-build-isolation -e ." in msg


def test_abi_mismatch_oserror_warns():
    with pytest.warns(RuntimeWarning, match="undefined symbol"):
        _load.load_extension(_raiser(OSError("_C.so: undefined symbol: _ZN3c10")))


def test_extension_not_built_is_silent():
    err = ModuleNotFoundError("No module named 'fastortho._C'", name="fastortho._C")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod, got = _load.load_extension(_raiser(err))
    assert mod is None and got is err


def test_public_names_are_the_op_layer():
    assert fastortho.muon_momentum_ is ops.muon_momentum_ and fastortho.muon_apply_ is ops.muon_apply_
    assert fastortho.HAS_C is _load.HAS_C and fastortho.HAS_C_CUDA is _load.HAS_C_CUDA
    assert fastortho.ns_triton_available is _load.triton_available
