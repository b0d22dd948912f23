"""The per-row maths of each way of a paired forward (:mod:`zofast.paired_layers` says which
tensor takes which, and why each is exact): the hooks that give the first copy of the stacked
batch W + c·Z and the second W − c·Z, and what they prepare once per step (the virtual tensors'
stacked factors, the small tensors' perturbed values)."""

from __future__ import annotations

import numpy as np
import torch

from zofast import offload_prepare
from zofast import virtual as virtual_mode
from zofast.offload_prepare import home
from zofast.perturb import _device_terms, gaussian_, lowrank_
from zofast.shadow import ShadowTensor
from zofast.shadow_step import PRESET_ALIGN, bulk_on, to_device
from zofast.virtual import VirtualTensor

__all__ = [
    "NormHooks",
    "Rows",
    "SignedFactors",
    "SmallValues",
    "SplitHooks",
    "FACTOR_ALIGN",
    "bias_hook",
    "factor_width",
    "halves",
    "lowrank_hook",
    "virtual_hook",
]


class Rows:
    """The stacked batch's number of rows in the current paired forward, shared by the hook
    sets of one optimizer (None until a hooked layer shows it; the optimizer resets it before
    each paired forward)."""

    def __init__(self):
        self.rows: int | None = None
        self.generation = 0  # counts paired forwards: what the hooks prepare once per forward

    def reset(self) -> None:
        self.rows = None
        self.generation += 1


def halves(rows: Rows, out: torch.Tensor, name: str, x=None, width: int | None = None):
    """(x, y, y3): the output y (contiguous: `out` itself where it is, else a copy, which the
    hook returns) and y3, its view (2, h, width) whose [0] is the first copy's rows and [1] the
    second's; an output broadcast over the batch (first dimension 1) is expanded to the stacked
    rows first, and so is the layer's input x. ValueError for any other layout."""
    lead = out.shape[0] if out.dim() else 0
    known = rows.rows
    if known is None and out.dim() >= 3 and lead > 1:
        known = rows.rows = lead
    if lead == 1 and known is not None and known > 1 and out.dim() >= 2:
        out = out.expand(known, *out.shape[1:])
        if x is not None:
            x = x.expand(known, *x.shape[1:])
        lead = known
    elif known is not None and lead != known and not (out.dim() == 2 and lead % known == 0):
        raise ValueError(
            f"paired step: {name} gives an output of shape {tuple(out.shape)}, whose first "
            f"dimension is not the stacked batch ({known} rows) nor its tokens: a paired forward "
            "runs the model once over the batch stacked twice, batch dimension first"
        )
    if lead % 2:
        raise ValueError(
            f"paired step: {name} gives an output of shape {tuple(out.shape)}, whose first "
            "dimension is odd: the closure must run the model on the batch stacked twice "
            "(zofast.paired.stack)"
        )
    y = out.contiguous()
    return x, y, y.view(2, -1, width or y.shape[-1])


# Factor columns are padded to a multiple of this on a GPU, so that every operand of the hooks'
# rank-k products is 16-byte aligned (cuBLAS falls back to slow kernels otherwise; the zero
# columns add exact zeros).
FACTOR_ALIGN = 8


def factor_width(k: int, device: torch.device) -> int:
    """k columns as the factors hold them on `device`."""
    return k + (-k % FACTOR_ALIGN if device.type == "cuda" else 0)


