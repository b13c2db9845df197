"""Tiled VAE decode/encode: the tiling geometry, fidelity to the full decode (8-bit, away from the border), no
seam along tile boundaries, whole-image GroupNorm as the tightest mode, encode, auto tile size, progress,
bad input (the latent untouched), the TAESD fallback, and isolation inside one prompt."""
from __future__ import annotations

import comfy.utils
import pytest
import torch

from sdxl_optimizer.nodes import tiled_vae as nv
from sdxl_optimizer.ops import tiled_vae as tv
from tinymodels import factories, prompts

BORDER = 8  # px left out: the image border, where zero padding differs by construction
TILE, OVERLAP = 24, 4  # latent px: 2 x 2 tiles over the 32 x 40 test latent


@pytest.fixture(scope="module")
def vae():
    return factories.tiny_kl_x8_vae(3)


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(0)) * 2


@pytest.fixture(scope="module")
def full(vae, latent) -> torch.Tensor:
    with torch.inference_mode():
        return vae.first_stage_model.decode(latent)


def q8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> 8-bit levels, as a saved image has them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def decode(vae, z: torch.Tensor, tile: int, overlap: int, mode: str) -> torch.Tensor:
    fsm = vae.first_stage_model
    with torch.inference_mode():
        return tv.decode_tiled(fsm.decoder, z, tile, overlap, mode, post_quant_conv=fsm.post_quant_conv)


def err_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (q8(a) - q8(b)).abs().amax(dim=(0, 1))[BORDER:-BORDER, BORDER:-BORDER]


@pytest.mark.parametrize("size,window,overlap", [(40, 24, 4), (32, 24, 14), (100, 16, 6), (17, 16, 0), (16, 16, 4)])
def test_plan_windows_cover_the_image_and_cores_partition_it(size, window, overlap):
    plan = tv.plan_1d(size, window, overlap)
    cores = [(c0, c1) for _, _, c0, c1 in plan]
    assert cores[0][0] == 0 and cores[-1][1] == size and all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    for (s, e, c0, c1), nxt in zip(plan, plan[1:] + [None]):
        assert 0 <= s <= c0 < c1 <= e <= size and e - s == min(window, size)
        if nxt is not None:
            assert e - nxt[0] >= overlap, f"expected neighbours to share >= {overlap} px, got {plan}"


@pytest.mark.parametrize("h,w,area,shared", [(32, 40, 576, 6), (128, 128, 4096, 14), (128, 192, 4096, 6), (9, 300, 400, 4)])
def test_grid_windows_fit_the_area_and_cores_tile_the_image(h, w, area, shared):
    tiles = tv.plan_grid(h, w, area, shared)
    cover = torch.zeros(h, w, dtype=torch.int64)
    for t in tiles:
        assert (t.y1 - t.y0) * (t.x1 - t.x0) <= area, f"window {t} holds more than {area} latent px"
        assert t.y0 <= t.cy0 < t.cy1 <= t.y1 and t.x0 <= t.cx0 < t.cx1 <= t.x1
        cover[t.cy0:t.cy1, t.cx0:t.cx1] += 1
        for u in tiles:  # neighbours (cores touching) share >= `shared` px across their common cut
            if u.cy0 == t.cy0 and u.cx0 == t.cx1:
                assert t.x1 - u.x0 >= shared
            if u.cx0 == t.cx0 and u.cy0 == t.cy1:
                assert t.y1 - u.y0 >= shared
    assert torch.equal(cover, torch.ones_like(cover)), "expected the cores to cover every latent pixel once"
    assert tv.plan_grid(h, w, h * w, shared) == [tv.Tile(0, h, 0, w, 0, h, 0, w)]


def test_statistics_recorded_over_tile_cores_are_the_whole_image_statistics():
    """Chan's merge of per-core statistics equals the whole tensor's per-group mean and variance."""
    x = torch.randn(2, 8, 24, 30) * torch.linspace(0.5, 3, 8)[:, None, None] + torch.arange(8.0)[:, None, None]
    gn = torch.nn.GroupNorm(4, 8)
    norm = tv.GroupNormStats(mode="record")
    for t in tv.plan_grid(12, 15, 50, 2):  # latent tiles; x is at scale 2
        norm.start_tile(t)
        norm(gn, x[:, :, t.y0 * 2:t.y1 * 2, t.x0 * 2:t.x1 * 2])
    count, mean, m2 = norm.new[0]
    var_ref, mean_ref = torch.var_mean(x.view(2, 4, -1).double(), dim=-1, correction=0)
    assert torch.allclose(mean, mean_ref) and torch.allclose(m2 / count, var_ref)
    assert tv.stat_passes("global", tv.MANY_TILES) == 2 and tv.stat_passes("global", tv.MANY_TILES + 1) == 3
    assert tv.stat_passes("global_fast", 9) == 1 and tv.stat_passes("tile") == 0


