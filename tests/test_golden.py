"""The golden-loss guard: fixed-seed short runs of each objective (CLIP, SigLIP, CoCa, distillation) must reproduce
the per-step losses, gradient norms and final evaluation stored in `golden/losses.json`, bit for bit.

A refactor must not move any of these numbers: a structural change that does is a bug, not a tolerance to widen.
A deliberate change of the numerics (a new default recipe, a different initialisation) re-records them:

    python tests/test_golden.py --record

Each stored run keeps its whole config (run config and architecture written out in full), so a change of a
default elsewhere does not move a golden run; only the code does. Bit-identity holds for one machine and torch
build (CI runs on the machine kind that recorded them); elsewhere the numbers are compared to 1e-4 instead and
the bit-for-bit test says why it is skipped.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
MICRO = {"embed_dim": 32,
         "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 2, "heads": 2, "vocab_size": 512}}
# The logged quantities compared; "kind: train" rows are logged every step (train.log_every 1).
STEP_KEYS = ("loss", "contrastive", "sigmoid", "caption", "distill", "grad_norm", "lr", "logit_scale")


def _run_dict(name: str, arch: dict, **sections) -> dict:
    base = {"model": {"name": "tiny", "arch": arch},
            "data": {"train_samples": 192, "val_samples": 48, "workers": 0},
            "tokenizer": {"vocab_size": 300},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "train": {"batch_size": 32, "steps": 5, "precision": "fp32", "name": name, "progress": False,
                      "log_every": 1, "tensorboard": False, "seed": 0},
            "eval": {"every_epochs": 0, "batch_size": 48}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def _specs() -> dict[str, dict]:
    """The golden runs as config dicts (before the defaults are written out): `clip` with exact accumulation and
    patch dropout (random draws replayed in the second pass); `distill` reads the teacher the `clip` run saves."""
    coca = {**MICRO, "multimodal": {"layers": 1, "heads": 2, "image_tokens": 4, "pool_heads": 2}}
    return {
        "clip": _run_dict("clip", {**MICRO, "vision": {**MICRO["vision"], "patch_dropout": 0.25}},
                          train={"accum_steps": 2}),
        "siglip": _run_dict("siglip", {**MICRO, "init_logit_scale": 2.302585092994046, "init_logit_bias": -10.0}),
        "coca": _run_dict("coca", coca, model={"name": "coca-tiny", "arch": coca}),
        "distill": _run_dict("distill", MICRO, distill={"teacher": "@clip", "weight": 0.5}),
    }


def full_config(spec: dict) -> dict:
    """`spec` with every default written out (run config and architecture), as stored in the golden file."""
    from cliptrain.base.config import RunConfig, from_dict, to_dict
    from cliptrain.checkpoint.convert import architecture_for_name
    cfg = to_dict(from_dict(RunConfig, spec))
    cfg["model"]["arch"] = to_dict(architecture_for_name(cfg["model"]["name"], **cfg["model"]["arch"])[0])
    return cfg


def fingerprint() -> dict:
    """What bit-identity depends on besides the code: torch build, CPU instruction sets, threads."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx_vnni"})
    return {"torch": torch.__version__, "machine": platform.machine(), "isa": isa, "threads": torch.get_num_threads()}


def run_golden(configs: dict[str, dict], out: Path) -> dict[str, dict]:
    """Train each stored config in `out`; {name: {"steps": [{key: value}], "eval": {metric: value}}}."""
    from cliptrain.base.config import RunConfig, from_dict
    from cliptrain.checkpoint import store as ckpt
    from cliptrain.training.build import build_trainer
    results, run_dirs = {}, {}
    for name, data in configs.items():
        data = json.loads(json.dumps(data))
        data["train"]["output_dir"] = str(out)
        if str(data["distill"].get("teacher") or "").startswith("@"):
            data["distill"]["teacher"] = str(ckpt.list_checkpoints(run_dirs[data["distill"]["teacher"][1:]])[-1])
        trainer = build_trainer(from_dict(RunConfig, data))
        final = trainer.fit()
        run_dirs[name] = trainer.run_dir
        rows = [json.loads(line) for line in (trainer.run_dir / "log.jsonl").read_text().splitlines()]
        steps = [{k: r[k] for k in STEP_KEYS if k in r} | {"step": r["step"]} for r in rows if r["kind"] == "train"]
        results[name] = {"steps": steps, "eval": {k: v for k, v in sorted(final.items())}}
    return results


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing: record it with `python tests/test_golden.py --record`")
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def reproduced(golden, tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(golden["fingerprint"]["threads"])
    return run_golden({name: run["config"] for name, run in golden["runs"].items()}, tmp_path_factory.mktemp("golden"))


def _first_difference(want: dict, got: dict) -> str:
    for i, (w, g) in enumerate(zip(want["steps"], got["steps"])):
        for key in w:
            if w[key] != g.get(key):
                return f"step {w['step']}: {key} {w[key]!r} stored, {g.get(key)!r} now (row {i})"
    if len(want["steps"]) != len(got["steps"]):
        return f"{len(want['steps'])} steps stored, {len(got['steps'])} now"
    for key in want["eval"]:
        if want["eval"][key] != got["eval"].get(key):
            return f"final eval {key}: {want['eval'][key]!r} stored, {got['eval'].get(key)!r} now"
    return "equal"


def test_golden_covers_every_objective(golden):
    runs = golden["runs"]
    assert set(runs) == {"clip", "siglip", "coca", "distill"}
    assert all(len(r["steps"]) == r["config"]["train"]["steps"] for r in runs.values())
    assert "sigmoid" in runs["siglip"]["steps"][0] and "caption" in runs["coca"]["steps"][0]
    assert "distill" in runs["distill"]["steps"][0] and runs["clip"]["config"]["train"]["accum_steps"] == 2
    # the stored runs learn: a later change cannot pass by storing a run that does nothing
    for name, run in runs.items():
        assert run["steps"][-1]["loss"] < run["steps"][0]["loss"], name


def test_golden_losses_are_bit_identical(golden, reproduced):
    if golden["fingerprint"] != fingerprint():
        pytest.skip(f"golden losses were recorded on {golden['fingerprint']}, this is {fingerprint()}: bit-identity "
                    f"is not expected across builds; re-record here with `python tests/test_golden.py --record`")
    for name, run in golden["runs"].items():
        got = reproduced[name]
        assert got == {"steps": run["steps"], "eval": run["eval"]}, f"{name}: {_first_difference(run, got)}"


def test_golden_losses_are_close_anywhere(golden, reproduced):
    for name, run in golden["runs"].items():
        got = reproduced[name]
        assert len(got["steps"]) == len(run["steps"]), name
        for want, have in zip(run["steps"], got["steps"]):
            assert have == pytest.approx(want, rel=1e-4, abs=1e-6), f"{name} step {want['step']}"
        assert got["eval"] == pytest.approx(run["eval"], rel=1e-3, abs=1e-3), name


def record() -> None:
    """Re-record the golden runs on this machine (see the module docstring for when that is right)."""
    import tempfile
    torch.manual_seed(0)
    torch.set_num_threads(2)
    configs = {name: full_config(spec) for name, spec in _specs().items()}
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_golden(configs, Path(tmp))
    golden = {"fingerprint": fingerprint(),
              "runs": {name: {"config": configs[name], **runs[name]} for name in configs}}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()
