"""scripts/bench's output shape (never its figures: no timed assertion)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hil.workflows import bench


def test_bench_json_has_the_issue_shape_and_scaling_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--ops", "12", "--gdb-only-ops", "3", "--scaling-ops", "4",
                       "--scaling", "default:10", "--json", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert set(data) == {"modes", "reset_ms", "scaling"}
    assert set(data["modes"]) == {"default", "gdb-only", "no-check", "sequential"}
    for r in data["modes"].values():
        assert r["ops_per_s"] > 0 and set(r["us_per_op"]) == {"drive", "snapshot", "model", "check", "reset"}
    assert data["modes"]["default"]["boots"] == 1 and data["modes"]["default"]["unlogged"] == 0
    assert data["reset_ms"] > 0
    (row,) = data["scaling"]
    assert row["ram_mib"] == 64 and row["mappings"] >= 10 and row["ops"] == 4
    text = capsys.readouterr().out
    assert "/no-check" in text and "boot to first op" in text and "64 MiB, " in text
