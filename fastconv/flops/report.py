"""The report of :func:`fastconv.flops.count`: a module tree with own counts and subtotals, as a table, JSON or CSV.

Each :class:`Node` is one module (named as in ``model.named_modules()``, the root ``""``) with ``self_``, the
counts of the ops and parameters that belong to it directly, and ``total``, those of its whole subtree
(``total = self_ + sum(child.total)``), like fvcore's ``flop_count_table`` and torchinfo's summary. Folding the
tree at ``depth`` N shows the nodes down to depth N, each with its subtree's totals. The table prints human
units (K/M/G, decimal) per row and the exact integers on the ``total`` lines; JSON and CSV carry exact integers.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, fields
from typing import Iterator, Optional

from torch import nn

__all__ = ["Counts", "Node", "Report", "build_report", "human", "NOTES", "UNITS"]

UNITS = ("units: MACs = multiply-accumulates (forward, plus backward when counted); FLOPs = 2 x MACs; bias adds "
         "and pool ops (one comparison or add per pooling-window element) are counted separately, not in "
         "MACs/FLOPs; % = share of the model's MACs; act = bytes of new tensors the forward produces; saved = "
         "bytes autograd keeps for backward (parameters excluded); K/M/G = 1e3/1e6/1e9.")

#: Where the anchors disagree, and why (kept with the report so every output states it).
NOTES = (
    "torch's FlopCounterMode (torch <= 2.13) counts a grouped conv's weight gradient groups x too high "
    "(conv_backward_flop ignores groups; fix proposed in pytorch/pytorch#183405); fastconv divides by groups, "
    "so with --backward on grouped/depthwise layers the totals differ from FlopCounterMode's by that much.",
)


@dataclass
class Counts:
    """Additive counts of a module (its own or its subtree's)."""

    params: int = 0             #: parameters, trainable and frozen
    frozen_params: int = 0      #: parameters with requires_grad=False
    macs: int = 0               #: multiply-accumulates, all counted passes
    backward_macs: int = 0      #: of which in the backward pass
    bias_adds: int = 0
    pool_ops: int = 0
    algorithm_mults: int = 0    #: multiplications the chosen algorithms execute
    activation_bytes: int = 0   #: bytes of new tensors produced in the forward pass
    saved_bytes: int = 0        #: bytes saved for backward

    @property
    def trainable_params(self) -> int:
        return self.params - self.frozen_params

    @property
    def forward_macs(self) -> int:
        return self.macs - self.backward_macs

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def add(self, other: "Counts") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(trainable_params=self.trainable_params, forward_macs=self.forward_macs, flops=self.flops)
        return d


@dataclass
class Node:
    """One module of the tree. ``self_``: its own ops and parameters; ``total``: its subtree's."""

    name: str
    type: str
    depth: int
    output_shape: tuple = ()
    calls: int = 0
    self_: Counts = field(default_factory=Counts)
    total: Counts = field(default_factory=Counts)
    children: list["Node"] = field(default_factory=list)
    ops: list = field(default_factory=list)   #: this module's own op rows (fastconv.flops.Row)
    percent: float = 0.0                      #: share of the model's MACs, subtree included

    def walk(self, depth: Optional[int] = None) -> Iterator["Node"]:
        """This node and its descendants, pre-order, down to ``depth`` (None: all)."""
        yield self
        if depth is None or self.depth < depth:
            for c in self.children:
                yield from c.walk(depth)

    def as_dict(self, depth: Optional[int] = None) -> dict:
        d = {"name": self.name, "type": self.type, "depth": self.depth, "output_shape": list(self.output_shape),
             "calls": self.calls, **self.total.as_dict(), "percent_macs": round(self.percent, 4),
             "self": self.self_.as_dict()}
        d["children"] = ([c.as_dict(depth) for c in self.children]
                         if depth is None or self.depth < depth else [])
        return d


def human(v: float, unit: str = "") -> str:
    """``1234567`` -> ``"1.23M"``: three significant digits, decimal prefixes; 0 -> ``"-"``."""
    if not v:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            x = v / scale
            return f"{x:.3g}{prefix}{unit}" if x < 1000 else f"{x:.0f}{prefix}{unit}"
    return f"{v:g}{unit}"


def _shape(s) -> str:
    return "x".join(map(str, s)) if s else ""


class Report:
    """Counts of one run of a model: the module tree (:attr:`root`), the op rows (:attr:`rows`) and totals.

    Totals are properties of ``root.total``: ``macs``, ``flops``, ``params``, ``frozen_params``,
    ``trainable_params``, ``bias_adds``, ``pool_ops``, ``algorithm_mults``, ``forward_macs``,
    ``backward_macs``, ``activation_bytes``, ``saved_bytes``.
    """

    def __init__(self, root: Node, rows: list, notes: tuple = NOTES):
        self.root = root
        self.rows = rows
        self.notes = list(notes)
        self.title = ""

    def __getattr__(self, name):
        # totals: report.macs, report.params, ... are the root's subtree counts
        if name in ("root",):
            raise AttributeError(name)
        total = self.root.total
        if hasattr(total, name):
            return getattr(total, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # ---- views -----------------------------------------------------------------------------------
    def modules(self, depth: Optional[int] = None) -> list[Node]:
        """The tree's nodes in module order, folded at ``depth`` (root = 0; None: every module)."""
        return list(self.root.walk(depth))

    def module(self, name: str) -> Node:
        """The node of module ``name`` (``""``: the root). KeyError names the known modules."""
        for n in self.root.walk():
            if n.name == name:
                return n
        raise KeyError(f"no module {name!r} in the report")

    def by_module(self) -> dict[str, int]:
        """MACs per module name of the op rows (own ops only, forward and backward together)."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.name] = out.get(r.name, 0) + r.macs
        return out

    # ---- output formats --------------------------------------------------------------------------
    def as_dict(self, depth: Optional[int] = None) -> dict:
        """JSON-ready: units, notes, exact totals, the module tree and the op rows."""
        return {"title": self.title, "units": UNITS, "notes": self.notes, "totals": self.root.total.as_dict(),
                "tree": self.root.as_dict(depth), "ops": [r.as_dict() for r in self.rows]}

    def to_json(self, depth: Optional[int] = None, indent: Optional[int] = 1) -> str:
        return json.dumps(self.as_dict(depth), indent=indent)

    def to_csv(self, depth: Optional[int] = None) -> str:
        """One line per module (folded at ``depth``), exact integers, subtree totals and own MACs."""
        buf = io.StringIO()
        cols = ["name", "type", "depth", "output_shape", "params", "trainable_params", "frozen_params", "macs",
                "forward_macs", "backward_macs", "flops", "bias_adds", "pool_ops", "algorithm_mults",
                "activation_bytes", "saved_bytes", "percent_macs", "self_macs", "self_params"]
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for n in self.modules(depth):
            t = n.total.as_dict()
            w.writerow([n.name, n.type, n.depth, _shape(n.output_shape)] + [t[c] for c in cols[4:16]]
                       + [f"{n.percent:.4f}", n.self_.macs, n.self_.params])
        return buf.getvalue()

    def table(self, depth: Optional[int] = None, width: int = 100) -> str:
        """The module tree as a table at most ``width`` columns wide, then exact totals, units and notes."""
        t = self.root.total
        cols = [("module", "<"), ("type", "<"), ("output", "<"), ("params", ">")]
        if t.frozen_params:
            cols.append(("frozen", ">"))
        cols += [("MACs", ">"), ("%", ">")]
        if t.backward_macs:
            cols.append(("bwd MACs", ">"))
        cols += [("act", ">"), ("saved", ">")]
        body = []
        for n in self.modules(depth):
            label = "  " * n.depth + (n.name or "(model)")  # full names: what --layer takes
            c = n.total
            row = [label, n.type, _shape(n.output_shape), human(c.params)]
            if t.frozen_params:
                row.append(human(c.frozen_params))
            row += [human(c.macs), f"{n.percent:.1f}" if c.macs else "-"]
            if t.backward_macs:
                row.append(human(c.backward_macs))
            row += [human(c.activation_bytes, "B"), human(c.saved_bytes, "B")]
            body.append(row)
        head = [c[0] for c in cols]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(cols))]
        # fit the width: shorten the type column, then the module names (kept left-aligned, cut at the end)
        excess = sum(widths) + 2 * (len(widths) - 1) - width
        for i, floor in ((1, 10), (2, 12), (0, 24)):
            if excess > 0:
                cut = min(excess, max(0, widths[i] - floor))
                widths[i] -= cut
                excess -= cut

        def fit(v: str, w: int) -> str:
            return v if len(v) <= w else v[:w - 1] + "~"

        def line(r):
            return "  ".join(fit(v, w).ljust(w) if a == "<" else fit(v, w).rjust(w)
                             for v, w, (_, a) in zip(r, widths, cols)).rstrip()

        rule = "-" * min(width, len(line(head)))
        out = [self.title] if self.title else []
        out += [line(head), rule, *map(line, body), rule]
        out.append(f"total  params {t.params:,}  MACs {t.macs:,} ({human(t.macs)})  FLOPs {t.flops:,} "
                   f"({human(t.flops)})")
        extra = f"       trainable {t.trainable_params:,}  frozen {t.frozen_params:,}"
        if t.backward_macs:
            extra += f"  [forward {t.forward_macs:,} + backward {t.backward_macs:,} MACs]"
        out.append(extra)
        out.append(f"       bias adds {t.bias_adds:,}  pool ops {t.pool_ops:,}  act {t.activation_bytes:,} B  "
                   f"saved {t.saved_bytes:,} B")
        out += _wrap(UNITS, width)
        for note in self.notes:
            out += _wrap("note: " + note, width)
        return "\n".join(out)

    def ops_table(self, width: int = 100) -> str:
        """One line per counted op: module, op, pass, output, MACs, executed multiplications, algorithm, why."""
        head = ["module", "op", "pass", "output", "MACs", "executed", "algorithm", "why"]
        body = [[r.name or "(model)", r.op, r.pass_[:3], _shape(r.output_shape),
                 human(r.macs or r.pool_ops), human(r.algorithm_mults), r.algorithm, r.reason]
                for r in self.rows]
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        widths[0] = min(widths[0], 24)
        widths[1] = min(widths[1], 18)
        widths[3] = min(widths[3], 14)
        used = sum(widths[:7]) + 2 * 7
        widths[7] = max(3, width - used)
        right = {4, 5}

        def line(r):
            cells = [(v if len(v) <= w else v[:w - 1] + "~") for v, w in zip(r, widths)]
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        return "\n".join([line(head), "-" * min(width, len(line(head))), *map(line, body)])

    def __str__(self) -> str:
        return self.table()


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, subsequent_indent="  ")


# --------------------------------------------------------------------------------------------------
# building the tree
# --------------------------------------------------------------------------------------------------
def build_report(module: Optional[nn.Module], rows: list, outputs: dict, activation_bytes: dict,
                 saved_bytes: dict) -> Report:
    """Assemble the tree from the op rows (attributed by module name), the modules' own parameters and
    output shapes, and the per-module activation and saved bytes."""
    nodes: dict[str, Node] = {}
    if module is not None:
        for name, m in module.named_modules():
            node = Node(name, type(m).__name__, 0 if name == "" else name.count(".") + 1)
            shapes = outputs.get(name, [])
            node.output_shape, node.calls = (shapes[0] if shapes else ()), len(shapes)
            for p in m.parameters(recurse=False):
                node.self_.params += p.numel()
                node.self_.frozen_params += 0 if p.requires_grad else p.numel()
            nodes[name] = node
            if name:
                nodes[name.rsplit(".", 1)[0] if "." in name else ""].children.append(node)
        root = nodes[""]
    else:
        root = Node("", "(function)", 0)
        nodes[""] = root
    for r in rows:
        node = nodes.get(r.name, root)  # ops outside the model's modules belong to the root
        node.ops.append(r)
        s = node.self_
        s.macs += r.macs
        s.backward_macs += r.macs if r.pass_ == "backward" else 0
        s.bias_adds += r.bias_adds
        s.pool_ops += r.pool_ops
        s.algorithm_mults += r.algorithm_mults
        if module is None:
            s.params += r.params  # a callable: the weights its ops used, each once
    for table, attr in ((activation_bytes, "activation_bytes"), (saved_bytes, "saved_bytes")):
        for name, b in table.items():
            node = nodes.get(name, root)
            setattr(node.self_, attr, getattr(node.self_, attr) + b)

    def subtotal(n: Node) -> Counts:
        n.total = Counts()
        n.total.add(n.self_)
        for c in n.children:
            n.total.add(subtotal(c))
        return n.total

    subtotal(root)
    for n in root.walk():
        n.percent = 100.0 * n.total.macs / root.total.macs if root.total.macs else 0.0
    return Report(root, rows)
