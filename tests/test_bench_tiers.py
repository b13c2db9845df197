"""The tier benchmark's advice (bench/tiers.py recommend): which shipped workflow fits a card."""
from __future__ import annotations

from bench.tiers import BASELINE, recommend


def row(name: str, card: float | None, peak: float) -> dict:
    return {"name": name, "card_gib": card, "peak_vram_gib": peak}


def test_recommends_the_largest_tier_that_fits_the_card():
    rows = [row(BASELINE, None, 8.7), row("sdxl_4gb", 4.0, 3.3), row("sdxl_8gb", 8.0, 7.1),
            row("sdxl_12gb_quality", 12.0, 8.7), row("sdxl_fastest", None, 7.0)]
    assert "sdxl_8gb.json" in recommend(rows, 10.0)
    assert "sdxl_12gb_quality.json" in recommend(rows, 80.0)
    assert "No tier fits" in recommend(rows, 3.0)


def test_a_run_without_card_sized_tiers_says_so_instead_of_advising_lowvram():
    rows = [row(BASELINE, None, 8.7), row("sdxl_fastest", None, 7.0)]
    text = recommend(rows, 80.0)
    assert "no card-sized tier" in text and "lowvram" not in text
