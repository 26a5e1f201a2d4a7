"""Pre-training of the tiny depth base: what a real depth model knows about depth before the study starts.

A real base has seen many scenes with depth; a random one has not, so its features carry no depth and LoRA on its
head alone has nothing to read. So the tiny model is given a short pre-training on generic street-level scenes,
never on the study's facades: a ground plane under an upright camera (random height, pitch, focal lengths), a
wall 8-19 m away standing on it, and up to 3 boards (some leaning) standing before it, under a sky. Surfaces
carry tiles of a random size in metres (so perspective makes them denser with distance) with patches of other
colours that are not depth edges, Lambertian shading, and haze growing with distance: the depth cues of real
scenes. One ray per pixel centre makes the z-depth exact; the loss is the study's `depth_loss` on every pixel
nearer than 0.95 `max_depth` (the sky and what the model cannot output are left out).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...pretrain import optimizer_step, warmup_cosine_adamw
from .losses import depth_loss
from .models import predict

log = logging.getLogger(__name__)

BATCH_SIZE = 8
HASH = 64  # tiles' brightness repeats every HASH tiles


def pretrain_depth(model: nn.Module, image_size: int, max_depth: float, steps: int, lr: float, seed: int) -> float:
    """Pre-train `model` in place on `steps` batches of generic scenes (AdamW, warm-up and cosine decay);
    deterministic from `seed` and torch's seed. Returns the last batch's loss.

    It starts by giving the convolutions (neck and head) PyTorch's default init: with transformers' normal(0, 0.02)
    the signal shrinks about a million-fold on its way to the output, whatever the input the depth is constant, and
    some seeds never leave that state."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.reset_parameters()
    rng = np.random.default_rng([seed, 7])
    optimizer, schedule = warmup_cosine_adamw(model.parameters(), lr, steps)
    model.train()
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc="pretrain depth", unit="step"):
        images, depth, valid = generic_batch(rng, BATCH_SIZE, image_size, max_depth)
        loss = depth_loss(predict(model, images).depth, depth, valid).loss
        optimizer_step(loss, model.parameters(), optimizer, schedule)
    model.eval()
    log.info("pre-trained the tiny depth base for %d steps: loss %.3f", steps, loss.item())
    return loss.item()


