"""examples/family.py in its quick mode: every method of the family trains and is evaluated, OT-CFM's paths are
straighter than I-CFM's, and a second invocation reads the finished runs instead of training again."""

import math

from example_scripts import load_script


def test_family_quick_runs_every_method_and_resumes(tmp_path, capsys):
    family = load_script("examples/family.py")
    rows = family.run(["--quick", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["I-CFM", "OT-CFM", "SB-CFM", "Target-CFM", "VP-CFM"]
    for r in rows:
        values = [r[f"w2 euler-{k}"] for k in family.EULER_NFES] + [r["w2 dopri5"], r["npe"], r["nll"]]
        assert all(math.isfinite(v) for v in values), r
        assert r["nfe dopri5"] > 8
    by_method = {r["method"]: r for r in rows}
    assert by_method["OT-CFM"]["npe"] < by_method["I-CFM"]["npe"]  # straighter paths, even after 100 steps
    text = (tmp_path / "family.md").read_text()
    assert all(f"| {m} |" in text for m in by_method) and (tmp_path / "family.png").stat().st_size > 0
    assert family.run(["--quick", "--out", str(tmp_path)]) == rows  # read back from the runs' folders
