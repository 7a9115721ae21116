"""Integer codes <-> int32 words: the bit-level half of the codec, vectorised and device-agnostic.

Every layout we read or write is a little-endian bit stream of `bits`-wide codes laid into int32 words
along one dimension (`unpack_codes` / `pack_codes`, `unpack_stream` / `pack_stream`); AWQ GEMM also
shuffles the fields of each word (`AWQ_PACK_ORDER`). Both directions work on whole tensors on the
codes' device; unpacked codes are uint8. gptqmodel's and autoawq's packers are the references the
tests hold these to, byte for byte. Layouts: docs/formats.md; CPU vs GPU passes: docs/performance.md.
"""

from __future__ import annotations

import sys

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


def _period(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest whole repeat of the layout: 32/bits codes in one word, or
    32 codes in 3 words for 3 bits."""
    if bits in (1, 2, 4, 8, 16):
        return WORD_BITS // bits, 1
    if bits == 3:
        return WORD_BITS, 3
    raise ValueError(f"{bits}-bit codes are not supported")


def _fields(bits: int, codes_per_period: int):
    """For each code of one period: (word, shift, low_bits): the code's first `low_bits` bits sit at
    `shift` in `word`, its remaining bits (if any) at bit 0 of `word + 1`."""
    for j in range(codes_per_period):
        word, shift = divmod(j * bits, WORD_BITS)
        yield j, word, shift, min(bits, WORD_BITS - shift)


def _as_3d(tensor: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """`tensor` viewed as [before, size(dim), after] (contiguous), and the normalised dim."""
    dim = dim % tensor.dim()
    before = 1
    for size in tensor.shape[:dim]:
        before *= size
    return tensor.contiguous().view(before, tensor.shape[dim], -1), dim


def _fold(t4: torch.Tensor) -> torch.Tensor:
    """[before, periods, n, 1] -> [1, before*periods, n, 1] (the same memory): packing along the
    last dimension then loops over one long run of periods instead of many short ones."""
    if t4.shape[3] == 1 and t4.is_contiguous():
        return t4.view(1, t4.shape[0] * t4.shape[1], t4.shape[2], 1)
    return t4


# elements per chunk: on a CPU the per-field temporaries stay in cache (no page faults per field);
# on a GPU memory is not the limit but kernel launches are (every chunk costs one launch per field)
CPU_CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 27


def _chunks(t4: torch.Tensor):
    """Ranges over dim 1 of a [before, periods, words, after] tensor, about CPU_CHUNK_ELEMENTS or
    GPU_CHUNK_ELEMENTS elements each."""
    target = GPU_CHUNK_ELEMENTS if t4.is_cuda else CPU_CHUNK_ELEMENTS
    per_period = max(1, t4.shape[0] * t4.shape[2] * t4.shape[3])
    step = max(1, target // per_period)
    return [(p0, min(p0 + step, t4.shape[1])) for p0 in range(0, t4.shape[1], step)]


def _through_bytes(bits: int, device: torch.device) -> bool:
    """Whether codes of `bits` bits are read and written through a byte view of the words (see the
    module docstring: on a GPU, when no code straddles a byte)."""
    return device.type == "cuda" and bits in (2, 4, 8) and sys.byteorder == "little"


def _unpack_bytes(words: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Codes of contiguous int32 words [periods, 1, after] into `out` uint8 [periods, 32/bits, after]."""
    periods, _, after = words.shape
    # byte k of word [p, a] is [p, a, k] of the byte view; as [p, k, a] it lines up with `out`
    data = words.reshape(-1).view(torch.uint8).view(periods, after, 4).permute(0, 2, 1)
    per_byte = 8 // bits
    codes = out.view(periods, 4, per_byte, after)  # code j = k·per_byte + f: field f of byte k
    for f in range(per_byte):
        field = codes[:, :, f]
        if f == per_byte - 1:  # the top field: the shift leaves nothing above it
            torch.bitwise_right_shift(data, f * bits, out=field)
        else:
            torch.bitwise_and(data >> (f * bits) if f else data, (1 << bits) - 1, out=field)


def _pack_bytes(codes: torch.Tensor, bits: int, words: torch.Tensor) -> None:
    """uint8 codes [periods, 32/bits, after] into contiguous int32 `words` [periods, 1, after]."""
    periods, _, after = codes.shape
    data = words.view(-1).view(torch.uint8).view(periods, after, 4).permute(0, 2, 1)
    per_byte = 8 // bits
    fields = codes.reshape(periods, 4, per_byte, after)
    data.copy_(fields[:, :, 0])
    for f in range(1, per_byte):
        data |= fields[:, :, f] << (f * bits)


def unpack_codes(words: torch.Tensor, bits: int, count: int, dim: int = -1, order=None) -> torch.Tensor:
    """Unpack `count` `bits`-bit codes laid along `dim` of int32 `words`; returns uint8 codes
    with `words.shape[dim]` replaced by `count`.

    `order` (a permutation of one word's fields, e.g. `AWQ_PACK_ORDER`) says that field k of each
    word holds code `order[k]` of that word's group.
    """
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {words.dtype}")
    if bits > 8:
        raise ValueError("codes wider than 8 bits do not fit uint8")
    n_words = packed_words(count, bits)
    w3, dim = _as_3d(words, dim)
    if w3.shape[1] < n_words:
        raise ValueError(f"{w3.shape[1]} words cannot hold {count} codes of {bits} bits")
    per_period, words_per_period = _period(bits)
    periods = -(-n_words // words_per_period)
    w3 = w3[:, :n_words]
    if periods * words_per_period != n_words:  # a partial last period: pad with zero words
        w3 = torch.nn.functional.pad(w3, (0, 0, 0, periods * words_per_period - n_words))
    w4 = _fold(w3.reshape(w3.shape[0], periods, words_per_period, w3.shape[2]))
    out = torch.empty((w4.shape[0], w4.shape[1], per_period, w4.shape[3]), dtype=torch.uint8, device=words.device)
    if _through_bytes(bits, words.device):
        w4 = w4.contiguous()
        for b in range(w4.shape[0]):  # (one b unless packing along a middle dimension)
            for p0, p1 in _chunks(out):
                _unpack_bytes(w4[b, p0:p1], bits, out[b, p0:p1])
        if order is not None:  # field k holds code order[k]: put each field in its code's place
            inverse = torch.tensor([order.index(j) for j in range(per_period)], device=out.device)
            out = out.index_select(2, inverse)
        codes = out.view(w3.shape[0], periods * per_period, w3.shape[2])[:, :count]
        return codes.reshape(*words.shape[:dim], count, *words.shape[dim + 1 :])
    fields = list(_fields(bits, per_period))
    for p0, p1 in _chunks(w4):
        src, dst = w4[:, p0:p1], out[:, p0:p1]
        field = torch.empty_like(src[:, :, 0])  # reused: no allocation per field
        high = torch.empty_like(field) if bits == 3 else None
        for j, word, shift, low in fields:
            torch.bitwise_right_shift(src[:, :, word], shift, out=field)
            field &= (1 << low) - 1  # drops what arithmetic >> smeared in from the sign bit
            if low < bits:  # straddles: the high bits come from the next word
                torch.bitwise_and(src[:, :, word + 1], (1 << (bits - low)) - 1, out=high)
                high <<= low
                field |= high
            dst[:, :, order[j] if order is not None else j] = field
    codes = out.view(w3.shape[0], periods * per_period, w3.shape[2])[:, :count]
    return codes.reshape(*words.shape[:dim], count, *words.shape[dim + 1 :])


def pack_codes(codes: torch.Tensor, bits: int, dim: int = -1, order=None) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes (any integer dtype, values in [0, 2**bits)) along `dim`
    into int32 words (inverse of `unpack_codes`). Values out of range corrupt their neighbours:
    callers check the range or unpack and compare."""
    count = codes.shape[dim]
    n_words = packed_words(count, bits)
    c3, dim = _as_3d(codes, dim)
    per_period, words_per_period = _period(bits)
    periods = -(-count // per_period)
    if periods * per_period != count:  # a partial last period: pad with zero codes
        c3 = torch.nn.functional.pad(c3, (0, 0, 0, periods * per_period - count))
    c4 = _fold(c3.reshape(c3.shape[0], periods, per_period, c3.shape[2]))
    if _through_bytes(bits, codes.device):
        words = torch.empty((c4.shape[0], c4.shape[1], 1, c4.shape[3]), dtype=torch.int32, device=codes.device)
        if order is not None:  # field k holds code order[k]
            c4 = c4.index_select(2, torch.tensor(order, device=c4.device))
        for b in range(c4.shape[0]):
            for p0, p1 in _chunks(c4):
                _pack_bytes(c4[b, p0:p1].to(torch.uint8), bits, words[b, p0:p1])
        words = words.view(c3.shape[0], periods, c3.shape[2])[:, :n_words]
        return words.reshape(*codes.shape[:dim], n_words, *codes.shape[dim + 1 :])
    words = torch.zeros((c4.shape[0], c4.shape[1], words_per_period, c4.shape[3]), dtype=torch.int32, device=codes.device)
    fields = list(_fields(bits, per_period))
    for p0, p1 in _chunks(words):
        src, dst = c4[:, p0:p1], words[:, p0:p1]
        code = torch.empty(src[:, :, 0].shape, dtype=torch.int32, device=codes.device)  # reused per field
        shifted = torch.empty_like(code)
        for j, word, shift, low in fields:
            code.copy_(src[:, :, order[j] if order is not None else j])
            torch.bitwise_left_shift(code, shift, out=shifted)  # int32: bits above 31 fall off...
            dst[:, :, word] |= shifted
            if low < bits:  # ...and go to the next word
                torch.bitwise_right_shift(code, low, out=shifted)
                dst[:, :, word + 1] |= shifted
    words = words.view(c3.shape[0], periods * words_per_period, c3.shape[2])[:, :n_words]
    return words.reshape(*codes.shape[:dim], n_words, *codes.shape[dim + 1 :])


def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack the last dimension of int32 `words` into `count` unsigned `bits`-bit codes (int32)."""
    return unpack_codes(words, bits, count, dim=-1).to(torch.int32)


def pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of unsigned `bits`-bit codes into int32 words (inverse of `unpack_stream`)."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    return pack_codes(codes, bits, dim=-1)


def to_int32_words(values: torch.Tensor) -> torch.Tensor:
    """Reinterpret the low 32 bits of int64 values as (two's complement) int32 words."""
    values = values & MASK32
    return torch.where(values >= (1 << 31), values - (1 << WORD_BITS), values).to(torch.int32)
