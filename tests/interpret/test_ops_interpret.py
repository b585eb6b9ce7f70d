"""torch.library wiring of the Triton backend, exercised under the interpreter at tiny sizes."""
from __future__ import annotations

import torch
from _common import ns_triton

import fastortho.ops  # noqa: F401  (registers fastortho::newton_schulz_triton)
from fastortho.coefficients import get_schedule


def _args(G, gram):
    co, safety = get_schedule("polar_express")
    return (G, [c[0] for c in co], [c[1] for c in co], [c[2] for c in co], safety, "fro", 1e-7,
            torch.bfloat16, torch.float32, False, gram)


def test_opcheck():
    """Schema, fake (meta) impl, dispatch and autograd registration checks of torch.library."""
    G = torch.randn(2, 8, 12)
    for gram in (False, True):
        torch.library.opcheck(torch.ops.fastortho.newton_schulz_triton.default, _args(G, gram))
    torch.library.opcheck(torch.ops.fastortho.newton_schulz_triton.default, _args(torch.randn(1, 12, 8), None))


def test_torch_compile_fullgraph():
    """Dynamo traces the op through its fake impl without a graph break."""
    def f(G):
        return ns_triton(G * 2.0, cdt=torch.bfloat16, out=torch.float32)

    G = torch.randn(2, 8, 12)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(G), f(G))
