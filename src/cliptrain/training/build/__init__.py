"""Builders: a RunConfig becomes the parts of a run, each from its own builder (data and tokenizer: `data`; model:
`model`; evaluators: `evaluators`; objective and optimizer: objectives / training.optim), assembled by `run`."""
from cliptrain.checkpoint.load import load_checkpoint
from cliptrain.training.build.data import (SHAPES_TRAIN_SAMPLES, build_sources, build_tokenizer, build_train_data,
                                           check_tokenizer, source_captions)
from cliptrain.training.build.evaluators import build_evalset, build_file_tasks, build_zeroshot_task, eval_transform
from cliptrain.training.build.model import from_pretrained, load_teacher, prepare_model, preprocessing_from_model
from cliptrain.training.build.run import build_parts, build_trainer, resolve_run_dir, resume_point, train_transform

__all__ = ["SHAPES_TRAIN_SAMPLES", "build_evalset", "build_file_tasks", "build_parts", "build_sources", "build_tokenizer",
           "build_train_data", "build_trainer", "build_zeroshot_task", "check_tokenizer", "eval_transform",
           "from_pretrained", "load_checkpoint", "load_teacher", "prepare_model", "preprocessing_from_model",
           "resolve_run_dir", "resume_point", "source_captions", "train_transform"]