def test_one_tile_is_the_full_decode(vae, latent, full):
    out = decode(vae, latent, 64, 8, "global")
    assert torch.equal(out, full), "a tile covering the image runs the decoder's own forward, as VAE Decode does"


def test_buffers_kept_off_the_compute_device_change_nothing(vae, latent):
    fsm = vae.first_stage_model
    with torch.inference_mode():
        here = decode(vae, latent, TILE, OVERLAP, "global")
        kept = tv.decode_tiled(fsm.decoder, latent, TILE, OVERLAP, "global", fsm.post_quant_conv,
                               store=torch.device("cpu"))
        x = torch.rand(1, 3, 128, 160) * 2 - 1
        enc = tv.encode_tiled(fsm.encoder, x, 8, 2, "global", fsm.quant_conv)
        enc_dev = tv.encode_tiled(fsm.encoder, x, 8, 2, "global", fsm.quant_conv, device=torch.device("cpu"))
    assert torch.equal(here, kept) and torch.equal(enc, enc_dev)


def test_tiled_decode_is_within_2_of_255_of_the_full_decode(vae, latent, full):
    fsm = vae.first_stage_model
    p = tv.plan(tv.decoder_stages(fsm.decoder, fsm.post_quant_conv), 32, 40, TILE, OVERLAP, 4, decoding=True)
    assert len(p.tiles) > 1 and p.tiled, f"expected several tiles with tiled stages, got {p}"
    err = err_map(decode(vae, latent, TILE, OVERLAP, "global"), full)
    assert err.max() <= 2, f"expected max 8-bit error <= 2 away from the border, got {err.max().item()}"


def test_whole_image_groupnorm_is_the_tightest_mode(vae, latent, full):
    errs = {m: err_map(decode(vae, latent, TILE, OVERLAP, m), full) for m in tv.GROUPNORM_MODES}
    mean = {m: e.float().mean().item() for m, e in errs.items()}
    assert mean["global"] <= mean["global_fast"] < mean["tile"], f"expected global <= global_fast < tile, got {mean}"
    assert errs["global"].max() < errs["tile"].max()


def seam_ratio(out: torch.Tensor, full: torch.Tensor, tiles: list[tv.Tile]) -> float:
    """How much the error jumps across the cuts between tile cores, against its jumps between other pixels."""
    d = (out.clamp(-1, 1) - full.clamp(-1, 1)).mul(127.5).mean(dim=(0, 1))  # signed error field, 8-bit units
    ratios = []
    for dim, cuts in ((1, {t.cx0 for t in tiles} - {0}), (0, {t.cy0 for t in tiles} - {0})):
        if not cuts:
            continue
        jump = d.diff(dim=dim).abs()
        jump = jump[BORDER:-BORDER, :] if dim == 1 else jump[:, BORDER:-BORDER]
        per_gap = jump.mean(dim=0 if dim == 1 else 1)  # mean jump between pixel j and j + 1
        at_cut = torch.tensor([c * 8 - 1 for c in cuts], dtype=torch.long)
        rest = torch.ones_like(per_gap, dtype=torch.bool)
        rest[at_cut] = False
        rest[:BORDER] = rest[-BORDER:] = False
        ratios.append((per_gap[at_cut].mean() / per_gap[rest].mean().clamp(min=1e-3)).item())
    return max(ratios)


def test_no_seam_along_tile_boundaries(vae, latent, full):
    """The error must not jump where one tile's core ends and the next begins (that is what a seam is)."""
    fsm = vae.first_stage_model
    stages = tv.decoder_stages(fsm.decoder, fsm.post_quant_conv)
    p = tv.plan(stages, 32, 40, TILE, OVERLAP, 4, decoding=True)
    ratio = seam_ratio(decode(vae, latent, TILE, OVERLAP, "global"), full, p.tiles)
    assert ratio < 1.5, f"expected no seam: the error jumps {ratio:.2f}x more across tile cuts than elsewhere"
    # the measure does see seams: per-tile GroupNorm statistics with no cross-fade leave them
    p0 = tv.plan(stages, 32, 40, TILE, 0, 4, decoding=True)
    ratio_t = seam_ratio(decode(vae, latent, TILE, 0, "tile"), full, p0.tiles)
    assert ratio_t > 2, f"expected per-tile statistics to show at the cuts, got a jump ratio of {ratio_t:.2f}"


