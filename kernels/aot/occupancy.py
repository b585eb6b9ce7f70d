"""Per-arch limits and the occupancy model: shared-memory limits, resident CTAs per SM, waves."""
from __future__ import annotations

# Per-block opt-in shared memory (bytes) when ``_config.SMEM_LIMIT`` has no entry for an arch
# (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
_SMEM_LIMIT_FALLBACK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                        100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024}
# Per-SM occupancy limits (same source): shared memory per SM, resident warps, resident CTAs.
SM_SMEM = {80: 164 * 1024, 86: 100 * 1024, 87: 164 * 1024, 89: 100 * 1024, 90: 228 * 1024,
           100: 228 * 1024, 103: 228 * 1024, 120: 100 * 1024}
SM_WARPS = {80: 64, 86: 48, 87: 48, 89: 48, 90: 64, 100: 64, 103: 64, 120: 48}
SM_CTAS = {80: 32, 86: 16, 87: 16, 89: 24, 90: 32, 100: 32, 103: 32, 120: 24}
SM_REGS = 65536
CTA_SMEM_RESERVED = 1024      # the driver reserves 1 KiB of shared memory per resident CTA (sm_80+)
H100_SMS = 132                # H100 SXM5 / H200


def smem_limit(arch: int) -> int:
    """Per-block shared-memory limit used by the launchers for ``arch`` (their table first)."""
    from .. import _config

    table = getattr(_config, "SMEM_LIMIT", {})
    if arch in table:
        return int(table[arch])
    return int(_SMEM_LIMIT_FALLBACK.get(arch, 99 * 1024))


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> int:
    """Resident CTAs per SM from registers (256-register warp allocation units), shared memory
    (+1 KiB reserved per CTA) and the warp / CTA limits of the arch."""
    if regs <= 0 or num_warps <= 0:
        return 0
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGS // per_warp) // num_warps
    by_smem = SM_SMEM.get(arch, 100 * 1024) // (smem + CTA_SMEM_RESERVED) if smem else 10 ** 9
    by_warps = SM_WARPS.get(arch, 48) // num_warps
    return max(0, min(by_regs, by_smem, by_warps, SM_CTAS.get(arch, 16)))


def waves(programs: int, ctas_per_sm: int, sms: int = H100_SMS) -> tuple[float, float]:
    """(waves, wave efficiency): programs / slots, and the busy fraction of the last-wave-rounded grid."""
    slots = ctas_per_sm * sms
    if slots <= 0 or programs <= 0:
        return 0.0, 0.0
    w = programs / slots
    return w, programs / (-(-programs // slots) * slots)


# ----------------------------------------------------------------------------------------------
