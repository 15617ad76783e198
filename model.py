"""
Gaussian Masked Autoencoder (GMAE) and its plain-MAE baseline, in one file.

GMAE (Rajasegaran et al. 2025, Sec. 3.2) is MAE (He et al. 2022) with a different decoder output:

    image [B,3,H,W] -> patchify (p x p) -> N = (H/p)(W/p) patches
    random masking (ratio m)            -> N_vis = N (1 - m) visible patches
    encoder: ViT on visible patches + cls token           -> latents [B, 1 + N_vis, D_enc]
    decoder input (paper Eq. 1): Linear(latents) ++ k learnable query tokens, NO mask tokens
    decoder: ViT blocks; the k query outputs -> Linear(D_dec -> 14) -> gaussian_activation
        (departures, off in GMAEConfig and on in the laptop preset: centred depth, anchored queries, g per token)
    splat.render(gaussians, H, W) -> reconstruction [B,3,H,W] in [0,1]
    loss = MSE(reconstruction, image) over the pixels of the masked patches

With `decoder="pixels"` the same encoder feeds MAE's decoder (mask tokens + per-patch pixel head), so the
two are compared in one code path with the same loss.

Shape legend: B batch, N patches, N_vis visible patches, K Gaussians (= config.num_gaussians),
D width (D_enc encoder, D_dec decoder), P = p*p*3 pixels per patch.

The encoder's parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
blocks.N.attn.qkv, blocks.N.mlp.fc1, norm, ...), so `model.encoder.state_dict()` loads into timm-style code.

Used by train.py (pretraining), probe.py / finetune.py (encoder features) and zeroshot.py (Gaussians).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import splat

# The encoder's input convention (ImageNet statistics); the loss compares renders with [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class GMAEConfig:
    img_size: int = 32
    patch_size: int = 4
    enc_dim: int = 192  # ViT-B: 768
    enc_depth: int = 6  # ViT-B: 12
    enc_heads: int = 3  # ViT-B: 12
    dec_dim: int = 128  # paper/MAE: 512
    dec_depth: int = 2  # paper/MAE: 8
    dec_heads: int = 4  # paper/MAE: 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    num_gaussians: int = 48  # paper: 512 (256 for most ablations); 48 = masked patches at 32 px / 4 / 0.75
    scale_max: float = 1.0  # c in scale = c * sigmoid(s); paper: 1, ablates 0.5 / 2
    decoder: str = "gaussians"  # "gaussians" (GMAE) or "pixels" (MAE baseline)
    loss_on: str = "masked"  # "masked" (paper default) or "all" (paper ablation, Table 1c)
    norm_pix: bool = False  # per-patch normalised targets (MAE's trick; hurts GMAE, Table 1c)
    # Three departures from the paper (off / 1 = the paper; the laptop preset turns them on).
    # center_depth: subtract each image's mean raw depth before tanh. Depth is a size knob (footprint x 8 / (z + 8));
    # when all Gaussians want to grow, Adam moves the shared depth until tanh saturates. Centring keeps only the
    # relative depth that layering reads.
    center_depth: bool = False
    # anchors: query j carries the sin-cos embedding of a grid point a_j and its centre is tanh(raw + atanh(a_j)),
    # so it starts there (reference points of Deformable DETR, Zhu et al. 2021, and DAB-DETR, Liu et al. 2022).
    anchors: bool = False
    # gaussians_per_token = g: K Gaussians from K / g query tokens, each token's head output read as g Gaussians
    # (as MAE's pixel head reads a token as a patch). The paper's limit, K > ~1000 slowing pretraining because
    # every Gaussian is a decoder token, goes.
    gaussians_per_token: int = 1

    def __post_init__(self):
        if self.img_size <= 0 or self.patch_size <= 0:
            raise ValueError(f"image size and patch size must be positive, got {self.img_size} and {self.patch_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}")
        if not 1 <= self.num_gaussians <= 4096:
            raise ValueError(f"--gaussians must be in 1..4096, got {self.num_gaussians}")
        if self.gaussians_per_token < 1 or self.num_gaussians % self.gaussians_per_token:
            raise ValueError(f"--gaussians {self.num_gaussians} is not a multiple of --gaussians-per-token "
                             f"{self.gaussians_per_token}; pick a divisor of it")
        check_mask_ratio(self.mask_ratio, self.num_patches)
        if self.decoder not in ("gaussians", "pixels"):
            raise ValueError(f"--decoder must be 'gaussians' or 'pixels', got {self.decoder!r}")
        if self.loss_on not in ("masked", "all"):
            raise ValueError(f"--loss-on must be 'masked' or 'all', got {self.loss_on!r}")
        if self.scale_max <= 0:
            raise ValueError(f"--scale-max must be > 0, got {self.scale_max}")
        for dim, heads, name in ((self.enc_dim, self.enc_heads, "encoder"), (self.dec_dim, self.dec_heads, "decoder")):
            if dim % heads:
                raise ValueError(f"{name} width {dim} is not divisible by its {heads} heads")

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_queries(self):
        """Decoder query tokens: K / g."""
        return self.num_gaussians // self.gaussians_per_token

    @classmethod
    def preset(cls, model="tiny", **overrides):
        """What `python train.py --model <model>` runs: MODEL_SIZES[model] and LAPTOP_DEFAULTS, then `overrides`
        (GMAEConfig fields). The one source of defaults; the paper's is GMAEConfig.preset("base", **PAPER)."""
        if model not in MODEL_SIZES:
            raise ValueError(f"--model must be one of {', '.join(MODEL_SIZES)}, got {model!r}")
        fields = {**MODEL_SIZES[model], **LAPTOP_DEFAULTS, **overrides}
        cfg = cls(**fields)
        if "gaussians_per_token" in overrides:
            return cfg
        return replace(cfg, gaussians_per_token=per_token_for(cfg.num_gaussians, cfg.num_patches))  # <= N tokens


