"""Command-line options that several commands share, and what they become in the library.

Not a command itself: `generate` and `chat` take the generation options; every command with
`--weights` (`generate`, `chat`, `eval`, `bench`), `--model` or `--threads` takes the one
definition here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # heavy modules are imported when a command runs
    from torch import nn

    from tilevlm.inference.sampling import SamplingParams
    from tilevlm.weights.loading import ModelSource

AUTO_WEIGHTS = "auto"
LOADED_DTYPE = "bf16 on CUDA, fp32 on CPU"  # what `auto` keeps: the dtype the model loads in


def add_weights_argument(parser: argparse.ArgumentParser, purpose: str, auto: str) -> None:
    """`--weights`: how the weights are stored for `purpose`; `auto` keeps `auto` (in words)."""
    from tilevlm.inference.quantize import WEIGHT_FORMATS

    parser.add_argument("--weights", default=AUTO_WEIGHTS, choices=(AUTO_WEIGHTS, *WEIGHT_FORMATS),
                        help=f"how the weights are stored for {purpose}. {AUTO_WEIGHTS}: {auto}. "
                        "bf16, int8 and int4 (weight-only; int4 in groups of 32, the LM head in "
                        "int8) read fewer bytes per token, and a decode step is bound by those "
                        "bytes, so they generate faster, with slightly different numbers "
                        "(docs/performance.md has the figures and what each costs)")


def weights_format(args: argparse.Namespace) -> str | None:
    """The format `--weights` names, or None for `auto`."""
    return None if args.weights == AUTO_WEIGHTS else args.weights


def store_weights(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The model with its weights stored as `--weights` asks (`inference_weights`)."""
    from tilevlm.inference.quantize import inference_weights

    weights = weights_format(args)
    return model if weights is None else inference_weights(model, weights)


MODEL_HELP = ("a model directory (from `tilevlm build`, `merge` or a run's model/), a "
              "checkpoint, a nanoVLM checkpoint, an Idefics3 / SmolVLM directory as transformers "
              "saves it, or a run folder of `tilevlm train` (its final model, else its latest "
              "checkpoint)")


def add_model_argument(parser: argparse.ArgumentParser | argparse._ActionsContainer,
                       required: bool = True, help: str = MODEL_HELP) -> None:
    """`--model PATH`; `model_source(args)` says what it is."""
    parser.add_argument("--model", required=required, metavar="PATH", help=help)


def model_source(args: argparse.Namespace) -> ModelSource:
    """What `--model` stands for (`weights.loading.model_source`: logs which directory when it
    chose one in a run folder)."""
    from tilevlm.weights.loading import model_source as resolve

    return resolve(args.model)


def add_new_out_arguments(parser: argparse.ArgumentParser) -> None:
    """`--out DIR` for a new model directory, and `--force` (`check_new_out`, `write_new_out`)."""
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where to write the model (a new or empty directory)")
    add_force_argument(parser)


def add_force_argument(parser: argparse.ArgumentParser, what: str = "--out") -> None:
    parser.add_argument("--force", action="store_true",
                        help=f"replace {what} when it already holds files (it is replaced whole: "
                        "none of its old files is kept)")


def check_new_out(args: argparse.Namespace, name: str = "--out", dest: str = "out") -> None:
    """A ValueError, before any work, when the output directory is a file, lies under a file, or
    holds anything and --force is not given: nothing is overwritten unasked."""
    out = Path(getattr(args, dest))
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == out else f"lies under the file {parent}"
            raise ValueError(f"{name} {out} {what}; give a new directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{name} {out} already holds files; give a new directory, or --force to "
                         "replace it whole")


def write_new_out(out: str | Path, write: Callable[[Path], None]) -> Path:
    """The output directory `out` written whole (`files.atomic_directory`): `write(tmp)` fills a
    temporary directory beside it, which then replaces `out`. A kill or a full disk leaves the
    old `out` (or none), never a mix of old and new files or half a model."""
    from tilevlm.files import atomic_directory, make_output_dir

    out = Path(out)
    make_output_dir(out.parent, "parent of the output directory")
    return atomic_directory(out, write, prefix=f".{out.name}.tmp-")


def check_output_file(path: str | Path, name: str) -> None:
    """A ValueError, before any work, when the output file `path` is a directory or lies under
    a file (it could not be written at the end)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a directory; give a file name")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{name} {path} lies under the file {parent}; give another path")


def check_outputs(outputs: dict[str, str | Path | None],
                  inputs: dict[str, str | Path | None]) -> None:
    """Output paths checked before any work (`files.path_overlap`): no output is an input or
    holds one (writing or replacing it would lose the input), no two outputs are the same. The
    dicts map an option's name to its path (None: not given)."""
    from tilevlm.files import path_overlap

    given = {k: Path(v) for k, v in outputs.items() if v is not None}
    sources = {k: Path(v) for k, v in inputs.items() if v is not None}
    for name, out in given.items():
        for source_name, source in sources.items():
            how = path_overlap(out, source)
            if how is not None:
                raise ValueError(f"{name} {out} {how} {source_name} {source}: an output may not "
                                 "be an input or hold one; give another path")
    names = list(given)
    for i, name in enumerate(names):
        for other in names[i + 1:]:
            if path_overlap(given[name], given[other]) == "is":
                raise ValueError(f"{name} and {other} name the same path {given[name]}; give "
                                 "each output its own")


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """`--device`, for every command that runs the model."""
    from tilevlm.device import DEVICE_HELP

    parser.add_argument("--device", default=default, help=DEVICE_HELP)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads N`: the one definition, on every command that computes (`apply_threads`)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice, one per core); on a "
                        "busy machine fewer, even 1, can be many times faster")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads to `--threads` (when the command has it and it was given)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, device, sampling and weight options of `generate` and `chat`."""
    add_model_argument(parser)
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer directory (needed for nanoVLM checkpoints)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="the longest answer, in tokens (generation also stops at the end "
                        "of the model's turn or a --stop text)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text appears (repeatable)")
    add_device_argument(parser)
    add_weights_argument(parser, "generation", LOADED_DTYPE)
    add_threads_argument(parser)


def check_generation_arguments(args: argparse.Namespace) -> None:
    """The generation options of `generate` and `chat`, checked before anything loads."""
    sampling_params(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def check_max_new_tokens(max_new_tokens: int, config: Any) -> None:
    """A ValueError, before the weights load, when --max-new-tokens alone fills the model's
    positions (no prompt could go with it)."""
    limit = config.lm_max_position_embeddings
    if max_new_tokens >= limit:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"model's {limit} positions (lm_max_position_embeddings)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling options as SamplingParams (a ValueError for a bad value)."""
    from tilevlm.inference.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty)
