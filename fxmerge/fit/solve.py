"""Solving a layer's least-squares system: PLeaS's ridge toward the permuted
weights (``solve_layer``, block by block over the layer's row classes, in
place for wide systems) and RegMean's closed form (``regmean_layer``).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import lapack

from fxmerge.merging.widening import row_blocks

from .lstsq import LayerSystem, weight_columns


def ridge_lambda(G: torch.Tensor, ridge: float) -> float:
    """The ridge weight: ``ridge`` times the mean diagonal of ``G``."""
    return max(ridge * float(torch.diagonal(G).sum()) / max(G.shape[0], 1), 1e-12)


IN_PLACE_MIN_COLS = 2048  # systems at least this wide are factored in place (``solve_block``)


def cholesky_in_place(A: torch.Tensor) -> bool:
    """Factors the symmetric positive definite ``A`` (contiguous, CPU, float)
    where it lies: its upper triangle becomes ``U`` with ``A = U^T U`` (the
    strict lower triangle is left as it was). LAPACK's ``potrf`` on A's own
    memory, read column-major (A^T = A there, so the lower factor there is U
    here). Returns False when A is not positive definite (A is then partly
    overwritten)."""
    potrf = lapack.dpotrf if A.dtype == torch.float64 else lapack.spotrf
    column_major = A.numpy().T
    factor, info = potrf(column_major, lower=True, overwrite_a=True, clean=False)
    if not np.shares_memory(factor, column_major):  # LAPACK was handed a copy
        column_major[...] = factor
    return info == 0


def solve_block(G: torch.Tensor, C: torch.Tensor, W0: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_W ||X W^T - Y||^2 + lam ||W - W0||^2`` from ``G = X^T X`` and
    ``C = X^T Y`` (``W0``: rows x cols). Returns ``W`` (rows x cols).

    A wide system on the CPU holds one copy of G (``solve_bytes``): the ridge
    copy, factored and solved in place by LAPACK (``potrf``, ``potrs``). torch's
    factorisation and triangular solve each copy their input, and a fully
    widened layer's Gram block is hundreds of megabytes: four copies of it were
    the merge's peak. Narrow systems keep torch's routines, which are faster
    there (they run on torch's own threads)."""
    lam = ridge_lambda(G, ridge)
    B = C + lam * W0.T
    A = G.clone(memory_format=torch.contiguous_format)
    A.diagonal().add_(lam)
    if A.shape[-1] >= IN_PLACE_MIN_COLS and A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64):
        if cholesky_in_place(A):
            potrs = lapack.dpotrs if A.dtype == torch.float64 else lapack.spotrs
            X, info = potrs(A.numpy().T, B.numpy(), lower=True)
            if info == 0:
                return torch.from_numpy(X).T
        A.copy_(G)
        A.diagonal().add_(lam)
    else:
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_solve(B, L).T
    # not positive definite (no ridge, dead inputs): the least-norm solution
    return torch.linalg.lstsq(A, B).solution.T


def layer_loss(G, C, yy, W) -> float:
    """``||X W^T - Y||^2`` from the statistics (W: rows x cols)."""
    return float(yy.sum() - 2 * torch.sum(W.T * C) + torch.sum((W @ G) * W))


def solved_loss(G, C, yy, W0, W, ridge: float) -> float:
    """``layer_loss`` of a ``solve_block`` solution without the ``W G W^T``
    product: the normal equations give ``G W^T = C + lam (W0 - W)^T``."""
    lam = ridge_lambda(G, ridge)
    return float(yy.sum() - torch.sum(W.T * C) + lam * torch.sum(W * (W0 - W)))