# Model sizes. "base" is the paper's ViT-B/16 encoder with MAE's 512-wide, 8-deep decoder; "tiny" runs on a laptop.
MODEL_SIZES = {
    "tiny": dict(enc_dim=192, enc_depth=6, enc_heads=3, dec_dim=128, dec_depth=2, dec_heads=4),
    "small": dict(enc_dim=384, enc_depth=12, enc_heads=6, dec_dim=256, dec_depth=4, dec_heads=8),
    "base": dict(enc_dim=768, enc_depth=12, enc_heads=12, dec_dim=512, dec_depth=8, dec_heads=16),
}
# What a 4-minute run at 32 px on a 2-core CPU needs, where it departs from the field defaults above (the
# paper's choices; README "Laptop defaults" has the measurements): 64 Gaussians, c = 2 for their coverage,
# the loss on the whole image, per-image centred depth and anchored queries.
LAPTOP_DEFAULTS = dict(num_gaussians=64, scale_max=2.0, loss_on="all", center_depth=True, anchors=True)
# The paper's pretraining (Sec. 4.1, Table 5) at ViT-B/16 and 224 px: GMAEConfig.preset("base", **PAPER).
PAPER = dict(img_size=224, patch_size=16, num_gaussians=512, scale_max=1.0, loss_on="masked", center_depth=False,
             anchors=False, gaussians_per_token=1)


