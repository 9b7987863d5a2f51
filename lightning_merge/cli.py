"""``lm-merge``: the entry point — fit / validate / test / predict / merge (`lightning_merge.lightning_cli`) and the
study runner (``reproduce``). It imports Lightning and torch only once a subcommand runs, so ``lm-merge --help``
answers at once."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from lightning_merge.errors import LightningMergeError

# The top-level help, kept here so that it needs no import of Lightning; every subcommand's own ``--help`` is the
# LightningCLI's (or the study runner's) and lists all its options.
SUBCOMMANDS = {
    "fit": "train a model from a config (configs/mlm.yaml: pretrain an MLM; configs/glue/*.yaml: fine-tune)",
    "validate": "run a model's validation loop",
    "test": "run a model's test loop",
    "predict": "run a model's predict loop",
    "merge": "align model B to model A with every method and measure loss barriers (configs/merge/*.yaml)",
    "reproduce": "run the whole study from one YAML: pretrain, fine-tune, merge every pair, report",
}
TOP_LEVEL_HELP = (
    "usage: lm-merge {" + ",".join(SUBCOMMANDS) + "} ...\n\n"
    "lm-merge: pretrain BERT MLMs from seeds (fit), fine-tune them (fit with a GLUE config), merge two models and\n"
    "measure loss barriers (merge), or run the whole study from one YAML (reproduce).\n\nsubcommands:\n"
    + "".join(f"  {name:<10} {text}\n" for name, text in SUBCOMMANDS.items())
    + "\nRun `lm-merge <subcommand> --help` for its options (e.g. `lm-merge merge --help`)."
)


def run_reproduce(args: list[str]) -> None:
    """``lm-merge reproduce``: the study runner's own jsonargparse CLI (it drives fit/merge runs, not a Trainer)."""
    from jsonargparse import auto_cli

    from lightning_merge.study import reproduce

    auto_cli(reproduce, args=args, as_positional=False, parser_mode="yaml", exit_on_error=False)


def build_cli(args: list[str] | None = None, run: bool = True) -> Any:
    """Build (and by default run) the LightningCLI; tests call this with ``args`` instead of a subprocess."""
    from lightning_merge.lightning_cli import build_cli as build

    return build(args, run)


# jsonargparse explains a bad key through every union subtype it tried; the useful clause is one of these.
_ARGUMENT_PROBLEMS = re.compile(
    r"(Option '[^']+' is not accepted|Key '[^']+' is not expected|[Uu]nrecognized arguments: \S+)"
)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _argument_problem(err: BaseException) -> str:
    text = _one_line(err)
    problem = _ARGUMENT_PROBLEMS.search(text)
    key = re.match(r'Parser key "([^"]+)"', text)
    if problem:
        return f"{key.group(1) + ': ' if key else ''}{problem.group(1).strip()}"
    return text


def _user_error(err: BaseException | None) -> LightningMergeError | None:
    """The user-caused error behind ``err``, if any (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LightningMergeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one ``error:`` line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = sys.argv[1:] if argv is None else argv
    if command in (["--help"], ["-h"]):
        print(TOP_LEVEL_HELP)
        return
    try:
        if command[:1] == ["reproduce"]:
            try:
                run_reproduce(command[1:])
            except KeyboardInterrupt:  # the study has said which stages it stopped
                sys.exit(130)
        else:
            build_cli(argv)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is not None:
            print(f"error: {_one_line(user_error)}", file=sys.stderr)
            sys.exit(2)
        if type(err).__name__ == "ArgumentError":  # jsonargparse's bad key/value: one line, not a usage dump
            print(f"error: {_argument_problem(err)} (see lm-merge --help)", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
