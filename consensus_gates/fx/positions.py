"""Channel positions: where inside a residual branch channel gates sit, one object each.

A position knows how to find its channel points in a branch (`find`, called by
`blocks.find_channel_points` for `insert_gates`) and how the surgery cuts a point whose gate
closed some channels (`cut_partly`) or all of them (`cut_closed`). `GateConfig.position`
accepts every name in `POSITIONS`, which `register_position` fills. A new position is one
class::

    @register_position("first")
    class First(ChannelPosition):
        # the output of the branch's first dense layer, where it feeds another one

        def find(self, facts, branch):
            return POSITIONS["middle"].find(facts, branch)[:1]

        def cut_partly(self, cut):
            POSITIONS["middle"].cut_partly(cut)

It works on the graph only through `facts` (`blocks.ChannelFacts`) and `cut`
(`surgery.ChannelCut`), so this module imports neither, nor torch-pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch.fx as fx

    from .blocks import Branch, ChannelFacts
    from .surgery import ChannelCut


@dataclass(frozen=True)
class ChannelPoint:
    """Where a channel gate goes: ``point``'s channels along ``channel_dim`` are masked for
    ``users``; ``source`` is what the gate reads."""

    name: str
    point: fx.Node
    source: fx.Node
    users: tuple[fx.Node, ...]
    channel_dim: int
    groups: int = 1  # grouped convs touch it: one decision per position, shared by the groups


class ChannelPosition:
    """One place for channel gates in a residual branch; `register_position` names it.

    Subclasses implement `find` and `cut_partly`, and `cut_closed` where closing every
    channel means more than a zero tensor.
    """

    name: str = ""  # set by `register_position`
    # The mask is an operand of the residual add, which the surgery may reorder so that the
    # kept channels are scattered into a tensor that has all of them (see `After`).
    masks_merge_operand: bool = False

    def find(self, facts: ChannelFacts, branch: Branch) -> list[ChannelPoint]:
        """The points of `branch` where a cut is exactly a zeroing; [] if none."""
        raise NotImplementedError

    def cut_partly(self, cut: ChannelCut) -> None:
        """Remove ``cut.closed`` channels (some, not all) physically, mask and gate with them."""
        raise NotImplementedError

    def cut_closed(self, cut: ChannelCut) -> None:
        """Every channel closed: the point becomes zeros, which the surgery folds into the
        constants they make once the other channels are cut."""
        cut.zero()

    def __repr__(self) -> str:
        return f"<channel position {self.name!r}>"


POSITIONS: dict[str, ChannelPosition] = {}  # name → position, filled by `register_position`

P = TypeVar("P", bound=type[ChannelPosition])


def register_position(name: str) -> Callable[[P], P]:
    """Class decorator: register one instance of a `ChannelPosition` subclass as
    ``GateConfig(position=name)``. ValueError if `name` is taken."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a position name must be a non-empty string, got {name!r}")

    def register(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, ChannelPosition)):
            raise TypeError(f"register_position({name!r}) decorates a ChannelPosition subclass")
        if name in POSITIONS:
            raise ValueError(f"a channel position named {name!r} is already registered")
        position = cls()
        position.name = name
        POSITIONS[name] = position
        return cls

    return register


def position_named(name: str) -> ChannelPosition:
    """The registered position `name`; ValueError listing the registered names if none."""
    position = POSITIONS.get(name)
    if position is None:
        raise ValueError(f"no channel position named {name!r}; registered: {tuple(POSITIONS)}")
    return position


def _relative(target: str, block: str) -> str:
    prefix = block.split("#")[0] + "."
    return target[len(prefix) :] if target.startswith(prefix) else target


@register_position("middle")
class Middle(ChannelPosition):
    """The branch's internal widths: each conv's or linear's output (past its BN, activation
    and depthwise conv) that feeds only dense layers inside the branch. Torch-pruning cuts
    the whole coupled group: producer, norms, depthwise convs, SE, consumers."""

    def find(self, facts: ChannelFacts, branch: Branch) -> list[ChannelPoint]:
        points = []
        for node in sorted(branch.nodes, key=facts.order.__getitem__):
            if not facts.is_dense(node):
                continue
            end = facts.chain_end(node, branch.nodes)
            readers = None if end is branch.output else facts.dense_readers(end, end, branch.nodes)
            if readers:
                dim = facts.channel_dim(node, len(end.meta["cg_shape"]))
                name = f"{branch.name}/{_relative(node.target, branch.name)}"
                groups = facts.groups(node, *readers)
                points.append(ChannelPoint(name, end, end, tuple(end.users), dim, groups))
        return points

    def cut_partly(self, cut: ChannelCut) -> None:
        cut.bypass()
        cut.cut_with_dependents(cut.producer_chain()[-1])


@register_position("after")
class After(ChannelPosition):
    """The branch output, before the residual add. The last dense layer and what follows it
    lose the closed output channels; the add becomes ``skip.index_add(dim, kept, branch)``.
    With every channel closed the branch adds nothing and goes, as a closed layer gate's."""

    masks_merge_operand = True

    def find(self, facts: ChannelFacts, branch: Branch) -> list[ChannelPoint]:
        chain = facts.producer_chain(branch.output)
        if chain is None or not set(chain) <= branch.nodes:
            return []
        dim = facts.channel_dim(chain[-1], len(branch.output.meta["cg_shape"]))
        name, groups = f"{branch.name}/after", facts.groups(chain[-1])
        return [ChannelPoint(name, branch.output, branch.output, (branch.merge,), dim, groups)]

    def cut_partly(self, cut: ChannelCut) -> None:
        for node in cut.producer_chain():
            cut.prune(node, "out")
        cut.scatter_into_skip()

    def cut_closed(self, cut: ChannelCut) -> None:
        cut.drop_branch()


@register_position("before")
class Before(ChannelPosition):
    """The block input as the branch sees it (the shortcut still sees all of it), where only
    dense layers read it. They lose the closed input channels and read
    ``x.index_select(dim, kept)``."""

    def find(self, facts: ChannelFacts, branch: Branch) -> list[ChannelPoint]:
        users = tuple(u for u in branch.input.users if u in branch.nodes)
        if not users or not all(facts.is_dense(u) for u in users):
            return []
        dim = facts.channel_dim(users[0], len(branch.input.meta["cg_shape"]))
        name, groups = f"{branch.name}/before", facts.groups(*users)
        return [ChannelPoint(name, branch.input, branch.input, users, dim, groups)]

    def cut_partly(self, cut: ChannelCut) -> None:
        for user in cut.readers():
            cut.prune(user, "in")
        cut.select_kept()
