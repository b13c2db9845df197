"""Benchmark cases: each module exports `run(ctx: BenchContext) -> None` that adds rows with ctx.add_row."""
