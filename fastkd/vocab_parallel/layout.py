"""Which part of a vocabulary-sharded DTensor this rank holds, and the checks that refuse any other layout."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from fastkd.sharding import is_dtensor


class VocabShard(NamedTuple):
    """This rank's columns [start, start + local.shape[-1]) of logits ``vocab`` wide, over ``mesh``."""

    local: torch.Tensor
    start: int
    vocab: int
    mesh: DeviceMesh


def _shard_dim(x: DTensor) -> int | None:
    (placement,) = x.placements
    if isinstance(placement, Shard):
        return placement.dim % x.ndim
    return None


def vocab_shard(x: DTensor, name: str) -> VocabShard:
    """``x`` placed ``Shard(-1)`` over a 1-D mesh (the layout of a column-parallel lm_head's output),
    else ValueError naming ``name`` and its placements."""
    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"{name} is a DTensor over a {mesh.ndim}-D device mesh; the vocabulary-parallel loss takes a 1-D "
            f"tensor-parallel mesh (slice a multi-dimensional mesh, e.g. mesh['tp'])"
        )
    if _shard_dim(x) != x.ndim - 1:
        raise ValueError(
            f"{name} is a DTensor placed {tuple(x.placements)}; the vocabulary-parallel loss expects it sharded "
            f"by vocabulary, placements (Shard(-1),) (the output of a column-parallel lm_head), or a plain tensor"
        )
    return VocabShard(x.to_local(), shard_start(x.shape[-1], mesh), x.shape[-1], mesh)


def widest_shard(size: int, mesh: DeviceMesh) -> int:
    """How DTensor splits a dimension over a 1-D mesh: chunks of ceil(size / R), the last ones shorter or empty."""
    return -(-size // mesh.size())


def shard_start(size: int, mesh: DeviceMesh) -> int:
    """The global index of this rank's first entry of a dimension split as DTensor splits it."""
    return min(widest_shard(size, mesh) * mesh.get_local_rank(), size)


def same_layout(student: VocabShard, teacher: object, name: str = "teacher_logits") -> VocabShard:
    """The teacher's shard, which must match the student's: the same mesh, shape and placements."""
    if not is_dtensor(teacher):
        raise ValueError(
            f"student_logits is a vocabulary-sharded DTensor but {name} is a {type(teacher).__name__}; pass "
            f"{name} as a DTensor placed (Shard(-1),) on the same mesh"
        )
    shard = vocab_shard(teacher, name)
    if shard.mesh != student.mesh:
        raise ValueError(f"student_logits and {name} are DTensors on different device meshes")
    if shard.vocab != student.vocab or shard.local.shape != student.local.shape:
        raise ValueError(
            f"student_logits (global {tuple(student.local.shape[:-1]) + (student.vocab,)}) and {name} (global "
            f"{tuple(shard.local.shape[:-1]) + (shard.vocab,)}) are sharded differently; they must have the same "
            f"shape and placements"
        )
    return shard


def replicated(x: torch.Tensor | int | None, name: str) -> torch.Tensor | int | None:
    """A tensor given whole on every rank (target, soft_mask, num_items_in_batch): a plain tensor or a
    replicated DTensor, as this rank's tensor; anything else as it is."""
    if x is None or not is_dtensor(x):
        return x
    if not all(isinstance(p, Replicate) for p in x.placements):
        raise ValueError(
            f"{name} is a DTensor placed {tuple(x.placements)}; with vocabulary-sharded logits it must be whole "
            f"on every rank: a plain tensor or a DTensor placed (Replicate(),)"
        )
    return x.to_local()
