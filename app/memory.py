"""`lte-fed-memory`: what one LTE client needs on a device, next to full AdamW training.

    lte-fed-memory --model vit_base --rank 64 --quant nf4 --batch 32 --img-size 224 --device-gb 8
    lte-fed-memory --model gpt2 --rank 64 --batch 8 --vocab 50257 --block-size 1024

Prints the estimate of `lte_fed.memory` term by term and the largest model of the same family
that fits the device for each. A bad argument ends in one message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

GiB, MiB = 2**30, 2**20
ROWS = (("base", "base / weights"), ("trainable", "trainable (+V)"), ("grads", "gradients"),
        ("optimizer", "AdamW state"), ("workspace", "fp32 W workspace"), ("message", "server message"),
        ("activations", "activations"),
        ("total", "total"))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lte-fed-memory", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_base", help="a registered model or a vit_* ladder size")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--quant", default="nf4", help="nf4 | fp4 | nf4-dq | fp4-dq | int8 | none")
    ap.add_argument("--variant", default="exact", help="exact | reset")
    ap.add_argument("--heads", type=int, default=4, help="N; a client's memory does not depend on it")
    ap.add_argument("--batch", type=int, default=32, help="per-device batch (samples)")
    ap.add_argument("--img-size", type=int, default=224, help="image models")
    ap.add_argument("--patch-size", type=int, default=None, help="image models; default: the model's own")
    ap.add_argument("--classes", type=int, default=100, help="image models: output classes")
    ap.add_argument("--channels", type=int, default=3, help="image models: input channels")
    ap.add_argument("--vocab", type=int, default=65, help="language models: vocabulary (65: Shakespeare's "
                    "characters; GPT-2's BPE: 50257)")
    ap.add_argument("--block-size", type=int, default=None, help="language models: tokens per window; "
                    "default: the model's own")
    ap.add_argument("--device-gb", type=float, default=8.0, help="device memory in GiB")
    return ap


def _check(ap: argparse.ArgumentParser, args) -> None:
    """Validate everything before the slow imports, so errors are quick and one line."""
    from lte_fed.memory import VIT_SIZES
    from lte_fed.models import is_language_model, list_models

    known = sorted(set(list_models()) | set(VIT_SIZES))
    if args.model not in known:
        ap.error(f"unknown model {args.model!r}; available: {', '.join(known)}")
    for name in ("rank", "heads", "batch", "img_size", "classes", "channels", "vocab"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("patch_size", "block_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    language = is_language_model(args.model)
    given = {a for a in ("img_size", "patch_size", "classes", "channels", "vocab", "block_size")
             if getattr(args, a) != ap.get_default(a)}
    wrong = given & ({"img_size", "patch_size", "classes", "channels"} if language else {"vocab", "block_size"})
    if wrong:
        flag = "--" + sorted(wrong)[0].replace("_", "-")
        ap.error(f"{flag} means nothing for {args.model!r}, {'a language' if language else 'an image'} model")
    if not 0 < args.device_gb < float("inf"):  # nan fails too
        ap.error(f"--device-gb must be a finite number > 0, got {args.device_gb}")


def table(lte: dict[str, int], full: dict[str, int]) -> str:
    """The two estimates side by side, in MiB."""
    lines = [f"{'':18}{'LTE client':>14}{'full AdamW':>14}"]
    for key, label in ROWS:
        lines.append(f"{label:18}{lte[key] / MiB:11.1f} MiB{full[key] / MiB:11.1f} MiB")
    lines.append("(total = base + trainable + the larger of training, AdamW + workspace + max(gradients,")
    lines.append(" activations), and building, 2 x message: backward frees activations as it makes")
    lines.append(" gradients, and the message is dropped before training; see lte_fed/memory.py)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _check(ap, args)
    from lte_fed.lte import LTEConfig
    from lte_fed.memory import analyse, estimate_full, estimate_lte, family_of, largest_fitting
    from lte_fed.models import is_language_model

    language = is_language_model(args.model)
    try:
        cfg = LTEConfig(heads=args.heads, rank=args.rank, variant=args.variant, quant=args.quant)
        if language:
            shape = analyse(args.model, args.block_size or 0, args.vocab)
        else:
            shape = analyse(args.model, args.img_size, args.classes, args.patch_size, in_chans=args.channels)
    except ValueError as e:  # bad quant/variant, image not divisible into patches
        ap.error(str(e))
    lte, full = estimate_lte(shape, cfg, args.batch), estimate_full(shape, args.batch)
    device = int(args.device_gb * GiB)
    data = f"vocabulary {shape.vocab}" if language else f"{args.img_size} px, {args.channels} channels, {args.classes} classes"
    print(f"{args.model}: {shape.full_params / 1e6:.1f} M parameters, {shape.tokens} tokens x "
          f"{shape.width} wide x {shape.depth} blocks; rank {cfg.rank}, base {cfg.quant}, "
          f"{cfg.variant}; per-device batch {args.batch}, {data}")
    print(table(lte, full))
    print(f"LTE client / full training: {lte['total'] / full['total']:.2f}")
    for side, est in (("LTE client", lte), ("full AdamW", full)):
        verdict = "fits" if est["total"] <= device else "does NOT fit"
        print(f"{side}: {verdict} in {args.device_gb:g} GiB")
    family = family_of(args.model)
    if family:
        best = largest_fitting(family, device, cfg, args.batch, args.img_size, args.patch_size, args.classes,
                               args.channels)
        print(f"largest {family} model that fits {args.device_gb:g} GiB: "
              f"LTE client {best['lte'] or 'none'}, full AdamW {best['full'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