class SignedFactors:
    """Every virtual tensor's paired factors for the current paired forward, per (dtype, device):
    L± (2, m, w) with L±[0] = L at +c and L±[1] at −c (virtual mode's L = A + c·U, or [A | c·U]
    on a V-refresh step) and R (n, w) (V, or [V_A | V]); w = k columns (+ 1 where a Linear's bias
    is fused: column k of L± holds its differences (b ± c·z) − b and column k of R is zero, the
    hook's x·R then getting a column of ones), padded by factor_width.

    Made at the first hook call of each paired forward (a new ``rows.generation``) for all the
    tensors at once: per group of tensors of one shape and form, the factors stacked and one add
    per sign, computed in float32 and rounded once into the dtype (as virtual mode's own factors,
    bit for bit): a few launches per group instead of a few per tensor.

    Args:
        tensors: the :class:`zofast.virtual.VirtualTensor` objects.
        fused: {id(tensor): (its Linear's bias ShadowTensor, that tensor's SmallValues lookup)}.
    """

    def __init__(self, tensors, fused: dict | None = None):
        self.tensors = list(tensors)
        self.fused = {} if fused is None else fused
        self._buffers: dict = {}  # (dtype, device, group) -> (L (G, 2, m, w), R (G, n, w))
        self._made: dict = {}  # (dtype, home) -> (generation, {id(vt): (L, R, bias column)})
        self._moved: dict = {}  # (dtype, device) -> (generation, {id(vt): its entry moved there})
        self._grouped: tuple | None = None  # (offload_prepare.VERSION, {home: tensors})

    def get(self, vt: VirtualTensor, dtype, device, generation: int):
        """(L±, R, the column of the fused bias or None) of `vt` for this paired forward, on
        `device`: made where vt lives for every tensor of its home (its device, or its
        streamed block, zofast.offload_prepare), moved to `device` if that is elsewhere."""
        where = home(vt.param)
        if where == (device, None):
            return self._entries(dtype, where, generation)[id(vt)]
        moved = self._moved.get((dtype, device))
        if moved is None or moved[0] != generation:
            moved = self._moved[(dtype, device)] = (generation, {})
        entry = moved[1].get(id(vt))
        if entry is None:  # a streamed block (zofast.offload): made where vt lives, moved
            L, R, column = self._entries(dtype, where, generation)[id(vt)]
            entry = moved[1][id(vt)] = (to_device(L, device), to_device(R, device), column)
        return entry

    def prepare(self, tensors, generation: int) -> None:
        """Make the paired factors of the home of `tensors` (one streamed block's) for this
        paired forward now, in their weights' dtype."""
        vt = tensors[0]
        self._entries(vt.param.dtype, home(vt.param), generation)

    def _entries(self, dtype, where, generation: int) -> dict:
        made = self._made.get((dtype, where))
        if made is None or made[0] != generation:
            with torch.inference_mode(False), torch.no_grad():
                made = (generation, self._build(dtype, where))
            self._made[(dtype, where)] = made
        return made[1]

    def _homes(self) -> dict:
        """{home: its tensors} (regrouped when streams start or end)."""
        if self._grouped is None or self._grouped[0] != offload_prepare.VERSION[0]:
            groups: dict = {}
            for vt in self.tensors:
                groups.setdefault(home(vt.param), []).append(vt)
            self._grouped = (offload_prepare.VERSION[0], groups)
        return self._grouped[1]

    def _build(self, dtype, where) -> dict:
        device = where[0]
        groups: dict = {}
        for vt in self._homes().get(where, []):
            r = vt.U.shape[1]
            form = "new" if vt.A is None else ("same" if vt.epoch == vt.V_epoch else "refresh")
            key = (vt.m, vt.n, r, form, id(vt) in self.fused)
            groups.setdefault(key, []).append(vt)
        made = {}
        for key, group in groups.items():
            m, n, r, form, fused = key
            k = 2 * r if form == "refresh" else r
            slot = (dtype, device, key, tuple(id(vt) for vt in group))
            buffers = self._buffers.get(slot)
            if buffers is None:
                w = factor_width(k + fused, device)
                buffers = self._buffers[slot] = (
                    torch.zeros(len(group), 2, m, w, dtype=dtype, device=device),
                    torch.zeros(len(group), n, w, dtype=dtype, device=device),
                )
            L, R = buffers
            c = group[0].c
            U = torch.stack([vt.U for vt in group])
            R[:, :, k - r : k].copy_(torch.stack([vt.V for vt in group]))  # V: the last r
            if form == "new":
                torch.mul(U, c, out=L[:, 0, :, :r])
                torch.mul(U, -c, out=L[:, 1, :, :r])
            elif form == "same":
                A = torch.stack([vt.A for vt in group])
                torch.add(A, U, alpha=c, out=L[:, 0, :, :r])
                torch.add(A, U, alpha=-c, out=L[:, 1, :, :r])
            else:  # A on the old V, c·U on the new: [A | c·U]·[V_A | V]ᵀ
                L[:, :, :, :r].copy_(torch.stack([vt.A for vt in group]).unsqueeze(1))
                torch.mul(U, c, out=L[:, 0, :, r:k])
                torch.mul(U, -c, out=L[:, 1, :, r:k])
                R[:, :, :r].copy_(torch.stack([vt.V_A for vt in group]))
            if fused:
                biases = [self.fused[id(vt)] for vt in group]
                L[:, :, :, k].copy_(torch.stack([v(st).differences(st) for st, v in biases]))
            for i, vt in enumerate(group):
                made[id(vt)] = (L[i], R[i], k if fused else None)
        return made


