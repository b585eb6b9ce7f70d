"""The manifest: one entry per distinct compiled kernel per (arch, shape, input dtype), and its
Markdown summaries."""
from __future__ import annotations

from collections.abc import Sequence

from .compiler import compile_launch
from .occupancy import occupancy, smem_limit, waves
from .trace import Launch, _short, describe, trace_newton_schulz


def parse_shape(s: str) -> tuple[int, int, int]:
    """'4096x16384' -> (1, 4096, 16384); '24x768x3072' -> (24, 768, 3072)."""
    parts = [int(p) for p in s.lower().split("x")]
    if len(parts) == 2:
        return (1, *parts)
    if len(parts) == 3:
        return tuple(parts)
    raise ValueError(f"shape {s!r}: write MxN or BxMxN")


def shape_str(shape: Sequence[int]) -> str:
    B, m, n = shape
    return f"{m}x{n}" if B == 1 else f"{B}x{m}x{n}"


def with_tall(shapes: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The shapes plus the transpose of each non-square one (the tall orientation: XᵀX kernels)."""
    out = list(shapes)
    for B, m, n in shapes:
        if m != n and (B, n, m) not in out:
            out.append((B, n, m))
    return out


def manifest_entries(arch: int, shape: tuple[int, int, int], input_dtype: str, out_dir: str | None = None,
                     launches: list[Launch] | None = None) -> list[dict]:
    """One manifest entry per distinct compiled kernel that newton_schulz launches for this input."""
    launches = trace_newton_schulz(shape, input_dtype, arch) if launches is None else launches
    groups: dict[str, dict] = {}
    for i, ln in enumerate(launches):
        rec = compile_launch(ln, arch, out_dir)
        variant, cfg = describe(ln)
        e = groups.get(rec["key"])
        if e is None:
            programs = 1
            for g in ln.grid:
                programs *= g
            ctas = occupancy(arch, rec["regs"], rec["smem_bytes"], rec["num_warps"])
            tiles = persistent_tiles(ln)
            w, eff = waves(programs, ctas) if tiles is None else (tiles / programs, tiles / (-(-tiles // programs) * programs))
            e = groups[rec["key"]] = dict(
                kernel=_short(ln.kernel), variant=variant, arch=arch, shape=shape_str(shape),
                input_dtype=input_dtype, config=cfg, regs=rec["regs"], spill_bytes=rec["spill_bytes"],
                smem_bytes=rec["smem_bytes"], smem_limit=smem_limit(arch), cubin=rec.get("cubin"),
                programs=programs, tiles=tiles if tiles is not None else programs, ctas_per_sm=ctas,
                waves_h100=round(w, 3), wave_efficiency_h100=round(eff, 4),
                launches=0, launch_index=[], mma=rec["sass"]["mma_ptx"], sass=rec["sass"])
        e["launches"] += 1
        e["launch_index"].append(i)
    return list(groups.values())


def persistent_tiles(ln: Launch) -> int | None:
    """Output tiles a persistent launch (``N_PROG`` among its arguments) walks, None for a one-tile-per-
    program launch: every triangle tile of the batch (symmetric kernel) or every k×L tile (apply)."""
    arg = dict(zip(ln.fn.arg_names, ln.args))
    if "N_PROG" not in arg:
        return None
    if "N_TRI" in arg:
        return int(arg["N_BATCH"]) * int(arg["N_TRI"])
    return int(arg["N_BATCH"]) * int(arg["TILES_M"]) * int(arg["TILES_N"])


def build_manifest(archs: Sequence[int], shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[str],
                   out_dir: str | None = None, log=None) -> list[dict]:
    entries = []
    for arch in archs:
        for shape in shapes:
            for dt in dtypes:
                es = manifest_entries(arch, shape, dt, out_dir)
                if log:
                    log(f"sm_{arch} {shape_str(shape)} {dt}: {len(es)} kernels")
                entries += es
    return entries


def summary_markdown(entries: list[dict]) -> str:
    """Markdown table of a manifest (one row per entry)."""
    lines = ["| arch | shape | G | kernel | variant | config | regs | spill B | smem KiB / limit | CTAs/SM | "
             "programs | wave eff. (132 SMs) | wgmma waits in loop | loads | C stores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        c = e["config"]
        if "block_m" in c and "block_k" in c:
            tile = f"{c['block_m']}x{c.get('block_n', c['block_m'])}x{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
        else:
            tile = f"w{c['num_warps']}"
        s = e["sass"]
        waits = ",".join(str(w) for w in s["wgmma_waits_in_loop"]) or ("—" if not s["hgmma"] else "none")
        loads = f"TMA {s['utmaldg']}" if s["utmaldg"] else (f"cp.async {s['ldgsts']}" if s["ldgsts"] else "LDG")
        st = (f"TMA {s['utmastg']}" if s["utmastg"] else
              f"{s['stg_128']}×128b {s['stg_u16']}×16b" if s["stg_total"] else "—")
        lines.append(f"| sm_{e['arch']} | {e['shape']} | {e['input_dtype']} | {e['kernel']} | {e['variant']} | {tile} | "
                     f"{e['regs']} | {e['spill_bytes']} | {e['smem_bytes'] / 1024:.0f} / {e['smem_limit'] // 1024} | "
                     f"{e['ctas_per_sm']} | {e['programs']} | {e['wave_efficiency_h100']:.0%} | {waits} | {loads} | {st} |")
    return "\n".join(lines)


def waves_markdown(entries: list[dict], arch: int = 90, input_dtype: str = "bf16") -> str:
    """Per shape and launched kernel on sm_<arch>: programs, tiles, CTAs/SM (registers + shared memory),
    waves and wave efficiency on the 132 SMs of an H100 SXM / H200. A persistent kernel launches
    SMs × CTAs/SM programs (or fewer) that walk the tiles: its waves are tiles per program and its
    efficiency tiles / (⌈tiles / programs⌉ · programs)."""
    lines = ["| shape | kernel [variant] | tile | launches | programs | tiles | regs | smem KiB | CTAs/SM | waves | "
             "wave efficiency |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if e["arch"] != arch or e["input_dtype"] != input_dtype:
            continue
        c = e["config"]
        tile = (f"{c['block_m']}x{c.get('block_n', c['block_m'])}x{c['block_k']}" if "block_m" in c else "—")
        lines.append(f"| {e['shape']} | {e['kernel']} [{e['variant']}] | {tile} | {e['launches']} | {e['programs']} | "
                     f"{e.get('tiles', e['programs'])} | "
                     f"{e['regs']} | {e['smem_bytes'] / 1024:.0f} | {e['ctas_per_sm']} | {e['waves_h100']:.2f} | "
                     f"{e['wave_efficiency_h100']:.0%} |")
    return "\n".join(lines)

