"""The bench command runs end to end on tiny cases, and refuses malformed ones."""

import json

import pytest

from fastconv import bench
from fastconv.__main__ import main


@pytest.mark.parametrize(
    "op, case",
    [
        ("forward", "1,2,8,8,3,3,3,1,1"),
        ("backward", "2,2,6,6,2,3,3,2,1,2"),
        ("transpose", "1,2,4,4,3,4,4,2,1"),
        ("transpose-backward", "1,2,4,4,3,3,3,2,1,1"),
        ("gemm", "9x7x5"),
    ],
)
def test_bench_runs_and_prints_the_table(monkeypatch, capsys, tmp_path, op, case):
    monkeypatch.setattr(bench, "_settle", lambda: None)  # no need to let thread pools idle for a smoke test
    monkeypatch.setattr(bench, "WARM_UP_SECONDS", 0)  # one warm-up call is enough
    out = tmp_path / "result.json"
    assert main(["bench", "--op", op, "--layer", case, "--repeat", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fastconv ms" in printed and "speed-up over" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["fastconv_ms"] > 0


def test_bench_refuses_a_malformed_layer(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--layer", "1,2,3"])
    assert "a layer is N,C,H,W,K,R,S" in capsys.readouterr().err


def test_main_without_bench_prints_usage(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
