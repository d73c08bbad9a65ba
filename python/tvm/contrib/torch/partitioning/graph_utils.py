"""Small helpers over ``torch._C`` graphs shared by the partitioning steps."""
from __future__ import annotations

from typing import Iterator

import torch


def walk_nodes(block) -> Iterator[torch._C.Node]:
    """Every node of a block, nested blocks included, in program order."""
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from walk_nodes(sub)


def is_tensor(value: torch._C.Value) -> bool:
    """Whether a value is typed ``Tensor``."""
    return isinstance(value.type(), torch._C.TensorType)


def is_tensor_list(value: torch._C.Value) -> bool:
    """Whether a value is typed ``List[Tensor]``."""
    kind = value.type()
    return isinstance(kind, torch._C.ListType) and \
        isinstance(kind.getElementType(), torch._C.TensorType)


__all__ = ["is_tensor", "is_tensor_list", "walk_nodes"]