def generic_batch(rng: np.random.Generator, count: int, size: int,
                  max_depth: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` generic scenes as one-frame windows: images [count, 1, 3, size, size] in [0, 1], depth (0 where
    invalid) and valid (nearer than 0.95 `max_depth`) [count, 1, size, size]."""
    images, depths = zip(*(generic_scene(rng, size) for _ in range(count)))
    depth = torch.from_numpy(np.stack(depths)).float()[:, None]
    valid = depth < 0.95 * max_depth
    return torch.from_numpy(np.stack(images)).float()[:, None], torch.where(valid, depth, 0.0), valid


def generic_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB [3, size, size] in [0, 1], z-depth [size, size], inf on the sky) of one random scene."""
    focal = size * rng.uniform(0.75, 1.25) * np.array([1.0, rng.uniform(0.85, 1.2)])
    u, v = np.meshgrid(np.arange(size) + 0.5 - size / 2, np.arange(size) + 0.5 - size / 2)
    rays = np.stack([u.ravel() / focal[0], v.ravel() / focal[1], np.ones(size * size)], axis=1)  # t is z-depth
    rays = rays @ _rotation(0.0, rng.uniform(-0.1, 0.35), rng.uniform(-0.05, 0.05)).T  # world: x right, y down
    height = rng.uniform(1.2, 2.2)  # of the camera above the ground
    ground = (np.array([0.0, height, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]), np.inf, np.inf)
    wall = _standing((0.0, height, rng.uniform(8.0, 19.0)), rng.uniform(-0.6, 0.6), 0.0, 40.0, rng.uniform(1.5, 5.0))
    surfaces = [ground, wall]
    for _ in range(rng.integers(0, 4)):
        z = rng.uniform(2.0, 15.0)
        lean = rng.uniform(-0.5, 0.5) if rng.random() < 0.3 else 0.0
        surfaces.append(_standing((z * rng.uniform(-0.6, 0.6), height, z), rng.uniform(-1.2, 1.2), lean,
                                  *rng.uniform(0.2, 1.5, 2)))
    light = rng.normal(size=3) * (1.0, 0.3, 1.0) - (0.0, 1.0, 0.0)
    light /= np.linalg.norm(light)
    t, color = np.full(size * size, np.inf), np.zeros((size * size, 3))
    for center, right, down, half_width, half_height in surfaces:
        normal = np.cross(right, down)
        with np.errstate(divide="ignore"):
            hit = (center @ normal) / (rays @ normal)
        s, r = ((hit[:, None] * rays - center) @ np.stack([right, down], axis=1)).T
        inside = (hit > 0) & (hit < t) & (np.abs(s) <= half_width) & (np.abs(r) <= half_height)
        t[inside] = hit[inside]
        shade = 0.3 + 0.7 * abs(normal @ light)
        color[inside] = shade * _texture(rng, s[inside], r[inside], np.minimum((half_width, half_height), 8.0))
    haze = np.exp(-np.where(np.isfinite(t), t, 0.0) / rng.uniform(20.0, 50.0))[:, None]
    air = rng.uniform([0.65, 0.7, 0.75], [0.85, 0.9, 0.95])
    sky = rng.uniform([0.5, 0.6, 0.75], [0.75, 0.85, 1.0])
    color = np.where(np.isfinite(t)[:, None], color * haze + air * (1 - haze), sky)
    color += rng.normal(0.0, 0.01, color.shape)
    return np.clip(color, 0.0, 1.0).T.reshape(3, size, size), t.reshape(size, size)


def _standing(base, yaw: float, lean: float, half_width: float, half_height: float) -> tuple:
    """(centre, right, down, half width, half height) of a rectangle whose bottom edge's middle is `base`, turned
    by `yaw` and leaning by `lean` (radians)."""
    axes = _rotation(yaw, lean, 0.0)
    return np.asarray(base) - half_height * axes[:, 1], axes[:, 0], axes[:, 1], half_width, half_height


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The rotation by `roll` about z, then `pitch` about x (positive: up), then `yaw` about y (radians)."""
    (cy, cp, cr), (sy, sp, sr) = np.cos([yaw, pitch, roll]), np.sin([yaw, pitch, roll])
    return (np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
            @ np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]]))


def _texture(rng: np.random.Generator, s: np.ndarray, r: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Albedo [N, 3] at surface coordinates (s, r) in metres: tiles 0.1-1 m in size (a grid, or rows offset by half
    a tile like bricks) of random brightness, with joints, and up to 3 patches of another colour (doors, posters,
    stains) within `extent` (half width, half height) of the surface's centre."""
    size = rng.uniform(0.1, 1.0, 2)
    row = np.floor(r / size[1])
    across = s / size[0] + 0.5 * (row % 2) * rng.integers(0, 2)
    column = np.floor(across)
    brightness = 1.0 + rng.uniform(0.1, 0.5) * (rng.random((HASH, HASH)) - 0.5)
    joint = np.minimum(across - column, r / size[1] - row) < rng.uniform(0.0, 0.15)
    tiles = brightness[row.astype(int) % HASH, column.astype(int) % HASH]
    albedo = rng.uniform(0.15, 0.85, 3) * np.where(joint, rng.uniform(0.6, 1.4), tiles)[:, None]
    for _ in range(rng.integers(0, 4)):
        (s0, r0), (ds, dr) = rng.uniform(-1.0, 1.0, 2) * extent, rng.uniform(0.2, 1.2, 2)
        albedo[(np.abs(s - s0) < ds) & (np.abs(r - r0) < dr)] = rng.uniform(0.05, 0.8, 3)
    return albedo
