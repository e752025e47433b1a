"""Grain's index shuffle for a whole epoch at once.

`grain.MapDataset.shuffle` orders epoch e by `grain.experimental.index_shuffle(i, n - 1, seed + e,
4)`: a Simon block cipher (Beaulieu et al., "The SIMON and SPECK Families of Lightweight Block
Ciphers", 2013) with 4 rounds whose keys come from C++'s `std::seed_seq{seed}`, on the smallest
even block of at least 16 bits that holds the index, walked in cycles until it lands in
[0, n - 1] (grain/_src/python/experimental/index_shuffle/index_shuffle.cc). Grain offers it one
index at a time, about 5 microseconds each on CPU (the cycle walk on a 16-bit block is ~65536/n
encryptions per index): a run on cached features that shuffles 31 streams of 5,000 rows spent
most of its step there. `permutation` computes every position with numpy instead, the same
integers (tested against grain for many sizes and seeds).
"""

from __future__ import annotations

import math

import numpy as np

ROUNDS = 4
_MASK32 = 0xFFFFFFFF


def round_keys(seed: int, rounds: int = ROUNDS) -> list[int]:
    """`std::seed_seq{seed}.generate` into `rounds` 32-bit words ([rand.util.seedseq] of C++11)."""
    n, v = rounds, [seed & _MASK32]
    s, b = len(v), [0x8B8B8B8B] * rounds
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p, m = (n - t) // 2, max(s + 1, n)
    q = p + t
    mix = lambda x: x ^ (x >> 27)
    for k in range(m):
        r1 = (1664525 * mix(b[k % n] ^ b[(k + p) % n] ^ b[(k - 1) % n])) & _MASK32
        r2 = (r1 + (s if k == 0 else (k % n + v[k - 1] if k <= s else k % n))) & _MASK32
        b[(k + p) % n] = (b[(k + p) % n] + r1) & _MASK32
        b[(k + q) % n] = (b[(k + q) % n] + r2) & _MASK32
        b[k % n] = r2
    for k in range(m, m + n):
        r3 = (1566083941 * mix((b[k % n] + b[(k + p) % n] + b[(k - 1) % n]) & _MASK32)) & _MASK32
        r4 = (r3 - k % n) & _MASK32
        b[(k + p) % n] ^= r3
        b[(k + q) % n] ^= r4
        b[k % n] = r4
    return b


def _encrypt(x: np.ndarray, keys: list[int], w: int) -> np.ndarray:
    """The cipher on blocks of 2w bits (left word high, right word low) of uint64 `x`."""
    word = np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if np.iinfo(t).bits >= w))
    mask = word.type((1 << w) - 1)
    rotl = lambda y, r: ((y << word.type(r)) | (y >> word.type(w - r))) & mask
    f = lambda y: (rotl(y, 1) & rotl(y, 8)) ^ rotl(y, 2)
    left = ((x >> np.uint64(w)) & np.uint64(mask)).astype(word)
    right = (x & np.uint64(mask)).astype(word)
    for k1, k2 in zip(keys[::2], keys[1::2], strict=True):
        left ^= f(right) ^ word.type(k1 & int(mask))
        right ^= f(left) ^ word.type(k2 & int(mask))
    return (left.astype(np.uint64) << np.uint64(w)) | right


def permutation(n: int, seed: int) -> np.ndarray:
    """`[index_shuffle(i, n - 1, seed, 4) for i in range(n)]` as an int64 array."""
    last = n - 1
    if last <= 0:
        return np.zeros(max(n, 0), np.int64)
    block = math.ceil(math.log2(last))
    block = max(block + block % 2, 16)
    keys, w = round_keys(seed), block // 2
    if block > 16:  # the block holds fewer than 4n values: a few encryptions per index
        out = _encrypt(np.arange(n, dtype=np.uint64), keys, w)
        walking = np.flatnonzero(out > last)
        while walking.size:
            out[walking] = _encrypt(out[walking], keys, w)
            walking = walking[out[walking] > last]
        return out.astype(np.int64)
    # On the 16-bit block a small n walks ~65536/n steps: encrypt the whole block once and
    # jump along the cycles by doubling (`to[x]`: a later value of x's walk, final when `hit`).
    to = _encrypt(np.arange(1 << block, dtype=np.uint64), keys, w).astype(np.int64)
    hit = to <= last
    walking = np.flatnonzero(~hit)
    while not hit[:n].all():
        ahead = to[walking]
        to[walking], hit[walking] = to[ahead], hit[ahead]
        walking = walking[~hit[walking]]
    return to[np.arange(n) % to.size]  # n = 2**16 + 1: the cipher reads index 2**16 as 0
