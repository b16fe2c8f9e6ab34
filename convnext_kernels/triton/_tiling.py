"""Tile shapes shared by the Triton kernels."""
import triton


def split_width(C, min_tile=16):
    """(BLOCK_C0, BLOCK_C1): a row of C channels as two power-of-two tiles, the first the largest
    power of 2 <= C, the second the rest (0 when C is a power of 2), each at least min_tile (16:
    tl.dot's minimum, for tiles that enter a dot). ConvNeXt widths are 3 * 2^k or 5 * 2^k (96 = 64 + 32, 384 = 256 + 128,
    40 = 32 + 8 -> 32 + 16): one next_power_of_2(C) tile would pad a quarter or more of the lanes
    with zeros, arithmetic and registers spent on nothing."""
    c0 = max(min_tile, 1 << (max(C, 1).bit_length() - 1))
    rest = C - c0
    return c0, (max(min_tile, triton.next_power_of_2(rest)) if rest > 0 else 0)