def take_square(G: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``G[index][:, index]``, a view when ``index`` is a contiguous range."""
    if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return G[index[0]:index[0] + len(index), index[0]:index[0] + len(index)]
    idx = torch.as_tensor(index, device=G.device)
    return G.index_select(0, idx).index_select(1, idx)


def solve_layer(sysm: LayerSystem, weight: torch.Tensor, bias: torch.Tensor | None, ridge: float):
    """New (weight, bias) of one layer. ``weight`` is the dense widened
    weight (groups x per-group rows first)."""
    g = sysm.groups
    out = weight.shape[0]
    W0 = weight.detach().double().reshape(g, out // g, -1)  # (groups, rows, cols)
    if bias is not None:
        W0 = torch.cat([W0, bias.detach().double().reshape(g, out // g, 1)], dim=-1)
    W = W0.clone()
    init_loss = fit_loss = 0.0
    if g == 1:
        ncol = W0.shape[-1]
        k_taps = (ncol - (bias is not None)) // sysm.w_in.size
        lay = sysm.layout
        stat_col = lay.inverse_cols if lay is not None else np.arange(ncol)
        stat_out = lay.inverse_outs if lay is not None else np.arange(out)
        # the largest block first: the smaller ones' copies then fit in the memory its copy freed
        blocks = sorted(row_blocks(sysm.w_out, sysm.w_in), key=lambda block: -len(block[0]))
        for cols, out_rows in blocks:
            full = weight_columns(cols, k_taps)
            if bias is not None:
                full = np.concatenate([full, [ncol - 1]])
            # unknowns in the statistics' order: a contiguous square under a layout
            full = full[np.argsort(stat_col[full], kind="stable")]
            S = torch.as_tensor(full, device=W.device)
            R = torch.as_tensor(out_rows, device=W.device)
            stat_s, stat_r = (torch.as_tensor(i, device=W.device) for i in (stat_col[full], stat_out[out_rows]))
            Gs = take_square(sysm.gram[0], stat_col[full])
            Cs = sysm.cross[0].index_select(0, stat_s).index_select(1, stat_r)
            yy = sysm.yy[0].index_select(0, stat_r)
            W0s = W0[0][R][:, S]
            Ws = solve_block(Gs, Cs, W0s, ridge)
            W[0][R.unsqueeze(1), S.unsqueeze(0)] = Ws
            init_loss += layer_loss(Gs, Cs, yy, W0s)
            fit_loss += solved_loss(Gs, Cs, yy, W0s, Ws, ridge)
    else:
        for j in range(g):
            W[j] = solve_block(sysm.gram[j], sysm.cross[j], W0[j], ridge)
            init_loss += layer_loss(sysm.gram[j], sysm.cross[j], sysm.yy[j], W0[j])
            fit_loss += layer_loss(sysm.gram[j], sysm.cross[j], sysm.yy[j], W[j])
    sysm.loss_init, sysm.loss_fit = init_loss, fit_loss
    if bias is not None:
        new_bias = W[..., -1].reshape(out).to(bias.dtype)
        W = W[..., :-1]
    else:
        new_bias = None
    return W.reshape(weight.shape).to(weight.dtype), new_bias


def regmean_layer(sysm: LayerSystem, weights: list, biases: list, alpha: float, ridge: float):
    """RegMean: ``W = (sum_i G~_i)^-1 sum_i G~_i W_i`` over the two models'
    own input Gram matrices ``G_i``, whose off-diagonal entries are scaled by
    ``alpha`` (``G~ = alpha G + (1 - alpha) diag(G)``). ``sum_i G_i W_i^T``
    is the accumulated ``X^T Y`` of the stacked samples, since each model's
    layer output is exactly ``X_i W_i^T``. Returns (weight, bias)."""
    g = sysm.groups
    out = weights[0].shape[0]
    Ws = []
    for w, b in zip(weights, biases):
        W = w.detach().double().reshape(g, out // g, -1)
        if b is not None:
            W = torch.cat([W, b.detach().double().reshape(g, out // g, 1)], dim=-1)
        Ws.append(W)
    W_new = torch.empty_like(Ws[0])
    for j in range(g):
        d = sum(dm[j] for dm in sysm.diag)
        G = alpha * sysm.gram[j] + (1 - alpha) * torch.diag(d)
        C = alpha * sysm.cross[j] + (1 - alpha) * sum(dm[j][:, None] * Wm[j].T for dm, Wm in zip(sysm.diag, Ws))
        W_new[j] = solve_block(G, C, 0.5 * (Ws[0][j] + Ws[1][j]), ridge)
    bias = None
    if biases[0] is not None:
        bias = W_new[..., -1].reshape(out).to(biases[0].dtype)
        W_new = W_new[..., :-1]
    return W_new.reshape(weights[0].shape).to(weights[0].dtype), bias
