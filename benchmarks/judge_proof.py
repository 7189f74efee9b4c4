"""Does the checkpoint judge pick what the tiny world's classifier would? One run of the shipped tiny model, judged
without the classifier (sdlora/judge.py: VAE-feature fidelity, prior kept), then the judge's own images graded by
tiny_world.classify: for every checkpoint x multiplier the concept share (editability prompts: the concept's test
prompts) and the known prompts' attributes kept (prior prompts: tiny_world.KNOWN_PROMPTS).

    python benchmarks/judge_proof.py RUN_DIR --concept sks-purple --samples_per_prompt 2

The classifier's best trade-off is the row with the highest mean of the two shares (ties: earlier, lower). Prints a
markdown table and the judge's pick against that best, and appends one JSON line to
benchmarks/results-judge-proof.jsonl.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdlora import tiny_world  # noqa: E402
from sdlora.judge import Judge, candidates  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results-judge-proof.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--concept", default="sks-purple", choices=("sks-purple", "sks-star"))
    parser.add_argument("--samples_per_prompt", type=int, default=2)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    concept = tiny_world.CONCEPTS[args.concept]
    judge = Judge(args.run, {"prompts": list(concept.prompts), "prior_prompts": list(tiny_world.KNOWN_PROMPTS),
                             "samples_per_prompt": args.samples_per_prompt})
    started = time.time()
    recommendation = judge.judge_all()
    seconds = time.time() - started
    k = args.samples_per_prompt
    edit_start = len(judge.fidelity_prompts) * k
    prior_start = edit_start + len(concept.prompts) * k
    known = [p for p in tiny_world.KNOWN_PROMPTS for _ in range(k)]
    table = []
    for row in judge.judged:  # every candidate x multiplier, scored, in checkpoint order
        concept_share = tiny_world.share(row.images[edit_start:prior_start], concept.attribute, concept.value)
        kept = tiny_world.attribute_share(known, row.images[prior_start:])
        table.append({"checkpoint": row.candidate.label, "multiplier": row.multiplier, "concept": concept_share,
                      "known_kept": kept, "trade_off": (concept_share + kept) / 2, **row.scores})
    best = min(table, key=lambda r: (-r["trade_off"], int(r["checkpoint"].split("-")[-1]) if "-" in r["checkpoint"]
                                     else 10**9, r["multiplier"]))
    pick = next(r for r in table if r["checkpoint"] == recommendation["checkpoint"]
                and r["multiplier"] == recommendation["multiplier"])
    print("| checkpoint | multiplier | judge score | fidelity gain | prior kept | classifier: concept | known kept | "
          "trade-off |\n|---|---|---|---|---|---|---|---|")
    for r in table:
        mark = (" **judge**" if r is pick else "") + (" **classifier**" if r is best else "")
        print(f"| {r['checkpoint']}{mark} | {r['multiplier']:g} | {r['score']:.3f} | {r['fidelity_gain']:.3f} | "
              f"{r.get('prior_kept', float('nan')):.3f} | {r['concept']:.0%} | {r['known_kept']:.0%} | "
              f"{r['trade_off']:.0%} |")
    gap = best["trade_off"] - pick["trade_off"]
    images = len(judge.prompt_list()) * (len(table) + 1)
    print(f"\njudge's pick: {pick['checkpoint']} x {pick['multiplier']:g} (classifier trade-off {pick['trade_off']:.1%});"
          f" classifier's best: {best['checkpoint']} x {best['multiplier']:g} ({best['trade_off']:.1%}); gap "
          f"{gap * 100:.1f} points. Judging {len(candidates(Path(args.run)))} checkpoints x "
          f"{len(judge.settings.multipliers)} multipliers: {images} images in {seconds:.0f} s "
          f"({seconds / images:.3f} s per image, pipeline load included)")
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps({"run": Path(args.run).name, "label": args.label, "concept": args.concept,
                            "samples_per_prompt": k, "pick": [pick["checkpoint"], pick["multiplier"]],
                            "best": [best["checkpoint"], best["multiplier"]], "gap_points": gap * 100,
                            "seconds": seconds, "images": images, "rows": table}) + "\n")


if __name__ == "__main__":
    main()
