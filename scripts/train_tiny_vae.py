"""Train the `tiny` VAE that ships inside vaepar: a small SD-architecture AutoencoderKL.

An ``AutoencoderKL`` with 8x spatial compression and 16 latent channels, trained from scratch on the
colour (and some grey) photographs bundled in scikit-image's wheel plus two colour images shipped in
scikit-learn's and matplotlib's wheels, with random rescales, crops, flips and colour changes, on one
CPU thread, seeded, in two phases (10 000 steps; the schedule is paced by steps, or by a hard time
cap of 66 minutes if a slow machine would pass it first):

1. guided (the first 8% of the steps): the encoder's mean learns the best linear code of 8x8 patches
   (their PCA, 16 coefficients) and the decoder learns to invert that code; both targets are dense
   and easy, and they teach the latent to carry absolute colour and brightness early;
2. end to end: encode, sample the nearly deterministic posterior (std ~ 0.007), decode; MSE + 0.2 L1
   and a tiny KL term. Adam 1e-3, warm-up then cosine decay to 2%; bfloat16 autocast for the first
   85% of the steps (1.5x faster on an AVX-512 BF16 CPU), float32 for the rest.

Afterwards it sets ``scaling_factor`` as Stable Diffusion did (1 / std of the latents' mode over the
training images), saves a diffusers folder in fp16 and measures the round-trip PSNR on held-out
photographs that the training never sees.

    pip install -e '.[train]'   # scikit-image, scikit-learn, matplotlib: training/evaluation data only
    python scripts/train_tiny_vae.py                       # writes vaepar/models/tiny
    python scripts/train_tiny_vae.py --eval-only vaepar/models/tiny

Held out (never trained on): ``chelsea`` (= ``cat``) and ``coffee`` from scikit-image,
scikit-learn's ``flower.jpg`` and matplotlib's ``grace_hopper.jpg``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

# skimage.data images that load from the wheel without a download. `cat` is `chelsea`.
# Held out, never trained on: two skimage photographs and three photographs shipped in other wheels
# (scikit-learn's sample images, matplotlib's sample data), so the evaluation is not skimage-only.
HELD_OUT = ("chelsea", "coffee", "sklearn:flower", "matplotlib:grace_hopper")
TRAIN_COLOUR = ("astronaut", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
                "immunohistochemistry", "retina", "colorwheel", "sklearn:china",
                "matplotlib:Minduka_Present_Blue_Pack")
TRAIN_GREY = ("camera", "moon", "brick", "grass", "gravel", "coins", "clock", "text")
# How often each training image is drawn, relative to its area: the colour photographs most.
WEIGHT = {"astronaut": 3.0, "rocket": 3.0, "motorcycle_left": 2.0, "motorcycle_right": 1.0,
          "hubble_deep_field": 0.5, "immunohistochemistry": 0.7, "retina": 0.4, "colorwheel": 0.3,
          "sklearn:china": 3.0, "matplotlib:Minduka_Present_Blue_Pack": 1.0}
GREY_WEIGHT = 0.4

ARCH = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 128), layers_per_block=1, norm_num_groups=4,
    sample_size=256, mid_block_add_attention=True,
)


def load_image(name: str) -> np.ndarray:
    """One image as ``(H, W, 3)`` uint8: a skimage.data name, ``sklearn:<name>`` (scikit-learn's
    ``datasets/images/<name>.jpg``) or ``matplotlib:<name>`` (``mpl-data/sample_data/<name>.jpg``)."""
    if ":" in name:
        from PIL import Image

        package, stem = name.split(":")
        if package == "sklearn":
            import sklearn

            path = Path(sklearn.__file__).parent / "datasets" / "images" / f"{stem}.jpg"
        elif package == "matplotlib":
            import matplotlib

            path = Path(matplotlib.get_data_path()) / "sample_data" / stem
            path = path.with_name(stem + ".png") if (path.parent / f"{stem}.png").exists() else path.with_name(stem + ".jpg")
        else:
            raise ValueError(f"unknown image source {name!r}")
        return np.array(Image.open(path).convert("RGB"), dtype=np.uint8)
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ``(1, 3, H, W)`` in [-1, 1], as diffusers' preprocess."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


def crop8(img: np.ndarray) -> np.ndarray:
    """Centre crop to height and width multiples of 8."""
    h, w = img.shape[0] // 8 * 8, img.shape[1] // 8 * 8
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top:top + h, left:left + w]


def centre(img: np.ndarray, size: int) -> np.ndarray:
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top:top + size, left:left + size]


class Crops:
    """Training images held in memory at a few scales; draws random crops with random flips."""

    SCALES = (1.0, 0.75, 0.5, 0.35)

    def __init__(self, names: list[str], crop: int, seed: int, permute: float = 0.0, colour: float = 0.0) -> None:
        self.permute, self.colour = permute, colour
        self.levels: list[torch.Tensor] = []
        weights = []
        for name in names:
            img = to_tensor(load_image(name))
            w = WEIGHT.get(name, GREY_WEIGHT)
            h0, w0 = img.shape[-2:]
            for s in self.SCALES:
                h, ww = round(h0 * s), round(w0 * s)
                if min(h, ww) < crop and not (s == 1.0 and min(h, ww) >= crop // 2):
                    continue
                level = img if s == 1.0 else F.interpolate(img, size=(h, ww), mode="bilinear",
                                                           antialias=True, align_corners=False)
                self.levels.append(level.clamp(-1, 1)[0])
                weights.append(w * math.sqrt(h * ww))  # favour bigger levels, not by full area
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int, size: int) -> torch.Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=self.gen)
        out = []
        for i in idx.tolist():
            img = self.levels[i]
            h, w = img.shape[-2:]
            top = int(torch.randint(0, max(1, h - size + 1), (1,), generator=self.gen))
            left = int(torch.randint(0, max(1, w - size + 1), (1,), generator=self.gen))
            x = img[:, top:top + size, left:left + size]
            if torch.rand((), generator=self.gen) < 0.5:
                x = x.flip(-1)
            if torch.rand((), generator=self.gen) < 0.1:
                x = x.flip(-2)
            if torch.rand((), generator=self.gen) < self.permute:  # unseen colours: swap RGB channels
                x = x[torch.randperm(3, generator=self.gen)]
            if torch.rand((), generator=self.gen) < self.colour:
                # unseen colours and casts: shuffle the channels, then a random gain and offset per channel
                x = x[torch.randperm(3, generator=self.gen)]
                gain = 1 + 0.25 * (2 * torch.rand(3, 1, 1, generator=self.gen) - 1)
                offset = 0.2 * (2 * torch.rand(3, 1, 1, generator=self.gen) - 1)
                x = (x * gain + offset).clamp(-1, 1)
            if x.shape[-1] < size or x.shape[-2] < size:  # a small image: pad by reflection
                x = F.pad(x[None], (0, size - x.shape[-1], 0, size - x.shape[-2]), mode="reflect")[0]
            out.append(x)
        return torch.stack(out).contiguous()


def build(blocks: tuple[int, ...] | None = None, layers: int | None = None, groups: int | None = None):
    from diffusers import AutoencoderKL

    arch = dict(ARCH)
    if blocks:
        arch["block_out_channels"] = tuple(blocks)
    if layers:
        arch["layers_per_block"] = layers
    if groups:
        arch["norm_num_groups"] = groups
    vae = AutoencoderKL(**arch)
    # Start the posterior nearly deterministic (std ~ 0.007): with a KL weight of 1e-6 the variance
    # would otherwise take thousands of steps to shrink from 1, drowning the latent in noise meanwhile.
    with torch.no_grad():
        lc = arch["latent_channels"]
        vae.quant_conv.weight[lc:] *= 0.1
        vae.quant_conv.bias[lc:] = -10.0
    return vae


def lr_at(progress: float, base: float, warmup: float) -> float:
    if progress < warmup:
        return base * progress / warmup
    t = (progress - warmup) / (1 - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


class PatchPCA:
    """The best linear 8x8-patch code with as many coefficients as latent channels (PCA of the
    training patches), divided by one common scale. It is the first phase's latent target."""

    def __init__(self, levels: list[torch.Tensor], k: int, p: int = 8) -> None:
        self.p = p
        cols = torch.cat([F.unfold(img[None], p, stride=p)[0].T for img in levels]).double()
        self.mean = cols.mean(0)
        _, _, vt = torch.linalg.svd(cols - self.mean, full_matrices=False)
        self.basis = vt[:k].float()  # (k, 3*p*p), orthonormal rows
        self.mean = self.mean.float()
        self.std = ((cols.float() - self.mean) @ self.basis.T).std().item()  # one scale for the code

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(x, self.p, stride=self.p).transpose(1, 2) - self.mean  # (B, L, 3*p*p)
        code = (cols @ self.basis.T) / self.std
        return code.transpose(1, 2).reshape(b, -1, h // self.p, w // self.p)


def reconstruction(y: torch.Tensor, x: torch.Tensor, l1: float, mse: float, edge: float) -> torch.Tensor:
    y = y.float()
    loss = l1 * (y - x).abs().mean() + mse * (y - x).pow(2).mean()
    if edge:
        gy, gx = gradients(y)
        ty, tx = gradients(x)
        loss = loss + edge * ((gy - ty).abs().mean() + (gx - tx).abs().mean())
    return loss


def guided_loss(vae, pca: "PatchPCA", x: torch.Tensor, args: argparse.Namespace):
    """First phase: two supervised halves. The encoder's mean learns the patch-PCA code; the decoder
    learns to invert that code. Each is a dense, easy target; end to end, both take far longer."""
    code = pca(x)
    post = vae.encode(x).latent_dist
    y = vae.decode(code).sample
    kl = post.kl().mean() / (x.shape[-1] * x.shape[-2])
    loss = (reconstruction(y, x, args.l1, args.mse, args.edge)
            + args.pca * (post.mean.float() - code).pow(2).mean() + args.kl * kl)
    return loss, y, kl


def end_to_end_loss(vae, x: torch.Tensor, args: argparse.Namespace):
    """Encode, sample the posterior (std ~ 0.007 from build(); kept low by the reconstruction), decode."""
    post = vae.encode(x).latent_dist
    y = vae.decode(post.sample()).sample
    kl = post.kl().float().mean() / (x.shape[-1] * x.shape[-2])
    return reconstruction(y, x, args.e2e_l1, args.e2e_mse, args.e2e_edge) + args.kl * kl, y, kl


def train(args: argparse.Namespace, vae, log) -> dict:
    data = Crops(list(TRAIN_COLOUR + TRAIN_GREY), args.crop, args.seed, args.permute, args.colour)
    pca = PatchPCA(data.levels, vae.config.latent_channels) if args.pca else None
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), fused=True)
    probe = [(name.split()[0], img) for name, img in held_out() if "256" in name] if args.eval_every else []
    vae.train()
    start = time.time()
    deadline = start + args.minutes * 60 - args.reserve
    step, avg = 0, None
    for step in range(1, args.steps + 1):
        progress = (step - 1) / args.steps
        if args.pace == "time":  # finish the schedule by the deadline even on a slower machine
            progress = max(progress, (time.time() - start) / (deadline - start))
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, args.lr, args.warmup)
        x = data.batch(args.batch, args.crop)
        # bfloat16 autocast (1.5x faster on this CPU) for the bulk of the run, float32 at the end.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=progress < args.bf16_until):
            if pca is not None and progress < args.pca_until:
                loss, y, kl = guided_loss(vae, pca, x, args)
            else:
                loss, y, kl = end_to_end_loss(vae, x, args)
        y = y.detach().float()
        mse = (y - x).pow(2).mean()
        l1 = (y - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        psnr = -10 * math.log10(max(mse.item() / 4, 1e-10))  # pixels span 2 in [-1, 1]
        cur = np.array([loss.item(), l1.item(), psnr, kl.item()])
        avg = cur if avg is None else 0.95 * avg + 0.05 * cur
        elapsed = time.time() - start
        if step % args.log_every == 0 or step == 1:
            log(f"step {step:5d}/{args.steps}  loss {avg[0]:.4f}  l1 {avg[1]:.4f}  psnr~ {avg[2]:5.2f} dB  "
                f"kl {avg[3]:.3f}  lr {opt.param_groups[0]['lr']:.2e}  {elapsed:6.0f}s  "
                f"{step / elapsed:.2f} step/s  load {os.getloadavg()[0]:.1f}")
        if probe and (step % args.eval_every == 0 or step == args.steps):
            vae.eval()
            vals = [psnr_roundtrip(vae, img) for _, img in probe]
            vae.train()
            log("  held-out probe (centre 256): " + "  ".join(f"{n} {v:.2f}" for (n, _), v in zip(probe, vals))
                + f"  mean {np.mean(vals):.2f} dB")
        if time.time() >= deadline:
            log(f"time cap reached at step {step} ({elapsed:.0f}s); stopping")
            break
    return {"steps": step, "train_seconds": time.time() - start}


@torch.no_grad()
def latent_std(vae) -> float:
    """std of the latents' mode over the training images (each at most 512 px a side)."""
    vals = []
    for name in TRAIN_COLOUR + TRAIN_GREY:
        img = to_tensor(load_image(name))
        h, w = img.shape[-2:]
        s = min(1.0, 512 / max(h, w))
        h, w = max(8, round(h * s) // 8 * 8), max(8, round(w * s) // 8 * 8)
        if (h, w) != tuple(img.shape[-2:]):
            img = F.interpolate(img, size=(h, w), mode="bilinear", antialias=True).clamp(-1, 1)
        vals.append(vae.encode(img).latent_dist.mode().flatten())
    return torch.cat(vals).std().item()


def held_out() -> list[tuple[str, np.ndarray]]:
    """The evaluation images: each held-out photo whole (cropped to multiples of 8) and its centre 256."""
    out = []
    for name in HELD_OUT:
        img = load_image(name)
        name = name.split(":")[-1]
        out.append((f"{name} {crop8(img).shape[0]}x{crop8(img).shape[1]}", crop8(img)))
        out.append((f"{name} centre 256x256", centre(img, 256)))
    return out


@torch.no_grad()
def psnr_roundtrip(vae, img: np.ndarray) -> float:
    """encode -> mode -> decode, untiled, then PSNR of the uint8 output against the uint8 input."""
    from vaepar.outputs import to_uint8

    z = vae.encode(to_tensor(img)).latent_dist.mode()
    y = to_uint8(vae.decode(z).sample)[0]
    mse = np.mean((y.astype(np.float64) - img.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


def evaluate(folder: Path, log) -> list[tuple[str, float]]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
    rows = [(name, psnr_roundtrip(vae, img)) for name, img in held_out()]
    log(f"held-out round trip, {folder} (float32, untiled, latent mode)")
    log(f"  {'image':<28} PSNR")
    for name, p in rows:
        log(f"  {name:<28} {p:6.2f} dB")
    log(f"  {'mean':<28} {np.mean([p for _, p in rows]):6.2f} dB")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "vaepar" / "models" / "tiny")
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=66.0, help="hard cap on the whole run")
    ap.add_argument("--reserve", type=float, default=150.0,
                    help="seconds of the cap kept for the scaling factor, saving and evaluation")
    ap.add_argument("--pace", choices=("steps", "time"), default="time",
                    help="lr schedule by step count (reproducible) or by whichever of steps/time runs out first")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.02, help="fraction of the run")
    ap.add_argument("--permute", type=float, default=0.0, help="probability of shuffling a crop's RGB channels")
    ap.add_argument("--colour", type=float, default=0.3,
                    help="probability of a colour augmentation (channel shuffle, gain and offset per channel)")
    ap.add_argument("--pca", type=float, default=1.0, help="weight of the encoder's patch-PCA target (0: no guided phase)")
    ap.add_argument("--pca-until", type=float, default=0.08, help="fraction of the run spent in the guided phase")
    ap.add_argument("--l1", type=float, default=1.0, help="guided phase: weight of the L1 loss")
    ap.add_argument("--mse", type=float, default=1.0, help="guided phase: weight of the MSE loss")
    ap.add_argument("--edge", type=float, default=0.5, help="guided phase: weight of the image-gradient L1")
    ap.add_argument("--e2e-l1", type=float, default=0.2, help="end to end: weight of the L1 loss")
    ap.add_argument("--e2e-mse", type=float, default=1.0, help="end to end: weight of the MSE loss")
    ap.add_argument("--e2e-edge", type=float, default=0.0, help="end to end: weight of the image-gradient L1")
    ap.add_argument("--bf16-until", type=float, default=0.85,
                    help="fraction of the run under bfloat16 autocast (the rest in float32)")
    ap.add_argument("--kl", type=float, default=1e-6)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=1000, help="probe held-out PSNR every N steps (0: never)")
    ap.add_argument("--blocks", type=int, nargs=4, help="block_out_channels (default %s)" % (ARCH["block_out_channels"],))
    ap.add_argument("--layers", type=int, help="layers_per_block (default %d)" % ARCH["layers_per_block"])
    ap.add_argument("--groups", type=int, help="norm_num_groups (default %d)" % ARCH["norm_num_groups"])
    ap.add_argument("--eval-only", type=Path, metavar="PATH", help="only evaluate a saved model folder")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.eval_only:
        evaluate(args.eval_only, log)
        return

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    vae = build(args.blocks, args.layers, args.groups)
    params = sum(p.numel() for p in vae.parameters())
    log(f"AutoencoderKL {params / 1e6:.2f}M params; training on {len(TRAIN_COLOUR + TRAIN_GREY)} images, "
        f"held out: {', '.join(HELD_OUT)}; {args.steps} steps of {args.batch}x{args.crop}px, "
        f"{args.threads} threads, cap {args.minutes:g} min")
    t0 = time.time()
    info = train(args, vae, log)

    vae.eval()
    std = latent_std(vae)
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"latent std {std:.4f} -> scaling_factor {1 / std:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    log(f"saved {args.out} ({size / 1e6:.2f} MB); trained {info['steps']} steps in "
        f"{info['train_seconds']:.0f}s, total so far {time.time() - t0:.0f}s")
    evaluate(args.out, log)
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
