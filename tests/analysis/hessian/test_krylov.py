"""The blocked Krylov basis: same algebra as one dense buffer, and growth never copies."""

from __future__ import annotations

import pytest
import torch

from analysis.hessian.krylov import KrylovBasis


def _filled(rows: int, size: int, m: int, block: int = 3) -> tuple[KrylovBasis, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    dense = torch.linalg.qr(torch.randn(rows, size, m, generator=gen, dtype=torch.float64))[0]
    dense = dense.transpose(1, 2).contiguous()  # rows x m x size, orthonormal columns
    basis = KrylovBasis(rows, size, torch.float64, torch.device("cpu"), block=block)
    for j in range(m):
        basis.append(dense[:, j])
    return basis, dense


def test_columns_cross_block_boundaries_and_growth_keeps_earlier_blocks():
    basis, dense = _filled(rows=2, size=11, m=7, block=3)
    assert basis.m == 7 and len(basis.blocks) == 3
    for j in range(7):
        assert torch.equal(basis.column(j), dense[:, j])
    first = basis.blocks[0]
    basis.append(torch.zeros(2, 11, dtype=torch.float64))
    basis.append(torch.zeros(2, 11, dtype=torch.float64))
    assert basis.blocks[0] is first  # no copy on growth


def test_projection_and_combination_match_the_dense_algebra():
    basis, dense = _filled(rows=3, size=20, m=8, block=3)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    expected = w - torch.einsum("bm,bmd->bd", torch.einsum("bmd,bd->bm", dense, w), dense)
    out = basis.orthogonalise(w.clone())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.einsum("bmd,bd->bm", dense, out).abs().max() < 1e-12

    coeffs = torch.randn(2, 8, 4, generator=gen, dtype=torch.float64)
    rows = torch.tensor([2, 0])
    want = torch.einsum("bmk,bmd->bkd", coeffs, dense[rows])
    torch.testing.assert_close(basis.combine(coeffs, rows), want, rtol=0, atol=1e-12)
    acc = torch.ones(2, 4, 20, dtype=torch.float64)
    basis.combine(coeffs, rows, out=acc)
    torch.testing.assert_close(acc, want + 1, rtol=0, atol=1e-12)


def test_row_subsets_project_against_their_own_bases():
    basis, dense = _filled(rows=4, size=9, m=5, block=2)
    w = torch.randn(2, 9, dtype=torch.float64)
    rows = torch.tensor([3, 1])
    out = basis.project_out(w, rows)
    assert torch.einsum("bmd,bd->bm", dense[rows], out).abs().max() < 1e-12

    basis.keep_rows(rows)
    assert basis.rows == 2
    for j in range(5):
        assert torch.equal(basis.column(j), dense[rows, j])


@pytest.mark.parametrize("kept", [[0, 2, 3, 5], [1, 2, 3, 4, 5], [5], [0, 1, 2]])
def test_ascending_rows_move_down_in_place(kept):
    basis, dense = _filled(rows=6, size=9, m=5, block=2)
    storage = [blk.untyped_storage().data_ptr() for blk in basis.blocks]
    rows = torch.tensor(kept)
    basis.keep_rows(rows)
    assert basis.rows == len(kept)
    assert [blk.untyped_storage().data_ptr() for blk in basis.blocks] == storage
    for j in range(5):
        assert torch.equal(basis.column(j), dense[rows, j])
    w = torch.randn(len(kept), 9, dtype=torch.float64)
    out = basis.project_out(w)
    assert torch.einsum("bmd,bd->bm", dense[rows], out).abs().max() < 1e-12
    basis.append(torch.ones(len(kept), 9, dtype=torch.float64))  # into the narrowed block
    assert torch.equal(basis.column(5), torch.ones(len(kept), 9, dtype=torch.float64))
    for j in range(5):
        assert torch.equal(basis.column(j), dense[rows, j])
