"""What a tensor's grid says about the QAT recipe that made it: the signature of a grid
scan (code shares of the largest element, scale rounding) and the recipe it points to."""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

from qatgguf.quant.lattice import GridStats


def recipe_signature(stats: GridStats) -> dict[str, object]:
    """Which code the block maximum maps to (share of grid blocks), the scale rounding and
    the QAT recipe those imply (ref: docs/DESIGN.md, "QAT grid recovery")."""
    total = stats.on_grid
    shares = (
        {f"{c:+d}": round(n / total, 4) for c, n in sorted(stats.max_codes.items())}
        if total
        else {}
    )
    p = {c: n / total for c, n in stats.max_codes.items()} if total else {}
    neg8, pos8, pos7 = p.get(-8, 0.0), p.get(8, 0.0), p.get(7, 0.0)
    # a scale learned per block (LSQ) leaves the block maximum wherever training put it;
    # every max-derived rule puts it on +-7 or +-8
    inner = sum(v for c, v in p.items() if abs(c) <= 6)
    if not total:
        recipe = "no grid"
    elif pos8 >= 0.1 and neg8 >= 0.1:
        recipe = "Q4_0-style: s = max/-8 (the max element always gets -8 in its sign)"
    elif inner >= 0.05:
        recipe = "learned per-block scale (LSQ-style): the max element's code varies, codes [-8, 7]"
    elif neg8 + pos8 < 0.01:
        recipe = "symmetric [-7, 7]: s = amax/7"
    elif pos7 >= 0.25:
        recipe = "symmetric round: s = amax/7.5 (torchao), codes [-8, 7]"
    else:
        recipe = "fixed per-block scale, codes [-8, 7]"
    return {"max_code_shares": shares, "scale_rounding": stats.scale_rounding(), "recipe": recipe}


def grid_signature(stats: GridStats, qtype: T | str) -> dict[str, object]:
    """`recipe_signature` for a grid of any type: for Q4_0 the 4-bit recipe; for TQ2_0 the
    2-bit grid and the share of blocks that need TQ2_0's negative scale (the block's largest
    weight is negative, so the grid is {-2,-1,0,1} times a positive step); for Q8_0 the
    8-bit grid and the share of blocks whose largest weight has the code 127."""
    name = qtype if isinstance(qtype, str) else qtype.name
    if name == "Q4_0":
        return recipe_signature(stats)
    total = stats.on_grid
    shares = (
        {f"{c:+d}": round(n / total, 4) for c, n in sorted(stats.max_codes.items())}
        if total
        else {}
    )
    if not total:
        recipe = "no grid"
    elif name == "TQ2_0":
        neg = stats.max_codes.get(-2, 0) / total
        ternary = (stats.max_codes.get(-1, 0) + stats.max_codes.get(1, 0)) / total
        recipe = (
            f"2-bit grid {{-1,0,1,2}}*d: negative scale in {neg:.1%} of blocks, "
            f"ternary (codes -1..1) in {ternary:.1%}"
        )
    else:
        full = (stats.max_codes.get(127, 0) + stats.max_codes.get(-127, 0)) / total
        recipe = f"8-bit grid, codes -127..127: the largest weight has code 127 in {full:.1%} of blocks"
    return {"max_code_shares": shares, "scale_rounding": stats.scale_rounding(), "recipe": recipe}
