"""Helpers shared by the ``ot-cfm`` commands: constants, option checks and parsers, checkpoint loading,
metrics files."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

import torch

from ot_cfm.training.checkpoint import read_checkpoint
from ot_cfm.utils.validation import check_seed

COUPLERS = ("exact", "sinkhorn", "independent")
PRECISION_CHOICES = ("fp32", "bf16", "fp16")
METRICS_JSON = "metrics.json"
TOY_DEFAULTS = {"source": "8gaussians", "target": "moons"}


def _make_coupler(args, conditional: bool = False):
    """The training coupler of ``args.coupler`` (Sinkhorn with ``args.epsilon``), within classes when
    ``conditional``, its pairs drawn with replacement (torchcfm's plan sampling) with
    ``args.pairs_with_replacement``."""
    from ot_cfm.couplers import (
        ClassConditionalCoupler,
        ExactOTCoupler,
        IndependentCoupler,
        ResampledCoupler,
        SinkhornCoupler,
    )

    coupler = {"exact": ExactOTCoupler, "independent": IndependentCoupler,
               "sinkhorn": lambda: SinkhornCoupler(epsilon=args.epsilon)}[args.coupler]()
    if conditional:
        coupler = ClassConditionalCoupler(coupler)
    return ResampledCoupler(coupler) if args.pairs_with_replacement else coupler


def _coupler_record(args) -> dict:
    """The coupling of a run for its checkpoint metadata and metrics: the coupler's name, and
    ``pairs_with_replacement`` only when set (so checkpoints written before the option still resume)."""
    return {"coupler": args.coupler, **({"pairs_with_replacement": True} if args.pairs_with_replacement else {})}


def _coupler_title(args) -> str:
    """The coupling of a run in figure titles, e.g. "exact coupler, pairs with replacement"."""
    return f"{args.coupler} coupler" + (", pairs with replacement" if args.pairs_with_replacement else "")


def _model_from_spec(spec: dict):
    """The model a checkpoint describes: ``model.config`` (with ``kind``), or a toy MLP's arguments (older
    toy checkpoints have no ``kind``)."""
    from ot_cfm.models import MLP, model_from_config

    return model_from_config(spec) if "kind" in spec else MLP(**spec)


def _load_sampling_model(checkpoint: Path):
    state = read_checkpoint(checkpoint)  # refuses files that would run code, names the file on any fault
    meta = state["metadata"]
    images = isinstance(meta, dict) and "dataset" in meta
    arrays = isinstance(meta, dict) and "data" in meta
    needed = (("model", "dataset", "shape", "conditional") if images else
              ("model", "data", "dim", "conditional", "mean", "std") if arrays else ("model", "source", "target"))
    missing = [k for k in needed if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{checkpoint} lacks {missing} in its metadata (the model's description and the data's "
                         "names); was it written by `ot-cfm train`?")
    model = _model_from_spec(meta["model"])
    if state.get("ema") is not None:  # AveragedModel's state: "module.<name>" entries plus a counter
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    else:
        weights = state["model"]
    model.load_state_dict(weights)
    return model.eval(), meta


def _json_value(value):
    """``value`` with every non-finite float replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _read_metrics(path: Path) -> dict | None:
    """The metrics written by an earlier call, or None when there are none or they are not strict JSON."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    try:
        return json.loads(path.read_text(), parse_constant=refuse)
    except (OSError, ValueError):
        return None


def _image_only_options(args) -> list[str]:
    """The image options given to a toy run."""
    given = [("--model unet", args.model == "unet"), ("--conditional", args.conditional),
             ("--label-dropout", args.label_dropout is not None), ("--guidance", args.guidance is not None),
             ("--data-dir", args.data_dir is not None), ("--eval-every", args.eval_every != 0),
             ("--classifier-steps", args.classifier_steps is not None),
             ("--inception-weights", args.inception_weights is not None),
             ("--eval-solvers", args.eval_solvers is not None), ("--no-eval", args.no_eval)]
    return [flag for flag, present in given if present]


def _finished_earlier(result, out: Path, steps: int) -> bool:
    """Print what ``fit`` did; True when the run had finished before this call and its metrics are valid
    (nothing left to do), False when it trained or its metrics must be written again."""
    if result.steps_trained:
        processes = f" on {result.world_size} processes, each" if result.world_size > 1 else ""
        print(f"trained {result.steps_trained} steps (to step {result.step}) in {result.seconds:.1f} s{processes} with "
              f"{_count(result.workers, 'worker')} and {_count(result.threads, 'torch thread')}; "
              f"final loss {result.loss:.4f}")
        return False
    print(f"the run in {out} had already finished at step {result.step} (--steps {steps}): nothing to train")
    if _read_metrics(out / METRICS_JSON) is None:
        return False
    print(f"its metrics are in {out / METRICS_JSON}")
    return True


def _array_only_options(args) -> list[str]:
    """The options of --data runs given to another run."""
    return [flag for flag, present in (("--label-column", args.label_column is not None),
                                       ("--standardize", args.standardize)) if present]


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {text!r}")


def _seed(text: str) -> int:
    """--seed: an integer in [0, 2**63 - 1] (torch's seeds), refused by argparse naming the option otherwise."""
    try:
        return check_seed(int(text), "the seed")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err) if text.lstrip("-").isdigit() else f"expected an integer, got {text!r}")


def _threads(text: str) -> int | None:
    if text == "auto":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None: those options say in their help what not giving them means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _device_name(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N (checked against the machine later)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def resolve_device(name: str) -> torch.device:
    """The device --device names: "auto" is cuda when ``torch.cuda.is_available()``, else cpu; ValueError when a
    CUDA device is asked for and this machine (or this torch build) has none or not that one. Under torchrun
    (LOCAL_RANK set) "cuda" and "auto" on a CUDA machine mean this process's GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _train_device(args) -> torch.device:
    """The device of a training run, with --precision checked against it (before any data is loaded)."""
    from ot_cfm.training import check_precision

    device = resolve_device(args.device)
    try:
        check_precision(args.precision, device)
    except ValueError as err:
        raise ValueError(f"--precision {args.precision} --device {args.device}: {err}") from None
    return device


def _trained_on_other_rank(trainer, args) -> bool:
    """A data-parallel rank other than 0 (torchrun) trains and stops there: rank 0 holds --out and alone writes
    and evaluates. True when this process was such a rank and has trained."""
    if trainer.is_main:
        return False
    trainer.fit(resume=args.resume, overwrite=args.overwrite)
    return True


def _conditioning(args) -> tuple[float, float]:
    """(guidance scale, label dropout) of a run from --guidance and --label-dropout: 1.0 and, when
    --conditional, 0.1 unless given; both refused without --conditional."""
    guidance = 1.0 if args.guidance is None else args.guidance
    if not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance}")
    if not args.conditional and (args.label_dropout or guidance != 1.0):
        raise ValueError("--label-dropout and --guidance apply to class-conditional runs: add --conditional")
    label_dropout = (0.1 if args.conditional else 0.0) if args.label_dropout is None else args.label_dropout
    return guidance, label_dropout
