"""Does `vet` tell backdoored teachers from clean ones? Pre-trains a run's teacher at several
seeds, clean and with a planted BadNets backdoor, and vets every one as `pmafl-teacher vet` does.

    python bench/vet_teachers.py                                               # digits, seeds 0-2
    python bench/vet_teachers.py --set "dataset='fashion-mnist'" --out results/vet-fashion

Each teacher is pre-trained exactly as a run pre-trains its own (`pretrain_teacher` with the run
config's teacher settings; the run's own teacher is seed 0), with `backdoor-rate` (default 0.1)
added for the backdoored ones, and kept in `<out>/teachers/` so that a second call only vets.
One row per teacher: its clean test accuracy and the trigger's attack success rate (ASR), the
smallest reverse-engineered trigger and the median class's, the anomaly index, the verdict, and,
for a flagged teacher, its clean accuracy and ASR once detoxified. `<out>/vet.json` holds the rows
with every class's trigger norm, those of earlier calls for other teachers included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from pmafl.assembly import backdoor_trigger, eval_split, load_data
from pmafl.backdoor import attack_success_rate
from pmafl.config import RunConfig, parse_overrides
from pmafl.data import SPLIT_SEED
from pmafl.evaluate import accuracy
from pmafl.robustkd import VET_IMAGES, VET_STEPS, DetoxifiedTeacher, norm_ratio, vet
from pmafl.teacher import TeacherSettings, load_teacher, pretrain_teacher, save_teacher, teacher_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated pre-training seeds (default 0,1,2)")
    parser.add_argument("--kinds", default="clean,backdoored",
                        help="which teachers: clean, backdoored or both (default clean,backdoored)")
    parser.add_argument("--backdoor-rate", type=float, default=0.1,
                        help="poison rate of the backdoored teachers (default 0.1)")
    parser.add_argument("--steps", type=int, default=VET_STEPS,
                        help=f"Neural Cleanse steps per class (default {VET_STEPS}, as `vet`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override in flwr's syntax, e.g. \"dataset='fashion-mnist'\" "
                             "(repeatable); the trigger keys (backdoor-patch, ...) apply too")
    parser.add_argument("--out", type=Path, default=Path("results/vet-teachers"),
                        help="folder for the teachers and vet.json (default results/vet-teachers)")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    rates = {"clean": 0.0, "backdoored": args.backdoor_rate}
    kinds = {kind: rates[kind] for kind in args.kinds.split(",") if kind in rates}
    if len(kinds) != len(args.kinds.split(",")) or not 0 < args.backdoor_rate <= 1:
        parser.error(f"--kinds takes clean and/or backdoored (got {args.kinds!r}) and --backdoor-rate "
                     f"a share in (0, 1] (got {args.backdoor_rate})")
    seeds = [int(s) for s in args.seeds.split(",")]
    (args.out / "teachers").mkdir(parents=True, exist_ok=True)
    # vet.json keeps the rows of earlier calls for other teachers
    rows = [row for row in (json.loads((args.out / "vet.json").read_text())
                            if (args.out / "vet.json").is_file() else [])
            if not (row["teacher"] in kinds and row["seed"] in seeds)]
    print("| teacher | seed | clean acc | ASR | smallest trigger (class) | median class | ratio "
          "| anomaly index | flagged | detoxified: clean acc | detoxified: ASR |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, rate in kinds.items():
        cfg = RunConfig.from_mapping({**overrides, "backdoor-rate": rate}, where="--set")
        data = load_data(cfg)
        settings = TeacherSettings.from_run_config(cfg)
        test_images, test_labels = eval_split(cfg, data).tensors()
        # the trigger whose ASR is measured: the backdoored teachers' own
        trigger = backdoor_trigger(dataclasses.replace(cfg, backdoor_rate=args.backdoor_rate), data)
        for seed in seeds:
            path = args.out / "teachers" / f"{cfg.dataset}-{kind}-seed{seed}.pt"
            start = time.time()
            if path.is_file():
                teacher, _ = load_teacher(path, data.num_classes)
            else:
                seeded = dataclasses.replace(settings, seed=seed)
                teacher = pretrain_teacher(data, seeded)
                save_teacher(teacher, path, {**teacher_record(data, seeded), "seed": seed})
            pretrain_s = time.time() - start
            images = data.public.tensors()[0][:VET_IMAGES]
            start = time.time()
            result = vet(teacher, cfg.teacher_model, images, args.steps, seed=SPLIT_SEED)
            row = {"teacher": kind, "seed": seed, "poison_rate": rate, "norms": result.norms,
                   "target": result.target, "anomaly_index": result.anomaly_index,
                   "flagged": result.backdoored, "channels": result.channels,
                   "clean_acc": accuracy(teacher, test_images, test_labels),
                   "asr": attack_success_rate(teacher, test_images, test_labels, trigger),
                   "pretrain_seconds": round(pretrain_s, 1), "vet_seconds": round(time.time() - start, 1)}
            if result.backdoored:
                detox = DetoxifiedTeacher(teacher, result.stage, result.mask, result.pattern).eval()
                row["detox_clean_acc"] = accuracy(detox, test_images, test_labels)
                row["detox_asr"] = attack_success_rate(detox, test_images, test_labels, trigger)
            rows.append(row)
            smallest, median = min(result.norms), statistics.median(result.norms)
            detox = (f"{row['detox_clean_acc']:.3f} | {row['detox_asr']:.3f}" if result.backdoored
                     else "- | -")
            print(f"| {kind} | {seed} | {row['clean_acc']:.3f} | {row['asr']:.3f} | {smallest:.1f} "
                  f"({result.target}) | {median:.1f} | {norm_ratio(result.norms):.2f} | "
                  f"{result.anomaly_index:.2f} | {'yes' if result.backdoored else 'no'} | {detox} |",
                  flush=True)
            (args.out / "vet.json").write_text(json.dumps(rows, indent=1))
    print(f"{len(kinds) * len(seeds)} teachers on {len(test_labels)} test images; ASR with the "
          f"{trigger.patch}x{trigger.patch} trigger to class {trigger.target}; "
          f"rows in {args.out / 'vet.json'}")


if __name__ == "__main__":
    main()
