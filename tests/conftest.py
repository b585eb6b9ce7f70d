"""Every test starts from the same global RNG state, so unseeded ``torch.randn`` draws are
reproducible: a tolerance measured on one draw stays valid in CI."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["c", "foreach"])
def step_path(request, monkeypatch):
    """Run the optimizer's fused momentum/apply on the compiled kernels ("c") or on the ``_foreach``
    fallback ("foreach"): every optimizer test that takes this fixture checks both paths."""
    from fastortho.ops import _load

    if request.param == "c":
        if "cpu" not in _load.C_DEVICE_TYPES:
            pytest.skip("fastortho._C has no CPU kernels here (FASTORTHO_REQUIRE_C=1 in CI makes test_csrc fail)")
    else:
        monkeypatch.setattr(_load, "C_DEVICE_TYPES", frozenset())
    return request.param
