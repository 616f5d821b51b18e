"""core.render.wrap: where a cell or header may break (never inside a number)."""

from __future__ import annotations

from refusal_ray.core.render import wrap


def test_wrap_never_breaks_inside_a_number():
    assert wrap("p-2", 1) == ["p-2"] and wrap("top-2 layers", 5) == ["top-2", "layers"]
    assert wrap("0.5,0.7", 3) == ["0.5,0.7"] and wrap("0.5-0.7", 3) == ["0.5-0.7"]
    assert wrap("-0.47", 2) == ["-0.47"] and wrap("1e-3", 2) == ["1e-3"] and wrap("k=2/3", 2) == ["k=2/3"]
    assert wrap("x-12%", 2) == ["x-12%"]


def test_wrap_breaks_at_spaces_and_between_words():
    assert wrap("0.5, 0.7", 4) == ["0.5,", "0.7"]          # after a comma only where a space follows
    assert wrap("works-partially", 10) == ["works-", "partially"] and wrap("abl-ctl", 4) == ["abl-", "ctl"]
    assert wrap("Qwen/Qwen2.5-1.5B-Instruct", 13) == ["Qwen/Qwen2.5-", "1.5B-Instruct"]
    assert wrap("a,b", 1) == ["a,b"]                      # no break after a comma inside a word
    text = "NOT-SUPPORTED (ablation, addition) p-2 0.5-0.7"
    pieces = {"NOT-", "SUPPORTED", "(ablation,", "addition)", "p-2", "0.5-0.7"}   # the places it may not break
    for width in range(1, len(text) + 1):
        lines = wrap(text, width)
        assert " ".join(lines).replace("- ", "-") == text          # nothing lost or reordered
        assert all(len(line) <= width or line in pieces for line in lines), (width, lines)
