"""A two-rank torch.distributed (gloo) run on CPU: one dump per rank, compared rank by rank,
here and through a local Dask cluster of two workers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import alignkit as ak
from alignkit.cli import main
from alignkit.comparison.cluster import environ_kept
from alignkit.comparison.ranks import for_rank, ranks_on_disk
from tests.conftest import ROOT

NET = textwrap.dedent(
    """
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)
    """
)
RUN = textwrap.dedent(
    """
    import os
    import torch
    import torch.distributed as dist
    from net import Net

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank))
    bug = os.environ.get("BUG_RANK")
    with torch.no_grad():
        for step in range(3):
            y = net(x)
            dist.all_reduce(y)
            if bug is not None and int(bug) == rank:
                y = y + 1  # the target's glue adds a bias on this rank only
            x = torch.tanh(y)
    dist.destroy_process_group()
    """
)


def _torchrun(folder, output, bug_rank=None):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{folder}"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    if bug_rank is not None:
        env["BUG_RANK"] = str(bug_rank)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "alignkit", "record", "-o", output, "--hook", "net:Net.forward", "--", "run.py"]
    proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def rank_dumps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    (folder / "net.py").write_text(NET)
    (folder / "run.py").write_text(RUN)
    _torchrun(folder, "ref_{rank}.h5")
    _torchrun(folder, "tgt_{rank}.h5", bug_rank=1)
    return folder


def test_each_rank_writes_its_own_dump_with_rank_and_world_size(rank_dumps):
    found = ranks_on_disk(rank_dumps / "ref_{rank}.h5")
    assert sorted(found) == [0, 1]
    for rank, path in found.items():
        with ak.open_dump(path) as dump:
            assert (dump.metadata["rank"], dump.metadata["world_size"]) == (rank, 2)
            assert len(dump) == 3 and dump.submodels == ["Net"]


def test_ranks_compare_on_their_own(rank_dumps):
    result = ak.compare_ranks(rank_dumps / "ref_{rank}.h5", rank_dumps / "tgt_{rank}.h5")
    assert sorted(result.by_rank) == [0, 1] and not result.missing
    first = {rank: (c.first_divergence.submodel, c.first_divergence.step) for rank, c in result.by_rank.items()}
    assert first == {1: ("Net", 1), 0: ("Net", 2)}  # rank 1's bias reaches rank 0 through the all-reduce a step later
    assert result.verdict == "diverged" and result.exit_code == 1
    same = ak.compare_ranks(rank_dumps / "ref_{rank}.h5", rank_dumps / "ref_{rank}.h5")
    assert same.verdict == "aligned" and same.headline() == "aligned: all 2 ranks"


def test_ranks_compare_on_a_local_dask_cluster_where_the_files_lie(rank_dumps):
    import distributed

    with (
        environ_kept(),
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
    ):
        with distributed.Client(cluster) as client:
            workers = set(client.scheduler_info()["workers"])
            with distributed.get_task_stream(client) as stream:
                result = ak.compare_ranks(
                    rank_dumps / "ref_{rank}.h5", rank_dumps / "tgt_{rank}.h5", dask=cluster.scheduler_address
                )
            ran = [task for task in stream.data if "compare_pair" in task["key"]]
    assert len(ran) == 2 and {task["worker"] for task in ran} <= workers  # two tasks, run on the cluster
    here = ak.compare_ranks(rank_dumps / "ref_{rank}.h5", rank_dumps / "tgt_{rank}.h5")
    for rank in (0, 1):
        a, b = result.by_rank[rank], here.by_rank[rank]
        assert a.first_divergence.message == b.first_divergence.message
        assert a.table["rel_l1"].tolist() == pytest.approx(b.table["rel_l1"].tolist())


def test_cli_compares_ranks_through_local_dask_and_writes_each_rank(rank_dumps, tmp_path, capsys):
    import distributed  # noqa: F401  (the test extra installs it; --dask needs it)

    ref, tgt = str(rank_dumps / "ref_{rank}.h5"), str(rank_dumps / "tgt_{rank}.h5")
    out = tmp_path / "out_{rank}.json"
    with pytest.raises(SystemExit) as exit_:
        main(["compare", ref, tgt, "--no-html", "--dask", "local:2", "--json", str(out)])
    assert exit_.value.code == 1
    printed = capsys.readouterr().out
    assert "rank 0: diverged: first at Net step 2" in printed and "rank 1: diverged: first at Net step 1" in printed
    assert "diverged: ranks 0, 1 of 2" in printed
    for rank in (0, 1):
        assert json.loads(for_rank(out, rank).read_text())["verdict"] == "diverged"


def test_a_local_cluster_leaves_the_environment_as_it_was(rank_dumps):
    before = dict(os.environ)
    ak.compare_ranks(rank_dumps / "ref_{rank}.h5", rank_dumps / "tgt_{rank}.h5", dask="local:2")
    assert dict(os.environ) == before  # distributed sets OMP_NUM_THREADS=1 and more for its workers


def test_a_rank_that_one_run_lacks_is_a_divergence_not_a_silence(rank_dumps, tmp_path):
    for name in ("ref_0.h5", "ref_1.h5", "tgt_0.h5"):
        (tmp_path / name).write_bytes((rank_dumps / name).read_bytes())
    result = ak.compare_ranks(tmp_path / "ref_{rank}.h5", tmp_path / "tgt_{rank}.h5")
    assert result.missing == {1: f"only the reference has a dump ({tmp_path / 'ref_1.h5'})"}
    assert result.verdict == "diverged"
    (tmp_path / "ref_1.h5").unlink()
    lone = ak.compare_ranks(tmp_path / "ref_{rank}.h5", tmp_path / "tgt_{rank}.h5")
    assert 1 in lone.missing and "2 ranks" in lone.missing[1]  # the world size says a rank is gone


def test_bad_rank_patterns_are_refused_in_one_line(rank_dumps, capsys):
    for argv, message in (
        (["compare", str(rank_dumps / "ref_{rank}.h5"), str(rank_dumps / "tgt_0.h5")], "{rank}"),
        (["compare", str(rank_dumps / "ref_{rank}.h5"), str(rank_dumps / "no_{rank}.h5")], "no target dump"),
        (
            ["compare", str(rank_dumps / "ref_{rank}.h5"), str(rank_dumps / "tgt_{rank}.h5"), "--dask", "local:x"],
            "local:N",
        ),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--no-html"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_rank_pattern_outside_a_distributed_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False), monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ak.UsageError, match="no rank"):
        with ak.Recorder(tmp_path / "d_{rank}.h5"):
            pass
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("WORLD_SIZE", "4")
    with ak.Recorder(tmp_path / "d_{rank}.h5") as rec:
        rec.watch(lambda x: x, "f")(1.0)
    with ak.open_dump(tmp_path / "d_3.h5") as dump:
        assert (dump.metadata["rank"], dump.metadata["world_size"]) == (3, 4)


def test_one_pair_spread_over_a_local_cluster_gives_the_table_and_verdict_computed_here(demo_dumps):
    """The calls of one pair of dumps sliced over two workers: the same rows, in order, and the
    same first divergence."""
    ref, tgt = demo_dumps["timestep"]
    here = ak.compare(ref, tgt)
    spread = ak.compare(ref, tgt, dask="local:2")
    assert spread.first_divergence.message == here.first_divergence.message
    assert spread.table[["seq", "io", "tensor", "status"]].equals(here.table[["seq", "io", "tensor", "status"]])
    assert spread.table["rel_l1"].tolist() == pytest.approx(here.table["rel_l1"].tolist(), nan_ok=True)
    assert spread.table.dtypes.equals(here.table.dtypes)
    with pytest.raises(ak.UsageError, match="matches no submodel or tensor"):
        ak.compare(ref, tgt, name_map=["no_such=unet"], dask="local:2")  # a map entry no worker used
