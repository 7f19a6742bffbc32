import json, sys
sys.path.insert(0, "/work/main")
from benchmarks import end_to_end
def main():
  rows = end_to_end.specs(["sgd", "adahessian", "adahessian update_each=4", "torch_optimizer.Adahessian",
                           "pytorch_optimizer.AdaHessian", "pytorch_optimizer.AdaHessian update_period=4"])
  out = end_to_end.memory_rows("cpu", "resnet18", 32, 2, rows, 10, 200)
  json.dump(out, open("/work/runs/mem_r18.json", "w"), indent=1, default=str)
  for k, v in out.items():
      print(k, {a: v.get(a) for a in ("peak_MB", "growth_MB", "leak", "method", "error")})


if __name__ == "__main__":
    main()
