"""Part of step 6: when the slim model's generated code lets go of its intermediate tensors.

torch.fx frees each value right after its last use. At a residual merge that frees both of
its inputs before the next op allocates its output, which then reuses their memory, so the
top of glibc's heap is left free. glibc returns a free top larger than twice the largest
block it has unmapped to the OS, and the next forward pass page-faults it in again: with
the default malloc the fx module ran 1.35-1.41x slower than the same network written by hand
(docs/benchmarks.md, P2). Hand-written code keeps a merge's inputs alive a little longer,
since they are the block's locals. `defer_merge_frees` does the same: the values a node is
the last user of, when there are two or more, are freed after the next node instead. The
ops, their order and the results are unchanged; at most those values live one op longer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch.fx as fx

# one node's line as fx writes it: `name = op(...);  a = b = None`
_FREES = re.compile(r"^(?P<stmt>\s+[A-Za-z_]\w* = .*?);  (?P<names>(?:[A-Za-z_]\w* = )+)None$")
_NODE = re.compile(r"^\s+[A-Za-z_]\w* = \S")


class DeferredFreesCodeGen(fx.graph.CodeGen):
    """fx's code generation, with a merge's inputs freed one node later."""

    def _gen_python_code(self, *args: Any, **kwargs: Any) -> fx.graph.PythonCode:
        code = super()._gen_python_code(*args, **kwargs)
        if kwargs.get("colored"):  # for display only; the escape codes defeat the rewrite
            return code
        return dataclasses.replace(code, src=defer_merge_frees(code.src))


def use_deferred_frees(graph: fx.Graph) -> None:
    """Generate `graph`'s code with `DeferredFreesCodeGen`. A graph with its own code
    generation (pytree inputs or outputs) keeps it."""
    if type(graph._codegen) is fx.graph.CodeGen:
        graph.set_codegen(DeferredFreesCodeGen())


def defer_merge_frees(src: str) -> str:
    """Move the frees of every line that frees two or more values onto the next node's
    line. Lines are only edited, never added, so fx's line-number map stays right."""
    lines = src.split("\n")
    carried: list[str] = []
    for i, line in enumerate(lines):
        if line.strip().startswith("return"):
            carried = []  # the frame's exit frees them, after the output is built
            continue
        if not _NODE.match(line):
            continue
        match = _FREES.match(line)
        names = match["names"].split(" = ")[:-1] if match else []
        stmt = match["stmt"] if match else line
        if len(names) >= 2:
            names, later = [], names
        else:
            later = []
        names = carried + names
        carried = later
        lines[i] = stmt + (f";  {' = '.join(names)} = None" if names else "")
    return "\n".join(lines)
