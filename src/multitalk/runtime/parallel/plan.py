"""Which process runs which DiT call of a sampling step: guidance (CFG) and sequence (Ulysses) degrees.

A step runs the DiT once per guidance *branch* (3: cond / drop-text / uncond, or 2 with text scale
1). ``N`` processes are cut into ``cfg`` groups of ``ulysses = N / cfg`` processes: the groups run
different branches at the same time, and the processes of a group split one branch's token
sequence (Ulysses: all-to-all of heads and tokens around the self-attention). When ``cfg`` does
not divide the branch count, the branch left over runs on all ``N`` processes at once (Ulysses
degree ``N``) if the head count allows it, else on group 0 alone. Examples (3 branches):

=========  =============  ===========================================================
processes  ``--parallel``  each step
=========  =============  ===========================================================
2          ulysses        3 rounds, each branch split over both processes
2          cfg / auto     branches 0 and 1 side by side, then branch 2 split over both
3          cfg / auto     the three branches side by side
4          auto           branches 0 and 1 on two pairs (Ulysses 2), branch 2 over all 4
=========  =============  ===========================================================

Ulysses needs the head count divisible by the degree, or diffusers' "Ulysses anything" mode,
which pads the heads: degree ``d`` with ``H`` heads pads ``p = -H mod d`` heads and needs
``p < (H + p) / d``. The 14B DiT's 40 heads allow every degree up to 8 (3, 6 and 7 padded); the
tiny test DiT's 2 heads allow degree 2 only (degree 3 would pad 1 head to 3 heads, 1 per process,
which diffusers refuses: it needs at least 3 heads, or 5 with padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from multitalk.errors import UserInputError

MODES = ("auto", "ulysses", "cfg")


def ulysses_fits(heads: int, degree: int) -> bool:
    """Can ``heads`` attention heads be split over ``degree`` processes (with diffusers' head padding)?"""
    if degree <= 1 or heads % degree == 0:
        return True
    pad = degree - heads % degree
    return pad < (heads + pad) // degree


@dataclass(frozen=True)
class Round:
    """Branches that run at the same time: ``{group: branch}``; ``world``: one branch over all processes."""

    branches: dict[int, int]
    world: bool = False


@dataclass(frozen=True)
class ParallelPlan:
    world: int
    cfg: int
    ulysses: int
    branches: int
    mode: str = field(compare=False)          # how it was chosen; equal degrees are the same plan
    leftover_on_world: bool = True

    def group_of(self, rank: int) -> int:
        return rank // self.ulysses

    def leader_of(self, group: int) -> int:
        return group * self.ulysses

    def rounds(self) -> list[Round]:
        full = self.branches - self.branches % self.cfg
        out = [Round({g: start + g for g in range(self.cfg)}) for start in range(0, full, self.cfg)]
        for b in range(full, self.branches):
            out.append(Round({0: b}, world=self.leftover_on_world and self.cfg > 1))
        return out

    def describe(self) -> str:
        parts = []
        if self.cfg > 1:
            parts.append(f"{self.cfg} guidance branches at once")
        if self.ulysses > 1:
            parts.append(f"sequence split over {self.ulysses} processes")
        if self.cfg > 1 and self.branches % self.cfg:
            parts.append("the leftover branch split over all " + str(self.world) if self.leftover_on_world
                         else "the leftover branch on the first group")
        return f"{self.world} processes ({self.mode}): " + ", ".join(parts or ["one process"])


def choose_plan(mode: str, world: int, branches: int, heads: int) -> ParallelPlan:
    """The plan for ``mode`` (``auto`` / ``ulysses`` / ``cfg``) on ``world`` processes and ``branches`` branches."""
    if mode not in MODES:
        raise UserInputError("parallel", f"unknown mode {mode!r}", "use auto, ulysses or cfg")
    if world < 1:
        raise UserInputError("gpus", f"{world} processes", "use --gpus 1 or more")
    if world == 1:
        return ParallelPlan(1, 1, 1, branches, mode)
    if mode == "ulysses":
        cfg = 1
    elif mode == "cfg":
        if world > branches:
            raise UserInputError(
                "parallel", f"--parallel cfg runs one guidance branch per process, and this run has {branches} "
                f"branches for {world} processes" + (" (text guidance scale 1 leaves 2)" if branches == 2 else ""),
                "use --parallel auto (guidance and sequence parallelism together) or --parallel ulysses")
        cfg = world
    else:
        fitting = [c for c in range(1, min(world, branches) + 1) if world % c == 0 and ulysses_fits(heads, world // c)]
        cfg = max(fitting) if fitting else 1
    ulysses = world // cfg
    if not ulysses_fits(heads, ulysses):
        raise UserInputError(
            "gpus", f"the DiT's {heads} attention heads cannot be split over {ulysses} processes "
            f"(Ulysses degree {ulysses})", _fix(heads, world))
    leftover_world = ulysses_fits(heads, world)
    return ParallelPlan(world, cfg, ulysses, branches, mode, leftover_world)


def _fix(heads: int, world: int) -> str:
    fits = [d for d in range(2, max(world, 8) + 1) if ulysses_fits(heads, d)]
    return (f"use --gpus {' or '.join(map(str, fits[:4]))} or --parallel cfg" if fits
            else "use --parallel cfg or one GPU")


__all__ = ["MODES", "ParallelPlan", "Round", "choose_plan", "ulysses_fits"]
