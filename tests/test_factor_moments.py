"""Adam on the K-gradients (``adam.py``, "Factor (K-) gradients"): the moments' change of column coordinates.

* ``column_transport`` against the dense Kronecker formula ``Q_old^T E^T (kron_{j != i} P_j) Q_new`` (float64);
* a constant gradient's first moment is carried exactly across steps (matrix adapter, no augmentation room);
* ``transport_columns`` keeps v a convex combination (history lost -> the row mean) and m linear;
* the state is saved compactly and a resumed step equals the uninterrupted one.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig
from tdrlt_peft.layers.inventory import iter_storages
from tdrlt_peft.math.adam import AdamMoments, transport_columns
from tdrlt_peft.math.group_moments import column_transport
from tdrlt_peft.math.masks import column_mask
from tdrlt_peft.math.tucker import unfold

F64 = torch.float64


def _orthonormal(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))[0]


def _kron_rows(mats):
    """kron of the matrices in the order ``unfold`` lists the other modes (the first varies slowest)."""
    out = torch.ones(1, 1, dtype=F64)
    for M in mats:
        out = torch.kron(out, M)
    return out


def _embed_rows(q, ranks, widths):
    """Rows of ``q`` indexed by a (ranks) block, as rows of the zero-padded (widths) index space."""
    block = q.T.reshape(q.shape[1], *ranks)
    padded = torch.zeros(q.shape[1], *widths, dtype=q.dtype)
    padded[(slice(None), *[slice(0, r) for r in ranks])] = block
    return padded.reshape(q.shape[1], -1).T


def test_column_transport_equals_dense_kronecker_formula():
    g = torch.Generator().manual_seed(0)
    old_ranks, aug, new = [3, 2, 4], [5, 3, 4], [2, 3, 3]
    widths = aug                                       # the storage: augmented ranks fit, old block in place
    rotations = [_orthonormal(a, k, g) for a, k in zip(aug, new)]
    mode = 0
    # unfold's column order for mode 0 of a (r1, r2, r3) tensor: check it on a probe instead of assuming it
    probe = torch.arange(2 * 3, dtype=F64).reshape(1, 2, 3)
    slow_first = torch.equal(unfold(probe, 0)[0], probe.reshape(-1))
    others = [j for j in range(3) if j != mode]
    order = others if slow_first else others[::-1]
    q_old = _orthonormal(old_ranks[1] * old_ranks[2], 3, g)
    q_new = _orthonormal(new[1] * new[2], 2, g)
    embed = _kron_rows([torch.eye(aug[j], old_ranks[j], dtype=F64) for j in order])          # E^T is its transpose
    kron_p = _kron_rows([rotations[j] for j in order])
    expected = q_old.T @ embed.T @ kron_p @ q_new
    # the engine's fixed-width form: rotations (R_j, R_j) zero past the new rank, Q's rows in the padded index space
    padded_p = [torch.nn.functional.pad(P, (0, w - P.shape[1], 0, w - P.shape[0]))[None] for P, w in zip(rotations,
                                                                                                       widths)]
    old = [column_mask(torch.tensor([r]), w) for r, w in zip(old_ranks, widths)]
    got = column_transport(_embed_rows(q_old, old_ranks[1:], widths[1:])[None],
                           _embed_rows(q_new, new[1:], widths[1:])[None], padded_p, old, mode, widths)
    torch.testing.assert_close(got[0], expected, atol=1e-12, rtol=0)


def test_transport_columns_convex_second_moment_and_linear_first_moment():
    g = torch.Generator().manual_seed(2)
    m, v = torch.randn(4, 3, generator=g, dtype=F64), torch.rand(4, 3, generator=g, dtype=F64)
    w = torch.full((4, 3), 0.5, dtype=F64)
    T = torch.cat([_orthonormal(3, 2, g), torch.zeros(3, 1, dtype=F64)], 1)[:, [0, 2, 1]] * 0.8
    out = transport_columns(AdamMoments(m, v, w, w), T)
    torch.testing.assert_close(out.m, m @ T)
    # column 1 has no history: v is the row mean, no first-moment weight
    torch.testing.assert_close(out.v[:, 1], v.mean(1))
    assert torch.all(out.wm[:, 1] == 0)
    lost = 1 - (T * T).sum(0)
    torch.testing.assert_close(out.v, v @ (T * T) + lost * v.mean(1, keepdim=True))
    assert torch.all(out.v >= v.min(1, keepdim=True).values - 1e-12)
    assert torch.all(out.v <= v.max(1, keepdim=True).values + 1e-12)


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(x)


def test_first_moment_of_a_constant_gradient_is_carried_exactly():
    """loss = <y, lin(x)>: G = s y^T x is constant, so the debiased first moment of G_K = G V must equal G V at the
    current V after every step (here r = r_max leaves no room to augment, so no direction lacks history)."""
    torch.manual_seed(0)
    config = TuckerAdapterConfig(target_modules=["lin"], r=3, r_max=3, tau=0.0)
    model = get_peft_model(_Linear().to(F64), config)
    integrator = TDLRTIntegrator(model, batched=False)
    x, y = torch.randn(7, 6, dtype=F64), torch.randn(7, 5, dtype=F64)
    G = config.scale * (y.T @ x)                                # dL/dΔW of W0 + s ΔW, (out, in)
    for _ in range(3):
        (model(x) * y).sum().backward()
        assert integrator.step(0.05)
        (s,) = iter_storages(model)
        U, V = (f.detach() for f in s.active()[1])
        K_m, L_m = (f.m[:, :3] for f in s.moments.factors)
        torch.testing.assert_close(K_m, G @ V, atol=1e-12, rtol=0)
        torch.testing.assert_close(L_m, G.T @ U, atol=1e-12, rtol=0)


def test_factor_moments_are_saved_compact_and_restored():
    torch.manual_seed(0)
    config = TuckerAdapterConfig(target_modules=["lin"], r=2, r_max=4, tau=0.0)
    model = get_peft_model(_Linear().to(F64), config)
    integrator = TDLRTIntegrator(model)
    x = torch.randn(7, 6, dtype=F64)
    model(x).pow(2).sum().backward()
    integrator.step(0.01)
    (s,) = iter_storages(model)
    rank = s.ranks[0]
    state = {k: v for k, v in model.state_dict().items() if "tdlrt_adam_K" in k}
    (value,) = state.values()
    assert value.shape == (4, 11, rank) and value.abs().sum() > 0
    fresh = get_peft_model(_Linear().to(F64), config)
    fresh.load_state_dict(model.state_dict())
    (t,) = iter_storages(fresh)
    for a, b in zip(t.moments.factors, s.moments.factors):
        for ta, tb in zip(a.tensors(), b.tensors()):
            assert torch.equal(ta, tb)


def test_factorized_state_dict_without_factor_moments_still_loads():
    """A factorized model saved before ``adam_K`` existed loads strictly, with no K-gradient history."""
    from tdrlt_peft import factorize

    torch.manual_seed(0)
    model = factorize(nn.Sequential(nn.Linear(6, 5)), target_modules=["0"], r=2, r_max=4)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("adam_K")}
    fresh = factorize(nn.Sequential(nn.Linear(6, 5)), target_modules=["0"], r=2, r_max=4)
    fresh[0].adam_K.fill_(1.0)
    fresh.load_state_dict(state)
    assert torch.all(fresh[0].adam_K == 0)


class _ConvAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, img):
        return self.lin(x).pow(2).sum() + self.conv(img).pow(2).sum()


def test_factor_moment_weights_are_the_same_in_every_row():
    """``wm``/``wv`` of the K-gradient moments are per column (the integrator reads one row and broadcasts it back):
    after steps that augment and truncate, every row of the stored weights must still be equal."""
    torch.manual_seed(0)
    model = get_peft_model(_ConvAndLinear().to(F64),
                           TuckerAdapterConfig(target_modules=["lin", "conv"], r=2, r_max=4, tau=0.05))
    integrator = TDLRTIntegrator(model)
    g = torch.Generator().manual_seed(3)
    seen_nonzero = False
    for _ in range(4):
        x, img = torch.randn(7, 6, generator=g, dtype=F64), torch.randn(2, 3, 6, 6, generator=g, dtype=F64)
        model(x, img).backward()
        assert integrator.step(0.01)
        for s in iter_storages(model):
            for f, r in zip(s.moments.factors, s.ranks):
                if f is None:
                    continue
                for w in (f.wm[:, :r], f.wv[:, :r]):
                    torch.testing.assert_close(w, w[:1].expand_as(w), atol=0, rtol=0)
                    seen_nonzero |= bool(w.abs().sum() > 0)
    assert seen_nonzero