def test_tiled_encode_matches_the_full_encode(vae):
    fsm = vae.first_stage_model
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 256, 320, generator=g) * 2 - 1, 5, 1, 2)
    with torch.inference_mode():
        ref = fsm.quant_conv(fsm.encoder(x))[:, :4]
        errs = {m: (tv.encode_tiled(fsm.encoder, x, TILE, OVERLAP, m, fsm.quant_conv)[:, :4] - ref).abs().max().item()
                / ref.std().item() for m in ("global", "tile")}
        one = tv.encode_tiled(fsm.encoder, x, 64, 8, "global", fsm.quant_conv)[:, :4]
    assert (one - ref).abs().max() < 1e-4, "a tile covering the image must compute exactly the full encode"
    assert errs["global"] < 0.02 and errs["global"] < errs["tile"], f"expected a close tiled encode, got {errs}"


def test_node_decode_and_encode_match_core(vae, latent):
    with torch.inference_mode():
        core = vae.decode(latent)
        ours = nv.TiledVAEDecode.execute(samples={"samples": latent}, vae=vae, tile_size=TILE * 8,
                                         overlap=OVERLAP * 8, groupnorm="global").result[0]
        auto = nv.TiledVAEDecode.execute(samples={"samples": latent}, vae=vae, tile_size=0, overlap=64,
                                         groupnorm="global").result[0]
        assert ours.shape == core.shape == (1, 256, 320, 3)
        d = (ours * 255).round() - (core * 255).round()
        assert d.abs()[:, BORDER:-BORDER, BORDER:-BORDER].max() <= 2
        assert (auto - core).abs().max() < 1e-4, "auto on a roomy device: one tile, the full decode"
        image = core[:, :250, :317]  # not multiples of 8: center-cropped as VAE Encode does
        enc = nv.TiledVAEEncode.execute(pixels=image, vae=vae, tile_size=0, overlap=64, groupnorm="global")
        assert (enc.result[0]["samples"] - vae.encode(image)).abs().max() < 1e-4


def test_an_image_smaller_than_the_overlaps_is_one_tile(vae):
    z = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        ref = vae.decode(z)
        for tile_size in (0, 128):
            out = nv.TiledVAEDecode.execute(samples={"samples": z}, vae=vae, tile_size=tile_size, overlap=64,
                                            groupnorm="global").result[0]
            assert (out - ref).abs().max() < 1e-4


def test_auto_tile_follows_the_budget(vae):
    fsm = vae.first_stage_model
    stages = tv.decoder_stages(fsm.decoder, fsm.post_quant_conv)
    assert tv.auto_tile(stages, 32, 40, 4, 4, 1e12, decoding=True) == 40, "all of it fits: one tile"
    whole = tv.plan(stages, 32, 40, 40, 4, 4, decoding=True).peak_bytes
    side = tv.auto_tile(stages, 32, 40, 4, 4, whole / 3, decoding=True)
    p = tv.plan(stages, 32, 40, side, 4, 4, decoding=True)
    assert side < 32 and len(p.tiles) > 1 and p.peak_bytes <= whole / 3, f"expected tiles within the budget: {p}"


def test_auto_tile_first_makes_room_from_models_the_decode_does_not_need(vae, monkeypatch):
    """Auto mode asks ComfyUI for the whole image's memory before reading the free VRAM, and lets it unload
    only models other than the VAE and the diffusion models (text encoders): a larger tile, no UNet reload."""
    import comfy.model_base
    import comfy.model_management as mm

    class Loaded:  # a LoadedModel stand-in: only .model is read
        def __init__(self, model):
            self.model = model

    unet = Loaded(type("Patcher", (), {"model": comfy.model_base.BaseModel.__new__(comfy.model_base.BaseModel)})())
    clip = Loaded(type("Patcher", (), {"model": torch.nn.Linear(1, 1)})())
    own = Loaded(vae.patcher)
    monkeypatch.setattr(mm, "current_loaded_models", [clip, unet, own])
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: None)
    calls = []
    monkeypatch.setattr(mm, "free_memory", lambda need, device, keep_loaded=(): calls.append((need, keep_loaded)))
    fsm = vae.first_stage_model
    stages = tv.decoder_stages(fsm.decoder, fsm.post_quant_conv)
    nv.choose_tile(vae, stages, 32, 40, 0, 4, decoding=True)
    whole = tv.plan(stages, 32, 40, 40, 4, torch.finfo(vae.vae_dtype).bits // 8, decoding=True,
                    offload=nv.offloads(vae)).peak_bytes
    need, keep = calls[0]
    assert need == int(whole / nv.AUTO_BUDGET) and keep == [unet, own], "text encoders may go, UNet and VAE stay"


