"""GPU training throughput: fp32 vs mixed precision + channels_last, per backbone.

What it measures: training images/second (forward, cross-entropy, backward, Adam step) of each
backbone (default ``efficientnet_b3`` and ``resnet50``, random init from
``create_backbone(name, pretrained=False)``: only speed is measured) at 224x224, batch 64, in two
configurations:

- ``fp32``: float32, NCHW (PyTorch's default TF32 settings, printed);
- ``amp+cl``: autocast to bf16 where the GPU supports it (else fp16 with a GradScaler), model
  and inputs in channels_last memory format. This is what ``Trainer`` does on CUDA with
  ``mixed_precision`` and ``channels_last`` on.

The inputs are synthetic: a pool of random uint8 224x224 images held on the GPU, normalised on
the GPU each step (``x / 255 - mean) / std``), so the numbers are the model's training speed,
not the input pipeline's (see ``bench_input_throughput.py`` for that). ``cudnn.benchmark`` is on
for both configurations. Each configuration gets ``--warmup`` untimed steps (cuDNN autotuning,
allocator growth), then ``--steps`` timed steps between two ``torch.cuda.synchronize()`` calls.
Peak memory is ``torch.cuda.max_memory_allocated`` over the configuration's run.

Run (from the project root, on a machine with a CUDA GPU):
    .venv/bin/python bench/bench_gpu_train.py [--steps 50] [--warmup 10] [--batch-size 64]
        [--models efficientnet_b3,resnet50]

Without a CUDA device it prints ``skipped: no CUDA device`` and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOL_BATCHES = 4  # distinct synthetic batches cycled through


@dataclass
class Result:
    model: str
    config: str
    images_per_s: float
    ms_per_step: float
    peak_gib: float
    final_loss: float


def build_model(name: str) -> tuple[nn.Module, str]:
    """The project's factory when importable; plain timm otherwise (same random-init model)."""
    try:
        from cnmc.models.backbones import create_backbone
    except ImportError as exc:  # e.g. a GPU box with torch + timm but not the project's deps
        import timm

        return timm.create_model(name, pretrained=False, num_classes=2), f"timm (cnmc not importable: {exc.name})"
    return create_backbone(name, pretrained=False).model, "cnmc.create_backbone"


def run_config(name: str, amp: bool, args: argparse.Namespace, device: torch.device) -> Result:
    torch.manual_seed(0)
    model, _ = build_model(name)
    model = model.to(device)
    amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss()
    size, bs = args.image_size, args.batch_size
    gen = torch.Generator(device=device).manual_seed(0)
    pool = torch.randint(0, 256, (POOL_BATCHES, bs, 3, size, size), dtype=torch.uint8, device=device, generator=gen)
    targets = torch.randint(0, 2, (POOL_BATCHES, bs), device=device, generator=gen)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def step(i: int) -> torch.Tensor:
        x = (pool[i % POOL_BATCHES].float() - mean) / std  # uint8 -> normalised float, on the GPU
        if amp:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp_dtype, enabled=amp):
            loss = loss_fn(model(x), targets[i % POOL_BATCHES])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    final = float(loss.item())
    config = f"amp-{'bf16' if amp_dtype == torch.bfloat16 else 'fp16'}+cl" if amp else "fp32"
    return Result(name, config, args.steps * bs / seconds, 1000 * seconds / args.steps, peak, final)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per configuration (default 50)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    ap.add_argument("--image-size", type=int, default=224, help="square input side (default 224)")
    ap.add_argument("--models", default="efficientnet_b3,resnet50", help="comma-separated backbones")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    _, source = build_model(models[0])
    print(
        f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
        f"cuDNN {torch.backends.cudnn.version()} | bf16 supported: {torch.cuda.is_bf16_supported()}"
    )
    print(
        f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}; "
        f"models from {source}"
    )
    print(
        f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {args.warmup} warm-up + "
        f"{args.steps} timed steps per configuration, Adam, synthetic uint8 inputs normalised on the GPU",
        flush=True,
    )
    results: list[Result] = []
    for name in models:
        for amp in (False, True):
            try:
                r = run_config(name, amp, args, device)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{name} {'amp' if amp else 'fp32'}: out of GPU memory at batch {args.batch_size}")
                continue
            torch.cuda.empty_cache()  # the configuration's model and optimizer are gone now
            results.append(r)
            print(
                f"  {r.model:<16} {r.config:<13} {r.images_per_s:8.0f} img/s  {r.ms_per_step:7.1f} ms/step  "
                f"peak {r.peak_gib:5.2f} GiB  (loss {r.final_loss:.3f})",
                flush=True,
            )

    print()
    header = f"{'model':<16} {'config':<13} {'img/s':>8} {'ms/step':>8} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.model:<16} {r.config:<13} {r.images_per_s:8.0f} {r.ms_per_step:8.1f} {r.peak_gib:9.2f}")
    print("-" * len(header))
    for name in models:
        rows = {r.config.split("-")[0]: r for r in results if r.model == name}
        if "fp32" in rows and "amp" in rows:
            ratio = rows["amp"].images_per_s / rows["fp32"].images_per_s
            print(f"speed-up {name}: {ratio:.2f}x ({rows['amp'].config} vs fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
