"""Compare the dumps of a torch.distributed run rank by rank, here or on a Dask cluster.

Each rank of a run recorded with ``-o dump_{rank}.h5`` wrote its own dump. ``{rank}`` in both
paths pairs the reference's dump of each rank with the target's, and each pair is compared on
its own. With a Dask cluster the comparisons run on its workers, each on a worker that sees
the pair's files: the dumps are read where they lie and only the results travel.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.comparison.cluster import client_for
from alignkit.comparison.result import Comparison
from alignkit.errors import UsageError

RANK = "{rank}"


def has_rank(path: str | os.PathLike) -> bool:
    return RANK in os.fspath(path)


def for_rank(path: str | os.PathLike, rank: int) -> Path:
    """``path`` for one rank: ``{rank}`` replaced, or ``_rank<N>`` before the suffix."""
    text = os.fspath(path)
    if RANK in text:
        return Path(text.replace(RANK, str(rank)))
    p = Path(text)
    return p.with_name(f"{p.stem}_rank{rank}{p.suffix}")


def ranks_on_disk(pattern: str | os.PathLike) -> dict[int, Path]:
    """The dumps a ``{rank}`` pattern names that exist here, by rank."""
    text = os.fspath(pattern)
    head, tail = text.split(RANK, 1)
    rx = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail.replace(RANK, "")) + "$")
    found = {}
    for path in glob.glob(glob.escape(head) + "*" + glob.escape(tail)):
        m = rx.match(path)
        if m:
            found[int(m.group(1))] = Path(path)
    return found


@dataclass
class RankComparisons:
    """What :func:`compare_ranks` returns: one :class:`Comparison` per rank."""

    reference: str
    target: str
    by_rank: dict[int, Comparison]
    missing: dict[int, str]  # ranks that one side has and the other has not

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.by_rank.values()}
        if self.missing or verdicts - {"aligned", "incomplete"}:
            return "diverged"
        return "incomplete" if "incomplete" in verdicts else "aligned"

    @property
    def exit_code(self) -> int:
        return {"aligned": 0, "incomplete": 3}.get(self.verdict, 1)

    def lines(self) -> list[str]:
        """One line per rank, then the ranks that one run lacks."""
        out = [f"rank {rank}: {c.headline()}" for rank, c in sorted(self.by_rank.items())]
        out += [f"rank {rank}: {why}" for rank, why in sorted(self.missing.items())]
        return out

    def headline(self) -> str:
        n = len(self.by_rank) + len(self.missing)
        bad = sorted({*self.missing, *(r for r, c in self.by_rank.items() if c.verdict != "aligned")})
        if not bad:
            return f"aligned: all {n} ranks"
        return f"{self.verdict}: rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {n}"


def compare_ranks(
    ref: str | os.PathLike,
    tgt: str | os.PathLike,
    *,
    dask: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> RankComparisons:
    """Compare ``ref`` and ``tgt``, each a path with ``{rank}`` in it, rank by rank; ``options``
    are :func:`alignkit.compare`'s. ``dask`` is a scheduler's address, or ``local`` (``local:N``)
    for a cluster of N worker processes on this machine; without it the ranks are compared here,
    one after another."""
    if not (has_rank(ref) and has_rank(tgt)):
        raise UsageError(f"{ref}, {tgt}: name one dump per rank in both, with {RANK} where the rank goes")
    if dask is None:
        return _pair_up(ref, tgt, ranks_on_disk(ref), ranks_on_disk(tgt), _here, progress, options)
    with client_for(dask) as client:
        seen = _ranks_on_workers(client, ref, tgt)
        refs = {rank: path for rank, (path, _) in seen["ref"].items()}
        tgts = {rank: path for rank, (path, _) in seen["tgt"].items()}
        workers = {rank: where for rank, (_, where) in seen["ref"].items()}

        def on_cluster(pairs: dict[int, tuple[Path, Path]]) -> Iterator[tuple[int, Comparison]]:
            from distributed import as_completed

            futures = {
                client.submit(_compare_pair, str(r), str(t), options, workers=[workers[rank]], pure=False): rank
                for rank, (r, t) in pairs.items()
            }
            for future in as_completed(futures):
                yield futures[future], future.result()

        return _pair_up(ref, tgt, refs, tgts, on_cluster, progress, options)


def _pair_up(
    ref: Any,
    tgt: Any,
    refs: dict[int, Path],
    tgts: dict[int, Path],
    run: Callable[[dict[int, tuple[Path, Path]]], Iterator[tuple[int, Comparison]]],
    progress: Callable[[int, int], None] | None,
    options: dict[str, Any],
) -> RankComparisons:
    if not refs and not tgts:
        raise UsageError(f"{ref}, {tgt}: no dump of any rank found")
    for side, pattern, found in (("reference", ref, refs), ("target", tgt, tgts)):
        if not found:
            raise UsageError(f"{pattern}: no {side} dump of any rank found")
    pairs = {rank: (refs[rank], tgts[rank]) for rank in sorted(refs.keys() & tgts.keys())}
    missing = {rank: f"only the reference has a dump ({refs[rank]})" for rank in refs.keys() - tgts.keys()}
    missing |= {rank: f"only the target has a dump ({tgts[rank]})" for rank in tgts.keys() - refs.keys()}
    by_rank = {}
    for done, (rank, result) in enumerate(run(pairs), 1):
        by_rank[rank] = result
        if progress is not None:
            progress(done, len(pairs))
    world = max((int(m.get("world_size", 0)) for c in by_rank.values() for m in (c.ref_meta, c.tgt_meta)), default=0)
    for rank in set(range(world)) - refs.keys() - tgts.keys():
        missing[rank] = f"the runs had {world} ranks, and neither dump of this one was found"
    return RankComparisons(os.fspath(ref), os.fspath(tgt), dict(sorted(by_rank.items())), dict(sorted(missing.items())))


def _here(pairs: dict[int, tuple[Path, Path]]) -> Iterator[tuple[int, Comparison]]:
    for rank, (r, t) in pairs.items():
        yield rank, _compare_pair(str(r), str(t), {})


def _compare_pair(ref: str, tgt: str, options: dict[str, Any]) -> Comparison:
    from alignkit.comparison import compare

    return compare(ref, tgt, **options)


def _ranks_where(pattern: str) -> dict[int, str]:
    """Run on a worker: the dumps of ``pattern`` that it sees."""
    return {rank: str(path) for rank, path in ranks_on_disk(pattern).items()}


def _ranks_on_workers(client: Any, ref: Any, tgt: Any) -> dict[str, dict[int, tuple[Path, str]]]:
    """Each side's dumps by rank, with a worker that sees each: the first to report it."""
    out: dict[str, dict[int, tuple[Path, str]]] = {"ref": {}, "tgt": {}}
    for side, pattern in (("ref", ref), ("tgt", tgt)):
        for worker, found in sorted(client.run(_ranks_where, os.path.abspath(os.fspath(pattern))).items()):
            for rank, path in found.items():
                out[side].setdefault(rank, (Path(path), worker))
    return out
