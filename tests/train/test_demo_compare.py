"""demo_compare's table: steps-to-match and speed-up from hand-made validation curves."""

import sys

import pytest

from jmp_ext.train.demo_compare import main, summarize


def run(test: float, curve: list[tuple[int, float]]) -> dict:
    return {"seed": 0, "test": test, "curve": curve, "seconds": 1.0}


def test_steps_to_match_and_speedup():
    # Scratch ends at 0.5 and 0.4; pretrained first reaches them at steps 20 and 40.
    results = {"md": {
        "pretrained": [run(0.3, [(20, 0.5), (40, 0.35), (60, 0.3)]), run(0.3, [(20, 0.6), (40, 0.4), (60, 0.3)])],
        "scratch": [run(0.6, [(20, 0.9), (40, 0.7), (60, 0.5)]), run(0.4, [(20, 0.8), (40, 0.6), (60, 0.4)])],
    }}
    text = summarize(results, steps=60)
    assert results["md"]["steps_to_match"] == [20, 40]
    row = text.splitlines()[2]
    assert "| 20, 40 of 60 |" in row and "2.0x" in row  # 60 / mean(20, 40)
    assert "| 40% |" in row  # 1 - 0.3 / 0.5
    assert "0.3 ± 0" in row and "0.5 ± 0.1" in row


def test_not_reached_is_reported_not_hidden():
    results = {"materials": {
        "pretrained": [run(0.2, [(10, 0.3), (20, 0.25)])],
        "scratch": [run(0.1, [(10, 0.2), (20, 0.1)])],
    }}
    row = summarize(results, steps=20).splitlines()[2]
    assert results["materials"]["steps_to_match"] == [None]
    assert "| - of 20 | not reached in 1 of 1 seeds |" in row
    assert "-100%" in row  # pretrained worse: a negative improvement, shown as such


@pytest.mark.parametrize("steps", [10, 40])
def test_speedup_uses_the_budget(steps):
    results = {"md": {"pretrained": [run(1.0, [(5, 1.0)])], "scratch": [run(1.0, [(5, 2.0), (steps, 1.0)])]}}
    assert f"{steps / 5:.1f}x" in summarize(results, steps).splitlines()[2]


def test_help_describes_the_comparison_in_full(monkeypatch, capsys):
    """--help showed the docstring's first line only, which stops mid-sentence."""
    monkeypatch.setattr(sys, "argv", ["demo_compare", "--help"])
    with pytest.raises(SystemExit):
        main()
    text = " ".join(capsys.readouterr().out.split())
    assert ("fine-tune the demo's pretrained model and the same network from scratch, with the same budget, "
            "on the held-out domains, over several seeds.") in text


def test_data_other_than_the_demos_is_a_message(monkeypatch, tmp_path):
    """--data with one's own datasets ended in a 30-line process-pool traceback."""
    (tmp_path / "last.pt").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["demo_compare", "--pretrained", str(tmp_path / "last.pt"),
                                      "--data", str(tmp_path / "mine")])
    with pytest.raises(SystemExit, match=r"is not the demo data \(no .*mine/md/train.*make-demo"):
        main()
