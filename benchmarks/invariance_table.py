"""Table of the invariance tests' float64 distances, correct and deliberately broken.

    KD_TEST_RECORD=/tmp/rec.jsonl python -m pytest -q -n 2 --dist loadfile tests
    XLA_FLAGS="--xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type=" \\
        KD_TEST_RECORD=/tmp/rec_avx2.jsonl python -m pytest -q -n 2 --dist loadfile tests
    python benchmarks/invariance_table.py default=/tmp/rec.jsonl avx2=/tmp/rec_avx2.jsonl

Each test writes its distances through `tests/helpers.record`; a name ending in "(broken)" is
the test's deliberately broken variant, which must land far from the correct one.
"""

import json
import sys


def main(argv):
    runs = dict(a.split("=", 1) for a in argv)
    values = {}
    for label, path in runs.items():
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                values.setdefault(r["what"], {})[label] = r["distance"]
    print("| what | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for what, by in values.items():
        print(f"| {what} | " + " | ".join(f"{by[k]:.1e}" if k in by else "-" for k in runs) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
