"""The inline PTX of the batch-1 fp16 pairs kernel's inner products (:mod:`misq.runtime.half2_kernel`,
whose docstring gives the arithmetic): plain strings, built once at import by that module, so
that the kernel file holds the kernel. Under Triton's CPU interpreter the kernel runs the same
steps as fp16 operations instead.
"""

from __future__ import annotations


def words4_dot_ptx() -> str:
    """PTX of half2_kernel._words_dot: operands $1, $2 the words, $3-$6 and $7-$10 their x pairs, $11 and $12
    the zero pairs -(1024 + z) and -(64 + z); $0 the float32 sum. Per word: four LOP3 (codes into
    fp16 1024 + c, or 1024 + 16 c), four HADD2/HFMA2 (c - z exactly) and four HFMA2 (products)."""
    lines = ["mov.b32 k, 0x2C002C00;"]  # 1/16, twice
    for word, x in ((1, 3), (2, 7)):
        lines += [f"lop3.b32 a, ${word}, 0x000F000F, 0x64006400, 0xEA;",  # (w & mask) | 0x6400 per half
                  f"lop3.b32 b, ${word}, 0x00F000F0, 0x64006400, 0xEA;",
                  f"shr.u32 t, ${word}, 8;",
                  "lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;",
                  "lop3.b32 d, t, 0x00F000F0, 0x64006400, 0xEA;",
                  "add.rn.f16x2 a, a, $11;", "fma.rn.f16x2 b, b, k, $12;",
                  "add.rn.f16x2 c, c, $11;", "fma.rn.f16x2 d, d, k, $12;"]
        first = "mul.rn.f16x2 h, a, $3;" if word == 1 else f"fma.rn.f16x2 h, a, ${x}, h;"
        lines += [first] + [f"fma.rn.f16x2 h, {r}, ${x + i}, h;" for i, r in enumerate("bcd", start=1)]
    lines += ["mov.b32 {lo, hi}, h;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.rn.f32 $0, flo, fhi;"]
    return "{ .reg .b32 a, b, c, d, t, h, k; .reg .b16 lo, hi; .reg .f32 flo, fhi;\n" + "\n".join(lines) + "\n}"


def pairs3_dot_ptx() -> str:
    """PTX of half2_kernel._pairs3_dot: operands $2, $3 the 2-bit words (runs h = 0, 1), $4, $5 the 1-bit words,
    $6-$13 x's pairs (h, s'), $14-$17 the zero pairs for q = 0, 2, 4, 6; $0, $1 the halves' sums.
    Per pair: two LOP3 (both pieces into fp16 1024 + c 2**q), one HADD2/HFMA2 (times 2**-q, plus
    -(2**(10 - q) + z): c - z exactly) and one HFMA2 (the product)."""
    lines = ["mov.b32 m1, 0x34003400;", "mov.b32 m2, 0x2C002C00;", "mov.b32 m3, 0x24002400;"]  # 2**-2, -4, -6
    for h in range(2):
        for sp in range(4):
            mask_a, mask_b = (6 << 2 * sp) * 0x10001, (1 << 2 * sp) * 0x10001
            lines += [f"lop3.b32 v, ${2 + h}, 0x{mask_a:08X}, 0x64006400, 0xEA;",
                      f"lop3.b32 v, ${4 + h}, 0x{mask_b:08X}, v, 0xEA;",
                      "add.rn.f16x2 v, v, $14;" if sp == 0 else f"fma.rn.f16x2 v, v, m{sp}, ${14 + sp};",
                      "mul.rn.f16x2 h, v, $6;" if h == sp == 0 else f"fma.rn.f16x2 h, v, ${6 + 4 * h + sp}, h;"]
    lines += ["mov.b32 {lo, hi}, h;", "cvt.f32.f16 $0, lo;", "cvt.f32.f16 $1, hi;"]
    return "{ .reg .b32 v, h, m1, m2, m3; .reg .b16 lo, hi;\n" + "\n".join(lines) + "\n}"