def virtual_hook(vt: VirtualTensor, kind: str, rows: Rows, factors: SignedFactors):
    """A virtual tensor's forward hook: virtual mode's own with c = 0, the paired product with
    c ≠ 0 (see zofast.paired_layers)."""
    plain = virtual_mode._make_hook(vt, kind)
    bias = factors.fused.get(id(vt), (None,))[0]
    constants: dict = {}

    def constant(key, make):
        t = constants.get(key)
        if t is None:
            with torch.inference_mode(False), torch.no_grad():
                t = constants[key] = make()
        return t

    def hook(module, args, kwargs, out):
        if vt.c == 0.0:
            return plain(module, args, kwargs, out)
        x = virtual_mode._input(args, kwargs).to(out.device)  # (a device map moves it inside)
        x, y, y3 = halves(rows, out, vt.name, x=x)
        L, R, column = factors.get(vt, y.dtype, y.device, rows.generation)
        w = R.shape[1]
        if kind == "linear":  # W: (out = m, in = n); y_i += (x_i·R)·L_iᵀ
            x2 = x.reshape(-1, vt.n).to(y.dtype)
            if column is None:
                xr = x2 @ R
            else:  # [x·R | 1]: the fused bias's row of L±ᵀ is added once per row
                ones = constant(
                    (y.dtype, y.device, w, column),
                    lambda: torch.zeros(1, w, dtype=y.dtype, device=y.device).index_fill_(
                        1, torch.tensor([column], device=y.device), 1.0
                    ),
                )
                xr = torch.addmm(ones, x2, R)
                bias.used = True
            y3.baddbmm_(xr.view(2, -1, w), L.transpose(1, 2))
        elif kind == "conv1d":  # W: (in = m, out = n); y_i += (x_i·L_i)·Rᵀ
            xl = torch.bmm(x.reshape(2, -1, vt.m).to(y.dtype), L)
            y.view(-1, vt.n).addmm_(xl.view(-1, w), R.T)
        else:  # embedding, W: (vocab = m, dim = n); y_i += L_i[id_i]·Rᵀ, L± read as 2m rows
            shift = constant(x.device, lambda: torch.tensor([[0], [vt.m]], device=x.device))
            index = (x.reshape(2, -1) + shift).reshape(-1)
            y.view(-1, vt.n).addmm_(L.view(-1, w).index_select(0, index), R.T)
        return y

    return hook