def per_token_for(num_gaussians, queries):
    """The smallest g dividing K with K / g <= queries; 1 if that leaves under queries / 2 tokens (a prime K).
    The presets pass queries = N patches, so the decoder holds at most 1 + N_vis + N tokens beside MAE's 1 + N:
    512 Gaussians at 32 px (g = 8) or 4096 at 224 px (g = 32) cost about MAE's step (bench.py --per-token)."""
    g = next(g for g in range(1, num_gaussians + 1) if num_gaussians % g == 0 and num_gaussians // g <= queries)
    return g if num_gaussians // g >= queries // 2 else 1


def normalize(x):
    """ImageNet normalisation (x - mean) / std of [3, H, W] or [B, 3, H, W] pixels in [0, 1]."""
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"normalize expects [3, H, W] or [B, 3, H, W] RGB pixels, got shape {tuple(x.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def check_mask_ratio(mask_ratio, num_patches):
    """A mask must leave at least one visible patch (the encoder needs input) and be a fraction."""
    if not 0.0 <= mask_ratio < 1.0:  # NaN fails too
        why = ": 1.0 would leave the encoder no patch" if mask_ratio == 1.0 else " (a fraction of the patches)"
        raise ValueError(f"--mask must be in [0, 1), got {mask_ratio}{why}")
    if int(num_patches * (1 - mask_ratio)) < 1:
        raise ValueError(f"--mask {mask_ratio} keeps no visible patch out of {num_patches}; lower it")


# ---------------------------------------------------------------------------------------------------------
# Patches, position embeddings, masking (MAE, models_mae.py)


def patchify(imgs, p):
    """[B, 3, H, W] -> [B, N, p*p*3], patches in row-major order, pixels (row, col, channel) inside."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, H, W):
    """[B, N, p*p*3] -> [B, 3, H, W], the inverse of patchify."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, p, p, 3)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, 3, H, W)


def sincos_embed_2d(dim, gx, gy):
    """2-D sin-cos embedding [M, dim] of (possibly fractional) grid coordinates gx, gy [M]: half the channels
    encode the column, half the row, each as sin/cos at geometric frequencies (MAE, after Vaswani et al.)."""
    if dim % 4:
        raise ValueError(f"embedding width must be divisible by 4 for 2-D sin-cos, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # [D/4]

    def embed_1d(pos):  # [M] -> [M, D/2]
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(gx), embed_1d(gy)], dim=1)  # (MAE order: w first, then h)


def sincos_pos_embed(dim, grid_size, cls_token=True):
    """Fixed 2-D sin-cos position embedding [1, (1 +) grid*grid, dim] of the patch grid (MAE)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    emb = sincos_embed_2d(dim, gx, gy)  # [grid*grid, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


def anchor_grid(k):
    """k anchor points [k, 2] (x, y in (-1, 1), image coordinates of splat.project): the cell centres of the
    smallest g x g grid with g*g >= k, k of them spread evenly in raster order."""
    g = math.ceil(math.sqrt(k))
    centres = (torch.arange(g, dtype=torch.float64) + 0.5) / g * 2 - 1
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    cells = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)  # [g*g, 2]
    return cells[torch.linspace(0, g * g - 1, k, dtype=torch.float64).round().long()]


def random_masking(x, mask_ratio, generator=None):
    """Per-sample random masking by argsort of uniform noise (MAE).

    x [B, N, D] -> x_visible [B, N_vis, D], mask [B, N] (1 = masked), ids_restore [B, N], ids_keep [B, N_vis].
    """
    B, N, D = x.shape
    check_mask_ratio(mask_ratio, N)
    n_keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return x_visible, mask, ids_restore, ids_keep


# ---------------------------------------------------------------------------------------------------------
# Transformer blocks (pre-norm ViT, timm names)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, T, D]
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, T, D/heads]
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)). drop_path (stochastic depth) is for fine-tuning."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _drop(self, x):
        if not self.training or self.drop_path == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x * keep / (1 - self.drop_path)

    def forward(self, x):
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


def init_weights(module):
    """MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------
