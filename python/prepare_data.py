"""Build the multi-task BIG-bench cache for MoPs training from the `bigbench` sdist (no install).

    python python/prepare_data.py --out data/bigbench            # ~/.cache/mops_kernels/bigbench, else fetched there
    python python/prepare_data.py --sdist ~/bigbench-1.0.0.tar.gz --out data/bigbench

The sdist is bigbench 1.0.0 from PyPI, checked by its sha256 (mops_kernels.training.data.BIGBENCH_SHA256)
wherever it comes from; it is fetched by pip in --require-hashes mode (pip checks that hash before it
runs anything of the archive) and then only read with tarfile, never installed.

The 10 default tasks are generative (a string target, scored here by LM perplexity), have short
instructions (most under 100 tokens, so a CPU run fits in an hour) and >= 200 examples, and were picked
to differ in the skill they exercise so that a gate has something to route on:
    qa_wikidata                    factual recall (short Wikidata questions)
    word_unscrambling              letter-level manipulation
    cryptonite                     cryptic-crossword clues (wordplay)
    tense                          grammatical rewriting of a sentence into another tense
    auto_categorization            naming the category shared by a list of things
    object_counting                counting objects described in a sentence
    matrixshapes                   tracking matrix shapes through algebra (symbolic math)
    international_phonetic_alphabet_transliterate   English <-> IPA transliteration
    word_sorting                   sorting words alphabetically (long, copy-like outputs)
    operators                      applying a newly defined operator (in-context arithmetic)
Each task is shuffled with --seed and cut into train / validation / test (--fractions, default
75/12.5/12.5: every default task then keeps >= 24 validation items, the experiment's minimum) after
keeping at most --max-examples examples.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mops_kernels.training.data import SDIST_CACHE, check_sdist, find_sdist, prepare  # noqa: E402

DEFAULT_TASKS = ("qa_wikidata", "word_unscrambling", "cryptonite", "tense", "auto_categorization",
                 "object_counting", "matrixshapes", "international_phonetic_alphabet_transliterate",
                 "word_sorting", "operators")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", help="bigbench-1.0.0.tar.gz (checked by sha256; default: OUT/_sdist, else downloaded there)")
    ap.add_argument("--out", required=True, help="cache directory to write")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-examples", type=int, default=300, help="per task, before splitting")
    ap.add_argument("--min-examples", type=int, default=30)
    ap.add_argument("--fractions", default="0.75,0.125,0.125", help="train,validation,test")
    args = ap.parse_args(argv)
    sdist = check_sdist(args.sdist) if args.sdist else find_sdist([SDIST_CACHE], download_dir=SDIST_CACHE)
    manifest = prepare(sdist, args.out, args.tasks, seed=args.seed, max_examples=args.max_examples,
                       min_examples=args.min_examples,
                       fractions=tuple(float(x) for x in args.fractions.split(",")))
    for t in manifest["tasks"]:
        print(f"{t:50s} " + " ".join(f"{s}={n}" for s, n in manifest["counts"][t].items()))
    if manifest["skipped"]:
        print("skipped (missing or too few generative examples):", ", ".join(manifest["skipped"]))
    print(json.dumps({k: manifest[k] for k in ("seed", "fractions", "max_examples", "sdist")}))
    return manifest


if __name__ == "__main__":
    main()
