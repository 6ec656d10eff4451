"""Pure tests of how a streaming source reads one file (scalai.storage.pieces): which
requests a plan's windows become, and that bytes fed in chunks of any size land in their
windows and check each tensor's CRC-32. Oracles: slices of a random buffer, zlib.crc32."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from scalai.errors import ChecksumError
from scalai.storage.pieces import CrcCheck, PieceFeed, plan_pieces

MiB = 1 << 20


def test_near_windows_share_a_request_far_ones_are_exact_and_a_whole_file_is_cut():
    windows = [[(0, 10), (100, 110)], [(5 * MiB, 5 * MiB + 10)], [(80 * MiB, 81 * MiB)]]
    exact = plan_pieces(windows, max_gap=0, max_bytes=64 * MiB)
    assert [p.spans for p in exact] == [((0, 10), (100, 110)), ((5 * MiB, 5 * MiB + 10),), ((80 * MiB, 81 * MiB),)]
    near = plan_pieces(windows, max_gap=8 * MiB, max_bytes=64 * MiB)
    assert [(p.spans, p.reads) for p in near] == [(((0, 5 * MiB + 10),), (0, 1)), (((80 * MiB, 81 * MiB),), (2,))]
    whole = plan_pieces(windows, cover=[(0, 200 * MiB)], max_gap=2 * MiB, max_bytes=64 * MiB)
    assert [(p.start, p.stop) for p in whole] == [(0, 64 * MiB), (64 * MiB, 128 * MiB), (128 * MiB, 192 * MiB),
                                                  (192 * MiB, 200 * MiB)]
    assert [p.reads for p in whole] == [(0, 1), (2,), (), ()]
    # every window lies in exactly one piece, even when windows interleave
    interleaved = plan_pieces([[(0, 4), (8, 12)], [(4, 8), (12, 16)]], max_gap=0, max_bytes=4)
    assert len(interleaved) == 1 and interleaved[0].spans == ((0, 16),)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_fed_bytes_land_in_their_windows_and_tensors_are_checked_across_pieces(chunk):
    rng = np.random.default_rng(chunk)
    data = rng.integers(0, 256, 3000, np.uint8)
    tensors = [(("r", "a"), 100, 900), (("r", "b"), 1000, 1500), (("r", "c"), 2500, 500)]  # key, start, nbytes
    crcs = {key: zlib.crc32(data[s:s + n].tobytes()) for key, s, n in tensors}
    crcs[("r", "c")] ^= 1  # c is stored damaged
    check = CrcCheck(lambda key: (crcs[key], dict((k, n) for k, _, n in tensors)[key]), lambda key: "file-r")
    windows = [[(120, 130), (200, 260)], [(1100, 1400)], [(2600, 2700)]]
    outs = {i: np.zeros(sum(b - a for a, b in w), np.uint8) for i, w in enumerate(windows)}
    done = []
    pieces = plan_pieces(windows, cover=[(100, 2500)], max_gap=64, max_bytes=1000)
    assert len(pieces) >= 2  # tensor b is checked from two pieces
    for piece in pieces:
        if 2500 <= piece.start:
            continue  # c: fed below
        feed = PieceFeed(piece, tensors, outs.__getitem__, done.append, check)
        for a, b in piece.spans:
            feed.seek(a)
            for x in range(a, b, chunk):
                feed.feed(data[x:min(x + chunk, b)].tobytes())
        feed.finish()
    assert check.checked == {("r", "a"), ("r", "b")}
    for i, w in enumerate(windows[:2]):
        assert np.array_equal(outs[i], np.concatenate([data[a:b] for a, b in w])), i
    assert sorted(done) == [0, 1]
    (last,) = plan_pieces([[]], cover=[(2500, 3000)], max_gap=0, max_bytes=1000)
    feed = PieceFeed(last, tensors, None, None, check)
    feed.seek(2500)
    with pytest.raises(ChecksumError, match="file-r, tensor c"):
        for x in range(2500, 3000, chunk):
            feed.feed(data[x:min(x + chunk, 3000)].tobytes())
        feed.finish()
