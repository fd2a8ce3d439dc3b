"""Local-training step time of each objective, with PGD-K and with FGSM-RS (fast adversarial
training), as ratios to a PGD-K adversarial-training step, measured in one run.

    python bench/step_time.py [--model cnn-small] [--image-size 8] [--channels 1] [--batch 32]
    python bench/step_time.py --device cuda --image-size 28 --batch 256 --precision bf16

Each step reads its batch from a CPU loader and moves it to `--device`, as a client does.
`--precision bf16` runs the step under `torch.autocast` (weights stay float32) and
`--channels-last` stores the models and batches channels-last: neither is a training option yet;
this measures whether they would pay.

PM-AFL's step = one PGD-K attack (like PGD-AT) + one forward/backward over four views + two no-grad
forwards (teacher on the blend, frozen global model); the teacher's logits on clean images are
precomputed, as the ClientApp does. A `kdiga` step makes no adversarial examples: one student
forward for CE + KL, and one forward with a double backward for the input-gradient alignment
(the teacher's input gradients precomputed too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from pmafl.assembly import resolve_device
from pmafl.config import DEVICES, TrainConfig
from pmafl.data import make_loader
from pmafl.kdiga import teacher_input_gradients
from pmafl.models import create_model
from pmafl.train import train_model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_objective(objective: str, attack: str, kdiga_weight: float, args: argparse.Namespace,
                   device: torch.device, batches: int) -> float:
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    shape = (args.batch * batches, args.channels, args.image_size, args.image_size)
    images, labels = torch.rand(shape), torch.randint(0, 10, (shape[0],))
    images = images.contiguous(memory_format=memory_format)
    mean, std = [0.5] * args.channels, [0.25] * args.channels
    model = create_model(args.model, 10, args.channels, mean, std)
    teacher = create_model(args.teacher, 10, args.channels, mean, std).eval()
    model, teacher = (m.to(device, memory_format=memory_format) for m in (model, teacher))
    with torch.no_grad():
        teacher_logits = teacher(images.to(device)).cpu()
    tensors = [images, labels, teacher_logits]
    if kdiga_weight > 0:  # cached once per node, as the ClientApp does
        tensors.append(teacher_input_gradients(teacher, images, labels))
    loader = make_loader(*tensors, batch_size=args.batch, shuffle=False)
    config = TrainConfig(objective=objective, local_epochs=1, pgd_steps=args.pgd_steps,
                         train_attack=attack, kdiga_weight=kdiga_weight)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        train_model(model, teacher, loader, config)  # warm-up
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(args.repeats):
            train_model(model, teacher, loader, config)
        _synchronize(device)
    return (time.perf_counter() - start) / (args.repeats * batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--teacher", default="cnn-large")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the times as JSON (docs/results/step-time/...)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where the steps run (default: auto, CUDA when present)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: run each step under torch.autocast")
    parser.add_argument("--channels-last", action="store_true",
                        help="store the models and batches in channels-last memory format")
    args = parser.parse_args()
    # (objective, training attack, kdiga-weight); ce and kdiga make no adversarial examples.
    cells = [("ce", "pgd", 0.0), ("kdiga", "pgd", 1.0),
             *((obj, attack, 0.0) for attack in ("pgd", "fgsm-rs")
               for obj in ("pgd-at", "trades", "calfat", "pmafl")),
             ("pmafl", "pgd", 1.0), ("pmafl", "fgsm-rs", 1.0)]
    device = resolve_device(args.device)
    times = {cell: time_objective(*cell, args, device, batches=4) for cell in cells}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    layout = ", channels-last" if args.channels_last else ""
    setup = (f"{args.model} on {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, "
             f"teacher {args.teacher}, torch {torch.__version__}, {where}, {args.precision}{layout}")
    print(setup)
    reference = times[("pgd-at", "pgd", 0.0)]
    rows = []
    for (obj, attack, kdiga_weight), seconds in times.items():
        attack_name = f"PGD-{args.pgd_steps}" if attack == "pgd" else "FGSM-RS"
        label = obj if obj in ("ce", "kdiga") else f"{obj} ({attack_name})"
        if kdiga_weight > 0 and obj != "kdiga":
            label = f"{obj} + KDIGA ({attack_name})"
        print(f"{label:>20}: {seconds * 1000:8.2f} ms/step  {args.batch / seconds:9.0f} images/s  "
              f"({seconds / reference:.2f} x PGD-{args.pgd_steps} AT)")
        rows.append({"step": label, "ms": round(seconds * 1000, 2), "ratio": round(seconds / reference, 3)})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"setup": setup, "repeats": args.repeats, "steps": rows}
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
