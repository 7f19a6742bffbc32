"""Pure-PyTorch references of every natasha op: the specification the kernels must match.

Each function computes its ``torch.ops.natasha.*`` op (tensor lists in, in-place where the op is
in-place, scalars out as tensors) with the op's arguments, positional or by name; the functions
under the ops' ATen-style names (``svrg_step_``, ``oja_step_``, ``adahessian_step_``, at the end)
take them in the schema's order. They are also the fallback path of every wrapper. Sections
follow ``csrc/ops.cpp``.
"""
from __future__ import annotations

from typing import List

import torch

from natasha_ext.precision import accumulation_dtype

# =============================================================================================
# foundation: Philox4x32-10 stream, rademacher_, global_norm
# =============================================================================================
_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, b: int):
    """(lo, hi) 32-bit halves of a*b for int64 tensors a in [0, 2^32) and a 32-bit constant b,
    computed with 16-bit splits so no intermediate leaves int64's exact range."""
    x = (a & 0xFFFF) * b          # < 2^48
    y = (a >> 16) * b             # < 2^48
    s = ((y & 0xFFFF) << 16) + x  # < 2^49
    return s & _MASK, ((y >> 16) + (s >> 32)) & _MASK


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> torch.Tensor:
    """Philox4x32-10 on int64 tensors holding uint32 words; returns an [..., 4] int64 tensor."""
    for r in range(10):
        lo0, hi0 = _mulhilo(c0, _M0)
        lo1, hi1 = _mulhilo(c2, _M1)
        ka, kb = (k0 + r * _W0) & _MASK, (k1 + r * _W1) & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ ka, lo1, hi0 ^ c3 ^ kb, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_blocks(seed: int, offset: int, first_block: int, n_blocks: int, device=None) -> torch.Tensor:
    """The [n_blocks, 4] words of Philox counters offset+first_block ... (see natasha/philox.h)."""
    c = torch.arange(n_blocks, dtype=torch.int64, device=device) + (offset + first_block)
    zero = torch.zeros_like(c)
    return philox4x32_10(c & _MASK, c >> 32, zero, zero, seed & _MASK, (seed >> 32) & _MASK)


def rademacher_values(seed: int, offset: int, first: int, n: int, device=None) -> torch.Tensor:
    """Signs (+1./-1., fp32) of stream elements first .. first+n-1."""
    if n == 0:
        return torch.empty(0, device=device)
    k = torch.arange(first, first + n, dtype=torch.int64, device=device)
    b0 = first >> 7
    words = philox_blocks(seed, offset, b0, ((first + n - 1) >> 7) - b0 + 1, device)
    w = words[(k >> 7) - b0, (k >> 5) & 3]
    return ((w >> (k & 31)) & 1).to(torch.float32) * 2 - 1


def rademacher_(tensors: List[torch.Tensor], seed: int, offset: int) -> None:
    """Fill each tensor with +-1; element k of the concatenated list takes bit (k & 31) of word
    ((k >> 5) & 3) of Philox counter offset + (k >> 7) under key (seed lo, seed hi)."""
    first = 0
    for t in tensors:
        n = t.numel()
        if n:
            t.copy_(rademacher_values(seed, offset, first, n, t.device).view_as(t))
        first += n


# the package's one accumulation rule (fp64 for fp64 lists, fp32 otherwise)
_acc_dtype = accumulation_dtype


