"""Reading integer codes out of int32 words (the unpacking half of the codec).

Every layout we read is a little-endian bit stream laid into 32-bit words: GPTQ packs 2/4/8-bit
codes whole into words and 3-bit codes across word boundaries (32 codes fill exactly 3 words,
the 11th and 22nd code straddling two words), which is the same thing as one continuous stream.
AWQ GEMM additionally shuffles the 8 nibbles inside each word (`AWQ_PACK_ORDER`).

Packing is deliberately not here: packed buffers are produced by gptqmodel's own packers (see
`gptq.py`, `awq.py`) so that what we write is, by construction, what gptqmodel writes. The
stream packer below exists only to cross-check layouts and to repack qzeros for the GPTQ v1 offset.
"""

from __future__ import annotations

import torch

WORD_BITS = 32
MASK32 = (1 << WORD_BITS) - 1

# AWQ GEMM stores output column `AWQ_PACK_ORDER[k]` of each group of 8 in nibble k of the word;
# reading nibble k back therefore yields column AWQ_PACK_ORDER[k], and the inverse permutation
# (`AWQ_UNPACK_ORDER`) puts the nibbles back into column order.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def packed_words(count: int, bits: int) -> int:
    """How many 32-bit words hold `count` codes of `bits` bits."""
    return -(-count * bits // WORD_BITS)


def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack the last dimension of int32 `words` into `count` unsigned `bits`-bit codes (int32).

    Code j occupies bits [j*bits, (j+1)*bits) of the stream formed by the words in order.
    """
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {words.dtype}")
    needed = packed_words(count, bits)
    if words.shape[-1] < needed:
        raise ValueError(f"{words.shape[-1]} words cannot hold {count} codes of {bits} bits")
    w64 = words.to(torch.int64) & MASK32
    starts = torch.arange(count, dtype=torch.int64, device=words.device) * bits
    index, shift = starts // WORD_BITS, starts % WORD_BITS
    low = w64[..., index] >> shift
    # A code that straddles two words takes its high bits from the next word; for codes that do
    # not straddle, the shift below pushes every bit of the next word past the mask.
    nxt = torch.clamp(index + 1, max=w64.shape[-1] - 1)
    high = (w64[..., nxt] << (WORD_BITS - shift)) & MASK32
    straddles = (shift + bits) > WORD_BITS
    codes = torch.where(straddles, low | high, low) & ((1 << bits) - 1)
    return codes.to(torch.int32)


def pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of unsigned `bits`-bit codes into int32 words (inverse of `unpack_stream`)."""
    count = codes.shape[-1]
    c64 = codes.to(torch.int64)
    if count and (int(c64.min()) < 0 or int(c64.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    n_words = packed_words(count, bits)
    words = torch.zeros((*codes.shape[:-1], n_words), dtype=torch.int64, device=codes.device)
    for j in range(count):
        start = j * bits
        index, shift = divmod(start, WORD_BITS)
        words[..., index] |= (c64[..., j] << shift) & MASK32
        if shift + bits > WORD_BITS:
            words[..., index + 1] |= c64[..., j] >> (WORD_BITS - shift)
    return to_int32_words(words)


def to_int32_words(values: torch.Tensor) -> torch.Tensor:
    """Reinterpret the low 32 bits of int64 values as (two's complement) int32 words."""
    values = values & MASK32
    return torch.where(values >= (1 << 31), values - (1 << WORD_BITS), values).to(torch.int32)