def test_progress_bar_counts_every_tile_of_every_pass(vae, latent, monkeypatch):
    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, total, preview, node_id=None: calls.append((v, total)))
    z = torch.cat([latent, latent])
    with torch.inference_mode():
        nv.TiledVAEDecode.execute(samples={"samples": z}, vae=vae, tile_size=TILE * 8, overlap=OVERLAP * 8,
                                  groupnorm="global")
    fsm = vae.first_stage_model
    p = tv.plan(tv.decoder_stages(fsm.decoder, fsm.post_quant_conv), 32, 40, TILE, OVERLAP, 4, decoding=True)
    n = 2 * (len(p.record_tiles) + len(p.refine_tiles) + len(p.tiles))  # 2 images x (2 statistics passes + output)
    assert calls[-1] == (n, n) and len(calls) == n, f"expected {n} progress steps, got {calls}"


def test_bad_input_is_a_clear_error_and_the_latent_is_untouched(vae, latent):
    samples = {"samples": latent.clone()}
    cases = [
        (dict(tile_size=96, overlap=64), "at least twice the overlap.*Fix"),
        (dict(tile_size=100, overlap=16), "multiple of 8.*Fix"),
        (dict(tile_size=512, overlap=12), "multiple of 8.*Fix"),
        (dict(tile_size=64, overlap=16), "tile larger than overlap.*Fix"),  # shorter than the convolutions' reach
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match), torch.inference_mode():
            nv.TiledVAEDecode.execute(samples=samples, vae=vae, groupnorm="global", **kwargs)
    with pytest.raises(ValueError, match="expected a latent of shape.*4.*got.*16.*Fix"), torch.inference_mode():
        nv.TiledVAEDecode.execute(samples={"samples": torch.randn(1, 16, 8, 8)}, vae=vae, tile_size=0, overlap=0,
                                  groupnorm="global")
    assert torch.equal(samples["samples"], latent), "the latent must not be modified"


def test_taesd_vae_falls_back_to_its_own_decode_and_encode(latent):
    taesd = factories.tiny_taesd_vae(2)
    with torch.inference_mode():
        out = nv.TiledVAEDecode.execute(samples={"samples": latent}, vae=taesd, tile_size=192, overlap=32,
                                        groupnorm="global").result[0]
        assert torch.equal(out, taesd.decode(latent)), "a TAESD VAE decodes whole, as VAE Decode does"
        image = out[:, :64, :64]
        enc = nv.TiledVAEEncode.execute(pixels=image, vae=taesd, tile_size=0, overlap=64, groupnorm="tile")
        assert torch.equal(enc.result[0]["samples"], taesd.encode(image))


def test_the_vae_is_unchanged_inside_one_prompt(run_prompt):
    """VAE Decode of the same VAE in the same prompt as the tiled node gives what it gives alone."""
    base = {
        **prompts.sampled_latent("kl", size=192, batch=1, steps=1),
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    alone = run_prompt(base).output("5")[0]
    both = dict(base)
    both["7"] = {"class_type": "SDXLOptTiledVAEDecode", "inputs": {
        "samples": ["4", 0], "vae": ["1", 2], "tile_size": 128, "overlap": 16, "groupnorm": "global"}}
    both["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}
    both["9"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["7", 0], "vae": ["1", 2]}}
    both["10"] = {"class_type": "SDXLOptTiledVAEEncode", "inputs": {
        "pixels": ["7", 0], "vae": ["1", 2], "tile_size": 128, "overlap": 16, "groupnorm": "global"}}
    both["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}}
    both["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    both["13"] = {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "tiled_vae_test"}}
    res = run_prompt(both)
    assert torch.equal(res.output("5")[0], alone), "the original VAE's decode changed beside the tiled node"
    tiled = res.output("7")[0]
    assert tiled.shape == alone.shape
    assert ((tiled - alone) * 255).round().abs()[:, BORDER:-BORDER, BORDER:-BORDER].max() <= 2
    core_lat, ours_lat = res.output("9")[0]["samples"], res.output("10")[0]["samples"]
    assert ((ours_lat - core_lat).abs().max() / core_lat.std()).item() < 0.05


def test_the_node_leaves_the_vae_as_it_was(vae, latent):
    fsm = vae.first_stage_model
    before = {k: v.clone() for k, v in fsm.state_dict().items()}
    with torch.inference_mode():
        ref = vae.decode(latent)
        for mode in tv.GROUPNORM_MODES:
            nv.TiledVAEDecode.execute(samples={"samples": latent}, vae=vae, tile_size=TILE * 8, overlap=OVERLAP * 8,
                                      groupnorm=mode)
        nv.TiledVAEEncode.execute(pixels=ref, vae=vae, tile_size=TILE * 8, overlap=OVERLAP * 8, groupnorm="global")
        after = vae.decode(latent)
    assert all(torch.equal(v, fsm.state_dict()[k]) for k, v in before.items()), "VAE weights changed"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in fsm.modules()), "hooks left on the VAE"
    assert torch.equal(ref, after) and not fsm.training
