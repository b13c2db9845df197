"""The diffusers bridge: one set of random weights in both ComfyUI's UNet and diffusers' UNet2DConditionModel.

Every parity test (FreeU vs diffusers, DeepCache vs the DeepCache package, ...) builds the tiny UNet here
once and feeds identical weights and inputs to both sides. ComfyUI's `comfy.utils.unet_to_diffusers`
gives the key map; the ADM (size-conditioning) MLP is mapped by hand.
"""
from __future__ import annotations

import torch

from .factories import ADM_IN, TINY_UNET_CONFIG

ADM_KEYS = {  # diffusers key -> ComfyUI key
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
}
TIME_EMBED_DIM = 256  # SDXL's size/crop Timestep embedder width


def diffusers_config(unet_config: dict = TINY_UNET_CONFIG) -> dict:
    """UNet2DConditionModel kwargs describing the same network as a ComfyUI SDXL unet_config."""
    mc = unet_config["model_channels"]
    mult = unet_config["channel_mult"]
    depth = unet_config["transformer_depth"]
    n = len(mult)
    per_level = [depth[2 * i] for i in range(n)]
    channels = [mc * m for m in mult]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in per_level]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(per_level)]
    return dict(
        sample_size=unet_config.get("image_size", 32),
        in_channels=unet_config["in_channels"],
        out_channels=unet_config["out_channels"],
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=unet_config["num_res_blocks"][0],
        transformer_layers_per_block=[max(d, 1) for d in per_level],
        attention_head_dim=[c // unet_config["num_head_channels"] for c in channels],
        cross_attention_dim=unet_config["context_dim"],
        use_linear_projection=unet_config["use_linear_in_transformer"],
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=unet_config["adm_in_channels"],
    )


def diffusers_unet_from_comfy(comfy_unet: torch.nn.Module, unet_config: dict = TINY_UNET_CONFIG):
    """A diffusers UNet2DConditionModel holding exactly the weights of ComfyUI's `comfy_unet` (fp32)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    dunet = UNet2DConditionModel(**diffusers_config(unet_config))
    key_map = dict(comfy.utils.unet_to_diffusers(unet_config))
    key_map.update(ADM_KEYS)
    comfy_sd = comfy_unet.state_dict()
    target = dunet.state_dict()
    missing = [k for k in target if k not in key_map or key_map[k] not in comfy_sd]
    if missing:
        raise KeyError(f"expected every diffusers key to map to a ComfyUI key, {len(missing)} did not: {missing[:5]}")
    dunet.load_state_dict({k: comfy_sd[key_map[k]].float() for k in target})
    return dunet.eval()


def load_diffusers_into_comfy(dunet, comfy_unet: torch.nn.Module, unet_config: dict = TINY_UNET_CONFIG) -> None:
    """Copy a diffusers UNet's weights into ComfyUI's UNet in place (the reverse of diffusers_unet_from_comfy)."""
    import comfy.utils

    key_map = dict(comfy.utils.unet_to_diffusers(unet_config))
    key_map.update(ADM_KEYS)
    dsd = dunet.state_dict()
    csd = comfy_unet.state_dict()
    mapped = {key_map[k]: v for k, v in dsd.items()}
    missing = sorted(set(csd) - set(mapped))
    if missing:
        raise KeyError(f"expected every ComfyUI key to be fed from diffusers, {len(missing)} were not: {missing[:5]}")
    comfy_unet.load_state_dict({k: mapped[k].to(csd[k].dtype) for k in csd})


def comfy_y(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ADM vector `y` for diffusers' (text_embeds, time_ids): pooled ++ Timestep(256)(time_ids)."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    b = pooled.shape[0]
    emb = timestep_embedding(time_ids.flatten(), TIME_EMBED_DIM).reshape(b, -1)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=1)


def random_unet_inputs(seed: int, batch: int = 2, size: int = 16, tokens: int = 8,
                       unet_config: dict = TINY_UNET_CONFIG) -> dict:
    """Seeded x, timestep, context, pooled, time_ids, and the matching ComfyUI y."""
    gen = torch.Generator().manual_seed(seed)
    pooled_dim = unet_config["adm_in_channels"] - 6 * TIME_EMBED_DIM
    assert unet_config["adm_in_channels"] == ADM_IN or pooled_dim > 0
    x = torch.randn(batch, unet_config["in_channels"], size, size, generator=gen)
    t = torch.randint(1, 999, (batch,), generator=gen).float()
    context = torch.randn(batch, tokens, unet_config["context_dim"], generator=gen)
    pooled = torch.randn(batch, pooled_dim, generator=gen)
    time_ids = torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32)
    return {"x": x, "t": t, "context": context, "pooled": pooled, "time_ids": time_ids,
            "y": comfy_y(pooled, time_ids)}


def run_comfy_unet(comfy_unet, inp: dict, transformer_options: dict | None = None) -> torch.Tensor:
    return comfy_unet(inp["x"], timesteps=inp["t"], context=inp["context"], y=inp["y"],
                      transformer_options=transformer_options or {})


def run_diffusers_unet(dunet, inp: dict) -> torch.Tensor:
    return dunet(inp["x"], inp["t"], encoder_hidden_states=inp["context"],
                 added_cond_kwargs={"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}).sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the parity measure used across the suite."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))
