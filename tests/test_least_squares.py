"""The least-squares example (paper A.3): merging a rank-4 LoRA recovers a full-rank target."""

import importlib.util
from pathlib import Path


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "least_squares.py"
    spec = importlib.util.spec_from_file_location("least_squares_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merging_recovers_full_rank_target_faster_for_smaller_T():
    ls = _example()
    # 300 steps: no merge is stuck near 0.8, T=25 near 0.45, T=5 near 0.03 (seeds 0-3 measured).
    final = {t: ls.run(300, t, seed=0, target_rank=32)[-1] for t in (None, 25, 5)}
    assert final[None] > final[25] > final[5], final
    assert final[None] > 0.5, final  # rank 4 cannot fit rank 32
    assert final[5] < 0.1, final


def test_rank_limited_lora_plateaus_without_merging():
    ls = _example()
    errs = ls.run(300, None, seed=1, target_rank=32)
    # The error stops improving: the best rank-4 fit leaves most of a rank-32 target.
    assert errs[-1] > 0.5 and abs(errs[-1] - errs[len(errs) // 2]) < 0.1, errs[-5:]


def test_main_writes_plot(tmp_path, capsys):
    ls = _example()
    out = tmp_path / "ls.png"
    ls.main(["--steps", "20", "--merge-every", "5", "--target-rank", "8", "--out", str(out)])
    assert out.stat().st_size > 1000
    assert "merge every 5" in capsys.readouterr().out
