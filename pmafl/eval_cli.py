"""pmafl-evaluate: robustness of a saved global model (or teacher) on a dataset's test split.

    pmafl-evaluate results/<run>/model.pt
    pmafl-evaluate ~/.cache/pmafl/teachers/digits--cnn-large.pt --autoattack-n 359
    pmafl-evaluate model.pt --model cnn-small --dataset digits --eps 0.2 --attacks fgsm,pgd20

The architecture and dataset come from the run's results.json beside a model.pt, or from the
teacher's .json record beside a cached teacher; flags override them. Writes JSON (default:
`<model file>.robustness.json`) with clean and per-attack accuracy and a PGD-20 eps sweep, and
warns when the sweep shows signs of gradient masking. When the record says the run's teacher
carried a backdoor (or with --backdoor-target), it also reports the trigger's attack success rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pmafl.assembly import backdoor_trigger
from pmafl.attacks import ATTACKS, make_attack
from pmafl.backdoor import Trigger, attack_success_rate
from pmafl.config import RunConfig
from pmafl.data import evaluation_subset, load_dataset
from pmafl.evaluate import accuracy, eps_sweep, gradient_masking_warnings, sweep_radii
from pmafl.models import ModelFileError, create_model, load_weights
from pmafl.teacher import TeacherSettings


def saved_settings(model_file: Path) -> dict[str, Any]:
    """Architecture, dataset, eps and input normalisation recorded beside `model_file`, when there
    is a record: a run's results.json beside its model.pt, or a cached teacher's .json."""
    results = model_file.parent / "results.json"
    if model_file.name == "model.pt" and results.is_file():
        config = json.loads(results.read_text())["config"]
        found = {"model": config["model"], "dataset": config["dataset"], "eps": config["eps"],
                 "data_dir": config["data-dir"], "public_fraction": config["public-fraction"],
                 "max_pool": config.get("max-train-examples", 0)}
        trigger = backdoor_trigger(RunConfig.from_mapping(config))  # the run's teacher's backdoor
        if trigger is not None:
            found["trigger"] = trigger
        return found
    record = model_file.with_suffix(".json")
    if record.is_file():
        meta = json.loads(record.read_text())
        settings = meta.get("settings") or {}
        found = {"model": meta["model"], "dataset": meta["dataset"], "eps": settings.get("eps"),
                 "mean": meta.get("mean"), "std": meta.get("std"),
                 "public_fraction": settings.get("public_fraction", 0.3)}
        if "backdoor" in settings:
            try:
                found["trigger"] = TeacherSettings.from_dict(settings, f"teacher record {record}").trigger()
            except (ValueError, TypeError) as e:
                sys.exit(f"pmafl-evaluate: {e}")
        return found
    return {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pmafl-evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model_file", type=Path, help="a state dict: results/<run>/model.pt or a teacher .pt")
    parser.add_argument("--model", help="architecture name (default: from the record beside the file)")
    parser.add_argument("--dataset", help="dataset name (default: from the record beside the file)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder (default: as recorded, else ~/.cache/pmafl/data)")
    parser.add_argument("--eps", type=float, help="L_inf radius (default: as recorded)")
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help=f"comma-separated, from {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--autoattack-n", type=int, default=100,
                        help="test images AutoAttack runs on (the first N; default 100, it is slow)")
    parser.add_argument("--sweep", default="0,0.5,1,2,3,4",
                        help="eps sweep as multiples of --eps, kept up to eps 0.45 where reaching "
                             "0 still proves something (default: 0,0.5,1,2,3,4; \"\": no sweep)")
    parser.add_argument("--sweep-n", type=int, default=500,
                        help="test images of the eps sweep, the first N of those evaluated "
                             "(default 500; 0: all)")
    parser.add_argument("--limit", type=int, default=0,
                        help="evaluate N test images only, a fixed class-stratified subset (the "
                             "per-round evaluation's with N = eval-examples; default: all)")
    parser.add_argument("--backdoor-target", type=int,
                        help="report the attack success rate of a white square trigger sending "
                             "images to this class (default: the trigger recorded beside the "
                             "file, if the run's teacher was backdoored)")
    parser.add_argument("--backdoor-patch", type=int, default=3,
                        help="side of that trigger, bottom-right (default 3)")
    parser.add_argument("--out", type=Path, help="JSON output (default: <model file>.robustness.json)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate as the command line says; return the report that was written."""
    args = parse_args(argv)
    if not args.model_file.is_file():
        sys.exit(f"pmafl-evaluate: no model file {args.model_file}")
    settings = saved_settings(args.model_file)
    for key in ("model", "dataset", "eps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
        if settings.get(key) is None:
            sys.exit(f"pmafl-evaluate: no record beside {args.model_file} gives --{key}; pass it")
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        sys.exit(f"pmafl-evaluate: unknown attack {unknown[0]!r}; known: {', '.join(ATTACKS)}")

    torch.manual_seed(args.seed)
    data = load_dataset(settings["dataset"], args.data_dir or settings.get("data_dir", ""), False,
                        settings.get("public_fraction", 0.3), settings.get("max_pool", 0))
    images, labels = evaluation_subset(data.test, args.limit).tensors()
    # A teacher normalises as its record says, not as this machine's data would.
    mean, std = settings.get("mean") or data.mean, settings.get("std") or data.std
    model = create_model(settings["model"], data.num_classes, data.in_channels, mean, std)
    try:
        load_weights(model, args.model_file, settings["model"])
    except ModelFileError as e:
        sys.exit(f"pmafl-evaluate: {e}")
    model.eval()
    eps = float(settings["eps"])

    report: dict[str, Any] = {"model_file": str(args.model_file.resolve()), "model": settings["model"],
                              "dataset": settings["dataset"], "eps": eps, "num_examples": len(labels)}
    report["clean_acc"] = accuracy(model, images, labels)
    trigger = settings.get("trigger")
    if args.backdoor_target is not None:
        if not 0 <= args.backdoor_target < data.num_classes or args.backdoor_patch < 1:
            sys.exit(f"pmafl-evaluate: --backdoor-target must be a class in [0, {data.num_classes}) "
                     f"and --backdoor-patch at least 1; got {args.backdoor_target}, "
                     f"{args.backdoor_patch}")
        trigger = Trigger(args.backdoor_target, args.backdoor_patch)
    if trigger is not None:
        report["asr"] = attack_success_rate(model, images, labels, trigger)
        report["trigger"] = trigger.to_dict()
    for name in attacks:
        x, y = (images[:args.autoattack_n], labels[:args.autoattack_n]) if name == "autoattack" \
            else (images, labels)
        with tqdm(total=len(y), desc=name, unit="img", file=sys.stderr) as bar:
            report[f"{name}_acc"] = accuracy(model, x, y, make_attack(name, model, eps, args.seed),
                                             progress=bar.update)
        if name == "autoattack":
            report["autoattack_n"] = len(y)
    multiples = [float(m) for m in args.sweep.split(",") if m]
    sweep_n = args.sweep_n or len(labels)
    report["eps_sweep"] = eps_sweep(model, images[:sweep_n], labels[:sweep_n],
                                    sweep_radii(eps, multiples))
    report["sweep_n"] = min(sweep_n, len(labels))
    report["gradient_masking_warnings"] = gradient_masking_warnings(report["eps_sweep"],
                                                                    report["sweep_n"])
    aa_n = report.get("autoattack_n", len(labels))
    if aa_n < len(labels):  # PGD-20 on AutoAttack's own images, the figure to compare it with
        report["autoattack_subset_pgd20_acc"] = accuracy(model, images[:aa_n], labels[:aa_n],
                                                         make_attack("pgd20", model, eps))

    out = args.out or args.model_file.with_name(args.model_file.name + ".robustness.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{settings['model']} on {settings['dataset']} ({len(labels)} test images), eps {eps:g}:")
    if "asr" in report:
        print(f"  backdoor attack success rate {report['asr']:.3f} (trigger {report['trigger']}, on "
              f"the non-target images of the {len(labels)})")
    print(f"  clean {report['clean_acc']:.3f}  " + "  ".join(
        f"{name} {report[f'{name}_acc']:.3f}" + (f" (on {report['autoattack_n']} images"
                                                  + (f", where PGD-20 gives "
                                                     f"{report['autoattack_subset_pgd20_acc']:.3f}"
                                                     if "autoattack_subset_pgd20_acc" in report else "")
                                                  + ")" if name == "autoattack" else "")
        for name in attacks))
    print(f"  PGD-20 eps sweep (on {report['sweep_n']} images): " + ", ".join(
        f"{r['eps']:.3g}: {r['pgd20_acc']:.3f}" for r in report["eps_sweep"]))
    for warning in report["gradient_masking_warnings"]:
        print(f"  WARNING, possible gradient masking: {warning}")
    print(f"Written to {out}")
    return report


def main() -> None:
    run()


if __name__ == "__main__":
    main()
