"""The quick mode of examples/sb_cfm_sigma.py: it runs, and its coupling study shows SB-CFM's plan
approaching exact OT as sigma falls."""

import json
import math

import pytest
from example_scripts import load_script


@pytest.mark.slow
def test_sb_cfm_sigma_quick(tmp_path):
    example = load_script("examples/sb_cfm_sigma.py")
    out = tmp_path / "sb.json"
    results = example.run(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["coupling"] == results["coupling"]
    large, small = results["coupling"]  # sigma 1.0, then 0.25
    # any plan other than the OT permutation costs more than OT; the smaller sigma is closer on both counts
    assert large["cost_ratio"] > small["cost_ratio"] >= 1.0 - 1e-9
    assert small["same_pairs"] > large["same_pairs"]
    methods = [r["method"] for r in results["trained"]]
    assert methods == ["OT-CFM", "SB-CFM sigma=1.0", "SB-CFM sigma=0.5"]
    for row in results["trained"]:
        assert all(math.isfinite(w) and w > 0 for w in row["w2"].values()) and math.isfinite(row["npe"])
        assert ("w2_sde" in row) == (row["sigma"] is not None)
