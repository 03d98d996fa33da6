"""Run by tests/test_eval_distributed.py under torchrun: evaluate a saved micro model on shapes (and the
same images as a zero-shot folder) in every process and write rank 0's results (not a test module itself)."""
import json
import sys

import torch

from cliptrain.base.distributed import init_distributed, shutdown
from test_eval_distributed import evalset_and_model, zeroshot_task

if __name__ == "__main__":
    from cliptrain.evaluation.encode import EvalContext
    from cliptrain.evaluation.evaluate import evaluate
    world = init_distributed("gloo", timeout_s=60)
    torch.set_num_threads(1)
    model, tokenizer, evalset = evalset_and_model(sys.argv[1])
    results = evaluate(model, evalset, tokenizer, torch.device("cpu"), batch_size=8)
    results.update(zeroshot_task(sys.argv[1]).run(EvalContext(model, tokenizer, None, torch.device("cpu"), batch_size=8)))
    if world.rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)
    shutdown()
