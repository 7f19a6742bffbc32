"""How memory.json was made: benchmarks.end_to_end.memory_rows for ResNet-18 batch 32, 2 threads,
memory after step 10 vs step 200 (a fresh process per row). Run from the repository root."""
import json
import os
import sys

sys.path.insert(0, ".")
from benchmarks import end_to_end  # noqa: E402

ROWS = ["sgd", "adahessian", "adahessian update_each=4", "torch_optimizer.Adahessian",
        "pytorch_optimizer.AdaHessian", "pytorch_optimizer.AdaHessian update_period=4"]


def main():
    out = end_to_end.memory_rows("cpu", "resnet18", 32, 2, end_to_end.specs(ROWS), 10, 200)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    for label, row in out.items():
        print(label, {k: row.get(k) for k in ("peak_MB", "growth_MB", "leak", "method", "error")})


if __name__ == "__main__":
    main()