def global_norm(tensors: List[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum_i ||t_i||^2), accumulated in fp32 (fp64 for fp64 lists), as a 0-dim tensor."""
    acc = _acc_dtype(tensors)
    if not tensors:
        return torch.zeros((), dtype=acc)
    total = torch.zeros((), dtype=acc, device=tensors[0].device)
    for t in tensors:
        total = total + t.to(acc).square().sum()
    return total.sqrt()


# =============================================================================================
# natasha: svrg_step (Natasha1.5 inner step), oja_step (one Oja / power iteration on I - eta H)
# =============================================================================================
def _opt(lst, i):
    return None if lst is None else lst[i]


def svrg_step(params: List[torch.Tensor], grads: List[torch.Tensor], snapshot_grads, mu,
              anchor: List[torch.Tensor], avg_sum: List[torch.Tensor], lr: float, reg: float,
              finalize: int, center, prox_L: float, prox_radius: float) -> torch.Tensor:
    """One inner step of Natasha1.5 over the whole parameter list (Liu, Liu, Liu & Li, "Implementing
    and evaluating Natasha2 with PyTorch", Columbia University project report, undated, Alg. 1
    lines 29-30, Alg. 2 lines 7-8), in place.

    Per element, with x = params, a = anchor (x_hat), accumulation in fp32 (fp64 for fp64):
        d   = g [- g_snap] [+ mu] + reg * (x - a)        (optional terms when the list is given)
        z   = x - lr * d
        avg_sum += x - a                                  (running sum of x_t - x_hat, t = 0 .. m-1)
    Without ``center``: x <- z. With ``center`` c (Natasha2's F^k regulariser
    psi(y) = prox_L * max(0, ||y - c|| - prox_radius)^2), x <- prox_{lr psi}(z) = c + kappa (z - c),
        dist = ||z - c|| over the whole list,
        kappa = 1 if dist <= r else (1 + 2 lr L r / dist) / (1 + 2 lr L)
    (z is first rounded to the parameter dtype, as the kernels store it between their two passes).
    ``finalize = m > 0`` marks the last step of a sub-epoch: the new iterate x_{m-1} joins the
    sum and x <- a <- a + (avg_sum + x_{m-1} - a) / m = mean(x_0 .. x_{m-1}), avg_sum <- 0
    (sub-epoch averaging). Summing deviations from x_hat keeps a parameter that does not move
    bit-identical and avoids cancellation in fp32.

    Returns a 3-element tensor (acc dtype): [sum d^2, dist^2 (0 without center), kappa (1 without)].
    State lists (mu, anchor, avg_sum, center) may be fp32 for fp16/bf16 params.
    """
    acc = _acc_dtype(params)
    dev = params[0].device if params else None
    sum_d2 = torch.zeros((), dtype=acc, device=dev)
    dist2 = torch.zeros((), dtype=acc, device=dev)
    zs = []
    for i, p in enumerate(params):
        x = p.detach().to(acc)
        d = grads[i].to(acc).clone()
        if snapshot_grads is not None:
            d = d - snapshot_grads[i].to(acc)
        if mu is not None:
            d = d + mu[i].to(acc)
        d = d + reg * (x - anchor[i].to(acc))
        z = x - lr * d
        sum_d2 = sum_d2 + d.square().sum()
        avg_sum[i].copy_(avg_sum[i].to(acc) + (x - anchor[i].to(acc)))
        if center is not None:
            dist2 = dist2 + (z - center[i].to(acc)).square().sum()
            z = z.to(p.dtype).to(acc)
        zs.append(z)
    kappa = torch.ones((), dtype=acc, device=dev)
    if center is not None:
        dist = dist2.sqrt()
        two_al = 2.0 * lr * prox_L
        shrunk = (1.0 + two_al * prox_radius / dist.clamp_min(torch.finfo(acc).tiny)) / (1.0 + two_al)
        kappa = torch.where(dist <= prox_radius, kappa, shrunk)
    with torch.no_grad():
        for i, p in enumerate(params):
            z = zs[i]
            if center is not None:
                c = center[i].to(acc)
                z = c + kappa * (z - c)
            if finalize > 0:
                a = anchor[i].to(acc)
                xh = a + (avg_sum[i].to(acc) + (z - a)) / finalize
                p.copy_(xh.view_as(p))
                anchor[i].copy_(xh.view_as(anchor[i]))
                avg_sum[i].zero_()
            else:
                p.copy_(z.view_as(p))
    return torch.stack([sum_d2, dist2, kappa])


def oja_step(v: List[torch.Tensor], hv: List[torch.Tensor], scale: torch.Tensor, eta: float) -> torch.Tensor:
    """One step of Oja's algorithm (power method on I - eta H) with lazy normalisation, in place.

    ``v`` holds an unnormalised iterate w whose unit vector is scale * w (``scale`` = 1/||w||, a
    0-dim tensor, so no host sync); ``hv`` = H w. Because H is linear,
        w <- scale * (w - eta * H w)      (= u - eta H u for the unit vector u = scale w)
    Returns [||w_new||, scale^2 * <w, H w>] (acc dtype): the norm for the next step's scale and
    the Rayleigh quotient u^T H u of the unit input vector.
    """
    acc = _acc_dtype(v)
    dev = v[0].device if v else scale.device
    s = scale.to(device=dev, dtype=acc)
    dot = torch.zeros((), dtype=acc, device=dev)
    nrm2 = torch.zeros((), dtype=acc, device=dev)
    with torch.no_grad():
        for vi, hi in zip(v, hv):
            w = vi.to(acc)
            h = hi.to(acc)
            dot = dot + (w * h).sum()
            w = s * (w - eta * h)
            nrm2 = nrm2 + w.square().sum()
            vi.copy_(w.view_as(vi))
    return torch.stack([nrm2.sqrt(), s * s * dot])


# =============================================================================================
# adahessian: hutchinson_diag_, adahessian_step (see natasha/adahessian.h)
# =============================================================================================
@torch.no_grad()
def hutchinson_diag_(diag: List[torch.Tensor], hz: List[torch.Tensor], seed: int, offset: int,
                     alpha: float, accumulate: bool) -> None:
    """Hutchinson's product D = z * (Hz) (paper eq. 8), z regenerated from the Philox stream.

    ``diag[i] = (diag[i] if accumulate else 0) + alpha * z_i * hz[i]`` where z is the Rademacher
    draw ``rademacher_(hz-shaped list, seed, offset)`` made (element k of the concatenated list
    uses the stream's element k). Averaging n probes: call it n times with alpha = 1/n."""
    total = sum(h.numel() for h in hz)
    if total == 0:
        return
    zs = rademacher_values(seed, offset, 0, total, hz[0].device).split([h.numel() for h in hz])
    for d, h, z in zip(diag, hz, zs):
        if h.numel():
            acc = torch.float64 if torch.float64 in (d.dtype, h.dtype) else torch.float32
            val = (z.to(acc).view(h.shape) * h.to(acc)) * alpha
            if accumulate:
                val = d.to(acc).reshape(h.shape) + val
            d.copy_(val.reshape(d.shape))  # diag and hz share numels, not necessarily shapes


def _group_mean(x: torch.Tensor, g: int) -> torch.Tensor:
    """Mean of each run of ``g`` consecutive elements of flat ``x`` (the last run may be
    shorter), broadcast back to every element of the run."""
    n = x.numel()
    if g <= 1 or n == 0:
        return x
    full = (n // g) * g
    parts = []
    if full:
        parts.append(x[:full].view(-1, g).mean(dim=1).repeat_interleave(g))
    if full < n:
        parts.append(x[full:].mean().expand(n - full))
    return torch.cat(parts)


@torch.no_grad()
def adahessian_step(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avg: List[torch.Tensor],
                    exp_hess_sq: List[torch.Tensor], curv: List[torch.Tensor], group_sizes: List[int],
                    curv_mode: int, abs_first: bool, seed: int, offset: int, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, hessian_power: float,
                    bias_correction1: float, bias_correction2: float) -> None:
    """One AdaHessian update of every tensor (Yao et al. 2020; paper eqs. 8-10), in place.

    Per tensor i with flat elements j and spatial group size G = group_sizes[i]:

      curv_mode 1: D_j = z_j * curv_j with z regenerated from (seed, offset) (curv = Hz);
      curv_mode 2: D_j = curv_j (a precomputed estimate, e.g. averaged over probes);
      curv_mode 0: no new curvature: exp_hess_sq is left as is.
      D^(s)_j = mean over j's group of |D|       (abs_first, the reference implementation)
              = |mean over j's group of D|       (not abs_first)
      m  <- beta1 m + (1 - beta1) g
      v  <- beta2 v + (1 - beta2) D^(s)^2        (curv_mode != 0)
      p  <- p - lr (m / bc1 / ((sqrt(v) / sqrt(bc2))^k + eps) + weight_decay p)

    bc1 = 1 - beta1^t and bc2 = 1 - beta2^h are passed in (t: steps, h: curvature updates).
    Groups are runs of G consecutive elements (conv kernels: G = prod(shape[2:])). exp_avg and
    exp_hess_sq hold fp32 (fp64 for fp64 params); the math runs in their dtype."""
    first = 0
    sbc2 = bias_correction2 ** 0.5
    for i, p in enumerate(params):
        n = p.numel()
        m, v = exp_avg[i], exp_hess_sq[i]
        acc = m.dtype
        if n:
            # flat logical order throughout: the lists only share numels, and any of them may be
            # non-contiguous (reshape copies then; results are copied back into each tensor)
            mf = m.reshape(-1).mul(beta1).add_(grads[i].to(acc).reshape(-1), alpha=1 - beta1)
            m.copy_(mf.view(m.shape))
            vf = v.reshape(-1)
            if curv_mode:
                c = curv[i].to(acc).reshape(-1)
                if curv_mode == 1 and not abs_first:
                    c = c * rademacher_values(seed, offset, first, n, c.device).to(acc)
                ds = _group_mean(c.abs(), group_sizes[i]) if abs_first else _group_mean(c, group_sizes[i]).abs()
                vf = vf.mul(beta2).add_(ds * ds, alpha=1 - beta2)
                v.copy_(vf.view(v.shape))
            denom = (vf.sqrt() / sbc2)
            if hessian_power != 1.0:
                denom = denom.pow(hessian_power)
            denom = denom + eps
            pa = p.detach().to(acc).reshape(-1)
            new = pa - lr * (mf / bias_correction1 / denom + weight_decay * pa)
            p.copy_(new.view(p.shape))
        first += n


# =============================================================================================
# trust region: tr_cg_init_, cg_dots, cg_step_ (preconditioned Steihaug-Toint CG in the A-norm)
# =============================================================================================
# Modes of the ellipsoid A = diag(a) (paper eqs. 2-3, diagonal versions):
TR_SPHERICAL, TR_RMSPROP, TR_ADAGRAD = 0, 1, 2


def tr_cg_init_(v: List[torch.Tensor], a: List[torch.Tensor], s: List[torch.Tensor], r: List[torch.Tensor],
                p: List[torch.Tensor], grads: List[torch.Tensor], beta: float, eps: float,
                mode: int) -> torch.Tensor:
    """Ellipsoid update fused with the CG start, per element:

    mode 0 (spherical): a = 1 (v untouched);
    mode 1 (RMSProp, eq. 3): v = beta v + (1 - beta) g^2, a = v + eps;
    mode 2 (Adagrad, eq. 2): v = v + g^2, a = v + eps;
    then s = 0, r = g, p = -a^{-1} g.

    Returns [g^T A^{-1} g, g^T g] (fp32; fp64 for fp64 lists) as a 1-D tensor of 2.
    """
    acc = _acc_dtype(grads)
    dev = grads[0].device if grads else None
    tot = torch.zeros(2, dtype=acc, device=dev)
    for vi, ai, si, ri, pi, gi in zip(v, a, s, r, p, grads):
        g = gi.to(acc)
        if mode == TR_SPHERICAL:
            av = torch.ones_like(g)
        else:
            vv = vi.to(acc)
            vv = beta * vv + (1.0 - beta) * g * g if mode == TR_RMSPROP else vv + g * g
            vi.copy_(vv)
            av = vv + eps
        ai.copy_(av)
        si.zero_()
        ri.copy_(g)
        z = g / av
        pi.copy_(-z)
        tot = tot + torch.stack([(g * z).sum(), (g * g).sum()])
    return tot


def cg_dots(p: List[torch.Tensor], Bp: List[torch.Tensor], r: List[torch.Tensor],
            a: List[torch.Tensor]) -> torch.Tensor:
    """The reductions a CG iteration needs after its curvature product Bp:
    [p^T B p, r^T p, r^T A^{-1} Bp, Bp^T A^{-1} Bp] as a 1-D tensor of 4 (the last two give
    r_{k+1}^T A^{-1} r_{k+1} = rz + 2 alpha u + alpha^2 w before r is updated)."""
    acc = _acc_dtype(p)
    dev = p[0].device if p else None
    tot = torch.zeros(4, dtype=acc, device=dev)
    for pi, bi, ri, ai in zip(p, Bp, r, a):
        pp, bb, rr, aa = pi.to(acc), bi.to(acc), ri.to(acc), ai.to(acc)
        ba = bb / aa
        tot = tot + torch.stack([(pp * bb).sum(), (rr * pp).sum(), (rr * ba).sum(), (bb * ba).sum()])
    return tot


def cg_step_(s: List[torch.Tensor], r: List[torch.Tensor], p: List[torch.Tensor], Bp: List[torch.Tensor],
             a: List[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """One CG iteration's vector work in one pass, per element:

    s += alpha p;  r += alpha Bp;  z = r / a;  p = -z + beta p

    Returns [r^T z, s^T A s, s^T A p, p^T A p] of the updated vectors (1-D tensor of 4): the
    next residual and the A-norm quantities of the boundary test ||s + tau p||_A = radius.
    """
    acc = _acc_dtype(s)
    dev = s[0].device if s else None
    tot = torch.zeros(4, dtype=acc, device=dev)
    for si, ri, pi, bi, ai in zip(s, r, p, Bp, a):
        pp, aa = pi.to(acc), ai.to(acc)
        ss = si.to(acc) + alpha * pp
        rr = ri.to(acc) + alpha * bi.to(acc)
        z = rr / aa
        pn = -z + beta * pp
        si.copy_(ss)
        ri.copy_(rr)
        pi.copy_(pn)
        sa = ss * aa
        tot = tot + torch.stack([(rr * z).sum(), (sa * ss).sum(), (sa * pn).sum(), (pn * aa * pn).sum()])
    return tot


# =============================================================================================
# kfac / ang / ifang: factor EMA, damped Kronecker apply, SMW (low-rank) apply, ANG slerp combine
# (Tang et al., "AsymptoticNG: a regularized natural gradient optimization algorithm with
# look-ahead strategy", 2021, eqs. 7-14). Every layer's gradient is one 2-D matrix
# T = [dW | db] of shape (out, in [+1]); its factors are A (in+1 square) and G (out square).
# Reductions are per layer, [L, 3] in the accumulation dtype, columns
#   0: t^T G^-1 t = <T, U>,   1: ||G^-1 t||^2 = ||U||^2,   2: ||t||^2 = ||T||^2,
# where U is the preconditioned matrix; ANG needs exactly these three (eq. 7).
# =============================================================================================
def kfac_factor_ema_(factors: List[torch.Tensor], rows: List[torch.Tensor], scales: List[float],
                     decay: float) -> None:
    """factor_i <- decay * factor_i + (1 - decay) * scales[i] * rows_i^T rows_i, in place.

    rows_i is the [M, n] matrix of one layer's statistics (activations with the bias column, or
    pre-activation gradients); it is cast to the factor's dtype (fp32 under AMP) first. With
    ``decay == 0`` the old factor is ignored (NaN/inf in it do not propagate), as in addmm."""
    for f, x, s in zip(factors, rows, scales):
        x = x.to(f.dtype)
        upd = (x.t() @ x) * ((1.0 - decay) * s)
        if decay == 0.0:
            f.copy_(upd)
        else:
            f.mul_(decay).add_(upd)


def _kfac_reductions(ts, us, acc, device):
    red = torch.zeros((len(ts), 3), dtype=acc, device=device)
    for i, (t, u) in enumerate(zip(ts, us)):
        t, u = t.to(acc), u.to(acc)
        red[i, 0] = (t * u).sum()
        red[i, 1] = u.square().sum()
        red[i, 2] = t.square().sum()
    return red


def kfac_precondition(grads: List[torch.Tensor], g_inv: List[torch.Tensor], a_inv: List[torch.Tensor]):
    """U_i = G_inv_i @ T_i @ A_inv_i for every layer (the damped Kronecker inverse
    (A + lam I)^-1 (x) (G + lam I)^-1 applied matrix-free, since (A (x) G) vec(T) = vec(G T A)),
    plus the [L, 3] reductions. Products run in the inverses' dtype (fp32 for fp16 grads)."""
    outs = []
    for t, gi, ai in zip(grads, g_inv, a_inv):
        outs.append((gi @ t.to(gi.dtype) @ ai).to(t.dtype))
    acc = _acc_dtype(grads)
    dev = grads[0].device if grads else None
    return outs, _kfac_reductions(grads, outs, acc, dev)


def _smw_right(t: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """t (lam I + y^T y)^-1 = (t - (t y^T)(lam I_k + y y^T)^-1 y) / lam   (eqs. 11-12, SMW)."""
    k = y.shape[0]
    K = y @ y.t() + lam * torch.eye(k, dtype=y.dtype, device=y.device)
    L = torch.linalg.cholesky_ex(K)[0]  # K is SPD (eigenvalues >= lam > 0); _ex: no info check / sync
    # (t y^T) K^-1 by two triangular solves (much cheaper than cholesky_solve for tiny k x k)
    X = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, (t @ y.t()).t(), upper=False),
                                      upper=True).t()
    return (t - X @ y) / lam


def kfac_smw_apply(grads: List[torch.Tensor], ya: List[torch.Tensor], yg: List[torch.Tensor],
                   damping: List[float]):
    """U_i = (lam I + YG_i^T YG_i)^-1 T_i (lam I + YA_i^T YA_i)^-1 by Sherman-Morrison-Woodbury
    (eqs. 11-14): only k x k systems (k = rank = rows of YA/YG) are solved, never an n x n one;
    for k = 1 they are scalars. YA_i is [k, in(+1)], YG_i is [k, out]. Computed in the
    accumulation dtype (fp32, fp64 for fp64); returns (U list in the grads' dtype, [L, 3])."""
    acc = _acc_dtype(grads)
    outs = []
    for t, a, g, lam in zip(grads, ya, yg, damping):
        t32, a32, g32 = t.to(acc), a.to(acc), g.to(acc)
        r = _smw_right(t32, a32, lam)
        u = _smw_right(r.t(), g32, lam).t()
        outs.append(u.to(t.dtype))
    dev = grads[0].device if grads else None
    return outs, _kfac_reductions(grads, outs, acc, dev)


def ang_coefficients(reductions: torch.Tensor, lam: float, per_layer: bool) -> torch.Tensor:
    """Coefficients (c1, c2) of the ANG direction d = c1 U + c2 T (eq. 7), per layer [L, 2].

    With dot = t^T G^-1 t, nu = ||G^-1 t|| (= ||t||_G, the amplitude), nt = ||t||:
        cos Omega = dot / (nu nt),  w1 = sin((1-lam) Omega)/sin Omega,  w2 = sin(lam Omega)/sin Omega,
        d = nu (w1 U / nu + w2 T / nt)  =>  c1 = w1,  c2 = w2 nu / nt.
    ||d|| = nu: the slerp of two unit vectors has unit norm. When sin Omega ~ 0 (parallel
    directions) the weights take their limits w1 = 1-lam, w2 = lam (no 0/0). When dot <= 0 (or
    any reduction is not finite) eq. 7's fallback uses the plain gradient: c1 = 0, c2 = 1.
    ``per_layer=False`` sums the reductions over all layers first (one global Omega, eq. 7 on the
    whole parameter vector); ``True`` blends every layer with its own Omega."""
    r = reductions.to(torch.float64)
    if not per_layer:
        r = r.sum(0, keepdim=True).expand(reductions.shape[0], 3)
    dot, nu2, nt2 = r[:, 0], r[:, 1], r[:, 2]
    nu, nt = nu2.sqrt(), nt2.sqrt()
    ok = (dot > 0) & torch.isfinite(dot) & torch.isfinite(nu2) & torch.isfinite(nt2) & (nu > 0) & (nt > 0)
    cos = torch.where(ok, dot / (nu * nt), torch.ones_like(dot)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    s = torch.sin(omega)
    small = s < 1e-6
    s_safe = torch.where(small, torch.ones_like(s), s)
    w1 = torch.where(small, torch.full_like(s, 1.0 - lam), torch.sin((1.0 - lam) * omega) / s_safe)
    w2 = torch.where(small, torch.full_like(s, lam), torch.sin(lam * omega) / s_safe)
    c1 = torch.where(ok, w1, torch.zeros_like(w1))
    c2 = torch.where(ok, w2 * nu / torch.where(ok, nt, torch.ones_like(nt)), torch.ones_like(w2))
    return torch.stack([c1, c2], 1)


def ang_combine_(nat: List[torch.Tensor], grads: List[torch.Tensor], reductions: torch.Tensor,
                 scale: torch.Tensor, lam: float, per_layer: bool) -> torch.Tensor:
    """In place: nat_i <- scale * (c1_i nat_i + c2_i grads_i), the ANG slerp combination (eq. 7)
    of the preconditioned U (in ``nat``) and the gradient T, with the coefficients of
    :func:`ang_coefficients` computed from the [L, 3] reductions; ``scale`` is a 0-dim tensor (the
    K-FAC KL-clip factor). Returns the [L, 2] coefficients (times scale) in the reductions' dtype."""
    coef = (ang_coefficients(reductions, lam, per_layer) * scale.to(torch.float64)).to(reductions.dtype)
    for i, (u, t) in enumerate(zip(nat, grads)):
        acc = _acc_dtype([u])
        u.copy_(coef[i, 0].to(acc) * u.to(acc) + coef[i, 1].to(acc) * t.to(acc))
    return coef


# ---- the ops' ATen-style names (in-place ops end in `_`; the schema's argument order) ---------
def svrg_step_(params, grads, snapshot_grads, mu, anchor, avg_sum, center, *, lr, reg, finalize, prox_L,
               prox_radius) -> torch.Tensor:
    """:func:`svrg_step` with the argument order of ``natasha::svrg_step_``."""
    return svrg_step(params, grads, snapshot_grads, mu, anchor, avg_sum, lr, reg, finalize, center, prox_L,
                     prox_radius)


oja_step_ = oja_step
adahessian_step_ = adahessian_step