class SmallValues:
    """W + c·Z, W − c·Z and their differences from W of the "bias" and "norm" tensors of one
    device, made once per paired forward (:meth:`build`) in flat buffers, one per dtype: copies of
    W perturbed by the engine (one CUDA-graphed pass over all of them on a GPU), so the values are
    bit for bit a two-forward step's temporaries."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self._slices: dict[int, tuple] | None = None  # id(st) -> (values, differences) (2, n)
        self._flat: list = []  # per dtype: (stored, perturbed (2, S), differences (2, S))
        self._copies: list = []  # per tensor: [stored, + and − copies] (views of the flat buffers)
        self._graph = None
        self._moved: dict = {}  # (id(st), 0 values / 1 differences, device) -> a copy there
        self._pending: float | None = None  # c of a deferred build

    def _allocate(self) -> None:
        by_dtype: dict = {}
        for st in self.tensors:
            by_dtype.setdefault(st.param.dtype, []).append(st)
        device = self.tensors[0].param.device
        self._slices = {}
        copies = {}
        for dtype, group in by_dtype.items():
            sizes = [-(-st.param.numel() // PRESET_ALIGN) * PRESET_ALIGN for st in group]
            total = sum(sizes)
            stored = torch.empty(total, dtype=dtype, device=device)
            perturbed = torch.empty(2, total, dtype=dtype, device=device)
            differences = torch.empty(2, total, dtype=dtype, device=device)
            self._flat.append((stored, perturbed, differences))
            start = 0
            for st, size in zip(group, sizes, strict=True):
                part = slice(start, start + st.param.numel())
                self._slices[id(st)] = (perturbed[:, part], differences[:, part])
                views = [flat[part].view(st.param.shape) for flat in (stored, *perturbed)]
                copies[id(st)] = views
                start += size
        self._copies = [copies[id(st)] for st in self.tensors]

    def build(self, c: float, now: bool = True) -> None:
        """Make every tensor's W ± c·Z and (W ± c·Z) − W; `now` False: at :meth:`make`, or at
        the first read (a streamed block's, zofast.offload_prepare)."""
        self._pending = None if now else c
        self._moved = {}
        if now:
            self._build(c)

    def make(self) -> None:
        """Make what :meth:`build` deferred (nothing if nothing is)."""
        if self._pending is not None:
            c, self._pending = self._pending, None
            self._build(c)

    def _build(self, c: float) -> None:
        if not self.tensors:
            return
        if self._slices is None:
            self._allocate()
        with torch.inference_mode(False), torch.no_grad():
            params = [st.param.data for st in self.tensors]
            for k in range(3):
                torch._foreach_copy_([views[k] for views in self._copies], params)
            self._perturb(c)
            for stored, perturbed, differences in self._flat:
                torch.sub(perturbed, stored, out=differences)

    def _perturb(self, c: float) -> None:
        plus = [views[1] for views in self._copies]
        minus = [views[2] for views in self._copies]
        if bulk_on(plus[0].device):
            if self._graph is None or self._graph.stale:
                from zofast.graphed import GraphedPass

                ranks = [st.rank for st in self.tensors] * 2
                self._graph = GraphedPass(plus + minus, ranks, 1)
            seeds = np.zeros((2 * len(self.tensors), 2), dtype=np.uint64)
            for i, st in enumerate(self.tensors * 2):
                seeds[i, : len(st.seeds)] = st.seeds
            scales = np.repeat(np.array([[c], [-c]], dtype=np.float32), len(self.tensors), 0)
            self._graph.replay_table(seeds, scales)
            return
        for st, up, down in zip(self.tensors, plus, minus, strict=True):
            for copy, scale in ((up, c), (down, -c)):
                if st.rank:
                    lowrank_(copy, st.seeds[:1], st.seeds[1:], st.rank, [scale])
                else:
                    gaussian_(copy, list(st.seeds), [scale])

    def values(self, st: ShadowTensor, device: torch.device | None = None) -> torch.Tensor:
        """(2, numel): W + c·Z and W − c·Z, flattened (on `device`: copied there once per
        build, for the streamed blocks of zofast.offload)."""
        return self._on(st, 0, device)

    def differences(self, st: ShadowTensor, device: torch.device | None = None) -> torch.Tensor:
        """(2, numel): (W + c·Z) − W and (W − c·Z) − W, flattened (on `device`)."""
        return self._on(st, 1, device)

    def _on(self, st: ShadowTensor, k: int, device) -> torch.Tensor:
        self.make()
        t = self._slices[id(st)][k]
        if device is None or t.device == device:
            return t
        key = (id(st), k, device)
        moved = self._moved.get(key)
        if moved is None:
            with torch.inference_mode(False), torch.no_grad():
                moved = self._moved[key] = to_device(t, device)
        return moved


def lowrank_hook(st: ShadowTensor, kind: str, rows: Rows):
    """A "product" / "rows" use: y_i += c_i·(the layer applied to U·Vᵀ)."""

    def hook(module, args, kwargs, out):
        if not st.c or st._stored is not None:  # c = 0, or W ± c·Z already swapped in
            return None
        st.used = True
        x = virtual_mode._input(args, kwargs).to(out.device)  # (a device map moves it inside)
        x, y, _ = halves(rows, out, st.name, x=x)
        Ut, Vt = st.factors(y.dtype, y.device)
        if kind == "embedding":
            left, right = Ut.index_select(1, x.reshape(-1)), Vt
        else:
            inner, right = (Vt, Ut) if kind == "linear" else (Ut, Vt)
            left = inner @ x.reshape(-1, inner.shape[1]).to(y.dtype).T
        left[:, left.shape[1] // 2 :].neg_()  # the second copy's rows: −c
        y.view(-1, right.shape[1]).addmm_(left.T, right, alpha=st.c)
        return y

    return hook


def bias_hook(st: ShadowTensor, rows: Rows, values):
    """A "bias" use: y_i += (b ± c·z) − b."""

    def hook(module, args, out):
        if not st.c or st._stored is not None:
            return None
        st.used = True
        _, y, y3 = halves(rows, out, st.name)
        y3.add_(values(st).differences(st, y.device).unsqueeze(1))
        return y

    return hook


class NormHooks:
    """A "norm" module's pre-hook (with a trained weight: swap ones / zeros in for the affine
    parameters) and always-called forward hook (swap the stored ones back; y = x̂ ⊙ (γ ± c·z_γ) +
    (β ± c·z_β), or y += (β ± c·z_β) − β with a trained bias alone)."""

    def __init__(self, weight, bias, rows: Rows, lookup):
        self.weight, self.bias, self.rows, self.lookup = weight, bias, rows, lookup
        self.frames: list[dict] = []
        self._identity: dict = {}

    def _constant(self, like: torch.Tensor, value: float) -> torch.Tensor:
        key = (like.dtype, like.device, value)
        t = self._identity.get(key)
        if t is None or t.shape != like.shape:
            with torch.inference_mode(False), torch.no_grad():
                t = self._identity[key] = torch.full_like(like, value)
        return t

    def pre(self, module, args):
        # A frame per call, pushed before any swap: the forward hook undoes a partial one.
        # "scale": γ's tensor swapped for ones; "shift": β's tensor swapped for zeros (trained),
        # or (the frozen bias, its stored tensor).
        frame: dict = {}
        self.frames.append(frame)
        st = self.weight
        if st is None or not st.c or st._stored is not None:
            return
        st.swap_to(self._constant(st.param.data, 1.0))
        frame["scale"] = st
        bias = getattr(module, "bias", None)
        if bias is None:
            return
        if self.bias is not None and self.bias._stored is None:
            self.bias.swap_to(self._constant(bias.data, 0.0))
            frame["shift"] = self.bias
        else:  # a frozen bias: swapped by hand, added back from its stored tensor
            frame["shift"] = (bias, bias.data)
            bias.data = self._constant(bias.data, 0.0)

    def post(self, module, args, out):
        frame = self.frames.pop() if self.frames else {}
        try:
            return self._apply(frame, out) if isinstance(out, torch.Tensor) else None
        finally:
            _unswap(frame)

    def _apply(self, frame: dict, out: torch.Tensor):
        if "scale" in frame:  # out is x̂
            st = self.weight
            values = self.lookup(st)
            width = st.param.numel()
            _, y, y3 = halves(self.rows, out, st.name, width=width)
            scale = values.values(st, y.device).unsqueeze(1)
            shift = frame.get("shift")
            if shift is None:
                y3.mul_(scale)
            else:
                if isinstance(shift, ShadowTensor):
                    shift = values.values(shift, y.device).unsqueeze(1)
                else:
                    shift = shift[1].reshape(1, 1, width)
                torch.addcmul(shift, y3, scale, out=y3)
            return y
        st = self.bias
        if st is None or not st.c or st._stored is not None:
            return None
        st.used = True
        _, y, y3 = halves(self.rows, out, st.name, width=st.param.numel())
        y3.add_(self.lookup(st).differences(st, y.device).unsqueeze(1))
        return y

    def restore(self) -> None:
        while self.frames:
            _unswap(self.frames.pop())


def _unswap(frame: dict) -> None:
    """Put back what a norm frame swapped."""
    for key in ("shift", "scale"):
        item = frame.pop(key, None)
        if isinstance(item, ShadowTensor):
            item._swap_out()
        elif item is not None:
            param, stored = item
            param.data = stored


class SplitHooks:
    """A "split" module's pre-hook (swap W + c·Z in) and always-called forward hook (run the
    module again with W − c·Z, keep that run's second half of the rows, swap W back)."""

    def __init__(self, tensors: list[ShadowTensor], rows: Rows):
        self.tensors, self.rows = tensors, rows
        self.frames: list[list] = []
        self._terms: dict = {}

    def _temporary(self, st: ShadowTensor, sign: float) -> torch.Tensor:
        """W ± c·Z out of place (bit for bit zofast.shadow's temporary)."""
        w = st.param.data
        key = (id(st), sign, w.device)
        terms = self._terms.get(key)
        if terms is None or terms[0] != (st.step, st.seeds, st.c):
            values = _device_terms(list(st.seeds), [sign * st.c], w.device)
            terms = self._terms[key] = ((st.step, st.seeds, st.c), values)
        seeds, scale = terms[1]
        tmp = torch.empty_like(w)
        if st.rank:
            return lowrank_(w, seeds[:1], seeds[1:], st.rank, scale, out=tmp)
        return gaussian_(w, seeds, scale, out=tmp)

    def _swap_all(self, frame: list, sign: float) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for st in frame:
                st._swap_out()
                st.swap_to(self._temporary(st, sign))

    def pre(self, module, args):
        frame = [st for st in self.tensors if st.c and st._stored is None]
        self.frames.append(frame)
        with torch.inference_mode(False), torch.no_grad():
            for st in frame:
                st.swap_to(self._temporary(st, 1.0))

    def post(self, module, args, kwargs, out):
        frame = self.frames.pop() if self.frames else []
        if not frame:
            return None
        try:
            if out is None:  # the forward raised
                return None
            name = frame[0].name
            if not isinstance(out, torch.Tensor):
                raise ValueError(
                    f"paired step: {name} is applied by a {type(module).__name__} whose output "
                    f"is a {type(out).__name__}, not one tensor with the batch's rows: it cannot "
                    "be paired (freeze it, or train without paired=True)"
                )
            self._swap_all(frame, -1.0)
            minus = module.forward(*args, **kwargs)
            _, y, y3 = halves(self.rows, out, name)
            _, _, m3 = halves(self.rows, minus, name)
            y3[1].copy_(m3[1])
            return y
        finally:
            for st in reversed(frame):
                st._swap_out()

    def restore(self) -> None:
        self.frames.clear()