# Encoder


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # [B, 3, H, W] -> [B, N, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class Encoder(nn.Module):
    """ViT encoder on the visible patches. Input: ImageNet-normalised images."""

    def __init__(self, cfg: GMAEConfig, drop_path=0.0):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.enc_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.enc_dim))
        grid = cfg.img_size // cfg.patch_size
        self.pos_embed = nn.Parameter(sincos_pos_embed(cfg.enc_dim, grid), requires_grad=False)  # [1, 1+N, D]
        rates = [drop_path * i / max(cfg.enc_depth - 1, 1) for i in range(cfg.enc_depth)]  # linear, as in MAE
        self.blocks = nn.ModuleList(Block(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.enc_dim, eps=1e-6)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x, mask_ratio=0.0, generator=None):
        """x [B, 3, H, W] -> latents [B, 1 + N_vis, D], mask [B, N], ids_restore [B, N], ids_keep [B, N_vis]."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # [B, N, D]
        x, mask, ids_restore, ids_keep = random_masking(x, mask_ratio, generator)  # [B, N_vis, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + N_vis, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore, ids_keep


# ---------------------------------------------------------------------------------------------------------
# Decoders: Gaussians (GMAE) and pixels (MAE)


RAW_LIMIT = 1e4  # raw outputs are clamped to +-RAW_LIMIT: every activation below is flat (saturated) there


def gaussian_activation(raw, scale_max=1.0, center_depth=False):
    """Raw decoder outputs [..., 14] -> valid Gaussians [..., 14] (docs/design.md 1; paper Sec. 4.1).

    xyz = tanh, scale = c sigmoid (largest std c W/16 px at z = 0 under splat.project's camera), quaternion
    normalised (w, x, y, z), rgb and opacity sigmoid. Any raw input gives finite, valid Gaussians
    (tests/test_fuzz.py): NaN -> 0, +-inf -> +-RAW_LIMIT (no gradient there), an all-zero quaternion -> 0,
    which quat_to_rotmat reads as the identity. A diverging run still shows as a NaN gradient norm in train.py.
    """
    raw = torch.nan_to_num(raw, nan=0.0, posinf=RAW_LIMIT, neginf=-RAW_LIMIT).clamp(-RAW_LIMIT, RAW_LIMIT)
    if center_depth:  # raw [..., K, 14]: remove each image's mean raw depth (see GMAEConfig.center_depth)
        raw = torch.cat([raw[..., 0:2], raw[..., 2:3] - raw[..., 2:3].mean(dim=-2, keepdim=True), raw[..., 3:]], -1)
    xyz = torch.tanh(raw[..., 0:3])
    scale = scale_max * torch.sigmoid(raw[..., 3:6])
    quat = F.normalize(raw[..., 6:10], dim=-1, eps=1e-8)
    rgb = torch.sigmoid(raw[..., 10:13])
    opacity = torch.sigmoid(raw[..., 13:14])
    return torch.cat([xyz, scale, quat, rgb, opacity], dim=-1)


class GaussianDecoder(nn.Module):
    """Paper Eq. 1: decoder tokens = projected visible latents ++ k query tokens; one Gaussian per query."""

    def __init__(self, cfg: GMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder_embed = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        grid = cfg.img_size // cfg.patch_size
        # The latents keep their patch position (MAE adds the decoder position embedding the same way).
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(cfg.dec_dim, grid), requires_grad=False)
        self.queries = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.dec_dim))  # K / g query tokens
        self.blocks = nn.ModuleList(Block(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(cfg.dec_dim, eps=1e-6)
        self.head = nn.Linear(cfg.dec_dim, splat.PARAM_DIM * cfg.gaussians_per_token)  # g Gaussians per token
        self.apply(init_weights)
        # Initialisation (docs/design.md 1): Gaussians all starting at the centre train slowly. N(0, 1) queries and xyz
        # head rows of std 1/sqrt(D) give tanh inputs of std ~1, centres spread over [-1, 1]^3 (each of a token's
        # g Gaussians from its own rows); the other rows keep xavier, so the rest starts around sigmoid(0) = 0.5.
        nn.init.normal_(self.queries, std=1.0)
        nn.init.normal_(self.head_rows()[:, 0:3], std=1.0 / math.sqrt(cfg.dec_dim))
        if cfg.anchors:
            self.init_anchors(cfg)

    def head_rows(self):
        """The head's weight [g, 14, D_dec] as the rows of each of a token's g Gaussians (a view: init writes it)."""
        return self.head.weight.view(self.cfg.gaussians_per_token, splat.PARAM_DIM, -1)

    def init_anchors(self, cfg):
        """GMAEConfig.anchors: query j gets the fixed sin-cos embedding of its grid point a_j (the latents carry
        that of their patch) and starts there. With g per token, its g Gaussians start on a sub-grid of the
        token's cell, spread like a pixel head's patch, not g copies on one point that must break symmetry."""
        t = anchor_grid(cfg.num_queries)  # [K/g, 2], x, y in (-1, 1): the tokens' grid points
        half_cell = 1.0 / math.ceil(math.sqrt(cfg.num_queries))
        a = (t[:, None] + anchor_grid(cfg.gaussians_per_token)[None] * half_cell).reshape(-1, 2)  # [K, 2]
        grid = (t + 1) * cfg.img_size / (2 * cfg.patch_size) - 0.5  # the token points in patch-grid units
        query_pos = sincos_embed_2d(cfg.dec_dim, grid[:, 0], grid[:, 1]).float()[None]  # [1, K/g, D_dec]
        # fixed and rebuilt from the config, so not saved: checkpoints without anchors load unchanged
        self.register_buffer("query_pos", query_pos, persistent=False)
        self.register_buffer("anchor_logit", torch.atanh(a).float(), persistent=False)  # [K, 2]
        nn.init.normal_(self.queries, std=0.02)  # small beside query_pos (MAE's mask token init)
        sub = math.ceil(math.sqrt(cfg.gaussians_per_token))  # the sub-grid's side: jitter shrinks with its cells
        nn.init.normal_(self.head_rows()[:, 0:2], std=0.1 / math.sqrt(cfg.dec_dim) / sub)  # start near the anchor

    def from_anchors(self, raw):
        """x, y = tanh(raw + atanh(a_j)): each anchored Gaussian starts at its grid point, free to go anywhere."""
        return torch.cat([raw[..., 0:2] + self.anchor_logit, raw[..., 2:]], dim=-1)

    def forward(self, latents, ids_keep):
        """latents [B, 1 + N_vis, D_enc] -> raw Gaussians [B, K, 14]."""
        x = self.decoder_embed(latents)  # [B, 1 + N_vis, D_dec]
        pos = self.decoder_pos_embed.expand(x.shape[0], -1, -1)
        pos_vis = torch.gather(pos[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = x + torch.cat([pos[:, :1], pos_vis], dim=1)  # each latent keeps its patch position
        q = self.queries + self.query_pos if self.cfg.anchors else self.queries
        x = torch.cat([x, q.expand(x.shape[0], -1, -1)], dim=1)  # [B, 1 + N_vis + K/g, D_dec]: Eq. 1, no mask tokens
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x[:, -self.cfg.num_queries:])  # [B, K/g, D_dec]: the query outputs only
        raw = self.head(x).reshape(x.shape[0], self.cfg.num_gaussians, splat.PARAM_DIM)  # [B, K, 14], g per token
        return self.from_anchors(raw) if self.cfg.anchors else raw


class PixelDecoder(nn.Module):
    """MAE's decoder: mask tokens fill the masked positions, a linear head predicts each patch's pixels."""

    def __init__(self, cfg: GMAEConfig):
        super().__init__()
        self.decoder_embed = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_dim))
        grid = cfg.img_size // cfg.patch_size
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(cfg.dec_dim, grid), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(cfg.dec_dim, eps=1e-6)
        self.head = nn.Linear(cfg.dec_dim, cfg.patch_size**2 * 3)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latents, ids_restore):
        """latents [B, 1 + N_vis, D_enc] -> patch pixels [B, N, P]."""
        x = self.decoder_embed(latents)  # [B, 1 + N_vis, D_dec]
        B, n_tok, D = x.shape
        N = ids_restore.shape[1]
        masks = self.mask_token.expand(B, N + 1 - n_tok, -1)
        x_ = torch.cat([x[:, 1:], masks], dim=1)  # [B, N, D_dec], visible first, in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # unshuffle to patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # [B, 1 + N, D_dec]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))[:, 1:]  # [B, N, P]


# ---------------------------------------------------------------------------------------------------------
# Loss and the whole model


def patch_stats(patches):
    """Each patch's mean and std, [B, N, 1] each, of patches [B, N, P]: the statistics --norm-pix normalises a
    target patch by (MAE's: the variance of the patch's p p 3 values, plus 1e-6 under the square root)."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5


def reconstruction_loss(pred, imgs, mask, patch_size, loss_on="masked", norm_pix=False):
    """MSE between the reconstruction and the image, both [B, 3, H, W] with pixels in [0, 1].

    loss_on="masked" averages over the pixels of masked patches only (mask [B, N], 1 = masked);
    "all" over every pixel. norm_pix normalises each target patch by its own mean and std (MAE), so pred is then
    read as normalised patches (to_pixels maps it back).
    """
    target = patchify(imgs, patch_size)  # [B, N, P]
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = ((patchify(pred, patch_size) - target) ** 2).mean(dim=-1)  # [B, N]
    if loss_on == "all" or mask.sum() == 0:  # with nothing masked (mask ratio 0), score every pixel
        return per_patch.mean()
    return (per_patch * mask).sum() / mask.sum()


def to_pixels(pred, imgs, patch_size, norm_pix):
    """The reconstruction in pixel space, [B, 3, H, W]: pred itself, or under norm_pix pred's patches scaled
    back by the image's own patch statistics, as MAE shows its norm-pix predictions. That borrows each masked
    patch's true mean and contrast from the image, so a norm-pix PSNR is not comparable with a plain one."""
    if not norm_pix:
        return pred
    mean, std = patch_stats(patchify(imgs, patch_size))
    return unpatchify(patchify(pred, patch_size) * std + mean, patch_size, *imgs.shape[-2:])


class GMAE(nn.Module):
    """Encoder + (Gaussian | pixel) decoder + loss. Takes images in [0, 1]; normalises them for the encoder."""

    def __init__(self, cfg: GMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = GaussianDecoder(cfg) if cfg.decoder == "gaussians" else PixelDecoder(cfg)

    def check_input(self, imgs):
        size = self.cfg.img_size
        if imgs.dim() != 4 or imgs.shape[1:] != (3, size, size):
            raise ValueError(f"expected images [B, 3, {size}, {size}], got {tuple(imgs.shape)}")

    def gaussians(self, imgs, mask_ratio=0.0, generator=None):
        """Images [B, 3, H, W] -> valid Gaussians [B, K, 14], mask [B, N]. For zero-shot readings."""
        if self.cfg.decoder != "gaussians":
            raise ValueError("this model has a pixel decoder (MAE); it predicts no Gaussians")
        self.check_input(imgs)
        latents, mask, _, ids_keep = self.encoder(normalize(imgs), mask_ratio, generator)
        raw = self.decoder(latents, ids_keep).float()  # [B, K, 14]; float32 even under --amp autocast
        return gaussian_activation(raw, self.cfg.scale_max, self.cfg.center_depth), mask

    def forward(self, imgs, mask_ratio=None, backend="auto", generator=None):
        """imgs [B, 3, H, W] in [0, 1] -> dict(loss, pred [B, 3, H, W]: what the loss compares (the render, or
        MAE's patches), recon [B, 3, H, W]: pred in pixel space (to_pixels), mask [B, N], gaussians [B, K, 14] |
        None)."""
        cfg = self.cfg
        mask_ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        H, W = imgs.shape[-2:]
        if cfg.decoder == "gaussians":
            gaussians, mask = self.gaussians(imgs, mask_ratio, generator)
            pred = splat.render(gaussians, H, W, background=1.0, backend=backend)
        else:
            self.check_input(imgs)
            latents, mask, ids_restore, _ = self.encoder(normalize(imgs), mask_ratio, generator)
            gaussians = None
            pred = unpatchify(self.decoder(latents, ids_restore).float(), cfg.patch_size, H, W)  # loss in fp32
        loss = reconstruction_loss(pred, imgs, mask, cfg.patch_size, cfg.loss_on, cfg.norm_pix)
        recon = to_pixels(pred, imgs, cfg.patch_size, cfg.norm_pix)
        return {"loss": loss, "pred": pred, "recon": recon, "mask": mask, "gaussians": gaussians}


# ---------------------------------------------------------------------------------------------------------
# Evaluation of a pretrained model: reconstruction quality and the state of the learned depths


def psnr_db(sq_err_sum, count):
    """PSNR in dB of `count` values in [0, 1] (peak 1) whose squared errors sum to sq_err_sum: 10 log10(1 / MSE);
    floats, or tensors elementwise (one PSNR per image). The project's one PSNR: reconstruction_metrics, study.py's
    oracle and psnr below all come here."""
    if torch.is_tensor(sq_err_sum):
        return 10 * torch.log10(count / sq_err_sum.clamp_min(1e-12))
    return 10 * math.log10(count / max(sq_err_sum, 1e-12))


def psnr(x, y):
    """PSNR in dB of image x against y (same shape, values in [0, 1]), over all their values."""
    return psnr_db(((x - y) ** 2).sum().item(), x.numel())


@torch.no_grad()
def reconstruction_metrics(model, imgs, backend="auto", batch_size=64, seed=0):
    """Reconstruction and depth statistics of `model` on images [B, 3, H, W] in [0, 1] (no gradient).

    psnr_masked: over each image's masked patches' pixels at the model's mask ratio (the paper's PSNR), a seeded
    mask per image; psnr_full: the whole image at mask 0 (the zero-shot setting). Each is the mean over images of
    each image's PSNR (common practice; it is >= the PSNR of the set's pooled squared error), computed in pixel
    space (the model's "recon", clamped to [0, 1]). loss: the training loss. For Gaussians at mask 0: z_mean,
    z_std (per image, averaged; 0 = one depth for all), z_saturated (share with |z| > 0.99, where tanh is flat)
    and corr_scale_z (Pearson, mean scale vs z, over all Gaussians after centring each image's z and scale on
    that image's means: the trend within an image, the paper's Fig. 10, larger nearer, is negative).
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator(imgs.device).manual_seed(seed)
    masked_db, full_db, zs, scales, loss = [], [], [], [], 0.0
    p = model.cfg.patch_size
    for i in range(0, imgs.shape[0], batch_size):
        x = imgs[i : i + batch_size]
        out = model(x, backend=backend, generator=gen)
        err = ((patchify(out["recon"].clamp(0, 1), p) - patchify(x, p)) ** 2).sum(-1)  # [b, N]
        m = out["mask"]
        m = torch.where(m.sum(1, keepdim=True) > 0, m, 1.0)  # nothing masked (--mask 0): every patch, as the loss
        masked_db.append(psnr_db((err * m).sum(1), m.sum(1) * p * p * 3))  # [b]
        loss += out["loss"].item() * x.shape[0]
        full = model(x, mask_ratio=0.0, backend=backend)
        full_db.append(psnr_db(((full["recon"].clamp(0, 1) - x) ** 2).flatten(1).sum(1), x[0].numel()))
        if full["gaussians"] is not None:
            zs.append(full["gaussians"][..., 2])  # [b, K]
            scales.append(full["gaussians"][..., 3:6].mean(-1))  # [b, K]
    model.train(was_training)
    metrics = {"loss": loss / imgs.shape[0], "psnr_masked": torch.cat(masked_db).mean().item(),
               "psnr_full": torch.cat(full_db).mean().item()}
    if zs:
        z, s = torch.cat(zs), torch.cat(scales)  # [B, K]
        zc, sc = z - z.mean(1, keepdim=True), s - s.mean(1, keepdim=True)
        corr = (zc * sc).sum() / ((zc * zc).sum().sqrt() * (sc * sc).sum().sqrt()).clamp_min(1e-12)
        metrics.update(z_mean=z.mean().item(), z_std=z.std(dim=1).mean().item() if z.shape[1] > 1 else 0.0,
                       z_saturated=(z.abs() > 0.99).float().mean().item(), corr_scale_z=corr.item())
    return metrics
