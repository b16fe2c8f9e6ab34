"""Train a small ConvNeXt with the fused kernels, optionally side by side with the reference model.

The default data set is scikit-learn's handwritten digits (1,797 8x8 images in 10 classes, shipped
inside the package, so nothing is downloaded), upsampled to --image-size RGB; or pass an
ImageFolder-style directory (one sub-directory of images per class, optionally under train/ and
val/). AdamW with a linear-warmup cosine schedule, drop path, bf16 autocast on the GPU, a progress
bar, and a loss/accuracy curve PNG under --out.

    python examples/train.py                                   # ConvNeXt-atto on digits
    python examples/train.py --backend triton --compare-reference
    python examples/train.py --data /path/to/imagefolder --model femto --image-size 128 --steps 2000

--compare-reference trains convnext_kernels.reference.ConvNeXt (plain PyTorch) from the same
initial weights on the same batches with the same drop-path draws, and reports the per-step loss
difference; in fp32 it stays at rounding level, under bf16 autocast it is the size of bf16's own
run-to-run noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import convnext_kernels as ck
except ImportError:  # not installed: use the checkout this example sits in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import convnext_kernels as ck
from convnext_kernels.reference import ConvNeXt  # noqa: E402

MODELS = {"atto": ((2, 2, 6, 2), (40, 80, 160, 320)), "femto": ((2, 2, 6, 2), (48, 96, 192, 384))}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def digits_datasets(image_size: int, seed: int):
    """scikit-learn's digits as (train, val) TensorDatasets of (3, S, S) images, an 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = _normalise(x.clamp(0, 1).expand(-1, 3, -1, -1))
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = len(y) // 5
    val, train = order[:n_val], order[n_val:]
    classes = [str(c) for c in range(10)]
    return (torch.utils.data.TensorDataset(x[train], y[train]),
            torch.utils.data.TensorDataset(x[val], y[val]), classes)


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>: images read with PIL, resized to a square, normalised (no torchvision needed)."""

    def __init__(self, root: Path, image_size: int, classes=None, files=None):
        self.root, self.image_size = Path(root), image_size
        self.classes = classes or sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise SystemExit(f"{root}: expected one sub-directory of images per class")
        self.files = files if files is not None else [
            (p, i) for i, c in enumerate(self.classes) for p in sorted((self.root / c).rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise SystemExit(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = x.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float().div(255)
        return _normalise(x.unsqueeze(0))[0], label


def folder_datasets(root: str, image_size: int, seed: int):
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = ImageFolder(root / "train", image_size)
        return train, ImageFolder(root / "val", image_size, classes=train.classes), train.classes
    full = ImageFolder(root, image_size)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, len(order) // 5)
    pick = lambda idx: ImageFolder(root, image_size, full.classes, [full.files[i] for i in idx])  # noqa: E731
    return pick(order[n_val:]), pick(order[:n_val]), full.classes


def endless(loader):
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float):
    """No weight decay on biases, norm affines and layer scales (1-D parameters), as timm does."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """One model, its optimizer, schedule and (for fp16) grad scaler."""

    def __init__(self, name, model, args, device, amp_dtype):
        self.name, self.model, self.device, self.amp_dtype = name, model, device, amp_dtype
        self.opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
        warmup = min(args.warmup_steps, max(1, args.steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: cosine_with_warmup(s, args.steps, warmup))
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.run = model
        if args.compile and name == "fused":
            if args.compare_reference:
                # Inductor otherwise replaces torch.rand with its own generator, so the compiled
                # model's drop-path masks would differ from the reference's for the same seed.
                import torch._inductor.config as inductor_config
                inductor_config.fallback_random = True
            self.run = torch.compile(model, fullgraph=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def step(self, x, y, rng_seed: int) -> float:
        self.model.train()
        torch.manual_seed(rng_seed)  # both models draw the same drop-path masks
        with self.autocast():
            loss = F.cross_entropy(self.run(x), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.item()

    @torch.no_grad()
    def evaluate(self, loader) -> tuple[float, float]:
        self.model.eval()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                logits = self.model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
        return loss_sum / total, correct / total


def plot(history: dict, path: Path, compare: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 if compare else 2
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4))
    style = {"fused": "-", "reference": ":"}  # the reference is dotted on top: the curves coincide
    for name, losses in history["train_loss"].items():
        axes[0].plot(losses, style[name], label=f"{name} train", alpha=0.8)
    for name, points in history["val"].items():
        steps = [p["step"] for p in points]
        axes[0].plot(steps, [p["loss"] for p in points], "o" + style[name], label=f"{name} val")
        axes[1].plot(steps, [100 * p["accuracy"] for p in points], "o" + style[name], label=name)
    axes[0].set(xlabel="step", ylabel="cross-entropy", title="loss", yscale="log")
    axes[1].set(xlabel="step", ylabel="%", title="validation accuracy")
    if compare:
        diff = [abs(a - b) for a, b in zip(history["train_loss"]["fused"], history["train_loss"]["reference"])]
        axes[2].plot([d if d > 0 else float("nan") for d in diff], ".-")  # exact ties leave gaps
        axes[2].set(xlabel="step", ylabel="|loss fused - loss reference|", title="per-step loss difference",
                    yscale="log")
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (scikit-learn, built in) or an ImageFolder path")
    p.add_argument("--model", choices=sorted(MODELS), default="atto")
    p.add_argument("--depths", default=None, help="override the depths, e.g. 1,1,3,1 (quick runs)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    p.add_argument("--backend", default="auto", choices=["auto", *ck.BACKENDS])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="autocast dtype; auto = bf16 on the GPU, none on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the fused model")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compare-reference", action="store_true",
                   help="train the reference ConvNeXt side by side and report the per-step loss difference")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (ImageFolder data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train", help="directory for curves.png and history.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    amp = {"auto": "bf16" if device.type == "cuda" else "none"}.get(args.amp, args.amp)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.data == "digits":
        train_set, val_set, classes = digits_datasets(args.image_size, args.seed)
    else:
        train_set, val_set, classes = folder_datasets(args.data, args.image_size, args.seed)
    loader_gen = torch.Generator().manual_seed(args.seed)  # its own RNG: the drop-path reseeding leaves it alone
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                               generator=loader_gen, num_workers=args.workers)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=args.workers)

    depths, dims = MODELS[args.model]
    if args.depths:
        depths = tuple(int(d) for d in args.depths.split(","))
    torch.manual_seed(args.seed)
    fused = ck.ConvNeXtFused(num_classes=len(classes), depths=depths, dims=dims, drop_path_rate=args.drop_path,
                             backend=args.backend).to(device)
    fused.set_grad_checkpointing(args.grad_checkpointing)
    trainers = [Trainer("fused", fused, args, device, amp_dtype)]
    if args.compare_reference:
        reference = ConvNeXt(num_classes=len(classes), depths=depths, dims=dims, drop_path_rate=args.drop_path)
        reference.load_state_dict(copy.deepcopy(fused.state_dict()))
        trainers.append(Trainer("reference", reference.to(device), args, device, amp_dtype))

    backend = ck.backends.resolve_backend(args.backend, device)
    print(f"ConvNeXt-{args.model} depths={depths} dims={dims} ({sum(p.numel() for p in fused.parameters()) / 1e6:.2f}M"
          f" params) | backend={backend} device={device} amp={amp} | data={args.data}: {len(train_set)} train / "
          f"{len(val_set)} val, {len(classes)} classes, {args.image_size}px | {args.steps} steps x {args.batch_size}")

    history = {"args": vars(args), "backend": backend, "train_loss": {t.name: [] for t in trainers},
               "val": {t.name: [] for t in trainers}, "seconds": {t.name: 0.0 for t in trainers}}
    batches = endless(train_loader)
    try:
        from tqdm import tqdm
        bar = tqdm(range(args.steps), disable=args.no_progress, dynamic_ncols=True)
    except ImportError:
        bar = range(args.steps)

    def evaluate(step):
        for t in trainers:
            loss, acc = t.evaluate(val_loader)
            history["val"][t.name].append({"step": step, "loss": loss, "accuracy": acc})
        return history["val"]["fused"][-1]

    for step in bar:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for t in trainers:
            start = time.perf_counter()
            history["train_loss"][t.name].append(t.step(x, y, rng_seed=args.seed * 1_000_003 + step))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step > 0:  # the first step compiles (torch.compile, Triton JIT and autotuning)
                history["seconds"][t.name] += time.perf_counter() - start
        losses = {name: v[-1] for name, v in history["train_loss"].items()}
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            val = evaluate(step)
            print(f"step {step + 1}: train loss {losses['fused']:.4f}, val loss {val['loss']:.4f}, "
                  f"val accuracy {100 * val['accuracy']:.1f}%", flush=True)
        if hasattr(bar, "set_postfix"):
            post = {"loss": f"{losses['fused']:.4f}", "lr": f"{trainers[0].sched.get_last_lr()[0]:.2e}"}
            if args.compare_reference:
                post["diff"] = f"{abs(losses['fused'] - losses['reference']):.1e}"
            bar.set_postfix(post)

    val = evaluate(args.steps - 1)
    train_loss = history["train_loss"]["fused"]
    print(f"final: train loss {train_loss[-1]:.4f} (first {train_loss[0]:.4f}), val loss {val['loss']:.4f}, "
          f"val accuracy {100 * val['accuracy']:.1f}% | fused {history['seconds']['fused']:.1f}s after step 1")
    if args.compare_reference:
        ref_loss = history["train_loss"]["reference"]
        diff = [abs(a - b) for a, b in zip(train_loss, ref_loss)]
        rel = [d / abs(b) for d, b in zip(diff, ref_loss)]
        ref_val = history["val"]["reference"][-1]
        print("step  loss fused   loss reference  |diff|")
        shown = sorted(set(range(min(5, len(diff)))) | set(range(max(0, len(diff) - 3), len(diff))))
        for i in shown:
            print(f"{i + 1:4d}  {train_loss[i]:.6f}   {ref_loss[i]:.6f}        {diff[i]:.2e}")
        print(f"reference: val loss {ref_val['loss']:.4f}, val accuracy {100 * ref_val['accuracy']:.1f}% | "
              f"reference {history['seconds']['reference']:.1f}s after step 1")
        print(f"max |loss diff| over {len(diff)} steps: {max(diff):.3e} (max relative {max(rel):.3e}, "
              f"mean {sum(diff) / len(diff):.3e})")
        history["max_abs_loss_diff"], history["max_rel_loss_diff"] = max(diff), max(rel)
    plot(history, out_dir / "curves.png", args.compare_reference)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    print(f"wrote {out_dir / 'curves.png'} and {out_dir / 'history.json'}")
    return history


if __name__ == "__main__":
    main()
